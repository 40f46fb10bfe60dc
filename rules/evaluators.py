"""Where a rule decides: what the running form of every rule type shares. ``Evaluator`` is the
interface the engine and the lifecycle ask of a compiled rule; ``Stateful`` the levels machinery
of threshold, rate and window rules; each type's own evaluator is in its module (rules/types/).

Every evaluator keeps state only for what is active (a pending or firing incident, an open
window), keyed by the dense sensor number, so a million quiet sensors cost nothing here. It
reports what changed as ``Change`` records; the lifecycle (``pipeline.core.lifecycle``) turns those
into notices for the tiers.

Time is event time in epoch milliseconds. A transition that becomes due between two readings
(``for:`` elapsed, ``clear_for:`` elapsed) takes effect *at its due time*, whether a later reading
or the watermark shows it first, so the output does not depend on how input was batched.
"""

from __future__ import annotations

import hashlib
import heapq
import operator
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from rules.types.base import Binding

PENDING, FIRING, CLEARING, RESOLVED = 1, 2, 3, 4
FIRE, UPGRADE, DOWNGRADE, RESOLVE, REOPEN = "fire", "upgrade", "downgrade", "resolve", "reopen"
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
    "==": operator.eq, "!=": operator.ne}


def alert_id(rule_id: str, subject: str, started_ms: int) -> str:
    """Stable per incident: the same input always names an incident the same way, so a replay
    or a redelivery after a crash cannot mint a second incident."""
    h = hashlib.blake2b(f"{rule_id}|{subject}|{started_ms}".encode(), digest_size=8)
    return h.hexdigest()


class Change:
    """An incident changed: fired, went up a level, resolved, or fired again while flapping."""

    __slots__ = ("what", "rule", "subject", "alert_id", "rank", "ts", "started", "value",
                 "threshold", "event", "members", "flapping", "heard", "cleared")

    def __init__(self, what: str, rule: Evaluator, subject: int | str, aid: str, rank: int,
                 ts: int, started: int, value: float | None, threshold: float | None,
                 event: str | None = None, members: list[int] | None = None,
                 flapping: bool = False, heard: int | None = None,
                 cleared: float | None = None) -> None:
        self.what, self.rule, self.subject, self.alert_id = what, rule, subject, aid
        self.rank, self.ts, self.started, self.value = rank, ts, started, value
        self.threshold, self.event, self.members, self.flapping = threshold, event, members, flapping
        self.heard = heard          # absence: when the subject was last heard from (0: never)
        self.cleared = cleared      # the clear level that held (a resolve, a step-down)

    def __repr__(self) -> str:
        return (f"Change({self.what} {self.rule.id} {self.subject} rank={self.rank} ts={self.ts} "
                f"value={self.value})")


# order offset of reminders and escalations: after everything else due at the same millisecond
# (a rule's deadline first: an incident that resolves at that instant is neither reminded nor
# escalated), among themselves in the order they were set
AFTER = 1 << 48


class Timers:
    """One heap of (due, order, owner, key) for every rule and the lifecycle, so that everything
    due before a watermark happens in time order, whoever owns it."""

    __slots__ = ("heap", "n")

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, int, Any]] = []
        self.n = 0

    def push(self, due: int, owner: int, key: Any) -> None:
        self.n += 1
        heapq.heappush(self.heap, (due, self.n, owner, key))

    def push_after(self, due: int, owner: int, key: Any) -> None:
        """A reminder or an escalation: after every other timer due at the same time (AFTER)."""
        self.n += 1
        heapq.heappush(self.heap, (due, self.n + AFTER, owner, key))

    def pop_due(self, watermark: int) -> tuple[int, int, Any] | None:
        heap = self.heap
        if heap and heap[0][0] <= watermark:
            due, _, owner, key = heapq.heappop(heap)
            return due, owner, key
        return None


class TrackState(msgspec.Struct):
    """A Track as a snapshot keeps it, by name (snapshot version 2; version 1 was this list, in
    this order): a field added later takes its default when an older snapshot lacks it."""

    phase: int
    since: int
    started: int
    rank: int
    value: Any = None
    threshold: Any = None
    due: int = 0
    aid: str = ""
    flapping: Any = False
    event: Any = None
    extra: Any = None


class Track:
    """The life of one (rule, subject) while it is not quiet."""

    __slots__ = ("phase", "since", "started", "rank", "value", "threshold", "due", "aid",
                 "flapping", "event", "extra")
    phase: int
    since: int
    started: int
    rank: int
    value: float | None
    threshold: float | None
    due: int
    aid: str
    flapping: bool
    event: str | None
    extra: Any                  # the type's own: a count, a time last heard, the members

    def __init__(self, phase: int, since: int, rank: int, value: float | None,
                 threshold: float | None) -> None:
        self.phase, self.since, self.started, self.rank = phase, since, since, rank
        self.value, self.threshold, self.due, self.aid = value, threshold, 0, ""
        self.flapping, self.event, self.extra = False, None, None

    def dump(self) -> TrackState:
        return TrackState(self.phase, self.since, self.started, self.rank, self.value,
                          self.threshold, self.due, self.aid, self.flapping, self.event, self.extra)

    @classmethod
    def load(cls, named: dict) -> Track:
        s = msgspec.convert(named, TrackState)
        t = cls(s.phase, s.since, s.rank, s.value, s.threshold)
        t.started, t.due, t.aid, t.flapping, t.event, t.extra = (s.started, s.due, s.aid,
                                                                 s.flapping, s.event, s.extra)
        return t


class Evaluator:
    """A compiled rule: the interface the engine and the lifecycle ask of every rule type
    (``rules/types/``). ``number`` is the rule's place in the engine (timer owner).

    The engine's screening asks, once, when it is built: ``reads``, ``takes_late``,
    ``quiet_floor``, ``battery_ceiling``, ``event_names``, ``hears`` and ``scans_silence``; then
    it calls ``observe`` (readings in order), ``late`` (late readings), ``on_timer`` (a timer
    the rule set fell due) and ``on_change`` (a change of a rule it ``hears``). The lifecycle
    asks ``shows_unit`` and ``notice_facts`` when it words a notice; a snapshot ``dump``s and
    ``load``s the state (``tracks``: one ``Track`` per subject that is not quiet)."""

    type = ""
    reads = "value"          # which part of a reading it observes: value, battery, event, none
    takes_late = False       # whether a late reading can act on it (``late``; README "Late readings")
    scans_silence = False    # whether the engine's absence scan drives it (rules.types.base.WatchesSilence)

    def __init__(self, spec: Any, b: Binding) -> None:
        self.spec = spec
        self.id: str = spec.id
        self.number = b.number
        self.out = b.sink             # the engine's list of Changes
        self.timers = b.timers
        self.subject_name = b.subject_name
        self.tracks: dict[int | str, Track] = {}
        self.bump: dict[int, int] = b.bump    # sensor -> severity levels added by modifiers
        self.bump_all = 0
        self.selected: bytearray | None = b.selected   # `where:` mask by sensor number, None = all
        self.loaded: Any = b.loaded              # the LoadedRule (pack, file) it came from
        # sensor -> when its last incident of this rule ended: a late reading older than that
        # fell inside that incident (or is its redelivery) and must not open another one
        self.ended: dict[int | str, int] = {}

    # -- helpers shared by the types ------------------------------------------------------
    def _emit(self, what: str, s: int | str, tr: Track, ts: int, **kw: Any) -> None:
        rank = min(3, tr.rank + (self.bump.get(s, self.bump_all) if isinstance(s, int) else 0))
        self.out.append(Change(what, self, s, tr.aid, rank, ts, tr.started, tr.value,
                               tr.threshold, event=tr.event, flapping=tr.flapping, **kw))

    def _new_incident(self, s: int | str, tr: Track, ts: int) -> None:
        tr.phase = FIRING
        tr.aid = alert_id(self.id, self.subject_name(s), tr.started)
        self._emit(FIRE, s, tr, ts)

    # -- what the engine's screening asks, once --------------------------------------------
    def quiet_floor(self) -> tuple[float, dict] | None:
        """A value under which a reading of a sensor with no track open changes nothing, the
        same for every sensor it watches, and its tracks; None: it cannot say (the engine then
        asks it of every reading of its kinds)."""
        return None

    def battery_ceiling(self) -> float:
        """For a battery rule: the level over which a sensor with no track open changes
        nothing (+inf: it cannot say)."""
        return float("inf")

    def event_names(self) -> frozenset[str]:
        """The event names it acts on (an event no rule names is a heartbeat)."""
        return frozenset()

    def hears(self) -> list[str]:
        """The rules whose changes it is told of (``on_change``)."""
        return self.spec.counts()

    # -- evaluation -------------------------------------------------------------------------
    def observe(self, s: int, ts: int, x: Any) -> None:
        """A reading (the part ``reads`` names) of sensor ``s`` at event time ``ts``, in order."""

    def on_change(self, ch: Change) -> None:
        """An incident of a rule it ``hears`` changed."""

    def on_timer(self, due: int, key: Any) -> None:  # pragma: no cover - every type overrides
        raise AssertionError(f"{self.id}: unexpected timer")

    # -- what a notice says (the type says it; see ``rules.types.base.RuleType``) ------------
    @property
    def shows_unit(self) -> bool:
        from rules.types.base import TYPES      # (the types import this module)
        return TYPES[self.spec.type].shows_unit

    def notice_facts(self, subject: int | str, heard: int | None, kind: str, members: int,
                     fmt_time: Callable[[int], str]) -> tuple[dict, str | None, str | None, list[str]]:
        from rules.types.base import TYPES
        return TYPES[self.spec.type].notice_facts(self.spec, subject, heard, kind, members, fmt_time)

    def late(self, s: int, ts: int, x: Any) -> None:
        """A reading older than the sensor's newest, within ``allowed_lateness``. Only the
        types with ``takes_late`` act on it; the base acts on nothing."""

    def _ended(self, s: int | str, ts: int) -> None:
        if self.takes_late:
            self.ended[s] = ts

    def dump(self, sid: Callable[[int | str], Any]) -> dict:
        d: dict = {"tracks": [[sid(s), t.dump()] for s, t in self.tracks.items()]}
        if self.ended:
            d["ended"] = [[sid(s), ts] for s, ts in self.ended.items()]
        return d

    @staticmethod
    def by_subject(rows: list, sidx: Callable[[Any], int | str | None]) -> Iterator[tuple[int | str, Any]]:
        """A snapshot's ``[subject key, value]`` rows, of the subjects the registry still has."""
        for key, value in rows:
            s = sidx(key)
            if s is not None:
                yield s, value

    @staticmethod
    def by_sensor(rows: list, sidx: Callable[[Any], int | str | None]) -> Iterator[tuple[int, Any]]:
        """The same rows of a state kept per sensor (a window, a run, a silence): of the sensors
        the registry still has."""
        for key, value in rows:
            s = sidx(key)
            if isinstance(s, int):
                yield s, value

    def load(self, state: dict, sidx: Callable[[Any], int | str | None]) -> int:
        lost = 0
        for key, row in state.get("tracks", []):
            s = sidx(key)
            if s is None:
                lost += 1
            else:
                self.tracks[s] = Track.load(row)
        for key, ts in state.get("ended", []):
            s = sidx(key)
            if s is not None:
                self.ended[s] = ts
        return lost


class Stateful(Evaluator):
    """Threshold, rate and window rules: levels, hysteresis, for:, clear_for:, flapping.

    ``levels`` is a list of (quantity number, comparison, threshold slot) from low to high
    severity; thresholds are per sensor (``thresholds`` for sensors whose district or registry
    facts differ, else ``default``), so a river gauge's 警戒水位 comes from the registry.
    ``level_clears`` gives each level its own clear comparison (or None); with any, a firing
    incident steps down a level when that level's clear holds (Kapacitor's warnReset/critReset).
    """

    def __init__(self, spec: Any, b: Binding, levels: list[tuple[int, str, int]],
                 ranks: list[int], clear: tuple[int, str, int] | None,
                 default: tuple[float, ...], thresholds: dict[int, tuple[float, ...]],
                 level_clears: list[tuple[int, str, int] | None] | None = None) -> None:
        super().__init__(spec, b)
        self.spec_levels = levels                # as written: (quantity, "op", slot)
        self.levels = [(q, OPS[op], slot) for q, op, slot in levels]
        self.ranks = ranks
        self.clear = (clear[0], OPS[clear[1]], clear[2]) if clear else None
        own = level_clears or [None] * len(levels)
        self.per_level = any(own)
        # what clears each level: its own `clear:`, else its `when:` no longer holding
        self.level_clears = [(c[0], OPS[c[1]], c[2], False) if c else (q, OPS[op], slot, True)
                             for c, (q, op, slot) in zip(own, levels, strict=True)]
        self.default = default
        # by sensor number; asked with a subject (int | str), which for these types is a sensor
        self.thresholds: dict[Any, tuple[float, ...]] = thresholds
        self.for_ms = spec.for_
        self.clear_for_ms = spec.clear_for
        self.flap_ms = spec.flapping.window if spec.flapping else 0
        # Fast exit for quiet readings: with only ">=" / ">" levels on one quantity, a value
        # under every threshold of the sensor fires nothing and clears nothing.
        ops = {op for _, op, _ in levels}
        self.rising = ops <= {">=", ">"} and len({q for q, _, _ in levels}) == 1
        # (read only when rising: the fast exit's floor)
        self.floor_default = min(default[slot] for _, _, slot in levels) if self.rising else float("-inf")
        self.floor: dict[int, float] = {
            s: min(t[slot] for _, _, slot in levels) for s, t in thresholds.items()} if self.rising else {}

    # level and clear of quantities q for sensor s
    def rank_of(self, s: int | str, q: tuple) -> tuple[int, float, float | None]:
        """Highest level that holds (-1: none), its threshold, and the quantity compared."""
        thr = self.thresholds.get(s, self.default) if self.thresholds else self.default
        rank, at, seen = -1, None, None
        for i, (qi, op, slot) in enumerate(self.levels):
            if op(q[qi], thr[slot]):
                rank, at, seen = self.ranks[i], thr[slot], q[qi]
        if at is None:
            qi, _, slot = self.levels[0]
            at, seen = thr[slot], q[qi]
        return rank, at, seen

    def is_clear(self, s: int | str, q: tuple, rank: int) -> bool:
        if self.clear is None:
            return rank < 0
        qi, op, slot = self.clear
        thr = self.thresholds.get(s, self.default) if self.thresholds else self.default
        return op(q[qi], thr[slot])

    def clear_threshold(self, s: int | str) -> float:
        """What a resolve says resolved it: the clear level (the rule's, or the lowest level's
        own), or with neither the lowest level's threshold."""
        thr = self.thresholds.get(s, self.default) if self.thresholds else self.default
        if self.clear is not None:
            return thr[self.clear[2]]
        return thr[self.level_clears[0][2]]

    def settle(self, s: int | str, q: tuple, rank: int, current: int) -> tuple[int, float | None]:
        """Per-level clears: from the level of rank ``current``, step down while that level's
        clear holds. Returns the level index that still holds (-1: cleared) and the clear
        threshold that held last (None: no step)."""
        thr = self.thresholds.get(s, self.default) if self.thresholds else self.default
        j = self.ranks.index(current)
        held = None
        while j >= 0:
            qi, op, slot, negate = self.level_clears[j]
            if op(q[qi], thr[slot]) == negate:      # this level's clear does not hold
                break
            held = thr[slot]
            j -= 1
        return j, held

    def update(self, s: int | str, ts: int, q: tuple) -> None:
        """Feed the quantities observed at ``ts``; drive the incident state machine."""
        tr = self.tracks.get(s)
        rank, at, value = self.rank_of(s, q)
        if tr is None:
            if rank < 0:
                return
            tr = self.tracks[s] = Track(PENDING, ts, rank, value, at)
            self._pending_or_fire(s, tr, ts)
            return
        clear = self.is_clear(s, q, rank)
        phase = tr.phase
        if phase == PENDING:
            if ts >= tr.due:                         # held long enough before this reading
                self._new_incident(s, tr, tr.due)
                phase = FIRING
            elif rank < 0:
                del self.tracks[s]                   # never fired: nobody is told
                return
            else:
                if rank > tr.rank:
                    tr.rank, tr.threshold = rank, at
                tr.value = value
                return
        if phase == CLEARING and ts >= tr.due:       # quiet long enough before this reading
            self._resolve(s, tr, tr.due)
            if s not in self.tracks:
                return self.update(s, ts, q)  # a fresh start for this reading
            phase = tr.phase
        if phase == RESOLVED:
            if ts >= tr.due:                         # the flapping window is over
                del self.tracks[s]
                return self.update(s, ts, q)
            if rank >= 0:                            # back within the flapping window
                tr.phase, tr.flapping, tr.value, tr.threshold = FIRING, True, value, at
                tr.rank = max(rank, tr.rank)
                self._emit(REOPEN, s, tr, ts)
            return
        if self.per_level and rank <= tr.rank:
            j, held = self.settle(s, q, rank, tr.rank)
            clear = j < 0
            if not clear:
                if phase == CLEARING:
                    tr.phase = FIRING                # crossed back before clear_for ran out
                if held is not None:                 # stepped down a level or more
                    thr = self.thresholds.get(s, self.default) if self.thresholds else self.default
                    tr.rank, tr.value, tr.threshold = self.ranks[j], value, thr[self.levels[j][2]]
                    self._emit(DOWNGRADE, s, tr, ts, cleared=held)
                else:
                    tr.value = value
                return
        if clear:
            if phase == FIRING:
                tr.value = value
                wait = max(self.clear_for_ms, self.flap_ms if tr.flapping else 0)
                if wait == 0:
                    self._resolve(s, tr, ts)
                else:
                    tr.phase, tr.since, tr.due = CLEARING, ts, ts + wait
                    self.timers.push(tr.due, self.number, s)
            return
        if phase == CLEARING:
            tr.phase = FIRING                        # crossed back before clear_for ran out
        if rank > tr.rank:
            tr.rank, tr.value, tr.threshold = rank, value, at
            self._emit(UPGRADE, s, tr, ts)
        elif rank >= 0:
            tr.value = value

    def _pending_or_fire(self, s: int | str, tr: Track, ts: int) -> None:
        if self.for_ms == 0:
            self._new_incident(s, tr, ts)
        else:
            tr.due = ts + self.for_ms
            self.timers.push(tr.due, self.number, s)

    def _resolve(self, s: int | str, tr: Track, ts: int) -> None:
        self._emit(RESOLVE, s, tr, ts, cleared=self.clear_threshold(s))
        self._ended(s, ts)
        if self.flap_ms:
            tr.phase, tr.due = RESOLVED, ts + self.flap_ms
            self.timers.push(tr.due, self.number, s)
        else:
            del self.tracks[s]

    def on_timer(self, due: int, s: Any) -> None:
        tr = self.tracks.get(s)
        if tr is None or tr.due != due:
            return                                   # superseded by a reading
        if tr.phase == PENDING:
            self._new_incident(s, tr, due)
        elif tr.phase == CLEARING:
            self._resolve(s, tr, due)
        elif tr.phase == RESOLVED:
            del self.tracks[s]
