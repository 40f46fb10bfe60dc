"""The life of an incident after a rule fires: tiers told, acknowledgement, escalation, reminders.

``AlertBook`` keeps every open incident: which tiers and workers were told (so each of them is
told when it resolves), who acknowledged, how far it has climbed street → district → city, and
the next reminder. Escalation and reminder deadlines are timers on the engine's one heap, so
they fall due in event time like everything else and survive a snapshot.
"""

from __future__ import annotations

import heapq
from typing import Any

import msgspec
from collections.abc import Callable

from pipeline.core import notices as nt
from pipeline.core.handling import Handling, still_to_come
from pipeline.core.models import Ack, Category, Severity, State, Tier
from pipeline.core.registry import Registry
from pipeline.core.routing import RouteOptions, Router, Target, sensor_labels
from pipeline.core.silences import NEVER, Silence, SilenceBook
from rules.compiler import modifier_notes
from rules.evaluators import DOWNGRADE, FIRE, REOPEN, RESOLVE, UPGRADE, Change, Timers
from rules.schema import format_duration

LIFECYCLE = -1          # timer owner number of the AlertBook
# what a silence never holds: the end of what the tiers were told, and people taking it in hand
_TOLD_WHILE_MUTED = frozenset((State.resolved, State.acknowledged, State.dispatched, State.on_site,
                               State.handled, State.closed))
SILENCE = -3            # ... and of the silences' edges (a silence starts or stops muting)


class IncidentState(msgspec.Struct):
    """An incident as a snapshot keeps it, by name (snapshot version 2; version 1 was a list in
    this order, shorter in older snapshots: ``from_row``). A field added later takes its default
    when an older snapshot lacks it."""

    aid: str
    rule: str
    subject: Any
    idx: Any
    members: Any
    rank: Any
    state: str
    started: Any
    seq: Any
    sent: list                  # [tier, target, worker id or None]
    value: Any
    threshold: Any
    event: Any
    flapping: Any
    escalation: Any
    acked_by: Any
    acked_tier: Any
    reminders: Any
    last_ts: Any
    district_at: Any
    gen: Any
    fired: Any = 0              # older than these: any link's seq is good
    muted: Any = None
    muted_at: Any = 0
    paused: Any = 0
    held: Any = False
    times: dict = {}            # older than these: not handled yet
    dispatched_to: Any = None
    community_at: Any = None
    street_at: Any = None

    @classmethod
    def from_row(cls, row: list) -> dict:
        """A version 1 row (21, 22, 26 or 30 values) by name; the fields it lacks are left out."""
        return dict(zip(cls.__struct_fields__, row, strict=False))


class Incident:
    __slots__ = ("aid", "rule", "subject", "idx", "members", "rank", "state", "started", "seq",
                 "sent", "route", "value", "threshold", "event", "flapping", "escalation",
                 "acked_by", "acked_tier", "reminders", "base", "last_ts", "district_at", "gen",
                 "fired", "muted", "muted_at", "paused", "held", "times", "dispatched_to",
                 "community_at", "street_at")
    aid: str
    rule: str                       # the rule's id
    subject: int | str              # a sensor's index, or a group (a gateway "gw:...", a correlation's)
    idx: int | None                 # the sensor whose place and kind it has (None: none)
    members: list[int] | None
    rank: int
    state: State
    started: int
    seq: int
    sent: list[Target]
    route: RouteOptions
    value: float | None
    threshold: float | None
    event: str | None
    flapping: bool
    escalation: int
    acked_by: str | None
    acked_tier: str | None
    reminders: int
    base: dict[str, Any]            # the notice as nt.base_notice made it (_rebase)
    last_ts: int
    district_at: int | None
    gen: int
    fired: int
    muted: str | None               # the silence that mutes it
    muted_at: int
    paused: int
    held: bool
    times: dict[str, int]
    dispatched_to: str | None
    community_at: int | None
    street_at: int | None

    def dump(self, sid: Callable[[Any], Any]) -> IncidentState:
        return IncidentState(
            self.aid, self.rule, sid(self.subject), sid(self.idx) if self.idx is not None else None,
            [sid(m) for m in self.members] if self.members else None, self.rank,
            self.state.value, self.started, self.seq,
            [[t.tier.value, t.target, t.worker.id if t.worker else None] for t in self.sent],
            self.value, self.threshold, self.event, self.flapping, self.escalation,
            self.acked_by, self.acked_tier, self.reminders, self.last_ts, self.district_at,
            self.gen, self.fired, self.muted, self.muted_at, self.paused, self.held,
            self.times, self.dispatched_to, self.community_at, self.street_at)


class _FactsOnAsk(dict):
    """Labels whose `sensor.*` entries (``routing.sensor_labels``) are read from the registry
    when first asked for, by ``get`` (all that ``Router.route`` calls)."""

    registry: Registry
    idx: int
    facts: dict[str, Any] | None

    def __init__(self, registry: Registry, idx: int, labels: dict[str, Any]) -> None:
        super().__init__(labels)
        self.registry, self.idx, self.facts = registry, idx, None

    def get(self, key: str, default: Any = None) -> Any:
        if not key.startswith("sensor."):
            return dict.get(self, key, default)
        if self.facts is None:
            self.facts = self.registry.sensor_facts(self.idx)
        return self.facts.get(key[7:], default)


class AlertBook(Handling):
    def __init__(self, registry: Registry, router: Router, timers: Timers,
                 rules: dict[str, Any], kinds: dict[str, Any],
                 subject_name: Callable[[int | str], str]) -> None:
        self.registry = registry
        self.router = router
        self.timers = timers
        self.rules = rules              # rule id -> Evaluator (with .loaded for pack/spec)
        self.kinds = kinds
        self.subject_name = subject_name
        self.open: dict[str, Incident] = {}
        self.resolved: dict[str, Incident] = {}   # kept only while a flapping rule may reopen
        self.silences = SilenceBook()
        self.closable: dict[str, Incident] = {}   # resolved, taken in hand, not closed yet

    # ---- from the rules ----------------------------------------------------------------
    def apply(self, ch: Change, out: list[dict]) -> None:
        if ch.what in (UPGRADE, DOWNGRADE, RESOLVE) and self.closed_early(ch):
            return                              # closed while firing: tells nobody (handling.py)
        if ch.what == FIRE:
            self._fire(ch, out)
        elif ch.what == REOPEN:
            inc = self.resolved.pop(ch.alert_id, None) or self.open.get(ch.alert_id)
            if inc is None:
                self._fire(ch, out)
                return
            inc.state, inc.rank, inc.value, inc.threshold = State.firing, ch.rank, ch.value, ch.threshold
            inc.flapping, inc.acked_by, inc.acked_tier, inc.escalation = True, None, None, 0
            self.closable.pop(inc.aid, None)        # a new firing: handled anew
            inc.times, inc.dispatched_to, inc.community_at, inc.street_at = {"fired": ch.ts}, None, None, None
            self.open[inc.aid] = inc
            self._rebase(inc, ch)
            inc.paused = 0
            self._mute_check(inc, ch.ts, out)
            self._send(inc, State.firing, State.resolved, ch.ts, out, self._widen(inc, ch.ts))
            inc.fired = inc.seq
            self._remind_from(inc, ch.ts)
            self._escalate_from(inc, ch.ts, ch.ts)
        elif ch.what == UPGRADE:
            inc = self.open.get(ch.alert_id)
            if inc is None or ch.rank <= inc.rank:
                return
            inc.rank, inc.value, inc.threshold, inc.event = ch.rank, ch.value, ch.threshold, ch.event
            self._rebase(inc, ch)
            self._mute_check(inc, ch.ts, out)       # a silence may match some severities only
            self._send(inc, State.firing, State.firing, ch.ts, out, self._widen(inc, ch.ts))
            if not self.settled(inc):
                self._escalate_from(inc, inc.started, ch.ts)
        elif ch.what == DOWNGRADE:
            # a per-level clear held: one level down, and every tier that was told hears it
            inc = self.open.get(ch.alert_id)
            if inc is None or ch.rank >= inc.rank:
                return
            inc.rank, inc.value, inc.threshold = ch.rank, ch.value, ch.threshold
            self._rebase(inc, ch)
            self._mute_check(inc, ch.ts, out)
            self._send(inc, State.firing, State.firing, ch.ts, out, [], lowered=True,
                       cleared=(ch.value, ch.cleared))
        elif ch.what == RESOLVE:
            inc = self.open.pop(ch.alert_id, None)
            if inc is None:
                return
            prev = inc.state
            inc.state = State.resolved
            self._rebase(inc, ch)                   # the text still tells what fired
            # a resolve reaches every tier that was told it fired, silenced or not
            self._send(inc, State.resolved, prev, ch.ts, out, [],
                       cleared=(ch.value, ch.cleared) if ch.cleared is not None else None)
            inc.muted, inc.held = None, False       # what was held is over: nobody is owed it
            self.keep_while_flapping(inc, ch.ts)
            self.await_closing(inc, ch)

    def keep_while_flapping(self, inc: Incident, ts: int) -> None:
        """A resolved incident of a flapping rule is kept until its window is over."""
        spec = self.rules[inc.rule].spec
        if getattr(spec, "flapping", None):
            self.resolved[inc.aid] = inc
            self.timers.push(ts + spec.flapping.window + 1, LIFECYCLE, (inc.aid, "forget", 0))

    def _fire(self, ch: Change, out: list[dict]) -> None:
        rule = ch.rule
        idx = ch.subject if isinstance(ch.subject, int) else (ch.members[0] if ch.members else None)
        inc = Incident()
        inc.aid, inc.rule, inc.subject, inc.idx = ch.alert_id, rule.id, ch.subject, idx
        inc.members, inc.rank, inc.state, inc.started = ch.members, ch.rank, State.firing, ch.started
        inc.seq, inc.sent, inc.value, inc.threshold = 0, [], ch.value, ch.threshold
        inc.event, inc.flapping, inc.escalation = ch.event, ch.flapping, 0
        inc.acked_by = inc.acked_tier = None
        inc.reminders, inc.last_ts, inc.district_at, inc.gen = 0, ch.ts, None, 0
        inc.muted, inc.muted_at, inc.paused, inc.held = None, 0, 0, False
        inc.times, inc.dispatched_to, inc.community_at, inc.street_at = {}, None, None, None
        inc.route = self.router.route(self._route_labels(inc))
        self._rebase(inc, ch)
        self.open[inc.aid] = inc
        self._mute_check(inc, ch.ts, out)
        self._send(inc, State.firing, None, ch.ts, out, self._widen(inc, ch.ts))
        inc.fired = inc.seq
        self._remind_from(inc, ch.ts)
        self._escalate_from(inc, ch.ts, ch.ts)

    # ---- from people -------------------------------------------------------------------
    def ack(self, ack: Ack, out: list[dict],
            may_ack: Callable[[Ack, Any, str], str | None] | None = None) -> tuple[str, str] | None:
        """Apply an acknowledgement; returns (dead-letter reason, why) if refused, or None.
        ``may_ack(ack, place, category)``: why its sender may not acknowledge this incident
        (pipeline/core/identity.py). A push link's ack (``seq``) is its token's: good for the firing
        its notice belonged to, not for the same incident firing again after it resolved."""
        if ack.state not in (None, "acknowledged"):
            return self.handle(ack, out, may_ack)      # dispatched … closed: pipeline/core/handling.py
        inc = self.open.get(ack.alert_id)
        if inc is None:
            return "bad_ack", f"no open incident {ack.alert_id} (resolved already, or never existed)"
        refused = self._may(inc, ack, may_ack)
        if refused:
            return refused
        if inc.acked_by:
            return None                      # a second ack changes nothing: idempotent
        # The notices are built first, on the incident as it will be; it keeps that state only
        # once they exist: a notice that cannot be built must not leave an incident
        # acknowledged in silence (with its escalation stopped).
        before = inc.acked_by, inc.acked_tier, inc.state, inc.seq, inc.last_ts
        before_times = inc.times
        prev = inc.state
        inc.acked_by, inc.acked_tier, inc.state = ack.by, ack.tier.value, State.acknowledged
        inc.times = {**before_times, "acknowledged": max(ack.ts_ms, inc.last_ts)}
        told: list[dict] = []
        try:
            self._send(inc, State.acknowledged, prev, max(ack.ts_ms, inc.last_ts), told, [])
        except Exception:
            inc.acked_by, inc.acked_tier, inc.state, inc.seq, inc.last_ts = before
            inc.times = before_times
            raise
        out += told
        return None

    def _may(self, inc: Incident, ack: Ack,
             may_ack: Callable[[Ack, Any, str], str | None] | None) -> tuple[str, str] | None:
        """Why ``ack`` may not act on ``inc``: a push link's for another firing, or a sender
        out of scope."""
        if ack.seq is not None:
            if ack.seq < inc.fired:
                return "bad_ack", (f"the alert this link was for is over: it resolved and fired "
                                   f"again (seq {inc.fired}); the link came with seq {ack.seq}")
        elif may_ack is not None:
            place = self.registry.place_of(inc.idx) if inc.idx is not None else None
            why = may_ack(ack, place, self._category(inc).value)
            if why:
                return "forbidden", why
        return None

    # ---- deadlines ---------------------------------------------------------------------
    def on_timer(self, due: int, key: tuple, out: list[dict]) -> None:
        aid, what, gen = key[0], key[1], key[2]
        if what == "forget":
            self.resolved.pop(aid, None)
            return
        if what == "unclose":
            self.unclose(aid, gen)
            return
        inc = self.open.get(aid)
        if inc is None or self.settled(inc) or gen != inc.gen or inc.muted:
            return        # resolved, taken in hand, planned again since, or paused by a silence
        if what == "esc":
            told = {t.tier for t in inc.sent}
            nxt = self.low_rung(inc, told) or (Tier.district if Tier.district not in told else Tier.city)
            if nxt in told:
                return
            place = self.registry.place_of(inc.idx) if inc.idx is not None else None
            # (ignored: a place is None only for an incident without a sensor, which
            # none is: a group's is its first member, _fire; city and dept do not read it)
            target = self.router.target(nxt.value, place, self._category(inc).value, due)  # type: ignore[arg-type]
            inc.escalation += 1
            prev = inc.state
            inc.state = State.escalated
            self._send(inc, State.escalated, prev, due, out, [target] if target else [],
                       f"超过{format_duration(due - inc.started)}无人{still_to_come(inc.route.escalate_until)}，"
                       f"已升级至{nt.tier_cn(nxt.value)}。")
            if nxt == Tier.district:
                inc.district_at = due
                self._escalate_from(inc, inc.started, due)
            elif nxt in (Tier.community, Tier.street):     # the community chain climbs on
                inc.community_at = inc.community_at if nxt is Tier.street else due
                inc.street_at = due if nxt is Tier.street else None
                self._escalate_from(inc, inc.started, due)
        elif what == "rem":
            step = key[3]
            inc.reminders = step
            prev = inc.state
            targets = [t for t in inc.sent if t.tier in (Tier.grid, Tier.street, Tier.community)]
            self._send(inc, State.reminder, prev, due, out, [],
                       f"第{step}次提醒：尚未{still_to_come(inc.route.escalate_until)}。", only=targets)
            inc.state = prev
            if step < inc.route.max_reminders:      # (remind_every is set: _remind_from planned step 1)
                self.timers.push_after(due + inc.route.remind_every, LIFECYCLE, (aid, "rem", gen, step + 1))  # type: ignore[operator]

    # ---- silences (pipeline/core/silences.py) -----------------------------------------------
    # A muted incident is kept and judged as any other, but what it would tell the tiers is
    # held (``held``), nobody new is told, and escalation and reminders stand still; a resolve
    # or an acknowledgement still reaches every tier already told. When no silence mutes it
    # any more, the tiers it reaches are told how it stands, and escalation goes on with the
    # muted time added to its deadlines (``paused``; the district's deadline moves with it).
    def add_silence(self, s: Silence, now: int, out: list[dict]) -> None:
        self.silences.items[s.id] = s
        if s.end < NEVER:       # over for good once time passes its end (not a late reading)
            heapq.heappush(self.timers.heap, (s.end, -1, SILENCE, ("over", s.id)))
        self._silence_edge(now, out)

    def end_silence(self, sid: str, now: int, out: list[dict]) -> None:
        del self.silences.items[sid]
        self._silence_edge(now, out)

    def _silence_edge(self, t: int, out: list[dict]) -> None:
        """At ``t`` a silence may have started or stopped muting: look at every open incident,
        and plan the next edge. An edge acts before anything else due at the same time."""
        for inc in list(self.open.values()):
            self._mute_check(inc, t, out)
        self._plan_edge(t)

    def _plan_edge(self, t: int) -> None:
        """Edges matter only to open incidents: none is planned while there are none (a
        window's edges would otherwise run every week of a long replay's quiet start)."""
        sb = self.silences
        sb.gen += 1
        sb.due = sb.next_edge(t) if self.open and sb.items else NEVER
        if sb.due < NEVER:
            heapq.heappush(self.timers.heap, (sb.due, -1, SILENCE, ("edge", sb.gen)))

    def on_silence_timer(self, due: int, key: tuple, out: list[dict]) -> None:
        what, which = key
        if what == "over":
            s = self.silences.items.get(which)
            if s is None or s.end != due:
                return                  # ended before, or made again since
            del self.silences.items[which]
            self._silence_edge(due, out)
        elif which == self.silences.gen:
            self._silence_edge(due, out)

    def silence_labels(self, inc: Incident) -> dict[str, Any]:
        labels = self._labels(inc)
        labels["sensor_id"] = self.subject_name(inc.idx if inc.idx is not None else inc.subject)
        return labels

    def _mute_check(self, inc: Incident, t: int, out: list[dict]) -> None:
        """``t``, or the incident's own latest time if later (an edge can be due behind a
        reading that went ahead of the watermark)."""
        if not self.silences.items:
            if inc.muted is None:
                return
        elif self.silences.due == NEVER:
            self._plan_edge(t)          # the first incident open while silences are in force
        t = max(t, inc.last_ts)
        sid = self.silences.muting(self.silence_labels(inc), t) if self.silences.items else None
        if sid is not None:
            if inc.muted is None:
                inc.muted_at = max(t, inc.started)
            inc.muted = sid
        elif inc.muted is not None:
            self._unmute(inc, t, out)

    def _unmute(self, inc: Incident, t: int, out: list[dict]) -> None:
        pause = max(0, t - inc.muted_at)
        inc.paused += pause
        for told_at in ("district_at", "community_at", "street_at"):    # deadlines move on
            if getattr(inc, told_at) is not None:
                setattr(inc, told_at, getattr(inc, told_at) + pause)
        inc.muted = None
        ts = max(t, inc.last_ts)
        if inc.held:
            inc.held = False
            state = State.acknowledged if inc.acked_by else State.firing
            inc.state = state
            self._send(inc, state, None, ts, out, self._widen(inc, ts), "静默结束，补发静默期间暂缓的通知。")
        if not self.settled(inc):
            self._remind_from(inc, ts)            # (voids what was planned before)
            self._escalate_from(inc, inc.started, ts)

    def _remind_from(self, inc: Incident, ts: int) -> None:
        """Reminders every `remind_every` from ``ts``; any earlier plan is void (``gen``)."""
        inc.gen += 1
        inc.reminders = 0
        r = inc.route
        if r.remind_every and r.max_reminders:
            self.timers.push_after(ts + r.remind_every, LIFECYCLE, (inc.aid, "rem", inc.gen, 1))

    def _escalate_from(self, inc: Incident, street_since: int, now: int) -> None:
        """Plan the next rung. Each tier's deadline runs from when that tier was told: the
        street's from the incident's start, the district's from when it was told (at once by a
        yellow or higher severity, or by the first escalation)."""
        told = {t.tier for t in inc.sent}
        r = inc.route
        if Tier.district in told and inc.district_at is None:
            inc.district_at = now
        low = self.low_due(inc, told, street_since, now) if r.escalate_grid or r.escalate_community else None
        if low is not None:
            due = low
        elif Tier.district not in told and r.escalate_street:
            # from when the street was told (moved on by a silence's pause, _unmute), else
            # from the start, plus the time silences held it
            due = inc.street_at + r.escalate_street if inc.street_at is not None \
                else street_since + r.escalate_street + inc.paused
        elif Tier.district in told and Tier.city not in told and r.escalate_district:
            due = inc.district_at + r.escalate_district  # type: ignore[operator]  # district_at: set above
        else:
            return
        self.timers.push_after(max(due, now), LIFECYCLE, (inc.aid, "esc", inc.gen))

    # ---- notices -----------------------------------------------------------------------
    def _category(self, inc: Incident) -> Category:
        e = self.rules[inc.rule]
        spec = e.spec
        if spec.category:
            return spec.category
        kind = self.registry.kinds[self.registry.kind_of[inc.idx]] if inc.idx is not None else spec.sensors[0]
        return self.kinds[kind].category if kind in self.kinds else Category.device

    def _labels(self, inc: Incident) -> dict[str, Any]:
        reg = self.registry
        labels: dict[str, Any] = {"rule_id": inc.rule, "category": self._category(inc).value,
                                  "severity": Severity.of_rank(inc.rank).value}
        if inc.idx is not None:
            labels.update(sensor_labels(reg, inc.idx))
        return labels

    def _route_labels(self, inc: Incident) -> dict[str, Any]:
        """``_labels`` as routing reads them: a route asks for few, and a sensor's `sensor.*`
        facts (registry columns, its attrs parsed) are read only if a route asks for one (the
        built-in routing does for gas alerts only)."""
        if inc.idx is None:
            return self._labels(inc)
        reg = self.registry
        p = reg.place_of(inc.idx)
        return _FactsOnAsk(reg, inc.idx, {
            "rule_id": inc.rule, "category": self._category(inc).value,
            "severity": Severity.of_rank(inc.rank).value, "kind": reg.kinds[reg.kind_of[inc.idx]],
            "district": p.district, "street": p.street, "community": p.community, "grid": p.grid})

    def _widen(self, inc: Incident, ts: int) -> list[Target]:
        """Targets the current severity reaches that were not told yet."""
        if inc.idx is None:
            return []
        place = self.registry.place_of(inc.idx)
        have = set(inc.sent)
        return [t for t in self.router.targets(inc.route, Severity.of_rank(inc.rank), place,
                                               self._category(inc).value, ts, inc.idx)
                if t not in have]

    def _rebase(self, inc: Incident, ch: Change) -> None:
        reg = self.registry
        e = self.rules[inc.rule]
        spec, idx = e.spec, inc.idx
        kind = reg.kinds[reg.kind_of[idx]] if idx is not None else "unknown"
        k = self.kinds.get(kind)
        notes = (modifier_notes(e.loaded, reg, idx)
                 if spec.modifiers and idx is not None and isinstance(inc.subject, int) else [])
        members = [reg.sensor_ids[m] for m in inc.members] if inc.members else None
        extra, group, as_kind, more = e.notice_facts(inc.subject, ch.heard, kind, len(members or ()),
                                                     lambda ms: nt.fmt_time(ms, reg.tz))
        out_kind = as_kind or kind
        notes = notes + more
        inc.base = nt.base_notice(
            alert_id=inc.aid, rule_id=inc.rule, rule_name=spec.name, rule_type=spec.type,
            sensor_id=reg.sensor_ids[idx] if idx is not None else str(inc.subject), kind=out_kind,
            kind_name=k.name if k else kind,
            unit=k.unit if k and e.shows_unit else "",
            category=self._category(inc), severity=Severity.of_rank(inc.rank),
            place=reg.place_of(idx), registry=reg, idx=idx, value=inc.value,  # type: ignore[arg-type]  # idx: on_timer
            threshold=inc.threshold, event=inc.event,
            event_name=k.events.get(inc.event, inc.event) if k and inc.event else None,
            started_ms=inc.started, title_t=spec.title, summary_t=spec.summary, notes=notes,
            group=group, members=members, extra=extra, instruction_t=spec.instruction)

    def _send(self, inc: Incident, state: State, prev: State | None, ts: int, out: list[dict],
              new: list[Target], extra_summary: str = "", only: list[Target] | None = None,
              lowered: bool = False, cleared: tuple | None = None,
              handling: dict | None = None) -> None:
        inc.last_ts = max(inc.last_ts, ts)
        if inc.muted and state not in _TOLD_WHILE_MUTED:
            inc.held = True         # told when the silence ends (_unmute); nobody is added now
            return
        inc.seq += 1
        inc.sent.extend(new)
        n = nt.finish(inc.base, seq=inc.seq, severity=Severity.of_rank(inc.rank), state=state,
                      previous=prev, ts_ms=ts, tz=self.registry.tz, flapping=inc.flapping,
                      escalation=inc.escalation, acked_by=inc.acked_by, acked_tier=inc.acked_tier,
                      extra_summary=extra_summary, lowered=lowered, cleared=cleared,
                      handling=handling)
        if inc.muted:
            n["silenced"] = inc.muted
        for t in (only if only is not None else inc.sent):
            out.append(nt.for_target(n, t.tier.value, t.target, t.worker))

    # ---- snapshot ----------------------------------------------------------------------
    def dump(self, sid: Callable[[Any], Any]) -> dict:
        state = {"open": [i.dump(sid) for i in self.open.values()],
                 "resolved": [i.dump(sid) for i in self.resolved.values()],
                 "silences": self.silences.dump(),
                 "silence_plan": [self.silences.gen, self.silences.due]}
        if self.closable:                    # (absent: a snapshot as before the handling states)
            state["closable"] = [i.dump(sid) for i in self.closable.values()]
        return state

    def load(self, state: dict, sidx: Callable[[Any], Any]) -> int:
        lost = 0
        for bucket, rows in (("open", state.get("open", [])), ("resolved", state.get("resolved", [])),
                             ("closable", state.get("closable", []))):
            for row in rows:
                # one incident both flapping-resolved and awaiting its closing stays one object
                inc = self.resolved.get(row["aid"]) if bucket == "closable" else None
                inc = inc or self._load_one(msgspec.convert(row, IncidentState), sidx)
                if inc is None:
                    lost += 1
                else:
                    getattr(self, bucket)[inc.aid] = inc
        self.silences.load(state.get("silences", []))
        self.silences.gen, self.silences.due = state.get("silence_plan", (0, NEVER))
        return lost

    def _load_one(self, row: IncidentState, sidx: Callable[[Any], Any]) -> Incident | None:
        (aid, rule, subject, idx, members, rank, state, started, seq, sent, value, threshold,
         event, flapping, escalation, acked_by, acked_tier, reminders, last_ts, district_at,
         gen) = (row.aid, row.rule, row.subject, row.idx, row.members, row.rank, row.state,
                 row.started, row.seq, row.sent, row.value, row.threshold, row.event, row.flapping,
                 row.escalation, row.acked_by, row.acked_tier, row.reminders, row.last_ts,
                 row.district_at, row.gen)
        if rule not in self.rules:
            return None
        inc = Incident()
        inc.aid, inc.rule, inc.subject = aid, rule, sidx(subject)
        inc.idx = sidx(idx) if idx is not None else None
        if inc.subject is None or (idx is not None and inc.idx is None):
            return None
        inc.members = [m for m in (sidx(x) for x in members) if m is not None] if members else None
        inc.rank, inc.state, inc.started, inc.seq = rank, State(state), started, seq
        inc.value, inc.threshold, inc.event, inc.flapping = value, threshold, event, flapping
        inc.escalation, inc.acked_by, inc.acked_tier = escalation, acked_by, acked_tier
        inc.reminders, inc.last_ts, inc.district_at, inc.gen = reminders, last_ts, district_at, gen
        inc.fired, inc.muted, inc.muted_at, inc.paused, inc.held = (row.fired, row.muted,
                                                                    row.muted_at, row.paused, row.held)
        inc.times, inc.dispatched_to, inc.community_at, inc.street_at = (
            dict(row.times), row.dispatched_to, row.community_at, row.street_at)
        inc.route = self.router.route(self._labels(inc))
        inc.sent = []
        for tier, target, worker in sent:
            w = self.registry.workers.get(worker) if worker else None
            inc.sent.append(Target(Tier(tier), target, w))
        fake = Change(FIRE, self.rules[rule], inc.subject, aid, rank, last_ts, started, value, threshold, event,
                      heard=inc.times.get("heard"))       # (a resolved one's: as it resolved)
        self._rebase(inc, fake)
        return inc
