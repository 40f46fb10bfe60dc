"""The reference model: the engine's semantics written the slow, plain way, as the specification.

One payload at a time, one reading at a time, plain dicts and lists: no numpy, no screening of
quiet readings, no timer heap, no skipped scans, no lazy bookkeeping. Every reading goes to every
rule that watches its kind; every deadline is kept next to what it belongs to, and the earliest
one due acts first (deadlines due at the same time act in the order they were set; a silence's
edge first, reminders and escalations last). It is slow
on purpose: it is what the fast engine (``pipeline.core.engine``) must equal, notice for notice and
dead letter for dead letter, whatever the batching (tests/core/test_engine_model.py fuzzes the two
against each other).

What it shares with the engine is only what is not a decision: the reading decoder
(``pipeline.core.wire``, property-tested on its own), the router's tier policy and on-call lookup
(``pipeline.core.routing``), and the notice text (titles, summaries, place fields, rendered by
``pipeline.core.lifecycle.AlertBook``'s presentation helpers). Every decision — what is refused and
why, when a rule fires, steps up or down, clears and resolves, who is told, escalation,
reminders, acknowledgement, silence — is made here again.

Time, as the engine defines it (README, "Time and order"):
- A batch is its payloads one after another. A payload's readings are checked against the
  state as it stands when the payload arrives, and taken in event-time order (ties: arrival).
  Its late readings (older than the sensor's newest by at most allowed_lateness) act first, as
  it arrives, and only where they can raise (``_late``).
- The watermark after a payload is max(watermark, newest accepted reading - allowed_lateness);
  with time_quorum q > 1, "newest" is the q-th newest of the sources' newest readings.
  Before each reading, the deadlines due before the reading's time that the payload's watermark
  reaches act; after the payload, every deadline its watermark reaches.
- Silence is checked at watch start + k * absence_scan_every, from the end of the first payload
  with an accepted reading (watch start: its earliest reading).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import msgspec
from pydantic import ValidationError

from pipeline.core import handling as hd
from pipeline.core import notices as nt
from pipeline.core import silences as sil
from pipeline.core import wire
from pipeline.core.engine import EARLIEST, EngineSettings
from pipeline.core.lifecycle import AlertBook
from pipeline.core.models import Ack, Severity, State, Tier
from pipeline.core.registry import Registry
from pipeline.core.routing import Router
from rules.compiler import RuleSet, params_for
from rules.evaluators import (AFTER, DOWNGRADE, FIRE, REOPEN, RESOLVE, UPGRADE, Change, Timers,
                              alert_id)
from rules.expr import evaluate, parse
from rules.schema import format_duration
from rules.types.absence import AbsenceRule
from rules.types.base import TYPES
from rules.types.correlation import CorrelationRule
from rules.types.events import EventRule
from rules.types.rate import RateRule
from rules.types.stuck import StuckRule
from rules.types.threshold import ThresholdRule
from rules.types.window import WindowRule

OPS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
       "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
FLIP = {">=": "<=", "<=": ">=", ">": "<", "<": ">", "==": "==", "!=": "!="}

# a silence holds news of an incident, never its end nor people taking it in hand
_TOLD_WHILE_MUTED = (State.resolved, State.acknowledged, State.dispatched, State.on_site,
                     State.handled, State.closed)


class Deadlines:
    """Everything that falls due: (due, set order, what). The earliest acts first."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, Any]] = []
        self.n = 0

    def set(self, due: int, what: Any, first: bool = False, after: bool = False) -> None:
        """``first``: before everything else due at the same time (a silence's edge);
        ``after``: after everything else due at the same time but others set ``after`` (a
        reminder, an escalation: an incident that ends at that instant is not reminded)."""
        self.n += 1
        self.items.append((due, 0 if first else self.n + (AFTER if after else 0), what))

    def next_due(self, upto: int) -> tuple[int, Any] | None:
        due = [d for d in self.items if d[0] <= upto]
        if not due:
            return None
        first = min(due)
        self.items.remove(first)
        return first[0], first[2]


class View:
    """What the presentation helpers read of a rule: its spec, where it came from, no state."""

    def __init__(self, loaded: Any) -> None:
        self.spec, self.loaded, self.id, self.tracks = loaded.spec, loaded, loaded.spec.id, {}
        self.shows_unit = TYPES[self.spec.type].shows_unit

    def notice_facts(self, subject: Any, heard: int | None, kind: str, members: int,
                     fmt_time: Any) -> tuple:
        return TYPES[self.spec.type].notice_facts(self.spec, subject, heard or 0, kind, members,
                                                  fmt_time)


class Rule:
    """One rule's place in the model: its spec and per-sensor facts, worked out when asked."""

    def __init__(self, number: int, loaded: Any, reg: Registry) -> None:
        self.number, self.loaded, self.spec, self.id = number, loaded, loaded.spec, loaded.spec.id
        self.reg = reg
        self.kinds = set(self.spec.sensors)
        self.tracks: dict[Any, dict] = {}
        self.ended: dict[Any, int] = {}         # subject -> when its last incident ended
        self.runs: dict[int, list] = {}         # stuck: a sensor's readings of its current run
        self._facts: dict[int, Any] = {}

    def lookup(self, idx: int | None):
        pack = self.loaded.pack
        params = params_for(pack, self.reg.place_of(idx).district if idx is not None else None)
        facts = self.reg.sensor_facts(idx) if idx is not None else {}
        place = self.reg.place_of(idx) if idx is not None else None

        def look(name: str) -> Any:
            root, _, rest = name.partition(".")
            if root == "params":
                return params[rest]
            if root == "sensor" and rest in facts:
                return facts[rest]
            if root == "place" and place is not None:
                return getattr(place, rest)
            raise KeyError(name)
        return look

    def holds(self, idx: int, text: str) -> bool:
        try:
            return bool(evaluate(parse(text), self.lookup(idx)))
        except KeyError:
            return False

    def watches(self, idx: int) -> bool:
        if self.reg.kinds[self.reg.kind_of[idx]] not in self.kinds:
            return False
        return self.spec.where is None or self.holds(idx, self.spec.where)

    def bump(self, idx: int) -> int:
        return sum(m.raise_ for m in self.spec.modifiers if self.holds(idx, m.if_))

    def comparison(self, idx: int, text: str) -> tuple[str, Any, float]:
        """`QUANTITY OP expression` for this sensor: (quantity, test, threshold)."""
        node = parse(text)
        op, a, b = node.args
        quantities = {"value", "battery", "rise", "fall"} | set(getattr(self.spec, "windows", {}))
        if a.op == "name" and a.args[0] in quantities:
            q, rhs = a.args[0], b
        else:
            q, rhs, op = b.args[0], a, FLIP[op]
        v = evaluate(rhs, self.lookup(idx))
        return q, OPS[op], round(v, 9) if isinstance(v, float) else v


class ReferenceEngine:
    def __init__(self, registry: Registry, rules: RuleSet,
                 settings: EngineSettings | None = None) -> None:
        self.reg = registry
        self.settings = settings or EngineSettings()
        self.rules = [Rule(n, r, registry) for n, r in enumerate(rules.rules)]
        self.by_id = {r.id: r for r in self.rules}
        self.kinds = rules.kinds
        self.router = Router(rules.routing, registry)
        self.present = AlertBook(registry, self.router, Timers(),
                                 {r.id: View(r.loaded) for r in self.rules}, rules.kinds,
                                 self._name)
        self.deadlines = Deadlines()
        self.last_seen: dict[int, int] = {}
        self.watermark = -(1 << 62)
        self.max_ts = 0
        self.watch_start = 0
        self.sources: dict[Any, int] = {}       # time_quorum: each source's newest reading
        self.heard: list[set] = []              # ... and the sources of every payload so far
        self.silent: dict[str, dict[int, Any]] = {r.id: {} for r in self.rules}
        self.members: dict[str, dict[str, dict[int, int]]] = {r.id: {} for r in self.rules}
        self.incidents: dict[str, dict] = {}        # open
        self.resolved: dict[str, dict] = {}         # kept while a flapping rule may reopen
        self.silences: dict[str, sil.Silence] = {}  # in force or still to come
        self.edge_plan, self.edge_due = 0, sil.NEVER    # the next time one may start or stop
        self.closable: dict[str, dict] = {}         # resolved, taken in hand, not closed yet
        self.changes: list[Change] = []
        self.counters: Counter[str] = Counter()
        self.notices: list[dict] = []
        self.dead: list = []

    def _name(self, s: Any) -> str:
        return self.reg.sensor_ids[s] if isinstance(s, int) else s

    # ---- input ----------------------------------------------------------------------------
    def payload(self, raw: bytes, now_ms: int | None = None) -> None:
        readings: list = []
        positions: list = []
        dead: list = []
        wire.decode(raw, None, readings, dead, positions)
        for d in dead:
            self._dead(d)
        is_array = raw.lstrip()[:1] == b"["
        array = wire.GatewayArray(raw) if is_array else None

        def refuse(reason: str, detail: str, where: int | None) -> None:
            # an array's bad element is a dead letter of its own bytes (and the array's digest)
            self._dead(array.dead_letter(reason, detail, where, None) if array is not None
                       else wire.dead_letter(reason, detail, raw))

        s = self.settings
        checked = []
        for r, pos in zip(readings, positions, strict=True):
            where = pos if is_array else None
            reason, detail = self._check(r, now_ms)
            if reason:
                refuse(reason, detail, where)
            else:
                checked.append((r, where))
        # stale or duplicate: in event-time order within the payload, ties by arrival
        accepted = []
        late = []
        for r, where in sorted(checked, key=lambda x: x[0].ts):
            idx = self.reg.index[r.sensor_id]
            newest = max(self.last_seen.get(idx, 0), max((t for i, t, _ in accepted if i == idx),
                                                          default=0))
            if newest - s.allowed_lateness <= r.ts < newest:
                self.counters["late"] += 1
                late.append((idx, r.ts, r))
            elif r.ts < newest:
                refuse("stale", f"older than sensor {r.sensor_id}'s newest reading ({newest})",
                       where)
            elif r.ts == newest:
                self.counters["duplicates"] += 1
            else:
                accepted.append((idx, r.ts, r))
        self.counters["readings"] += len(readings)
        if checked and s.time_quorum > 1:
            # the time `time_quorum` sources have reached: the q-th newest of the newest readings
            # of the sources heard in the last `quorum_window` payloads that took a reading
            # (all of them, while fewer); a gateway is a source, a sensor without one is its own
            heard = set()
            for r, _ in checked:
                idx = self.reg.index[r.sensor_id]
                g = self.reg.gateway_of[idx]
                src = ("g", g) if g >= 0 else ("s", idx)
                heard.add(src)
                self.sources[src] = max(self.sources.get(src, r.ts), r.ts)
            self.heard.append(heard)
            counted = set().union(*self.heard[-s.quorum_window:])
            newest = sorted((self.sources[x] for x in counted), reverse=True)
            self.max_ts = max(self.max_ts, newest[min(s.time_quorum, len(newest)) - 1])
        elif accepted and s.time_quorum == 1:
            self.max_ts = max(self.max_ts, max(t for _, t, _ in accepted))
        horizon = max(self.watermark, self.max_ts - s.allowed_lateness)
        for idx, ts, r in late:             # as the payload arrives, before its own readings
            self._late(idx, ts, r)
        for idx, ts, r in accepted:
            self._run(min(ts - 1, horizon))
            self._reading(idx, ts, r)
        if accepted and not self.watch_start:
            self.watch_start = accepted[0][1]
            self._plan_scan(self.watch_start + s.absence_scan_every)
        # everything the payload's watermark reaches acts now, also what a late reading set
        # behind a watermark that did not move (an escalation due before it arrived)
        self._run(horizon)
        self.advance(self.max_ts - s.allowed_lateness)

    def _check(self, r: Any, now_ms: int | None) -> tuple[str | None, str]:
        s = self.settings
        value_nan = r.value is None or (isinstance(r.value, float) and math.isnan(r.value))
        if (r.event is not None) != value_nan:
            if r.value is not None and r.event is None:
                return "not_finite", f"value {r.value} is not a finite measurement"
            return "invalid", "a reading carries exactly one of `value` or `event`"
        idx = self.reg.index.get(r.sensor_id)
        if idx is None:
            return "unknown_sensor", f"sensor {r.sensor_id} is not in the registry"
        if now_ms is not None and r.ts > now_ms + s.max_future:
            return "future", (f"ts {r.ts} is more than {s.max_future // 1000}s ahead of the "
                              "clock; check the gateway's clock (NTP)")
        if r.ts < EARLIEST or r.ts < self.watermark - s.max_age:
            return "too_old", (f"ts {r.ts} is more than {s.max_age // 86_400_000} days behind "
                               "the watermark" + ("; epoch seconds? send milliseconds"
                                                  if r.ts < 10_000_000_000 else ""))
        kind = self.reg.kinds[self.reg.kind_of[idx]]
        wants_value = self.kinds[kind].reading == "value" if kind in self.kinds else True
        if (r.event is not None) == wants_value:
            return "wrong_kind", (f"sensor {r.sensor_id} reports "
                                  f"{'`value`' if wants_value else '`event`'} readings")
        if r.value is not None and not abs(r.value) < 1e15:
            return "not_finite", f"value {r.value} is not a finite measurement"
        return None, ""

    def _dead(self, d: Any) -> None:
        self.counters["dead_letters"] += 1
        self.counters["dead." + d.reason] += 1
        self.dead.append(d)

    def _reading(self, idx: int, ts: int, r: Any) -> None:
        self.last_seen[idx] = ts
        for rule in self.rules:
            if isinstance(rule.spec, AbsenceRule) and idx in self.silent[rule.id]:
                self._back(rule, idx, ts)
        kind = self.reg.kinds[self.reg.kind_of[idx]]
        for rule in self.rules:
            spec = rule.spec
            if kind not in rule.kinds or isinstance(spec, (AbsenceRule, CorrelationRule)):
                continue
            if spec.where is not None and not rule.holds(idx, spec.where):
                continue
            if isinstance(spec, EventRule):
                if r.event is not None:
                    self._event(rule, idx, ts, r.event)
            elif isinstance(spec, ThresholdRule):
                q = self._threshold_quantity(rule, idx)
                x = r.battery if q == "battery" else r.value
                if x is not None:
                    self._stateful(rule, idx, ts, {q: x})
            elif isinstance(spec, RateRule) and r.value is not None:
                self._rate(rule, idx, ts, r.value)
            elif isinstance(spec, WindowRule) and r.value is not None:
                self._window(rule, idx, ts, r.value)
            elif isinstance(spec, StuckRule) and r.value is not None:
                self._stuck(rule, idx, ts, r.value)
            self._drain()

    def _late(self, idx: int, ts: int, r: Any) -> None:
        """A reading older than its sensor's newest, within allowed_lateness: it may open or
        raise an incident of a threshold rule without ``for:`` or of an event rule, and
        nothing else (README "Late readings")."""
        kind = self.reg.kinds[self.reg.kind_of[idx]]
        for rule in self.rules:
            spec = rule.spec
            if kind not in rule.kinds or (spec.where is not None and not rule.holds(idx, spec.where)):
                continue
            if isinstance(spec, EventRule) and r.event is not None:
                self._late_event(rule, idx, ts, r.event)
            elif (isinstance(spec, ThresholdRule) and spec.for_ == 0 and r.value is not None
                  and self._threshold_quantity(rule, idx) == "value"):
                self._late_threshold(rule, idx, ts, r.value)
            self._drain()

    def ack(self, raw: bytes | dict) -> None:
        try:
            a = Ack.model_validate_json(raw) if isinstance(raw, bytes) else Ack.model_validate(raw)
        except ValidationError as exc:
            self._refuse(str(exc.errors()[0]["msg"]),
                         raw if isinstance(raw, bytes) else msgspec.json.encode(raw))
            return
        payload = raw if isinstance(raw, bytes) else a.model_dump_json().encode()
        if a.state not in (None, "acknowledged"):
            return self._handle(a, payload)
        inc = self.incidents.get(a.alert_id)
        if inc is None:
            self._refuse(f"no open incident {a.alert_id} (resolved already, or never existed)",
                         payload)
            return
        self.counters["acks"] += 1
        if inc["acked_by"]:
            return
        inc["acked_by"], inc["acked_tier"] = a.by, a.tier.value
        inc["times"]["acknowledged"] = max(a.ts_ms, inc["last_ts"])
        prev = inc["state"]
        inc["state"] = State.acknowledged
        self._send(inc, State.acknowledged, prev, max(a.ts_ms, inc["last_ts"]), [])

    def _handle(self, a: Ack, payload: bytes) -> None:
        """dispatched, on_site, handled, closed (pipeline/core/handling.py): open incidents and
        resolved ones somebody took in hand, until closed."""
        inc = self.incidents.get(a.alert_id) or self.closable.get(a.alert_id)
        if inc is None:
            self._refuse(f"no open incident {a.alert_id} (closed already, or never existed)",
                         payload)
            return
        times = inc["times"]
        if hd.RANK[a.state] <= max([hd.RANK[k] for k in times if k in hd.RANK] or [0]):
            self.counters["acks"] += 1
            return
        open_ = a.alert_id in self.incidents
        if a.state == "closed":
            why = hd.may_close({t.tier for t in inc["sent"]}, a.tier)
            if why:
                self._refuse(f"{a.by!r}: {why}; alert {a.alert_id}", payload, "forbidden")
                return
            if open_ and not a.note:
                self._refuse("the sensor has not resolved: close it with the reason in `note` "
                             "(e.g. 传感器故障)", payload)
                return
        self.counters["acks"] += 1
        ts = max(a.ts_ms, inc["last_ts"])
        if not inc["acked_by"]:
            inc["acked_by"], inc["acked_tier"] = a.by, a.tier.value
            times.setdefault("acknowledged", ts)
        times[a.state] = ts
        if a.state == "dispatched":
            inc["dispatched_to"] = a.to or a.by
        prev, inc["state"] = inc["state"], State(a.state)
        fields = {"state_by": a.by, "state_tier": a.tier.value,
                  "dispatched_to": inc["dispatched_to"], "note": a.note}
        if a.state == "closed":          # one still firing stays, silent, until it resolves
            fields["timeline"] = hd.timeline(times, inc["started"], self.reg.tz)
            self.closable.pop(a.alert_id, None)
        self._send(inc, State(a.state), prev, ts, [], hd.summary(a.state, a), handling=fields)

    def _settled(self, inc: dict) -> bool:
        if inc["route"].escalate_until == "on_site":
            return any(k in inc["times"] for k in ("on_site", "handled", "closed"))
        return bool(inc["acked_by"])

    def _refuse(self, why: str, payload: bytes, reason: str = "bad_ack") -> None:
        self._dead(wire.dead_letter(reason, why, payload))

    # ---- silences: at the watermark; a muted incident's news waits, a resolve does not ------
    def silence(self, raw: bytes | dict) -> None:
        got, why = sil.accept(self.silences, raw, self.watermark)
        if why:
            return self._refuse(why, raw if isinstance(raw, bytes) else msgspec.json.encode(raw),
                                "bad_silence")
        self.counters["silences"] += 1
        if isinstance(got, sil.Silence):
            self.silences[got.id] = got
            if got.end < sil.NEVER:
                self.deadlines.set(got.end, ("over", got.id), first=True)
        else:
            del self.silences[got.id]
        self._edge(self.watermark)

    def _edge(self, t: int) -> None:
        """A silence may start or stop muting at ``t``: every open incident is looked at. The
        next edge is planned only while incidents are open (and when the first one opens)."""
        for inc in list(self.incidents.values()):
            self._mute(inc, t)
        self._plan_edge(t)

    def _plan_edge(self, t: int) -> None:
        self.edge_plan += 1
        self.edge_due = min((s.next_edge(t) for s in self.silences.values()),
                            default=sil.NEVER) if self.incidents else sil.NEVER
        if self.edge_due < sil.NEVER:
            self.deadlines.set(self.edge_due, ("edge", self.edge_plan), first=True)

    def _muting(self, inc: dict, t: int) -> str | None:
        view = _Inc(inc)
        labels = self.present._labels(view)
        labels["sensor_id"] = self._name(inc["idx"] if inc["idx"] is not None else inc["subject"])
        return next((sid for sid in sorted(self.silences)
                     if self.silences[sid].active(t) and self.silences[sid].covers(labels)), None)

    def _mute(self, inc: dict, t: int) -> None:
        if self.silences and self.edge_due == sil.NEVER:
            self._plan_edge(t)
        t = max(t, inc["last_ts"])
        sid = self._muting(inc, t)
        if sid is not None:
            if inc["muted"] is None:
                inc["muted_at"] = max(t, inc["started"])
            inc["muted"] = sid
            return
        if inc["muted"] is None:
            return
        # no longer muted: escalation resumes with the muted time added to its deadlines, and
        # what was held is told as it stands now, to every tier it reaches
        pause = max(0, t - inc["muted_at"])
        inc["paused"] += pause
        for told_at in ("district_at", "community_at", "street_at"):     # deadlines move on
            if inc[told_at] is not None:
                inc[told_at] += pause
        inc["muted"] = None
        ts = max(t, inc["last_ts"])
        if inc["held"]:
            inc["held"] = False
            inc["state"] = State.acknowledged if inc["acked_by"] else State.firing
            self._send(inc, inc["state"], None, ts, self._reach(inc, ts),
                       "静默结束，补发静默期间暂缓的通知。")
        if not self._settled(inc):
            self._plan_reminders(inc, ts)
            self._plan_escalation(inc, inc["started"], ts)

    # ---- time ------------------------------------------------------------------------------
    def advance(self, watermark: int) -> None:
        if watermark <= self.watermark:
            return
        self.watermark = watermark
        if not self.watch_start and any(isinstance(r.spec, AbsenceRule) for r in self.rules) \
                and watermark > 0:
            self.watch_start = watermark
            self._plan_scan(watermark + self.settings.absence_scan_every)
        self._run(watermark)

    def _run(self, upto: int) -> None:
        while (d := self.deadlines.next_due(upto)) is not None:
            due, (what, *key) = d
            if what == "rule":
                rule, s = key
                self._rule_due(rule, s, due)
            elif what == "scan":
                self._scan(due)
                self._plan_scan(due + self.settings.absence_scan_every)
            elif what == "edge":
                if key[0] == self.edge_plan:
                    self._edge(due)
            elif what == "over":        # a silence's end: gone for good, even for late readings
                s = self.silences.get(key[0])
                if s is not None and s.end == due:
                    del self.silences[key[0]]
                    self._edge(due)
            else:
                self._incident_due(due, what, *key)
            self._drain()

    def _plan_scan(self, at: int) -> None:
        if any(isinstance(r.spec, AbsenceRule) for r in self.rules):
            self.deadlines.set(at, ("scan",))

    def _drain(self) -> None:
        while self.changes:
            batch, self.changes = self.changes, []
            for ch in batch:
                for rule in self.rules:
                    if isinstance(rule.spec, CorrelationRule) and ch.rule.id in rule.spec.of:
                        self._correlate(rule, ch)
                self._apply(ch)
                self.counters["changes." + ch.what] += 1

    # ---- threshold, rate, window ---------------------------------------------------------
    def _threshold_quantity(self, rule: Rule, idx: int) -> str:
        return rule.comparison(idx, rule.spec.levels[0].when)[0]

    def _levels(self, rule: Rule, idx: int, q: dict) -> tuple[int, float, float]:
        """Highest severity whose level holds (-1: none), its threshold, the quantity seen."""
        rank, at, seen = -1, None, None
        for lv in rule.spec.levels:
            name, test, thr = rule.comparison(idx, lv.when)
            if test(q[name], thr):
                rank, at, seen = lv.severity.rank, thr, q[name]
        if at is None:
            name, _, thr = rule.comparison(idx, rule.spec.levels[0].when)
            at, seen = thr, q[name]
        return rank, at, seen

    def _level_cleared(self, rule: Rule, idx: int, q: dict, level: Any) -> tuple[bool, float]:
        text = level.clear or level.when
        name, test, thr = rule.comparison(idx, text)
        held = test(q[name], thr)
        return (held if level.clear else not held), thr

    def _clear_threshold(self, rule: Rule, idx: int) -> float:
        spec = rule.spec
        text = spec.clear or spec.levels[0].clear or spec.levels[0].when
        return rule.comparison(idx, text)[2]

    def _emit(self, what: str, rule: Rule, s: Any, tr: dict, ts: int,
              cleared: float | None = None) -> None:
        bump = rule.bump(s) if isinstance(s, int) else 0
        rank = min(3, tr["rank"] + bump)
        self.changes.append(Change(what, rule, s, tr["aid"], rank, ts, tr["started"], tr["value"],
                                   tr["threshold"], event=tr.get("event"),
                                   flapping=tr["flapping"], cleared=cleared))

    def _fire(self, rule: Rule, s: Any, tr: dict, ts: int) -> None:
        tr["phase"] = "firing"
        tr["aid"] = alert_id(rule.id, self._name(s), tr["started"])
        self._emit(FIRE, rule, s, tr, ts)

    def _resolve(self, rule: Rule, s: Any, tr: dict, ts: int) -> None:
        self._emit(RESOLVE, rule, s, tr, ts, cleared=self._clear_threshold(rule, s))
        rule.ended[s] = ts
        if rule.spec.flapping:
            tr["phase"], tr["due"] = "resolved", ts + rule.spec.flapping.window
            self.deadlines.set(tr["due"], ("rule", rule, s))
        else:
            del rule.tracks[s]

    def _stateful(self, rule: Rule, s: int, ts: int, q: dict) -> None:
        spec = rule.spec
        rank, at, value = self._levels(rule, s, q)
        tr = rule.tracks.get(s)
        if tr is None:
            if rank < 0:
                return
            tr = rule.tracks[s] = {"phase": "pending", "started": ts, "rank": rank, "value": value,
                                   "threshold": at, "due": 0, "aid": "", "flapping": False}
            if spec.for_ == 0:
                self._fire(rule, s, tr, ts)
            else:
                tr["due"] = ts + spec.for_
                self.deadlines.set(tr["due"], ("rule", rule, s))
            return
        if tr["phase"] == "pending":
            if ts >= tr["due"]:
                self._fire(rule, s, tr, tr["due"])
            elif rank < 0:
                del rule.tracks[s]
                return
            else:
                if rank > tr["rank"]:
                    tr["rank"], tr["threshold"] = rank, at
                tr["value"] = value
                return
        if tr["phase"] == "clearing" and ts >= tr["due"]:
            self._resolve(rule, s, tr, tr["due"])
            if s not in rule.tracks:
                return self._stateful(rule, s, ts, q)
        if tr["phase"] == "resolved":
            if ts >= tr["due"]:
                del rule.tracks[s]
                return self._stateful(rule, s, ts, q)
            if rank >= 0:
                tr.update(phase="firing", flapping=True, value=value, threshold=at,
                          rank=max(rank, tr["rank"]))
                self._emit(REOPEN, rule, s, tr, ts)
            return
        per_level = any(lv.clear for lv in spec.levels)
        if rank > tr["rank"]:
            tr.update(phase="firing", rank=rank, value=value, threshold=at)
            self._emit(UPGRADE, rule, s, tr, ts)
            return
        if per_level:
            levels = [lv for lv in spec.levels if lv.severity.rank <= tr["rank"]]
            held = None
            while levels:
                cleared, thr = self._level_cleared(rule, s, q, levels[-1])
                if not cleared:
                    break
                held = thr
                levels.pop()
            cleared = not levels
        else:
            if spec.clear:
                name, test, thr = rule.comparison(s, spec.clear)
                cleared = test(q[name], thr)
            else:
                cleared = rank < 0
        if cleared:
            if tr["phase"] == "firing":
                tr["value"] = value
                wait = max(spec.clear_for, spec.flapping.window if spec.flapping and tr["flapping"]
                           else 0)
                if wait == 0:
                    self._resolve(rule, s, tr, ts)
                else:
                    tr.update(phase="clearing", since=ts, due=ts + wait)
                    self.deadlines.set(tr["due"], ("rule", rule, s))
            return
        tr["phase"] = "firing"
        if per_level and held is not None:
            tr.update(rank=levels[-1].severity.rank, value=value,
                      threshold=rule.comparison(s, levels[-1].when)[2])
            self._emit(DOWNGRADE, rule, s, tr, ts, cleared=held)
        elif rank >= 0 or per_level:
            tr["value"] = value

    def _late_threshold(self, rule: Rule, s: int, ts: int, v: float) -> None:
        spec = rule.spec
        rank, at, value = self._levels(rule, s, {"value": v})
        if rank < 0:
            return
        tr = rule.tracks.get(s)
        if tr is not None and tr["phase"] == "clearing" and ts >= tr["due"]:
            self._resolve(rule, s, tr, tr["due"])
            tr = rule.tracks.get(s)
        if tr is not None and tr["phase"] == "resolved" and ts >= tr["due"]:
            del rule.tracks[s]
            tr = None
        if tr is None:
            if ts >= rule.ended.get(s, -(1 << 62)):
                tr = rule.tracks[s] = {"phase": "pending", "started": ts, "rank": rank,
                                       "value": value, "threshold": at, "due": 0, "aid": "",
                                       "flapping": False}
                self._fire(rule, s, tr, ts)
            return
        if tr["phase"] == "resolved":
            if ts >= tr["due"] - spec.flapping.window:
                tr.update(phase="firing", flapping=True, value=value, threshold=at,
                          rank=max(rank, tr["rank"]))
                self._emit(REOPEN, rule, s, tr, ts)
            return
        if any(lv.clear for lv in spec.levels):
            return
        if tr["phase"] == "clearing" and ts > tr["since"]:
            tr["phase"] = "firing"
        if rank > tr["rank"]:
            tr.update(rank=rank, value=value, threshold=at)
            self._emit(UPGRADE, rule, s, tr, ts)

    def _rate(self, rule: Rule, s: int, ts: int, v: float) -> None:
        seen = rule.tracks.setdefault(("readings", s), [])
        seen.append((ts, v))
        window = [x for t, x in seen if ts - rule.spec.over <= t <= ts]
        seen[:] = [(t, x) for t, x in seen if t >= ts - rule.spec.over]
        self._stateful(rule, s, ts, {"rise": round(v - min(window), 6),
                                     "fall": round(max(window) - v, 6)})

    def _window(self, rule: Rule, s: int, ts: int, v: float) -> None:
        windows = rule.spec.windows
        first = next(iter(windows.values()))
        step = first.every or first.size
        seen = rule.tracks.setdefault(("readings", s), [])
        b = ts // step
        if first.every is None:                      # tumbling: judged when the next one opens
            if seen and seen[0][0] // step != b:
                closed = seen[0][0] // step
                q = {name: self._fn(w.fn, [[x for _, x in seen]]) for name, w in windows.items()}
                seen.clear()
                seen.append((ts, v))
                self._stateful(rule, s, (closed + 1) * step, q)
                return
            seen.append((ts, v))
            return
        seen.append((ts, v))
        q = {}
        for name, w in windows.items():
            steps = w.size // step
            buckets = [[x for t, x in seen if t // step == bb] for bb in range(b - steps + 1, b + 1)]
            q[name] = self._fn(w.fn, [bk for bk in buckets if bk])
        longest = max(w.size for w in windows.values())
        seen[:] = [(t, x) for t, x in seen if t // step > b - longest // step]
        self._stateful(rule, s, ts, q)

    @staticmethod
    def _fn(fn: str, buckets: list[list[float]]) -> float:
        """Sums and counts are per step, then over the steps (the engine keeps steps)."""
        if fn in ("sum", "avg"):
            total, count = 0.0, 0
            for bk in buckets:
                part = 0.0
                for i, x in enumerate(bk):
                    part = x if i == 0 else part + x
                total += part
                count += len(bk)
            if fn == "sum":
                return round(total, 6)
            return round(total / count, 6) if count else 0.0
        if fn == "count":
            return float(sum(len(bk) for bk in buckets))
        values = [x for bk in buckets for x in bk]
        if not values:
            return 0.0
        return min(values) if fn == "min" else max(values)

    def _rule_due(self, rule: Rule, s: Any, due: int) -> None:
        tr = rule.tracks.get(s)
        if tr is None or tr["due"] != due:
            return
        if isinstance(rule.spec, EventRule):
            self._event_end(rule, s, tr, due)
        elif tr["phase"] == "pending":
            self._fire(rule, s, tr, due)
        elif tr["phase"] == "clearing":
            self._resolve(rule, s, tr, due)
        elif tr["phase"] == "resolved":
            del rule.tracks[s]

    # ---- events ----------------------------------------------------------------------------
    def _event(self, rule: Rule, s: int, ts: int, event: str) -> None:
        spec = rule.spec
        tr = rule.tracks.get(s)
        if event not in spec.events:
            if tr is not None and event in spec.clear_events:
                self._event_end(rule, s, tr, ts)
            return
        if tr is not None and ts >= tr["due"]:
            self._event_end(rule, s, tr, tr["due"])
            tr = None
        if tr is None:
            self._event_open(rule, s, ts, event)
        else:
            self._event_repeat(rule, s, tr, ts, event)

    def _late_event(self, rule: Rule, s: int, ts: int, event: str) -> None:
        """A late named event acts as in order; a late clear event ends nothing."""
        if event not in rule.spec.events:
            return
        tr = rule.tracks.get(s)
        if tr is not None and ts >= tr["due"]:
            self._event_end(rule, s, tr, tr["due"])
            tr = None
        if tr is None:
            if ts >= rule.ended.get(s, -(1 << 62)):
                self._event_open(rule, s, ts, event)
        else:
            self._event_repeat(rule, s, tr, ts, event)

    def _event_end(self, rule: Rule, s: Any, tr: dict, ts: int) -> None:
        self._emit(RESOLVE, rule, s, tr, ts)
        del rule.tracks[s]
        rule.ended[s] = ts

    def _event_open(self, rule: Rule, s: int, ts: int, event: str) -> None:
        spec = rule.spec
        tr = rule.tracks[s] = {"phase": "firing", "started": ts, "rank": spec.events[event].rank,
                               "value": None, "threshold": None, "due": ts + spec.resolve_after,
                               "aid": "", "flapping": False, "event": event}
        self._fire(rule, s, tr, ts)
        self.deadlines.set(tr["due"], ("rule", rule, s))

    def _event_repeat(self, rule: Rule, s: int, tr: dict, ts: int, event: str) -> None:
        spec = rule.spec
        rank = spec.events[event].rank
        if ts + spec.resolve_after > tr["due"]:      # a repeat keeps it open longer
            tr["due"] = ts + spec.resolve_after
            self.deadlines.set(tr["due"], ("rule", rule, s))
        if rank > tr["rank"]:
            tr["rank"], tr["event"] = rank, event
            self._emit(UPGRADE, rule, s, tr, ts)

    # ---- absence ---------------------------------------------------------------------------
    def _stuck(self, rule: Rule, s: int, ts: int, v: float) -> None:
        """A stuck sensor: its readings since the first of its run (the first that differed
        from the run before by more than ``tolerance``) all within ``tolerance`` of that first
        one, for ``for`` or longer. A reading that differs ends the incident and the run."""
        spec = rule.spec
        run = rule.runs.setdefault(s, [])
        if run and round(abs(v - run[0][1]), 6) > spec.tolerance:
            tr = rule.tracks.pop(s, None)
            if tr is not None:
                tr["value"] = v
                self._emit(RESOLVE, rule, s, tr, ts)
            run.clear()
        run.append((ts, v))
        first_ts, first_v = run[0]
        if len(run) > 1 and s not in rule.tracks and ts - first_ts >= spec.for_:
            tr = rule.tracks[s] = {"phase": "firing", "started": ts, "rank": spec.severity.rank,
                                   "value": first_v, "threshold": None, "due": 0, "aid": "",
                                   "flapping": False}
            self._fire(rule, s, tr, ts)

    def _absent_ms(self, rule: Rule, idx: int) -> int:
        spec = rule.spec
        kind = self.reg.kinds[self.reg.kind_of[idx]]
        if kind not in rule.kinds or (spec.where is not None and not rule.holds(idx, spec.where)):
            return 0
        if isinstance(spec.absent_for, dict):
            return spec.absent_for.get(kind, 0)
        return spec.absent_for

    def _scan(self, at: int) -> None:
        for rule in self.rules:
            if not isinstance(rule.spec, AbsenceRule):
                continue
            silent = self.silent[rule.id]
            due = {}
            for idx in range(len(self.reg)):
                ms = self._absent_ms(rule, idx)
                if ms:
                    due[idx] = max(self.last_seen.get(idx, 0), self.watch_start) + ms
            quiet = {i for i, d in due.items() if d <= at}
            new = sorted(i for i in quiet if i not in silent)
            if not new:
                continue
            by_gw: dict[int, list[int]] = {}
            for i in due:
                g = self.reg.gateway_of[i]
                if rule.spec.group_by_gateway and g >= 0:
                    by_gw.setdefault(g, []).append(i)
            whole = {g for g, ms in by_gw.items() if len(ms) >= 2 and all(m in quiet for m in ms)}
            for i in new:
                g = self.reg.gateway_of[i]
                if g in whole:
                    subject = "gw:" + self.reg.gateways[g]
                    if subject not in rule.tracks:
                        members = sorted(by_gw[g])
                        when = max(due[m] for m in members)
                        heard = max(self.last_seen.get(m, 0) for m in members)
                        self._silent_fire(rule, subject, when, heard, members)
                    silent[i] = subject
                else:
                    silent[i] = ""
                    self._silent_fire(rule, i, due[i], self.last_seen.get(i, 0), None)

    def _silent_fire(self, rule: Rule, s: Any, ts: int, heard: int, members: Any) -> None:
        rank = rule.spec.severity.rank
        tr = rule.tracks[s] = {"rank": rank, "started": ts, "heard": heard,
                               "aid": alert_id(rule.id, self._name(s), ts)}
        self.changes.append(Change(FIRE, rule, s, tr["aid"], rank, ts, ts, None, None,
                                   members=members, heard=heard))

    def _back(self, rule: Rule, idx: int, ts: int) -> None:
        silent = self.silent[rule.id]
        subject = silent[idx]
        key = idx if subject == "" else subject
        tr = rule.tracks.get(key)
        if tr is not None and ts < tr["started"] - self._absent_ms(rule, idx):
            return          # a reading from before the silence it stands for ends nothing
        del silent[idx]
        tr = rule.tracks.pop(key, None)
        if tr is None:
            return
        if key != idx:                       # the gateway is back: its others are watched anew
            for m in [m for m, subj in silent.items() if subj == subject]:
                del silent[m]
        self.changes.append(Change(RESOLVE, rule, key, tr["aid"], tr["rank"], ts, tr["started"],
                                   None, None, heard=tr["heard"]))
        self._drain()

    # ---- correlation -----------------------------------------------------------------------
    def _correlate(self, rule: Rule, ch: Change) -> None:
        if not isinstance(ch.subject, int):
            return
        spec = rule.spec
        by = spec.group_by
        g = (self.reg.building[ch.subject] or None) if by == "building" \
            else getattr(self.reg.place_of(ch.subject), by)
        if g is None:
            return
        groups = self.members[rule.id]
        if ch.what in (FIRE, REOPEN):
            members = groups.setdefault(g, {})
            members[ch.subject] = ch.ts
            if g in rule.tracks:
                return
            times = sorted(members.values())
            at = next((times[j] for j in range(spec.min_sensors - 1, len(times))
                       if times[j] - times[j - spec.min_sensors + 1] <= spec.within), None)
            if at is None:
                return
            recent = sorted(m for m, t in members.items() if at - spec.within <= t <= at)
            aid = alert_id(rule.id, g, at)
            rule.tracks[g] = {"aid": aid, "started": at, "rank": spec.severity.rank,
                              "members": recent}
            self.changes.append(Change(FIRE, rule, g, aid, spec.severity.rank, at, at, None,
                                       float(spec.min_sensors), members=recent))
        elif ch.what == RESOLVE and g in groups:
            groups[g].pop(ch.subject, None)
            if not groups[g]:
                del groups[g]
                tr = rule.tracks.pop(g, None)
                if tr is not None:
                    self.changes.append(Change(RESOLVE, rule, g, tr["aid"], tr["rank"], ch.ts,
                                               tr["started"], None, None, members=tr["members"]))

    # ---- the incident lifecycle ------------------------------------------------------------
    def _apply(self, ch: Change) -> None:
        closed = self.incidents.get(ch.alert_id)
        if ch.what in (UPGRADE, DOWNGRADE, RESOLVE) and closed and "closed" in closed["times"]:
            if ch.what == RESOLVE:              # closed while firing: it ends telling nobody
                del self.incidents[ch.alert_id]
                closed["state"] = State.resolved
                if getattr(ch.rule.spec, "flapping", None):
                    self.resolved[ch.alert_id] = closed
                    self.deadlines.set(ch.ts + ch.rule.spec.flapping.window + 1,
                                       ("forget", ch.alert_id))
            return
        if ch.what == FIRE:
            idx = ch.subject if isinstance(ch.subject, int) else \
                (ch.members[0] if ch.members else None)
            inc = {"aid": ch.alert_id, "rule": ch.rule.id, "subject": ch.subject, "idx": idx,
                   "members": ch.members, "rank": ch.rank, "state": State.firing,
                   "started": ch.started, "seq": 0, "sent": [], "value": ch.value,
                   "threshold": ch.threshold, "event": ch.event, "flapping": ch.flapping,
                   "escalation": 0, "acked_by": None, "acked_tier": None, "last_ts": ch.ts,
                   "district_at": None, "plan": 0,
                   "muted": None, "muted_at": 0, "paused": 0, "held": False,
                   "times": {}, "dispatched_to": None, "community_at": None, "street_at": None}
            inc["route"] = self.router.route(self.present._labels(_Inc(inc)))
            self._base(inc, ch)
            self.incidents[inc["aid"]] = inc
            self._mute(inc, ch.ts)
            self._send(inc, State.firing, None, ch.ts, self._reach(inc, ch.ts))
            self._plan_reminders(inc, ch.ts)
            self._plan_escalation(inc, ch.ts, ch.ts)
        elif ch.what == REOPEN:
            inc = self.resolved.pop(ch.alert_id, None) or self.incidents.get(ch.alert_id)
            if inc is None:
                return self._apply(Change(FIRE, ch.rule, ch.subject, ch.alert_id, ch.rank, ch.ts,
                                          ch.started, ch.value, ch.threshold, ch.event,
                                          ch.members, ch.flapping))
            inc.update(state=State.firing, rank=ch.rank, value=ch.value, threshold=ch.threshold,
                       flapping=True, acked_by=None, acked_tier=None, escalation=0,
                       times={"fired": ch.ts}, dispatched_to=None, community_at=None,
                       street_at=None)
            self.closable.pop(inc["aid"], None)
            self.incidents[inc["aid"]] = inc
            self._base(inc, ch)
            inc["paused"] = 0
            self._mute(inc, ch.ts)
            self._send(inc, State.firing, State.resolved, ch.ts, self._reach(inc, ch.ts))
            self._plan_reminders(inc, ch.ts)
            self._plan_escalation(inc, ch.ts, ch.ts)
        elif ch.what == UPGRADE:
            inc = self.incidents.get(ch.alert_id)
            if inc is None or ch.rank <= inc["rank"]:
                return
            inc.update(rank=ch.rank, value=ch.value, threshold=ch.threshold, event=ch.event)
            self._base(inc, ch)
            self._mute(inc, ch.ts)
            self._send(inc, State.firing, State.firing, ch.ts, self._reach(inc, ch.ts))
            if not self._settled(inc):
                self._plan_escalation(inc, inc["started"], ch.ts)
        elif ch.what == DOWNGRADE:
            inc = self.incidents.get(ch.alert_id)
            if inc is None or ch.rank >= inc["rank"]:
                return
            inc.update(rank=ch.rank, value=ch.value, threshold=ch.threshold)
            self._base(inc, ch)
            self._mute(inc, ch.ts)
            self._send(inc, State.firing, State.firing, ch.ts, [], lowered=True,
                       cleared=(ch.value, ch.cleared))
        elif ch.what == RESOLVE:
            inc = self.incidents.pop(ch.alert_id, None)
            if inc is None:
                return
            prev = inc["state"]
            inc["state"] = State.resolved
            self._base(inc, ch)
            self._send(inc, State.resolved, prev, ch.ts, [],
                       cleared=(ch.value, ch.cleared) if ch.cleared is not None else None)
            inc["muted"], inc["held"] = None, False
            spec = ch.rule.spec
            if getattr(spec, "flapping", None):
                self.resolved[inc["aid"]] = inc
                self.deadlines.set(ch.ts + spec.flapping.window + 1, ("forget", inc["aid"]))
            if inc["acked_by"]:                # taken in hand: it awaits its closing
                inc["times"]["resolved"] = ch.ts
                self.closable[inc["aid"]] = inc
                self.deadlines.set(ch.ts + hd.CLOSABLE_FOR, ("unclose", inc["aid"], inc["plan"]))

    def _base(self, inc: dict, ch: Change) -> None:
        view = _Inc(inc)
        self.present._rebase(view, ch)
        inc["base"] = view.base

    def _reach(self, inc: dict, ts: int) -> list:
        """The targets its severity reaches now that were not told yet."""
        if inc["idx"] is None:
            return []
        place = self.reg.place_of(inc["idx"])
        category = self.present._category(_Inc(inc)).value
        return [t for t in self.router.targets(inc["route"], Severity.of_rank(inc["rank"]), place,
                                               category, ts, inc["idx"]) if t not in inc["sent"]]

    def _send(self, inc: dict, state: State, prev: State | None, ts: int, new: list,
              extra: str = "", only: list | None = None, lowered: bool = False,
              cleared: tuple | None = None, handling: dict | None = None) -> None:
        inc["last_ts"] = max(inc["last_ts"], ts)
        if inc["muted"] and state not in _TOLD_WHILE_MUTED:
            inc["held"] = True
            return
        inc["seq"] += 1
        inc["sent"] += new
        n = nt.finish(inc["base"], seq=inc["seq"], severity=Severity.of_rank(inc["rank"]),
                      state=state, previous=prev, ts_ms=ts, tz=self.reg.tz,
                      flapping=inc["flapping"], escalation=inc["escalation"],
                      acked_by=inc["acked_by"], acked_tier=inc["acked_tier"],
                      extra_summary=extra, lowered=lowered, cleared=cleared, handling=handling)
        if inc["muted"]:
            n["silenced"] = inc["muted"]
        for t in (only if only is not None else inc["sent"]):
            self.notices.append(nt.for_target(n, t.tier.value, t.target, t.worker))

    def _plan_reminders(self, inc: dict, ts: int) -> None:
        inc["plan"] += 1
        r = inc["route"]
        if r.remind_every and r.max_reminders:
            self.deadlines.set(ts + r.remind_every, ("rem", inc["aid"], inc["plan"], 1), after=True)

    def _plan_escalation(self, inc: dict, street_since: int, now: int) -> None:
        told = {t.tier for t in inc["sent"]}
        r = inc["route"]
        if Tier.district in told and inc["district_at"] is None:
            inc["district_at"] = now
        below = self._below_street(inc, told)
        if (r.escalate_grid or r.escalate_community) and Tier.community in told \
                and inc["community_at"] is None:
            inc["community_at"] = now
        if below is Tier.community:
            due = street_since + r.escalate_grid + inc["paused"]
        elif below is Tier.street:
            due = inc["community_at"] + r.escalate_community
        elif Tier.district not in told and r.escalate_street:
            due = inc["street_at"] + r.escalate_street if inc["street_at"] is not None \
                else street_since + r.escalate_street + inc["paused"]
        elif Tier.district in told and Tier.city not in told and r.escalate_district:
            due = inc["district_at"] + r.escalate_district
        else:
            return
        self.deadlines.set(max(due, now), ("esc", inc["aid"], inc["plan"]), after=True)

    @staticmethod
    def _below_street(inc: dict, told: set) -> Tier | None:
        """The community chain's next rung below the street (网格 → 社区 → 街道), if any."""
        r = inc["route"]
        if Tier.street in told or Tier.district in told:
            return None
        if r.escalate_grid and Tier.community not in told:
            return Tier.community
        if r.escalate_community and Tier.community in told:
            return Tier.street
        return None

    def _incident_due(self, due: int, what: str, aid: str, plan: int = 0, step: int = 0) -> None:
        if what == "forget":
            self.resolved.pop(aid, None)
            return
        if what == "unclose":
            if aid in self.closable and self.closable[aid]["plan"] == plan:
                del self.closable[aid]
            return
        inc = self.incidents.get(aid)
        if inc is None or self._settled(inc) or plan != inc["plan"] or inc["muted"]:
            return
        until = hd.still_to_come(inc["route"].escalate_until)
        if what == "esc":
            told = {t.tier for t in inc["sent"]}
            nxt = self._below_street(inc, told) or \
                (Tier.district if Tier.district not in told else Tier.city)
            if nxt in told:
                return
            place = self.reg.place_of(inc["idx"]) if inc["idx"] is not None else None
            target = self.router.target(nxt.value, place,
                                        self.present._category(_Inc(inc)).value, due)
            inc["escalation"] += 1
            prev = inc["state"]
            inc["state"] = State.escalated
            self._send(inc, State.escalated, prev, due, [target] if target else [],
                       f"超过{format_duration(due - inc['started'])}无人{until}，已升级至"
                       f"{nt.tier_cn(nxt.value)}。")
            if nxt == Tier.district:
                inc["district_at"] = due
                self._plan_escalation(inc, inc["started"], due)
            elif nxt == Tier.community:
                inc["community_at"] = due
                self._plan_escalation(inc, inc["started"], due)
            elif nxt == Tier.street:
                inc["street_at"] = due
                self._plan_escalation(inc, inc["started"], due)
        elif what == "rem":
            prev = inc["state"]
            targets = [t for t in inc["sent"] if t.tier in (Tier.grid, Tier.street, Tier.community)]
            self._send(inc, State.reminder, prev, due, [], f"第{step}次提醒：尚未{until}。",
                       only=targets)
            inc["state"] = prev
            if step < inc["route"].max_reminders:
                self.deadlines.set(due + inc["route"].remind_every, ("rem", aid, plan, step + 1),
                                   after=True)


class _Inc:
    """An incident of the model seen through the attribute names the presentation helpers
    read (place, category, routing labels, notice text)."""

    def __init__(self, inc: dict) -> None:
        self.aid, self.rule, self.subject = inc["aid"], inc["rule"], inc["subject"]
        self.idx, self.members, self.rank = inc["idx"], inc["members"], inc["rank"]
        self.started, self.value, self.threshold = inc["started"], inc["value"], inc["threshold"]
        self.event = inc["event"]
        self.base = inc.get("base")
