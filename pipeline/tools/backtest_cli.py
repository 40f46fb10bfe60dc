"""`cityops backtest`: load and check both rule sets and the history's source, run, report.

Every mistake in what is given (a missing file, a rule pack or params file that does not
check, a CSV without its map, a bad history address) stops before anything runs, with the file
and line (rule files) or the flag, as the other commands do.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from rules.yamlfile import ConfigError

BUILTIN = "builtin"


def _rules(packs: list[str], params: str | None, routing: str | None, only: list[str], flag: str):
    from rules.compiler import load_rules
    extra = [p for p in packs if p != BUILTIN]
    for p in extra:
        if not Path(p).exists():
            raise ConfigError(p, None, f"no such rule file or folder (given to {flag}; "
                              f"`{BUILTIN}` means the built-in packs)")
    for f in (params, routing):
        if f and not Path(f).exists():
            raise ConfigError(f, None, "no such file")
    rs = load_rules(extra, routing, params=params)
    if only:
        try:
            rs = rs.select(only)
        except ConfigError as exc:
            raise ConfigError("--only", None, f"{exc.message.split(';')[0]} among the rules of "
                              f"{flag} {' '.join(packs)}") from None
    return rs


def _time(text: str | None, tz: ZoneInfo, flag: str) -> int | None:
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(flag, None, f"{text!r}: write a time as 2026-07-01T00:00:00+08:00 or a "
                          "date as 2026-07-01 (the city's time zone)") from None
    return int((t if t.tzinfo else t.replace(tzinfo=tz)).timestamp() * 1000)


def run(args: argparse.Namespace) -> int:
    from connectors.history_export import HistoryError, export_url, is_history_url, read_readings
    from pipeline.core import history
    from pipeline.tools.replay_args import replay_knobs
    from pipeline.core.backtest import Side, as_json, backtest
    from pipeline.tools.backtest_report import html_report, text
    from pipeline.core.engine import EngineSettings
    from pipeline.core.registry import check_districts
    from pipeline.core.registry import load as load_registry
    from pipeline.core.replay import load_mapping

    src = args.history
    remote = is_history_url(src)
    if remote:
        try:
            export_url(src)                      # a clear error now, not after loading rules
        except HistoryError as exc:
            raise ConfigError("--history", None, str(exc)) from None
        if args.csv_map:
            raise ConfigError("--csv-map", None, "a CSV map is for a CSV file, not influx://")
    else:
        if args.since or args.until:
            raise ConfigError("--from" if args.since else "--to", None, "a time range selects "
                              "from an influx:// history; a file is read whole")
        if not Path(src).exists():
            raise ConfigError(src, None, "no such file (--history: JSONL, CSV with --csv-map, or "
                              "influx://HOST:PORT)")
        if args.csv_map and not args.csv_map.exists():
            raise ConfigError(args.csv_map, None, "no such file")
        if not args.csv_map and Path(src).suffix.lower() == ".csv":
            raise ConfigError(src, None, "a CSV needs --csv-map MAP.yaml (which columns are time "
                              "and which feed which sensor); see docs/replay.md")
    mapping = load_mapping(args.csv_map) if args.csv_map else None
    # a CSV's rows share one time column, and recorded history comes back in time order
    ack_after, quorum = replay_knobs(args, 1 if mapping or remote else 2)
    if args.batch < 1:
        raise ConfigError("--batch", None, f"{args.batch} is not a number of inputs")

    new_rs = _rules(args.rules, args.params, args.routing, args.only, "--rules")
    cur_rs = _rules(args.against, args.against_params, args.against_routing or args.routing,
                    args.only, "--against")
    reg = load_registry(args.registry, {**cur_rs.kinds, **new_rs.kinds})
    check_districts(new_rs.packs, new_rs.sources, reg, args.params)
    check_districts(cur_rs.packs, cur_rs.sources, reg, args.against_params)
    tz_name = str(reg.tz.key)

    tty = sys.stderr.isatty()
    shown = [0.0]

    def say(line: str, force: bool = False) -> None:
        now = time.monotonic()
        if tty and (force or now - shown[0] >= 0.25):
            shown[0] = now
            print(f"\r\x1b[K  {line}", end="", file=sys.stderr, flush=True)

    batch = 1 if ack_after is not None else args.batch
    if remote:                                   # read once, before the second process forks
        since, until = _time(args.since, reg.tz, "--from"), _time(args.until, reg.tz, "--to")
        try:
            recorded = read_readings(src, reg.kinds, since, until,
                                     progress=lambda s, p: say(f"reading {src}: {s:,} series, {p:,} readings"))
        except HistoryError as exc:
            raise ConfigError("--history", None, str(exc)) from None

    def open_history():
        seen = history.Progress()
        if remote:
            return history.recorded_batches(recorded, batch, seen), seen
        if mapping is not None:
            return history.csv_batches(Path(src), mapping, batch, seen), seen
        return history.jsonl_batches(Path(src), batch, seen, one_at_a_time=ack_after is not None), seen

    jobs = args.jobs
    def progress(r) -> None:
        when = (datetime.fromtimestamp(r.latest_ms / 1000, reg.tz).strftime("%Y-%m-%d %H:%M")
                if r.latest_ms else "")
        mine = f", new {len(r.new.tally.incidents):,}" if jobs == 1 else ""
        say(f"{when}  {r.inputs:,} inputs; incidents: current {len(r.current.tally.incidents):,}{mine}")

    current = Side(" ".join(args.against) + (f" + {args.against_params}" if args.against_params else ""),
                   cur_rs)
    new = Side(" ".join(args.rules) + (f" + {args.params}" if args.params else ""), new_rs)
    settings = EngineSettings(time_quorum=quorum, quorum_window=args.quorum_window)
    result = backtest(reg, current, new, open_history, settings, ack_after, progress, jobs)
    if tty:
        print("\r\x1b[K", end="", file=sys.stderr, flush=True)
    sys.stdout.write(text(result, src, tz_name))
    sys.stdout.flush()
    if args.html:
        args.html.write_text(html_report(result, src, tz_name), encoding="utf-8")
        print(f"report written to {args.html}", file=sys.stderr)
    if args.json:
        import orjson
        args.json.write_bytes(orjson.dumps(as_json(result), option=orjson.OPT_INDENT_2
                                           | orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS))
        print(f"figures written to {args.json}", file=sys.stderr)
    return 0
