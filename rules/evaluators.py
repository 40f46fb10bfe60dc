"""Where a rule decides: the compiled, running form of each rule type.

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
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

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
    """Base of all rule types. ``number`` is the rule's place in the engine (timer owner)."""

    type = ""
    reads = "value"          # which part of a reading it observes: value, battery, event, none
    takes_late = False       # whether a late reading can act on it (``late``; README "Late readings")

    def __init__(self, spec: Any, number: int, sink: list, timers: Timers,
                 subject_name: Callable[[int | str], str]) -> None:
        self.spec = spec
        self.id: str = spec.id
        self.number = number
        self.out = sink               # the engine's list of Changes
        self.timers = timers
        self.subject_name = subject_name
        self.tracks: dict[int | str, Track] = {}
        self.bump: dict[int, int] = {}        # sensor -> severity levels added by modifiers
        self.bump_all = 0
        self.selected: bytearray | None = None   # `where:` mask by sensor number, None = all
        self.loaded: Any = None                  # the LoadedRule (pack, file) it came from
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

    def on_timer(self, due: int, key: Any) -> None:  # pragma: no cover - every type overrides
        raise AssertionError(f"{self.id}: unexpected timer")

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

    def __init__(self, spec: Any, number: int, sink: list, timers: Timers,
                 subject_name: Callable[[int | str], str], levels: list[tuple[int, str, int]],
                 ranks: list[int], clear: tuple[int, str, int] | None,
                 default: tuple[float, ...], thresholds: dict[int, tuple[float, ...]],
                 level_clears: list[tuple[int, str, int] | None] | None = None) -> None:
        super().__init__(spec, number, sink, timers, subject_name)
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
        self.thresholds = thresholds
        self.for_ms = spec.for_
        self.clear_for_ms = spec.clear_for
        self.flap_ms = spec.flapping.window if spec.flapping else 0
        # Fast exit for quiet readings: with only ">=" / ">" levels on one quantity, a value
        # under every threshold of the sensor fires nothing and clears nothing.
        ops = {op for _, op, _ in levels}
        self.rising = ops <= {">=", ">"} and len({q for q, _, _ in levels}) == 1
        self.floor_default = min(default[slot] for _, _, slot in levels) if self.rising else None
        self.floor: dict[int, float] = {
            s: min(t[slot] for _, _, slot in levels) for s, t in thresholds.items()} if self.rising else {}

    # level and clear of quantities q for sensor s
    def rank_of(self, s: int | str, q: tuple) -> tuple[int, float, float]:
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

    def is_clear(self, s: int, q: tuple, rank: int) -> bool:
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


class Threshold(Stateful):
    type = "threshold"

    @property
    def takes_late(self) -> bool:          # type: ignore[override]
        return self.for_ms == 0 and self.reads == "value"

    def observe(self, s: int, ts: int, v: float) -> None:
        if self.selected is not None and not self.selected[s]:
            return
        if self.rising and s not in self.tracks:
            floor = self.floor.get(s, self.floor_default) if self.floor else self.floor_default
            if v < floor:
                return
        self.update(s, ts, (v,))

    def late(self, s: int, ts: int, v: float) -> None:
        """A late value can open an incident, reopen it in its flapping window, step it up or
        stop its clearing, never lower or end one: the readings after it were judged already."""
        if self.selected is not None and not self.selected[s]:
            return
        rank, at, value = self.rank_of(s, (v,))
        if rank < 0:
            return
        tr = self.tracks.get(s)
        if tr is not None and tr.phase == CLEARING and ts >= tr.due:
            self._resolve(s, tr, tr.due)             # it was over before this reading
            tr = self.tracks.get(s)
        if tr is not None and tr.phase == RESOLVED and ts >= tr.due:
            del self.tracks[s]                       # the flapping window is over
            tr = None
        if tr is None:
            if ts >= self.ended.get(s, -(1 << 62)):
                tr = self.tracks[s] = Track(PENDING, ts, rank, value, at)
                self._new_incident(s, tr, ts)
            return
        if tr.phase == RESOLVED:
            if ts >= tr.due - self.flap_ms:          # after the resolve, within the window
                tr.phase, tr.flapping, tr.value, tr.threshold = FIRING, True, value, at
                tr.rank = max(rank, tr.rank)
                self._emit(REOPEN, s, tr, ts)
            return
        if self.per_level:                           # its steps down were judged in order
            return
        if tr.phase == CLEARING and ts > tr.since:
            tr.phase = FIRING                        # clear_for starts again at the next clear
        if rank > tr.rank:
            tr.rank, tr.value, tr.threshold = rank, value, at
            self._emit(UPGRADE, s, tr, ts)


class Windowed(Stateful):
    """Window rules (sum/avg/min/max/count, sliding or tumbling) and rate-of-change rules.

    Per sensor a ring of ``n`` step-buckets ``[bucket, sum, count, min, max] * n``. Sliding
    windows are evaluated on every reading over the trailing buckets; tumbling windows when a
    reading opens the next bucket (at the closed bucket's end time).
    """

    def __init__(self, *args: Any, step: int, windows: list[tuple[str, int]], tumbling: bool,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.step = step
        self.windows = windows            # (fn, steps) per quantity, in quantity order
        self.n = max(steps for _, steps in windows)
        self.tumbling = tumbling
        self.rings: dict[int, list] = {}

    def observe(self, s: int, ts: int, v: float) -> None:
        if self.selected is not None and not self.selected[s]:
            return
        b = ts // self.step
        ring = self.rings.get(s)
        if ring is None:
            ring = self.rings[s] = [-1, 0.0, 0, 0.0, 0.0] * self.n
        if self.tumbling:
            if ring[0] != b:
                if ring[0] >= 0 and ring[0] < b:
                    closed_end = (ring[0] + 1) * self.step
                    q = self._quantities(ring, ring[0], None)
                    self.update(s, closed_end, q)
                elif ring[0] > b:
                    return                   # a reading for a window already closed
                ring[0:5] = [b, v, 1, v, v]
            else:
                ring[1] += v
                ring[2] += 1
                if v < ring[3]:
                    ring[3] = v
                if v > ring[4]:
                    ring[4] = v
            return
        i = (b % self.n) * 5
        if ring[i] != b:
            if ring[i] > b:
                return                       # older than the ring: already slid out
            ring[i:i + 5] = [b, v, 1, v, v]
        else:
            ring[i + 1] += v
            ring[i + 2] += 1
            if v < ring[i + 3]:
                ring[i + 3] = v
            if v > ring[i + 4]:
                ring[i + 4] = v
        self.update(s, ts, self._quantities(ring, b, v))

    def _quantities(self, ring: list, b: int, v: float | None) -> tuple:
        out = []
        n = self.n
        for fn, steps in self.windows:
            total, count, lo, hi = 0.0, 0, None, None
            for bb in range(b - steps + 1, b + 1):
                i = (bb % n) * 5
                if ring[i] == bb:
                    total += ring[i + 1]
                    count += ring[i + 2]
                    lo = ring[i + 3] if lo is None or ring[i + 3] < lo else lo
                    hi = ring[i + 4] if hi is None or ring[i + 4] > hi else hi
            if fn == "sum":
                out.append(round(total, 6))
            elif fn == "avg":
                out.append(round(total / count, 6) if count else 0.0)
            elif fn == "count":
                out.append(float(count))
            elif fn == "min":
                out.append(lo if lo is not None else 0.0)
            elif fn == "max":
                out.append(hi if hi is not None else 0.0)
        return tuple(out)

    def dump(self, sid: Callable[[int | str], Any]) -> dict:
        d = super().dump(sid)
        d["rings"] = [[sid(s), r] for s, r in self.rings.items()]
        return d

    def load(self, state: dict, sidx: Callable[[Any], int | str | None]) -> int:
        lost = super().load(state, sidx)
        for key, ring in state.get("rings", []):
            s = sidx(key)
            if s is not None:
                self.rings[s] = ring
        return lost


class Rate(Stateful):
    """Rate of change: ``rise`` is the value minus the lowest of the sensor's readings in the
    closed window [t - over, t] and ``fall`` the highest minus the value, exactly, whatever the
    reporting interval (the reading made exactly ``over`` before counts: "0.4 m in 1 h").

    Per sensor two monotonic queues of (ts, value): the lows ascending and the highs descending,
    so each reading costs O(1) however many readings the window holds."""

    type = "rate"

    def __init__(self, *args: Any, over: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.over = over
        self.lows: dict[int, deque] = {}
        self.highs: dict[int, deque] = {}

    def observe(self, s: int, ts: int, v: float) -> None:
        if self.selected is not None and not self.selected[s]:
            return
        lows = self.lows.get(s)
        if lows is None:
            lows, highs = self.lows[s], self.highs[s] = deque(), deque()
        else:
            highs = self.highs[s]
        start = ts - self.over
        while lows and lows[0][0] < start:
            lows.popleft()
        while highs and highs[0][0] < start:
            highs.popleft()
        while lows and lows[-1][1] >= v:
            lows.pop()
        lows.append((ts, v))
        while highs and highs[-1][1] <= v:
            highs.pop()
        highs.append((ts, v))
        self.update(s, ts, (round(v - lows[0][1], 6), round(highs[0][1] - v, 6)))

    def dump(self, sid: Callable[[int | str], Any]) -> dict:
        d = super().dump(sid)
        d["window"] = [[sid(s), list(self.lows[s]), list(self.highs[s])] for s in self.lows]
        return d

    def load(self, state: dict, sidx: Callable[[Any], int | str | None]) -> int:
        lost = super().load(state, sidx)
        for key, lows, highs in state.get("window", []):
            s = sidx(key)
            if s is not None:
                self.lows[s] = deque((t, v) for t, v in lows)
                self.highs[s] = deque((t, v) for t, v in highs)
        return lost


class Events(Evaluator):
    """Discrete events (camera violations, crane alarms, door magnets): one incident per sensor
    while events keep coming; it resolves after ``resolve_after`` of quiet or on a clear event."""

    type = "event"
    reads = "event"
    takes_late = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.severity_of = {e: sev.rank for e, sev in self.spec.events.items()}
        self.clear_events = set(self.spec.clear_events)
        self.quiet = self.spec.resolve_after

    def observe(self, s: int, ts: int, event: str) -> None:
        if self.selected is not None and not self.selected[s]:
            return
        rank = self.severity_of.get(event)
        tr = self.tracks.get(s)
        if rank is None:
            if tr is not None and event in self.clear_events:
                self._end(s, tr, ts)
            return
        if tr is not None and ts >= tr.due:          # the old incident went quiet before this
            self._end(s, tr, tr.due)
            tr = None
        if tr is None:
            self._open(s, ts, event, rank)
            return
        tr.extra += 1                                # repeats are one incident, counted
        self._repeat(s, tr, ts, event, rank)

    def late(self, s: int, ts: int, event: str) -> None:
        """A late named event acts as it would have in order, but a clear event ends nothing
        (a newer event may have raised it again) and a late repeat is not counted."""
        if self.selected is not None and not self.selected[s]:
            return
        rank = self.severity_of.get(event)
        if rank is None:
            return
        tr = self.tracks.get(s)
        if tr is not None and ts >= tr.due:
            self._end(s, tr, tr.due)
            tr = None
        if tr is None:
            if ts >= self.ended.get(s, -(1 << 62)):
                self._open(s, ts, event, rank)
            return
        self._repeat(s, tr, ts, event, rank)

    def _open(self, s: int, ts: int, event: str, rank: int) -> None:
        tr = self.tracks[s] = Track(FIRING, ts, rank, None, None)
        tr.event, tr.extra = event, 1
        tr.due = ts + self.quiet
        self._new_incident(s, tr, ts)
        self.timers.push(tr.due, self.number, s)

    def _repeat(self, s: int, tr: Track, ts: int, event: str, rank: int) -> None:
        tr.due = max(tr.due, ts + self.quiet)
        if rank > tr.rank:
            tr.rank, tr.event = rank, event
            self._emit(UPGRADE, s, tr, ts)

    def _end(self, s: int | str, tr: Track, ts: int) -> None:
        self._emit(RESOLVE, s, tr, ts)
        del self.tracks[s]
        self._ended(s, ts)

    def on_timer(self, due: int, s: Any) -> None:
        tr = self.tracks.get(s)
        if tr is None:
            return
        if tr.due > due:
            self.timers.push(tr.due, self.number, s)   # extended by a repeat: look again then
            return
        self._end(s, tr, tr.due)


class Absence(Evaluator):
    """Dead-man: a sensor silent for ``absent_for`` (never heard from counts, from the time the
    engine started watching) raises an incident; when every watched sensor behind a gateway is
    silent, one gateway incident stands for all of them. The scan is vectorised by the engine;
    this class keeps the incidents."""

    type = "absence"
    reads = "none"

    def __init__(self, *args: Any, absent_ms: Any, gateway_of: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.absent_ms = absent_ms      # numpy int64 per sensor, 0 = not watched by this rule
        self.gateway_of = gateway_of    # numpy int32 per sensor, -1 = none
        self.silent: dict[int, str] = {}  # sensor -> subject of its incident (itself or gateway)
        # the same, as a mask per sensor and per gateway subject: a city has many silent
        # sensors, and neither a scan nor a gateway coming back may walk all of them
        self.silent_mask = np.zeros(len(absent_ms), dtype=bool)
        self.members: dict[str, set[int]] = {}

    def mark(self, s: int, subject: str) -> None:
        """Sensor ``s`` is silent, in its own incident (``subject`` "") or its gateway's."""
        self.silent[s] = subject
        self.silent_mask[s] = True
        if subject:
            self.members.setdefault(subject, set()).add(s)

    def fire(self, s: int | str, ts: int, last: int, members: list[int] | None) -> None:
        tr = self.tracks[s] = Track(FIRING, ts, self.spec.severity.rank, None, None)
        tr.extra = last                 # last heard from (0 = never)
        tr.aid = alert_id(self.id, self.subject_name(s), ts)
        rank = self.spec.severity.rank
        self.out.append(Change(FIRE, self, s, tr.aid, rank, ts, ts, None, None, members=members,
                               heard=last))

    def recover(self, s: int, ts: int) -> list[int]:
        """Sensor ``s`` reported at ``ts``; returns the sensors no longer silent by it."""
        subject = self.silent.get(s)
        if subject is None:
            return []
        key: int | str = s if subject == "" else subject
        tr = self.tracks.get(key)
        if tr is not None and ts < tr.started - int(self.absent_ms[s]):
            return []   # older than the silence the incident stands for: it goes on (README)
        del self.silent[s]
        self.silent_mask[s] = False
        freed = [s]
        if subject:
            self.members[subject].discard(s)
        tr = self.tracks.pop(key, None)
        if tr is None:
            return freed
        if key != s:   # a gateway is back: its other sensors are looked at again by the next scan
            others = sorted(self.members.pop(subject))
            for m in others:
                del self.silent[m]
            self.silent_mask[others] = False
            freed += others
        self.out.append(Change(RESOLVE, self, key, tr.aid, tr.rank, ts, tr.started, None, None,
                               heard=tr.extra))
        return freed

    def dump(self, sid: Callable[[int | str], Any]) -> dict:
        d = super().dump(sid)
        d["silent"] = [[sid(s), subj] for s, subj in self.silent.items()]
        return d

    def load(self, state: dict, sidx: Callable[[Any], int | str | None]) -> int:
        lost = super().load(state, sidx)
        for key, subj in state.get("silent", []):
            s = sidx(key)
            if s is not None:
                self.mark(s, subj)
        return lost


class Correlation(Evaluator):
    """N distinct sensors of the same building / grid / community / street with incidents of the
    watched rules started within T: one group incident at a raised severity. It resolves when
    the last member incident resolves."""

    type = "correlation"
    reads = "none"

    def __init__(self, *args: Any, group_of: Callable[[int], str | None], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.group_of = group_of
        self.members: dict[str, dict[int, int]] = {}   # group -> {sensor: incident start}

    def on_change(self, ch: Change) -> None:
        if not isinstance(ch.subject, int):
            return
        g = self.group_of(ch.subject)
        if g is None:
            return
        members = self.members.get(g)
        if ch.what in (FIRE, REOPEN):
            if members is None:
                members = self.members[g] = {}
            members[ch.subject] = ch.ts
            if g in self.tracks:
                return
            at = self._reached(members)
            if at is not None:
                recent = sorted(m for m, t in members.items() if at - self.spec.within <= t <= at)
                tr = self.tracks[g] = Track(FIRING, at, self.spec.severity.rank, None, None)
                tr.aid = alert_id(self.id, g, at)
                tr.extra = recent
                self.out.append(Change(FIRE, self, g, tr.aid, tr.rank, at, at, None,
                                       float(self.spec.min_sensors), members=recent))
        elif ch.what == RESOLVE and members is not None:
            members.pop(ch.subject, None)
            if not members:
                del self.members[g]
                tr = self.tracks.pop(g, None)
                if tr is not None:
                    self.out.append(Change(RESOLVE, self, g, tr.aid, tr.rank, ch.ts, tr.started,
                                           None, None, members=tr.extra))

    def _reached(self, members: dict[int, int]) -> int | None:
        """The event time at which `min_sensors` members had started within `within`, if they
        have. Judged on the start times, not on the order their alarms arrived in, so a member
        that comes late (another Kafka partition's forwarding, a gateway's backlog) names the
        group incident as it would have been named had everything come in order."""
        n, within = self.spec.min_sensors, self.spec.within
        times = sorted(members.values())
        for j in range(n - 1, len(times)):
            if times[j] - times[j - n + 1] <= within:
                return times[j]
        return None

    def dump(self, sid: Callable[[int | str], Any]) -> dict:
        d = super().dump(sid)
        d["members"] = {g: [[sid(s), t] for s, t in m.items()] for g, m in self.members.items()}
        for _, track in d["tracks"]:
            track.extra = [sid(s) for s in track.extra]
        return d

    def load(self, state: dict, sidx: Callable[[Any], int | str | None]) -> int:
        lost = super().load(state, sidx)
        for tr in self.tracks.values():
            tr.extra = [x for x in (sidx(k) for k in tr.extra) if x is not None]
        for g, rows in state.get("members", {}).items():
            m = {s: t for s, t in ((sidx(k), t) for k, t in rows) if s is not None}
            if m:
                self.members[g] = m
        return lost
