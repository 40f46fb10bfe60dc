"""Backtest: one history through two rule sets, side by side — what would this change have done?

The history is read and decoded once (``pipeline.core.history``); each batch goes to two engines on
one registry. Rules whose definition is the same on both sides (the rule, its pack's
parameters and district overrides, its kinds, the routing tree) say the same on both: the
engine's rules do not see each other (only a correlation rule counts the rules it names), so
the second engine runs only the rules that differ, and the unchanged rules' notices count for
both sides. What is counted is what two separate ``cityops replay`` runs would send
(tests/core/test_backtest.py checks every count against two replays).

A side's tally (``Tally``): incidents and notices per rule, district, tier and day; pushes per
grid worker per night; every incident's first firing (for the incidents only one side has, and
the time-to-fire differences of those both have).
"""

from __future__ import annotations

import multiprocessing
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import orjson

from pipeline.core.engine import Engine, EngineSettings, Output
from pipeline.core.history import Batch, Progress
from pipeline.core.registry import Registry
from pipeline.core.replay import AckAfter
from rules.compiler import LoadedRule, RuleSet

NIGHT = (22, 7)                 # a night: 22:00 to 07:00 local time, named by its evening's date
DIMENSIONS = ("rule", "district", "tier", "day")
SEVERITY_RANK = {"blue": 0, "yellow": 1, "orange": 2, "red": 3}
_PARAM = re.compile(r"params\.([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class Incident:
    """One incident (an ``alert_id``) as its notices tell it."""
    alert_id: str
    rule: str
    subject: str                # the sensor, or the group of a group incident
    place: str                  # district and street names
    district: str
    started: str                # RFC 3339, city time
    started_ms: int
    value: float | None         # the first firing's reading (a window rule: its quantity)
    threshold: float | None
    unit: str
    severity: str               # the highest it reached
    ended_ms: int | None = None  # its last resolve, if it resolved

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _ms(ts: str) -> int:
    return int(datetime.fromisoformat(ts).timestamp() * 1000)


class Tally:
    """What one side told, counted as it goes (notices are not kept)."""

    def __init__(self) -> None:
        # dimension -> key -> [incidents, notices]
        self.counts: dict[str, dict[str, list[int]]] = {d: {} for d in DIMENSIONS}
        self.incidents: dict[str, Incident] = {}
        self.told: set[tuple[str, str]] = set()          # (alert_id, tier)
        self.pushes: dict[tuple[str, str], int] = {}     # (grid worker, night) -> pushes
        self.notices = 0
        self.dead_letters = 0
        self.district_names: dict[str, str] = {}
        self._nights: dict[str, str] = {}                # day -> the night before it

    def merge(self, other: Tally) -> None:
        """Add a tally of other rules (the second process's) to this one."""
        for dim, keys in other.counts.items():
            for key, (inc, num) in keys.items():
                c = self.counts[dim].setdefault(key, [0, 0])
                c[0] += inc
                c[1] += num
        self.incidents.update(other.incidents)
        self.told |= other.told
        for key, v in other.pushes.items():
            self.pushes[key] = self.pushes.get(key, 0) + v
        self.notices += other.notices
        self.dead_letters += other.dead_letters
        for code, name in other.district_names.items():
            self.district_names.setdefault(code, name)

    def _count(self, dim: str, key: str, slot: int) -> None:
        c = self.counts[dim].get(key)
        if c is None:
            c = self.counts[dim][key] = [0, 0]
        c[slot] += 1

    def add(self, notices: list[dict], rules: set[str] | None = None) -> None:
        """Count these notices (only those of ``rules``, when given)."""
        for n in notices:
            rule = n["rule_id"]
            if rules is not None and rule not in rules:
                continue
            aid, tier, ts = n["alert_id"], n["tier"], n["ts"]
            district = n.get("district") or "-"
            self.notices += 1
            for dim, key in (("rule", rule), ("district", district), ("tier", tier),
                             ("day", ts[:10])):
                self._count(dim, key, 1)
            inc = self.incidents.get(aid)
            if inc is None:
                inc = self._incident(n, district)
                for dim, key in (("rule", rule), ("district", district),
                                 ("day", inc.started[:10])):
                    self._count(dim, key, 0)
            if (aid, tier) not in self.told:
                self.told.add((aid, tier))
                self._count("tier", tier, 0)
            state = n["state"]
            if state == "firing":
                if SEVERITY_RANK[n["severity"]] > SEVERITY_RANK[inc.severity]:
                    inc.severity = n["severity"]
                if n.get("previous_state") == "resolved":
                    inc.ended_ms = None                  # flapping: open again
            elif state == "resolved":
                inc.ended_ms = _ms(ts)
            if tier == "grid":
                night = self._night(ts)
                if night is not None:
                    key = (n["target"], night)
                    self.pushes[key] = self.pushes.get(key, 0) + 1

    def _incident(self, n: dict, district: str) -> Incident:
        self.district_names.setdefault(district, n.get("district_name") or "")
        inc = Incident(
            alert_id=n["alert_id"], rule=n["rule_id"], subject=n.get("group") or n["sensor_id"],
            place=f"{n.get('district_name') or ''}{n.get('street_name') or ''}", district=district,
            started=n["started_at"], started_ms=_ms(n["started_at"]), value=n.get("value"),
            threshold=n.get("threshold"), unit=n.get("unit") or "", severity=n["severity"])
        self.incidents[inc.alert_id] = inc
        return inc

    def _night(self, ts: str) -> str | None:
        """The night a time (city time, as notices write it) falls in, named by the date of its
        evening; None in the day."""
        hour = int(ts[11:13])
        day = ts[:10]
        if hour >= NIGHT[0]:
            return day
        if hour >= NIGHT[1]:
            return None
        night = self._nights.get(day)
        if night is None:
            night = self._nights[day] = (date.fromisoformat(day) - timedelta(days=1)).isoformat()
        return night


@dataclass
class Side:
    """One rule set: its name (what the user gave), rules, engine and tally."""
    name: str
    rules: RuleSet
    tally: Tally = field(default_factory=Tally)
    engine: Engine | None = None
    acks: AckAfter | None = None
    counted: set[str] | None = None      # the rules its own engine's notices count for

    @property
    def rule_ids(self) -> list[str]:
        return [r.spec.id for r in self.rules.rules]


def fingerprint(r: LoadedRule, rs: RuleSet) -> bytes:
    """Everything a rule's notices depend on besides the registry and the readings: the rule,
    the values of the parameters it names (and their district overrides), its sensor kinds,
    the routing tree."""
    spec = r.spec.model_dump(mode="json")
    names = set(_PARAM.findall(orjson.dumps(spec).decode()))
    params = {p: r.pack.params.get(p) for p in sorted(names)}
    districts = {d: {p: v for p, v in over.items() if p in names}
                 for d, over in r.pack.districts.items()}
    kinds = {k: rs.kinds[k].model_dump(mode="json") for k in r.spec.sensors if k in rs.kinds}
    return orjson.dumps([spec, r.pack.pack, params, {d: v for d, v in districts.items() if v},
                         kinds, rs.routing.model_dump(mode="json")], option=orjson.OPT_SORT_KEYS)


def differing(current: RuleSet, new: RuleSet) -> set[str]:
    """The rule ids whose notices may differ between the sides: changed, added or removed, and
    every correlation rule that counts one of those."""
    cur = {r.spec.id: fingerprint(r, current) for r in current.rules}
    nxt = {r.spec.id: fingerprint(r, new) for r in new.rules}
    out = {rid for rid in cur.keys() | nxt.keys() if cur.get(rid) != nxt.get(rid)}
    grew = True
    while grew:
        grew = False
        for r in current.rules + new.rules:
            if r.spec.id not in out and out.intersection(r.spec.counts()):
                out.add(r.spec.id)
                grew = True
    return out


def only(rs: RuleSet, ids: set[str]) -> RuleSet:
    """``rs`` with these rules and the rules their correlation rules count."""
    need = set(ids)
    need |= {o for r in rs.rules if r.spec.id in ids for o in r.spec.counts()}
    return RuleSet(rs.packs, rs.kinds, [r for r in rs.rules if r.spec.id in need], rs.routing,
                   rs.routing_doc, rs.sources)


@dataclass
class Result:
    current: Side
    new: Side
    differing: set[str]
    inputs: int = 0
    latest_ms: int | None = None         # how far the reading has got (progress)
    missing: int = 0
    readings: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    seconds: float = 0.0


def backtest(registry: Registry, current: Side, new: Side,
             history: Callable[[], tuple[Iterator[Batch], Progress]], settings: EngineSettings,
             ack_after: int | None = None, progress: Callable[[Result], None] | None = None,
             jobs: int = 1) -> Result:
    """Run the history through both sides; the sides' tallies are filled in. ``history()``
    opens the batches (each process of ``jobs=2`` opens its own)."""
    started = time.perf_counter()
    diff = differing(current.rules, new.rules)
    current.engine = Engine(registry, current.rules, settings)
    # With --ack-after an acknowledgement moves its engine's watermark, which other rules' timers
    # then see: the sides' unchanged rules only say the same when each engine has every rule.
    if ack_after is None:
        mine = {rid for rid in new.rule_ids if rid in diff}
        new.counted = mine
        new.engine = Engine(registry, only(new.rules, mine), settings) if mine else None
        shared = set(current.rule_ids) - diff
    else:
        new.engine = Engine(registry, new.rules, settings)
        shared = set()
    for side in (current, new):
        side.acks = AckAfter(ack_after) if ack_after is not None else None
    result = Result(current, new, diff)
    # the wall clock only refuses readings from the future, as in replay
    clock = int(time.time() * 1000)
    batches, seen = history()
    if jobs > 1 and new.engine is not None:
        ctx = multiprocessing.get_context("fork")        # the engines, built, go with it
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_child, args=(new, history, clock, send), daemon=True,
                            name="cityops-backtest-new")
        child.start()
        send.close()
        try:
            _drive([current], batches, clock, new.tally, shared, result, seen, progress)
            status, got = receive.recv()
        except EOFError:
            raise RuntimeError("the backtest's second process ended without an answer") from None
        finally:
            child.join(5.0)
            if child.is_alive():
                child.terminate()
                child.join()
        if status == "error":
            raise got
        new.tally.merge(got)
    else:
        _drive([current, new], batches, clock, new.tally, shared, result, seen, progress)
    if new.engine is None:               # nothing differs: the new side's dead letters are these
        new.tally.dead_letters = current.tally.dead_letters
    result.inputs, result.missing = seen.lines, seen.missing
    result.readings = current.engine.counters["readings"]
    result.last_ms = current.engine.max_ts or None
    result.seconds = time.perf_counter() - started
    return result


def _child(side: Side, history: Callable[[], tuple[Iterator[Batch], Progress]], clock: int,
           send: Any) -> None:
    """The second process of ``jobs=2``: the new side over its own reading of the history."""
    try:
        batches, seen = history()
        _drive([side], batches, clock, side.tally, set(), Result(side, side, set()), seen, None)
        send.send(("ok", side.tally))
    except BaseException as exc:          # noqa: BLE001  handed to the parent, which raises it
        send.send(("error", exc))
    finally:
        send.close()


def _drive(sides: list[Side], batches: Iterator[Batch], clock: int, shared_into: Tally,
           shared: set[str], result: Result, seen: Progress,
           progress: Callable[[Result], None] | None) -> None:
    """The batches through these sides' engines, then the end of history (as replay ends it).
    The first side's notices of ``shared`` rules also count into ``shared_into``."""
    first = sides[0]
    live = [(s, s.engine) for s in sides if s.engine is not None]

    def take(side: Side, o: Output) -> None:
        side.tally.add(o.notices, side.counted)
        side.tally.dead_letters += len(o.dead_letters)
        if side is first and shared:
            shared_into.add(o.notices, shared)
        if side.acks is not None:
            side.acks.watch(o)

    def settle(ts: int | None) -> None:
        for side, engine in live:
            if side.acks is not None and ts is not None:
                for o in side.acks.due_by(engine, ts):
                    take(side, o)

    for b in batches:
        settle(b.first_ts)
        for side, engine in live:
            take(side, b.feed(engine, clock))
        if b.readings:                                 # their times are epoch ms by now
            if result.first_ms is None:
                result.first_ms = min(r.ts for r in b.readings)
            result.latest_ms = b.readings[-1].ts
        if progress:
            result.inputs = seen.lines
            progress(result)
    # History is over: every timer the data reached runs out
    for side, engine in live:
        end = engine.max_ts + 1
        if side.acks is not None:
            for o in side.acks.due_by(engine, end):
                take(side, o)
        take(side, engine.advance(end))


# ---- the comparison -----------------------------------------------------------------------
@dataclass
class Pair:
    current: Incident
    new: Incident

    @property
    def delta_ms(self) -> int:
        """How much later (+) or earlier (-) the new rules fire than the current ones."""
        return self.new.started_ms - self.current.started_ms


def compare(result: Result) -> tuple[list[Incident], list[Incident], list[Pair]]:
    """Incidents of the differing rules only the current side has, only the new side has, and
    the pairs both have: same rule and subject, overlapping in time (an open incident runs to
    the end of the history). Each incident pairs with at most one of the other side, the
    earliest that overlaps it."""
    def by_subject(t: Tally) -> dict[tuple[str, str], list[Incident]]:
        out: dict[tuple[str, str], list[Incident]] = {}
        for inc in t.incidents.values():
            if inc.rule in result.differing:
                out.setdefault((inc.rule, inc.subject), []).append(inc)
        for v in out.values():
            v.sort(key=lambda i: (i.started_ms, i.alert_id))
        return out

    end = 1 << 62
    cur, new = by_subject(result.current.tally), by_subject(result.new.tally)
    only_cur: list[Incident] = []
    only_new: list[Incident] = []
    pairs: list[Pair] = []
    for key in sorted(cur.keys() | new.keys()):
        a_list, b_list = cur.get(key, []), new.get(key, [])
        used: set[str] = set()
        paired_a: set[str] = set()
        for a in a_list:
            a_end = a.ended_ms if a.ended_ms is not None else end
            for b in b_list:
                b_end = b.ended_ms if b.ended_ms is not None else end
                if b.alert_id not in used and b.started_ms <= a_end and a.started_ms <= b_end:
                    used.add(b.alert_id)
                    paired_a.add(a.alert_id)
                    pairs.append(Pair(a, b))
                    break
        for a in a_list:
            if a.alert_id not in paired_a and not _overlaps_any(a, b_list, end):
                only_cur.append(a)
        for b in b_list:
            if b.alert_id not in used and not _overlaps_any(b, a_list, end):
                only_new.append(b)
    order = lambda i: (i.started_ms, i.rule, i.subject)   # noqa: E731
    return sorted(only_cur, key=order), sorted(only_new, key=order), pairs


def _overlaps_any(x: Incident, others: list[Incident], end: int) -> bool:
    x_end = x.ended_ms if x.ended_ms is not None else end
    return any(o.started_ms <= x_end and x.started_ms <= (o.ended_ms if o.ended_ms is not None
                                                            else end) for o in others)


def night_figures(t: Tally) -> dict[str, Any]:
    """The alert-fatigue figure: pushes per grid worker per night."""
    per = sorted(t.pushes.values())
    worst = max(t.pushes.items(), key=lambda kv: (kv[1], kv[0]), default=None)
    return {
        "worker_nights": len(per),
        "pushes": sum(per),
        "mean": sum(per) / len(per) if per else 0.0,
        "median": per[len(per) // 2] if per else 0,
        "max": worst[1] if worst else 0,
        "max_at": f"{worst[0][0]} {worst[0][1]}" if worst else "",
        "over_5": sum(1 for v in per if v > 5),
        "histogram": _histogram(per),
    }


def _histogram(per: list[int]) -> dict[str, int]:
    """Worker-nights by pushes: 1, 2, …, 9, 10+."""
    out = {str(k): 0 for k in range(1, 10)} | {"10+": 0}
    for v in per:
        out[str(v) if v < 10 else "10+"] += 1
    return out


def as_json(result: Result) -> dict[str, Any]:
    """Every figure of the report, for machines (``--json``)."""
    only_cur, only_new, pairs = compare(result)
    sides = {}
    for key, side in (("current", result.current), ("new", result.new)):
        t = side.tally
        sides[key] = {
            "name": side.name, "rules": side.rule_ids, "notices": t.notices,
            "incidents": len(t.incidents), "dead_letters": t.dead_letters,
            **{f"by_{d}": {k: {"incidents": v[0], "notices": v[1]}
                           for k, v in sorted(t.counts[d].items())} for d in DIMENSIONS},
            "pushes_per_night": night_figures(t),
            "pushes": {f"{w} {night}": v for (w, night), v in sorted(t.pushes.items())},
        }
    return {
        "inputs": result.inputs, "readings": result.readings, "missing": result.missing,
        "differing_rules": sorted(result.differing), "night": f"{NIGHT[0]:02}:00-{NIGHT[1]:02}:00",
        "sides": sides,
        "only_current": [i.as_dict() for i in only_cur],
        "only_new": [i.as_dict() for i in only_new],
        "time_to_fire": [{"rule": p.current.rule, "subject": p.current.subject,
                          "current": p.current.started, "new": p.new.started,
                          "delta_s": p.delta_ms / 1000} for p in pairs],
    }
