"""The backtest's report: a text table for the terminal, and one HTML file with charts.

The HTML is a single file with its charts as inline SVG and its style inline: no script, no
font, nothing fetched, so it opens offline on the meeting room's machine.
"""

from __future__ import annotations

import html
from datetime import datetime
from typing import Any

from pipeline.core.backtest import DIMENSIONS, NIGHT, Incident, Pair, Result, compare, night_figures
from pipeline.core.notices import tier_cn
from pipeline.shared.console import pad

TIERS = ["city", "district", "street", "dept", "grid", "owner"]
DAYS_SHOWN = 30                 # text: at most this many days where the sides differ
LISTED = 25                     # text: at most this many incidents of each "only" list
CURRENT_COLOUR, NEW_COLOUR = "#8a8f98", "#1f6fd1"


def _signed(v: int) -> str:
    return f"{v:+,}" if v else "0"


def duration(ms: int) -> str:
    """-1h30m, +45m, +20s, 0."""
    if ms == 0:
        return "0"
    sign = "+" if ms > 0 else "-"
    s = abs(ms) // 1000
    d, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    parts = [f"{d}d" if d else "", f"{h}h" if h else "", f"{m}m" if m else "",
             f"{sec}s" if sec and not d else ""]
    return sign + ("".join(parts) or f"{abs(ms)}ms")


def _keys(result: Result, dim: str) -> list[str]:
    keys = result.current.tally.counts[dim].keys() | result.new.tally.counts[dim].keys()
    if dim == "tier":
        return [t for t in TIERS if t in keys] + sorted(keys - set(TIERS))
    return sorted(keys)


def _label(result: Result, dim: str, key: str) -> str:
    if dim == "district":
        name = result.current.tally.district_names.get(key) or result.new.tally.district_names.get(key)
        return f"{name} {key}" if name else key
    if dim == "tier":
        return f"{tier_cn(key)} {key}" if key in TIERS else key
    if dim == "rule" and key in result.differing:
        return f"{key} *"
    return key


def rows(result: Result, dim: str) -> list[tuple[str, int, int, int, int]]:
    """(label, incidents current, new, notices current, new) per key of a dimension."""
    a, b = result.current.tally.counts[dim], result.new.tally.counts[dim]
    out = []
    for k in _keys(result, dim):
        ca, cb = a.get(k, [0, 0]), b.get(k, [0, 0])
        out.append((_label(result, dim, k), ca[0], cb[0], ca[1], cb[1]))
    return out


def _when(inc: Incident) -> str:
    return inc.started[:16].replace("T", " ")


def _first(inc: Incident) -> str:
    value = "" if inc.value is None else f"{inc.value:g}{inc.unit}"
    limit = "" if inc.threshold is None else f" (threshold {inc.threshold:g}{inc.unit})"
    return f"{value}{limit}"


# ---- text ---------------------------------------------------------------------------------
def text(result: Result, history: str, tz_name: str) -> str:
    cur, new = result.current, result.new
    only_cur, only_new, pairs = compare(result)
    out = [f"backtest of {history}: NEW = {new.name} against CURRENT = {cur.name}",
           f"{result.inputs:,} inputs, {result.readings:,} readings"
           + (f" ({result.missing:,} missing cells skipped)" if result.missing else "")
           + f", {_period(result, tz_name)}; dead letters: current {cur.tally.dead_letters:,}, "
           f"new {new.tally.dead_letters:,}"]
    if not result.differing:
        out.append("the two rule sets are the same: every count below is equal")
    else:
        out.append(f"rules that differ (*): {', '.join(sorted(result.differing))}")
    head = (f"{'':34}{'incidents':>24}    {'notices':>24}\n"
            f"{'':34}{'current':>8}{'new':>8}{'Δ':>8}    {'current':>8}{'new':>8}{'Δ':>8}")
    out += ["", head]
    for dim in DIMENSIONS:
        table = rows(result, dim)
        if dim == "day":
            differ = [r for r in table if r[1] != r[2] or r[3] != r[4]]
            out.append(f"by day (local date: incidents started, notices sent): {len(table):,} "
                       f"days with either, {len(differ):,} where the sides differ"
                       + (f", the first {DAYS_SHOWN}:" if len(differ) > DAYS_SHOWN else
                          ":" if differ else ""))
            table = differ[:DAYS_SHOWN]
        else:
            out.append(f"by {dim}")
        for label, ia, ib, na, nb in table:
            out.append(f"  {pad(label, 32)}{ia:>8,}{ib:>8,}{_signed(ib - ia):>8}    "
                       f"{na:>8,}{nb:>8,}{_signed(nb - na):>8}")
    out += ["", f"pushes per grid worker per night ({NIGHT[0]:02}:00-{NIGHT[1]:02}:00 "
            f"{tz_name}; a night is named by the date of its evening)"]
    fa, fb = night_figures(cur.tally), night_figures(new.tally)
    out.append(f"{'':34}{'current':>8}{'new':>8}")
    for label, key, fmt in (("worker-nights with a push", "worker_nights", "{:,}"),
                            ("pushes at night", "pushes", "{:,}"),
                            ("mean per worker-night", "mean", "{:.1f}"),
                            ("median per worker-night", "median", "{:,}"),
                            ("most in one night", "max", "{:,}"),
                            ("worker-nights over 5 pushes", "over_5", "{:,}")):
        out.append(f"  {pad(label, 32)}{fmt.format(fa[key]):>8}{fmt.format(fb[key]):>8}")
    for side, f in (("current", fa), ("new", fb)):
        if f["max"]:
            out.append(f"  most in one night, {side}: {f['max_at']}")
    for title, lst in (("incidents only the current rules have", only_cur),
                       ("incidents only the new rules have", only_new)):
        out += ["", f"{title}: {len(lst):,}" + (" (with their first reading)" if lst else "")]
        for inc in lst[:LISTED]:
            out.append(f"  {_when(inc)}  {inc.rule}  {inc.subject}  {inc.place}  {_first(inc)}  "
                       f"{inc.severity}")
        if len(lst) > LISTED:
            out.append(f"  … {len(lst) - LISTED:,} more (--json or --html lists them all)")
    out += ["", time_to_fire_line(pairs)]
    for p in sorted(pairs, key=lambda p: (-abs(p.delta_ms), p.current.started_ms))[:10]:
        if p.delta_ms:
            out.append(f"  {p.current.rule}  {p.current.subject}  current {_when(p.current)}, "
                       f"new {_when(p.new)} ({duration(p.delta_ms)})")
    out.append(f"\nread and evaluated in {result.seconds:.1f}s")
    return "\n".join(out) + "\n"


def _period(result: Result, tz_name: str) -> str:
    if result.first_ms is None or result.last_ms is None:
        return "no readings"
    from zoneinfo import ZoneInfo
    tz = ZoneInfo(tz_name)
    a = datetime.fromtimestamp(result.first_ms / 1000, tz)
    b = datetime.fromtimestamp(result.last_ms / 1000, tz)
    return f"{a:%Y-%m-%d %H:%M} to {b:%Y-%m-%d %H:%M}"


def time_to_fire_line(pairs: list[Pair]) -> str:
    if not pairs:
        return "time to fire: no incident of a differing rule is on both sides"
    deltas = sorted(p.delta_ms for p in pairs)
    earlier = sum(1 for d in deltas if d < 0)
    later = sum(1 for d in deltas if d > 0)
    return (f"time to fire, {len(pairs):,} incidents both sides have (same rule and subject, "
            f"overlapping): the new rules fire earlier in {earlier:,}, later in {later:,}, at the "
            f"same time in {len(pairs) - earlier - later:,}; median {duration(deltas[len(deltas) // 2])}"
            f", from {duration(deltas[0])} to {duration(deltas[-1])}")


# ---- HTML ---------------------------------------------------------------------------------
def bars(title: str, labels: list[str], a: list[float], b: list[float],
         names: tuple[str, str] = ("current", "new"), horizontal: bool = False) -> str:
    """A grouped bar chart of two series as inline SVG."""
    e = html.escape
    top = max([*a, *b, 1])
    legend = (f'<rect x="0" y="4" width="12" height="12" fill="{CURRENT_COLOUR}"/>'
              f'<text x="16" y="14">{e(names[0])}</text>'
              f'<rect x="110" y="4" width="12" height="12" fill="{NEW_COLOUR}"/>'
              f'<text x="126" y="14">{e(names[1])}</text>')
    parts = []
    if horizontal:
        left, row, w = 260, 26, 560
        h = 30 + row * len(labels)
        for i, (lab, va, vb) in enumerate(zip(labels, a, b, strict=True)):
            y = 30 + i * row
            parts.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{e(lab)}</text>')
            for j, (v, c) in enumerate(((va, CURRENT_COLOUR), (vb, NEW_COLOUR))):
                bw = w * v / top
                parts.append(f'<rect x="{left}" y="{y + 2 + j * 11}" width="{bw:.1f}" height="10" '
                             f'fill="{c}"><title>{e(lab)}: {v:,}</title></rect>')
                parts.append(f'<text x="{left + bw + 4:.1f}" y="{y + 11 + j * 11}" '
                             f'class="n">{v:,}</text>')
        total_w = left + w + 60
    else:
        left, plot_h, w = 50, 220, 860
        h = plot_h + 80
        n = max(len(labels), 1)
        slot = w / n
        every = max(1, round(n / 24))              # at most ~24 labels along the axis
        parts.append(f'<text x="{left - 6}" y="34" text-anchor="end" class="n">{top:,.0f}</text>'
                     f'<line x1="{left}" y1="{30 + plot_h}" x2="{left + w}" y2="{30 + plot_h}" '
                     'stroke="#999"/>')
        for i, (lab, va, vb) in enumerate(zip(labels, a, b, strict=True)):
            x = left + i * slot
            for j, (v, c) in enumerate(((va, CURRENT_COLOUR), (vb, NEW_COLOUR))):
                bh = plot_h * v / top
                parts.append(f'<rect x="{x + j * slot * 0.45 + slot * 0.05:.1f}" '
                             f'y="{30 + plot_h - bh:.1f}" width="{max(slot * 0.42, 0.5):.1f}" '
                             f'height="{bh:.1f}" fill="{c}"><title>{e(lab)}: {v:,}</title></rect>')
            if i % every == 0:
                parts.append(f'<text x="{x + slot / 2:.1f}" y="{46 + plot_h}" '
                             f'transform="rotate(45 {x + slot / 2:.1f} {46 + plot_h})">{e(lab)}</text>')
        total_w = left + w + 20
    return (f'<figure><figcaption>{e(title)}</figcaption><svg xmlns="http://www.w3.org/2000/svg" '
            f'width="{total_w}" height="{h}" font-size="12" font-family="sans-serif">'
            f'<g>{legend}</g>{"".join(parts)}</svg></figure>')


def _table(head: list[str], body: list[list[Any]]) -> str:
    e = html.escape
    th = "".join(f"<th>{e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{e(f'{c:,}' if isinstance(c, int) else str(c))}</td>"
                                   for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _count_table(result: Result, dim: str) -> str:
    return _table([dim, "incidents current", "new", "Δ", "notices current", "new", "Δ"],
                  [[lab, ia, ib, _signed(ib - ia), na, nb, _signed(nb - na)]
                   for lab, ia, ib, na, nb in rows(result, dim)])


def _over_time(result: Result) -> tuple[str, list[str], list[int], list[int]]:
    """Incidents started per day, or per month over a history longer than two months."""
    a, b = result.current.tally.counts["day"], result.new.tally.counts["day"]
    days = sorted(a.keys() | b.keys())
    if not days:
        return "day", [], [], []
    monthly = (datetime.fromisoformat(days[-1]) - datetime.fromisoformat(days[0])).days > 62
    cut = 7 if monthly else 10
    keys = sorted({d[:cut] for d in days})
    if monthly:                               # every month between, empty ones included
        y, m = int(keys[0][:4]), int(keys[0][5:7])
        keys = []
        while f"{y:04}-{m:02}" <= days[-1][:7]:
            keys.append(f"{y:04}-{m:02}")
            y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    va = dict.fromkeys(keys, 0)
    vb = dict.fromkeys(keys, 0)
    for src, dst in ((a, va), (b, vb)):
        for d, (inc, _) in src.items():
            if d[:cut] in dst:
                dst[d[:cut]] += inc
    return ("month" if monthly else "day"), keys, list(va.values()), list(vb.values())


def _incident_rows(lst: list[Incident]) -> list[list[Any]]:
    return [[_when(i), i.rule, i.subject, i.place, _first(i), i.severity,
             "open at the end" if i.ended_ms is None else ""] for i in lst]


def html_report(result: Result, history: str, tz_name: str) -> str:
    e = html.escape
    cur, new = result.current, result.new
    only_cur, only_new, pairs = compare(result)
    unit, keys, va, vb = _over_time(result)
    rule_rows = rows(result, "rule")
    tier_rows = rows(result, "tier")
    fa, fb = night_figures(cur.tally), night_figures(new.tally)
    hist = list(fa["histogram"])
    charts = [
        bars(f"incidents started per {unit}", keys, va, vb),
        bars("incidents per rule (* differs)", [r[0] for r in rule_rows],
             [r[1] for r in rule_rows], [r[2] for r in rule_rows], horizontal=True),
        bars("notices per tier", [r[0] for r in tier_rows], [r[3] for r in tier_rows],
             [r[4] for r in tier_rows], horizontal=True),
        bars(f"worker-nights by pushes per night ({NIGHT[0]:02}:00-{NIGHT[1]:02}:00 {tz_name})",
             hist, [fa["histogram"][k] for k in hist], [fb["histogram"][k] for k in hist]),
    ]
    night_rows = [[label, fmt.format(fa[k]), fmt.format(fb[k])] for label, k, fmt in (
        ("worker-nights with a push", "worker_nights", "{:,}"), ("pushes at night", "pushes", "{:,}"),
        ("mean per worker-night", "mean", "{:.1f}"), ("median per worker-night", "median", "{:,}"),
        ("most in one night", "max", "{:,}"), ("worker-nights over 5 pushes", "over_5", "{:,}"))]
    differ = ", ".join(sorted(result.differing)) or "none: the two rule sets are the same"
    sections = [
        f"<h1>Backtest: {e(new.name)} against {e(cur.name)}</h1>",
        f"<p>History <code>{e(history)}</code>: {result.inputs:,} inputs, "
        f"{result.readings:,} readings, {e(_period(result, tz_name))}. Dead letters: current "
        f"{cur.tally.dead_letters:,}, new {new.tally.dead_letters:,}. Rules that differ: "
        f"{e(differ)}.</p>",
        *charts,
        "<h2>By rule</h2>", _count_table(result, "rule"),
        "<h2>By district</h2>", _count_table(result, "district"),
        "<h2>By tier</h2>", _count_table(result, "tier"),
        f"<h2>Pushes per grid worker per night</h2><p>A night is {NIGHT[0]:02}:00-{NIGHT[1]:02}:00 "
        f"{e(tz_name)}, named by the date of its evening.</p>",
        _table(["", "current", "new"], night_rows),
        f"<h2>Incidents only the current rules have ({len(only_cur):,})</h2>",
        _table(["started", "rule", "subject", "place", "first reading", "highest", ""],
               _incident_rows(only_cur)),
        f"<h2>Incidents only the new rules have ({len(only_new):,})</h2>",
        _table(["started", "rule", "subject", "place", "first reading", "highest", ""],
               _incident_rows(only_new)),
        f"<h2>Time to fire</h2><p>{e(time_to_fire_line(pairs))}</p>",
        _table(["rule", "subject", "current fires", "new fires", "difference"],
               [[p.current.rule, p.current.subject, _when(p.current), _when(p.new),
                 duration(p.delta_ms)] for p in pairs if p.delta_ms]),
        "<h2>By day</h2>", _count_table(result, "day"),
    ]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1000px}table{border-collapse:"
             "collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}figure{margin:1em 0}"
             "figcaption{font-weight:bold}.n{fill:#333}")
    return (f'<!DOCTYPE html>\n<html lang="zh-CN"><head><meta charset="utf-8"><title>cityops '
            f'backtest</title><style>{style}</style></head><body>{"".join(sections)}</body></html>\n')
