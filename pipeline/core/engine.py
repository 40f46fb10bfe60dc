"""The engine: pure, deterministic, event-time. Every runtime, replay and rule test runs this.

    engine = Engine(registry, rules)
    out = engine.ingest([payload, ...])        # bytes from MQTT/Kafka/a file
    out = engine.process(readings)             # already-decoded readings
    out = engine.ack([Ack(...)])               # somebody took an incident in hand
    out = engine.advance(watermark_ms)         # time passes: for:, clear_for:, absence, escalation
    blob = engine.snapshot(); engine.restore(blob)

Each call returns an ``Output``: the notices (AlertNotice dicts, one per tier target) and the
dead letters (bad input with its reason and original bytes). No I/O happens here.

Time: the watermark is the newest event time seen minus ``allowed_lateness`` (a live runtime
also advances it from the wall clock). Readings act at once, in event-time order within a
batch; a sensor's reading older than its newest one by at most ``allowed_lateness`` is late
(it may open or raise an incident, never lower or end one), older still is stale
(dead-lettered), and an exact repeat is a duplicate (counted, dropped: at-least-once delivery
redelivers). Timers fire when the watermark passes them.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress
from math import isfinite
from operator import attrgetter, ge, gt
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core import silences, wire
from pipeline.core.lifecycle import LIFECYCLE, SILENCE, AlertBook, IncidentState
from pipeline.core.models import Ack, DeadLetter
from pipeline.core.registry import Registry
from pipeline.core.routing import Router
from rules import evaluators as ev
from rules.compiler import RuleSet, compile_rules
from rules.schema import Duration

if TYPE_CHECKING:
    from rules.types.base import WatchesSilence

SCAN = -2                  # timer owner number of the absence scan
SNAPSHOT_VERSION = 2        # 2: tracks and incidents by name (rules.evaluators.TrackState,
#                             pipeline.core.lifecycle.IncidentState); 1: positional lists


def _named(state: dict) -> dict:
    """Version 1 -> 2: a track or an incident was a list, now a map of its fields by name."""
    fields = ev.TrackState.__struct_fields__
    for rule in state["rules"].values():
        rule["tracks"] = [[key, dict(zip(fields, row, strict=True))] for key, row in rule.get("tracks", [])]
    book = state["book"]
    for bucket in ("open", "resolved", "closable"):
        if bucket in book:
            book[bucket] = [IncidentState.from_row(row) for row in book[bucket]]
    return state


# A snapshot of an older version is brought forward one version at a time: MIGRATIONS[v] takes
# a decoded snapshot of version v to v + 1. A change of the format adds one here.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _named}
NEVER = 1 << 62
EARLIEST = 946_684_800_000  # 2000-01-01T00:00:00Z: an earlier ts is epoch seconds or an unset clock
_EMPTY = np.zeros(0, dtype=np.int64)
SMALL_BATCH = 64            # readings: below, the batch screen's numpy calls cost more than a loop


def _newest_so_far(g_idx: np.ndarray, g_ts: np.ndarray, before: np.ndarray,
                   back: np.ndarray) -> None:
    """``before`` holds, per reading, its sensor's previous reading in arrival order; where
    time went back across payloads, make it the newest of all the sensor's earlier readings
    (rare: only the sensors concerned are walked)."""
    for s in np.unique(g_idx[back]).tolist():
        lo = int(np.searchsorted(g_idx, s, side="left"))
        hi = int(np.searchsorted(g_idx, s, side="right"))
        newest = 0
        for k in range(lo, hi):
            before[k] = newest
            newest = max(newest, int(g_ts[k]))


_SENSOR_ID, _TS, _VALUE, _EVENT, _BATTERY = (attrgetter(a) for a in ("sensor_id", "ts", "value",
                                                                      "event", "battery"))
_ID_CACHE = 1 << 18     # ids remembered (~30 MB at most): more sensors than one process hears


class EngineSettings(BaseModel):
    """The engine's few knobs, validated once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_lateness: Duration = Field(default=60_000, description="how late a reading may come "
                                       "before timers stop waiting for it")
    max_future: Duration = Field(default=300_000, description="readings further ahead of the clock "
                                 "than this are refused (with a clock: the runtimes and replay "
                                 "pass the wall clock)")
    max_age: Duration = Field(default=7 * 86_400_000, description="readings older than this "
                              "behind the watermark are refused")
    absence_scan_every: Duration = Field(default=60_000, description="how often silence is checked")
    time_quorum: int = Field(default=1, ge=1, le=100, description="how many sources (gateways; a "
                             "sensor without one is its own) must have reached an event time "
                             "before it moves the watermark: 1 = the newest reading; replay of "
                             "gateway payloads uses 2, so one gateway's wrong clock moves no one "
                             "else's timers")
    quorum_window: int = Field(default=100, ge=1, description="with time_quorum: the sources that "
                               "count are those heard in this many last payloads")


@dataclass
class _Quorum:
    """time_quorum's state: each source's newest reading, the sources of the last payloads
    (how many of those each was in: the counted ones), and the counted sources ranked by their
    newest reading (a sorted list: at most quorum_window of them)."""
    newest: dict[int, int] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)
    ranked: list[tuple[int, int]] = field(default_factory=list)
    recent: deque = field(default_factory=deque)


@dataclass
class Output:
    notices: list[dict] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # The readings the engine took, column-wise (sensor numbers, event-time ms, values; an
    # event's value is nan), for sinks that keep history. Filled only when the engine is asked
    # to (`Engine.keep_accepted`): the columns cost nothing on the hot path, but nobody else needs them.
    accepted: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


class Engine:
    def __init__(self, registry: Registry, rules: RuleSet,
                 settings: EngineSettings | None = None) -> None:
        self.registry = registry
        self.rules = rules
        self.keep_accepted = False          # Output.accepted for a history sink
        self.settings = settings or EngineSettings()
        self.timers = ev.Timers()
        self.changes: list[ev.Change] = []
        n = len(registry)
        self.last_seen = array("q", bytes(8 * n))            # 0 = never heard from
        self._last_seen_np = np.frombuffer(self.last_seen, dtype=np.int64) if n else np.zeros(0, np.int64)
        self.evaluators = compile_rules(rules, registry, self.changes, self.timers, self._subject_name)
        self.by_id = {e.id: e for e in self.evaluators}
        self.book = AlertBook(registry, Router(rules.routing, registry), self.timers, self.by_id,
                              rules.kinds, self._subject_name)
        self._ask_rules(registry.kinds, rules)
        self._id_numbers: dict[str, int] = {}     # sensor id -> number, of the sensors heard
        self._wants_value_np = np.array(list(self._wants_value) or [True], dtype=bool)
        self._kind_np = np.frombuffer(registry.kind_of, dtype=np.uint8) if n else np.zeros(1, np.uint8)
        self._gateway_np = np.frombuffer(registry.gateway_of, dtype=np.int32) if n else np.zeros(1, np.int32)
        self._gateway_numbers = registry.gateway_index
        # _screen_small's lookups: the same tables, indexed to Python numbers
        # a view: copies nothing (ignored: numpy declares ndarray a Buffer only for Python 3.12+)
        self._kind_list = memoryview(self._kind_np)  # type: ignore[arg-type]
        self._floor_list = self._floor_np.tolist()
        self._has_event_rules_list = self._has_event_rules_np.tolist()
        self._battery_ceiling_list = self._battery_ceiling_np.tolist()
        # batches of fewer readings are screened reading by reading in Python (_screen_small);
        # the fuzzer sets it to 0 or to a large number to check each screen alone
        self.small_batch = SMALL_BATCH
        # time_quorum: the source of each sensor (its gateway, else itself after the gateways),
        # and what the quorum keeps between batches (_Quorum)
        self._source_np = np.where(self._gateway_np >= 0, self._gateway_np,
                                   len(registry.gateways) + np.arange(max(n, 1))) if n else self._gateway_np
        self._quorum = _Quorum()
        self.silent: set[int] = set()       # sensors in an absence incident (any absence rule)
        self._silent_np = np.zeros(max(n, 1), dtype=bool)     # the same, as a mask
        self._gateway_members = [self._members_by_gateway(a) for a in self.absence]
        # the batch being taken (see _screen_and_evaluate): its accepted readings in rank order,
        # the stamps applied so far, payload horizons, the loop's place, readings to act still
        self._seen_idx = self._seen_ts = self._seen_pay = _EMPTY
        self._seen_at = 0
        self._horizons: list[int] | None = None
        self._cur = 0
        self._visit: list[int] = []
        self._positions: Sequence[int] | np.ndarray = []   # a list, or the batch's index array
        self._next_visit = 0
        self._passed = 0
        self._current = -1
        self._recoveries: list[tuple[int, int, int]] = []
        self._late: list[tuple[int, int]] = []      # (payload, reading) of the late readings
        self._late_at = 0
        self._readings: list = []
        self._idx_list: list[int] = []
        self._watch_from: tuple[int, int] | None = None
        self._scan_due = NEVER               # the planned absence scan, and its plan number
        self._scan_gen = 0
        self._frontier = -NEVER              # in a batch: the time timers have been run up to
        self.watermark = -(1 << 62)
        self.clock_bound = False            # see max_ts
        self._clock: int | None = None
        self._max_ts = 0
        self.max_ts = 0
        self.watch_start = 0                # when absence watching began (event time)
        self.counters: Counter[str] = Counter()

    def _ask_rules(self, kinds: Sequence[str], rules: RuleSet) -> None:
        """What the screening asks of the rules, once, per sensor kind (``_ask_kind``), and of
        every rule: the event names they act on, whom they hear, which the absence scan drives."""
        self._wants_value = bytes(rules.kinds[k].reading == "value" if k in rules.kinds else True
                                  for k in kinds)
        asked = [self._ask_kind(k) for k in kinds]
        (self._value, self._battery, self._event, self._late_value, self._late_event,
         self._quiet, floors, ceilings) = (list(col) for col in zip(*asked, strict=True)) if asked \
            else ([] for _ in range(8))
        # per kind: the value under which a reading can change nothing (+inf: no value rule,
        # -inf: every reading matters, e.g. windows), and whether event/battery rules exist
        self._floor_np = np.array(floors or [0.0])
        self._quiet_tracks = [q[1] for q in self._quiet if q]
        self._has_event_rules_np = np.array([bool(h) for h in self._event] or [False])
        self._has_battery_rules_np = np.array([bool(h) for h in self._battery] or [False])
        self._battery_kinds_any = any(self._battery)
        self._battery_rules = [e for e in self.evaluators if e.reads == "battery"]
        self._battery_ceiling_np = np.array(ceilings or [0.0])
        self._event_names = frozenset(name for e in self.evaluators for name in e.event_names())
        self.absence: list[WatchesSilence] = [e for e in self.evaluators if e.scans_silence]  # type: ignore[misc]
        self._listeners: dict[str, list[ev.Evaluator]] = {}
        for e in self.evaluators:
            for rid in e.hears():
                self._listeners.setdefault(rid, []).append(e)

    def _ask_kind(self, kind: str) -> tuple:
        """The rules watching ``kind``: what a value, a battery level and an event of it are
        given to, in order and late (README "Late readings"); its quiet floor (readings of a
        kind whose only value rule names one, a plain rising threshold (gas: the bulk of a
        city's sensors), need no call at all: under the floor, with no incident open, nothing
        can happen): (floor, that rule's tracks) or None, and the floor as the screen uses it;
        its battery ceiling (battery rules fire on low levels: over every rule's highest
        threshold, with no incident open, a level changes nothing; +inf: look at every level)."""
        watching = [e for e in self.evaluators if kind in e.spec.sensors]
        value = [e for e in watching if e.reads == "value"]
        battery = [e for e in watching if e.reads == "battery"]
        event = [e for e in watching if e.reads == "event"]
        quiet = value[0].quiet_floor() if len(value) == 1 else None
        floor = np.inf if not value else (quiet[0] if quiet else -np.inf)
        return (tuple(e.observe for e in value), tuple(e.observe for e in battery),
                tuple(e.observe for e in event), tuple(e.late for e in value if e.takes_late),
                tuple(e.late for e in event if e.takes_late), quiet, floor,
                max((e.battery_ceiling() for e in battery), default=-np.inf))

    def _members_by_gateway(self, a: WatchesSilence) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Per gateway, the sensors the rule watches behind it, computed once: (how many,
        where each gateway's run starts in the third array, the sensors in gateway order)."""
        gw = a.gateway_of
        if gw is None:
            return None
        watched = np.flatnonzero((a.absent_ms > 0) & (gw >= 0))
        total = np.bincount(gw[watched], minlength=len(self.registry.gateways))
        starts = np.zeros(len(total) + 1, dtype=np.int64)
        np.cumsum(total, out=starts[1:])
        return total, starts, watched[np.argsort(gw[watched], kind="stable")]

    # ---- time is never moved by one sensor ----------------------------------------------
    @property
    def max_ts(self) -> int:
        """The newest event time taken. With ``clock_bound`` (set by the live runtimes) it is
        held to the clock the batch is judged by (ingest's ``now_ms``): a reading that is
        within ``max_future`` of the clock is taken, but the watermark, and with it every timer
        of every incident in the city, does not move past the wall clock on its word."""
        return self._max_ts

    @max_ts.setter
    def max_ts(self, ts: int) -> None:
        clock = self._clock
        self._max_ts = max(clock, self._max_ts) if clock is not None and ts > clock else ts

    # ---- names of subjects (sensor numbers or group keys) -----------------------------
    def _subject_name(self, s: int | str) -> str:
        return self.registry.sensor_ids[s] if isinstance(s, int) else s

    def find_incident(self, rule: str, subject: str) -> str | None:
        """The alert_id of `rule`'s open (or closable) incident on a sensor or gateway `subject`:
        how rule tests and replayed acks name an incident without its id."""
        for inc in [*self.book.open.values(), *self.book.closable.values()]:
            name = self._subject_name(inc.subject)
            if inc.rule == rule and (name == subject or name == "gw:" + subject):
                return inc.aid
        return None

    # ---- input ------------------------------------------------------------------------
    def ingest(self, payloads: Iterable[bytes], source: str | list[str] | None = None,
               now_ms: int | None = None,
               senders: list[tuple[str, str] | None] | None = None,
               out: Output | None = None) -> Output:
        """Decode payloads (objects or gateway arrays) and process them as one batch.

        ``source``: where they came from (a topic, one per payload, or a file) for dead letters.
        ``senders``: per payload, who the transport says sent it — ("gateway", id) or
        ("sensor", id), e.g. from the MQTT topic the broker's ACL ties to the gateway's login.
        A reading for a sensor that is not the sender, or not behind the sending gateway, is
        refused (`wrong_sender`): one gateway cannot clear another's gas alarm.
        ``out``: an Output to add to, which keeps what was made before a failure
        (pipeline.shared.quarantine).
        """
        return self.ingest_decoded(wire.decode_batch(list(payloads), source), now_ms, senders, out)

    def ingest_decoded(self, decoded: tuple[list, list, wire.Spans], now_ms: int | None = None,
                       senders: list[tuple[str, str] | None] | None = None,
                       out: Output | None = None) -> Output:
        """``ingest`` of payloads ``wire.decode_batch`` has decoded already: a backtest decodes
        each batch once and gives it to two engines (an engine changes nothing it is given but
        RFC 3339 times, turned into the same epoch ms in place)."""
        readings, dead, spans = decoded
        self._clock = now_ms if self.clock_bound else None
        out = out if out is not None else Output()
        out.dead_letters += dead
        self.counters["dead_letters"] += len(dead)
        for d in dead:
            self.counters["dead." + d.reason] += 1
        claims = self._claims(senders, spans) if senders is not None and readings else None
        screened = len(out.dead_letters)
        self.process(readings, now_ms, out, _spans=spans, _claims=claims)
        # decoded but refused (unknown, stale, from the future ...): not readings the engine took
        self.counters["refused"] += len(out.dead_letters) - screened
        return out

    def _claims(self, senders: list, spans: wire.Spans) -> tuple[np.ndarray, np.ndarray]:
        """Per reading: the gateway number and the sensor number its sender vouches for
        (-1: no claim; -2: a sender the registry does not know)."""
        reg = self.registry
        gw_numbers = self._gateway_numbers
        gw, sensor = [], []
        for sender in senders:
            kind, name = sender if sender else (None, None)
            gw.append(gw_numbers.get(name, -2) if kind == "gateway" else -1)
            sensor.append(reg.index.get(name, -2) if kind == "sensor" else -1)
        ends = np.array(spans.ends, dtype=np.int64)
        counts = np.diff(ends, prepend=0)
        return np.repeat(np.array(gw, dtype=np.int64), counts), np.repeat(np.array(sensor, dtype=np.int64), counts)

    def process(self, readings: list, now_ms: int | None = None, out: Output | None = None,
                ends: list[int] | None = None, _spans: wire.Spans | None = None,
                _claims: tuple | None = None) -> Output:
        """Evaluate a batch of decoded readings (``wire.WireReading``, ts in epoch ms).

        ``ends``: where each payload of the batch ends in ``readings`` (default: the whole list
        is one payload, e.g. one gateway array). A batch is taken as its payloads one after
        another, in arrival order, each in event-time order: exactly what one call per payload
        would do, so batching never changes the answer (tests/core/test_engine_model.py checks it
        against the reference model at random batch splits).

        Batch-first: the checks every reading needs (known sensor, time bounds, kind, finite,
        stale or duplicate) and the question "can this reading change anything?" are answered
        for the whole batch with numpy; Python then visits only the readings that can matter
        (over a threshold, a sensor with an incident open, an event, a battery level, a window
        rule).
        """
        out = out if out is not None else Output()
        if readings:
            if ends is None:
                ends = _spans.ends if _spans else [len(readings)]
            self._screen_and_evaluate(readings, now_ms, out, _spans, _claims, ends)
        self._drain(out)
        self.advance(self.max_ts - self.settings.allowed_lateness, out)
        self._end_batch()
        return out

    # ---- the batch as its payloads in arrival order --------------------------------------------
    # Accepted readings are ranked by (payload, event time, arrival); ``_seen_*`` hold them in
    # that order. Payload p's horizon ``_horizons[p]`` is the watermark once p has been taken:
    # timers due by then have run before any reading of a later payload, as they would with one
    # call per payload. Last-seen stamps are applied lazily: an absence scan during payload p at
    # time d sees every earlier payload and p's readings up to d.

    def _end_batch(self) -> None:
        left = len(self._seen_ts) - self._seen_at
        if left >= SMALL_BATCH:
            sl = slice(self._seen_at, None)
            np.maximum.at(self._last_seen_np, self._seen_idx[sl], self._seen_ts[sl])
        elif left > 0:                      # a few: a loop costs less than numpy's call
            last_seen = self.last_seen
            for i, t in zip(self._seen_idx[self._seen_at:].tolist(),
                            self._seen_ts[self._seen_at:].tolist(), strict=True):
                if t > last_seen[i]:
                    last_seen[i] = t
        self._seen_idx = self._seen_ts = self._seen_pay = _EMPTY
        self._seen_at = 0
        self._horizons = None
        self._frontier = -NEVER
        self._recoveries.clear()
        self._late, self._late_at, self._readings, self._idx_list = [], 0, [], []

    def _apply_seen(self, upto: int) -> None:
        """Stamps an absence scan at ``upto`` may see: earlier payloads, and the current
        payload's readings up to ``upto``."""
        if self._horizons is None or self._seen_at >= len(self._seen_ts):
            return
        lo = self._seen_at
        cur = self._cur
        pay = self._seen_pay
        first = lo + int(np.searchsorted(pay[lo:], cur, side="left"))
        last = lo + int(np.searchsorted(pay[lo:], cur, side="right"))
        end = first + int(np.searchsorted(self._seen_ts[first:last], upto, side="right"))
        if end > lo:
            sl = slice(lo, end)
            np.maximum.at(self._last_seen_np, self._seen_idx[sl], self._seen_ts[sl])
            self._seen_at = end

    def _finish_payloads(self, upto: int, out: Output) -> None:
        """The end of payloads ``_cur`` .. ``upto`` - 1: absence watching starts after the first
        accepted reading's payload, then the timers its horizon reaches run. Stops early at a
        payload that a scan has just given a reading to visit."""
        h = self._horizons
        assert h is not None                # (set for the batch being taken)
        heap = self.timers.heap
        while self._cur < upto:
            nxt = upto
            if heap and heap[0][0] <= h[upto - 1]:
                nxt = bisect.bisect_left(h, heap[0][0], self._cur, upto)
            watch = self._watch_from
            if watch is not None and watch[0] < nxt:
                nxt = watch[0]
            if self._late_at < len(self._late) and self._late[self._late_at][0] <= nxt:
                nxt = self._late[self._late_at][0] - 1      # its late readings act as it arrives
            if self._recoveries:
                nxt = self._cur              # readings of this payload still to act
            if nxt >= upto:
                break
            self._cur = nxt
            self._passed = int(np.searchsorted(self._seen_pay, nxt, side="right"))
            self._current = -1
            if watch is not None and watch[0] == nxt:
                self._watch_from = None
                self._start_watching(watch[1])
                # watching starts once this payload is taken: its first scans see all of it
                self._apply_seen(NEVER)
            self._run_timers(h[nxt], out)
            self._recover_pending(1 << 62, out)
            self._cur = nxt + 1
            self._take_late(out)
            if self._next_visit < len(self._visit):
                upto = min(upto, int(self._seen_pay[self._visit[self._next_visit]]))
        self._cur = max(self._cur, upto)
        if upto:
            self._frontier = max(self._frontier, h[upto - 1])

    def _numbers(self, ids: list[str]) -> list[int]:
        """Sensor numbers of a batch's ids (-1: not in the registry). The registry's index is a
        sorted array (no Python object per sensor of the city); the sensors that report are
        remembered in a dict, so most of a batch is found by one C-level pass of dict lookups.
        Bounded: cleared when full, and an unknown id is never kept (hostile input cannot
        fill it)."""
        cache = self._id_numbers
        got: list = list(map(cache.get, ids))          # None: not yet known, filled below
        if None in got:
            miss = [i for i, g in enumerate(got) if g is None]
            found = self.registry.index.lookup([ids[i] for i in miss]).tolist()
            if len(cache) + len(miss) > _ID_CACHE:
                cache.clear()
            for i, number in zip(miss, found, strict=True):
                got[i] = number
                if number >= 0:
                    cache[ids[i]] = number
        return got

    def _screen_and_evaluate(self, readings: list, now_ms: int | None, out: Output,
                             spans: wire.Spans | None, claims: tuple | None, ends: Sequence[int]) -> None:
        n = len(readings)
        # one reading a payload (the common batch); not merely as many payloads as readings, as
        # an array of two beside a payload that gave none (malformed) has too
        single = spans.one_each if spans is not None else ends == list(range(1, n + 1))
        if n < self.small_batch and self._screen_small(readings, now_ms, out, claims, ends, single):
            return
        s = self.settings
        idx_list = self._numbers(list(map(_SENSOR_ID, readings)))
        idx = np.array(idx_list, dtype=np.int64)
        try:
            ts = np.fromiter(map(_TS, readings), dtype=np.int64, count=n)
        except TypeError:                   # RFC 3339 times from a fast batch decode: to ms
            for r in readings:
                if r.ts.__class__ is not int:
                    r.ts = int(r.ts.timestamp() * 1000)
            ts = np.fromiter(map(_TS, readings), dtype=np.int64, count=n)
        val = np.fromiter(map(_VALUE, readings), dtype=np.float64, count=n)   # None (an event) -> nan
        names = self._event_names   # 0: no event, 1: an event no rule names (a heartbeat), 2: named
        if not any(map(_EVENT, readings)):  # measurements only (the common batch)
            event = np.zeros(n, dtype=np.int8)
        else:
            event = np.array([0 if e is None else 1 + (e in names) for e in map(_EVENT, readings)],
                             dtype=np.int8)
        has_event = event > 0
        invalid = has_event == ~np.isnan(val)          # both value and event, or neither
        known = (idx >= 0) & ~invalid
        wrong_sender = np.zeros(n, dtype=bool)
        if claims is not None:
            gw_claim, sensor_claim = claims
            gateway = self._gateway_np[np.where(known, idx, 0)]
            wrong_sender = known & (((gw_claim != -1) & (gateway != gw_claim))
                                    | ((sensor_claim != -1) & (idx != sensor_claim)))
            known &= ~wrong_sender
        kind = self._kind_np[np.where(known, idx, 0)]
        npay = len(ends)
        if single:
            pay = np.arange(n, dtype=np.int64)
        else:
            counts: np.ndarray = np.diff(np.asarray(ends, dtype=np.int64), prepend=0)
            pay = np.repeat(np.arange(npay, dtype=np.int64), counts)
        # "future" needs a clock (the runtimes and replay pass the wall clock; history is never
        # ahead of it). "Too old" is judged against the watermark as it stood when the reading
        # arrived (earlier payloads of this batch count), and nothing before 2000 is a real
        # reading: it is epoch seconds, or a clock that was never set.
        ceiling = now_ms + s.max_future if now_ms is not None else 1 << 62
        future = known & (ts > ceiling)
        wants = self._wants_value_np[kind]
        no_value = np.isnan(val)            # an event, or a NaN value: told apart below (rare)
        finite = no_value | (np.abs(val) < 1e15)
        unset = ts < EARLIEST
        could = known & ~future & ~unset & (no_value != wants) & finite
        if s.time_quorum > 1:
            reached = self._quorum_time(pay, idx, ts, could, npay)
        elif single:                        # a payload's newest is its reading's time
            reached = np.where(could, ts, -(1 << 62))
        else:
            reached = np.full(npay, -(1 << 62), dtype=np.int64)
            np.maximum.at(reached, pay[could], ts[could])
        newest = np.maximum.accumulate(reached)
        arrived = np.empty(npay, dtype=np.int64)       # the watermark as each payload arrives
        arrived[0] = self.watermark
        arrived[1:] = np.maximum(newest[:-1] - s.allowed_lateness, self.watermark)
        too_old = known & ~future & (unset | (ts < arrived[pay] - s.max_age))
        suspect = known & ~future & ~too_old & (no_value == wants)
        bad_value = known & ~future & ~too_old & ~finite
        fit = known & ~future & ~too_old & ~suspect & ~bad_value
        # Per sensor, in arrival order (payloads one after another, each in event-time order):
        # newer than every reading before it, stored or earlier in this batch? Equal is a
        # redelivered duplicate, older is stale.
        pos = np.flatnonzero(fit)
        if single:                          # (payload order is arrival order: pos is in it)
            order = pos[np.argsort(idx[pos], kind="stable")]
        else:
            order = pos[np.lexsort((ts[pos], pay[pos], idx[pos]))]
        g_idx, g_ts = idx[order], ts[order]
        same = np.zeros(len(order), dtype=bool)
        same[1:] = g_idx[1:] == g_idx[:-1]
        before = np.zeros(len(order), dtype=np.int64)
        before[1:] = np.where(same[1:], g_ts[:-1], 0)
        back = np.flatnonzero(same & (g_ts < before))
        if len(back):                       # time went back across payloads: newest so far
            _newest_so_far(g_idx, g_ts, before, back)
        newest_seen = np.maximum(self._last_seen_np[g_idx], before)
        accepted = g_ts > newest_seen
        duplicate = g_ts == newest_seen
        older = g_ts < newest_seen
        # late: older than the sensor's newest by at most allowed_lateness. Taken, acting only
        # where it can raise (README "Late readings"); older still is stale.
        late = older & (g_ts >= newest_seen - s.allowed_lateness)
        older &= ~late
        stale_pos = np.sort(order[older])
        self._stale_newest = dict(zip(order[older].tolist(), newest_seen[older].tolist(), strict=True))
        late_pos = np.sort(order[late])
        if len(late_pos):                   # by payload, then event time, ties by arrival
            late_pos = late_pos[np.lexsort((ts[late_pos], pay[late_pos]))]
            self._late = list(zip(pay[late_pos].tolist(), late_pos.tolist(), strict=True))
            self.counters["late"] += len(late_pos)
        ok = np.zeros(n, dtype=bool)
        ok[order[accepted]] = True
        good = np.flatnonzero(ok)
        if not single:                      # (one reading a payload: in payload order already)
            good = good[np.lexsort((ts[good], pay[good]))]    # stable: ties keep arrival order
        self._seen_idx, self._seen_ts, self._seen_pay = idx[good], ts[good], pay[good]
        self._seen_at = 0
        self._cur = 0
        before = self.max_ts
        if s.time_quorum > 1 and newest[-1] > self.max_ts:
            self.max_ts = int(newest[-1])
        if len(good):
            if s.time_quorum == 1:
                self.max_ts = max(self.max_ts, int(ts[good].max()))
            if not self.watch_start:
                self._watch_from = (int(pay[good[0]]), int(ts[good[0]]))
        if s.time_quorum > 1:
            top = reached
        else:
            top = np.full(npay, -(1 << 62), dtype=np.int64)
            if single:                      # one reading a payload: no two to take the max of
                top[self._seen_pay] = self._seen_ts
            else:
                np.maximum.at(top, self._seen_pay, self._seen_ts)
        if self._clock is not None:         # clock_bound: no payload moves time past the clock
            top = np.minimum(top, max(self._clock, before))
        self._horizons = np.maximum(np.maximum.accumulate(top) - s.allowed_lateness,
                                    self.watermark).tolist()
        # Which accepted readings can change anything?
        matter = ok & (val >= self._floor_np[kind])        # over the quiet floor (events: nan)
        matter |= ok & (event == 2) & self._has_event_rules_np[kind]
        # a sensor with an incident open, or with another reading here that matters: asked
        # per reading of the batch, so the cost follows the batch, not the open incidents
        measured = ok & ~no_value
        busy_at = matter & ~no_value
        if len(late_pos):       # a late reading may open an incident a later reading here ends
            busy_at = busy_at.copy()
            busy_at[late_pos] = True
        busy = idx[busy_at]                 # (repeats cost isin less than np.unique would)
        if len(busy):
            matter |= measured & np.isin(idx, busy)
        matter |= self._tracked(idx, measured & ~matter, self._quiet_tracks)
        if self.silent:                     # any reading of a silent sensor ends its silence
            matter |= ok & self._silent_np[idx]
        if self._battery_kinds_any:
            bat = np.array([r.battery for r in readings], dtype=np.float64)   # None -> nan
            low = ok & (bat <= self._battery_ceiling_np[kind])                # nan: False
            charged = ok & (bat > self._battery_ceiling_np[kind])
            # a flat battery that was changed clears
            low |= self._tracked(idx, charged & ~low, [e.tracks for e in self._battery_rules])
            matter |= low
        if self.keep_accepted and (ok.any() or len(late_pos)):
            kept = ok.copy()
            kept[late_pos] = True           # a late reading is a real measurement: history
            out.accepted.append((idx[kept], ts[kept], val[kept]))
        rank = np.empty(n, dtype=np.int64)
        rank[good] = np.arange(len(good))
        self._visit = np.sort(rank[matter]).tolist()
        self._positions = good              # (only the visited few are read)
        self._readings, self._idx_list = readings, idx_list
        self._evaluate(readings, idx_list, out)
        c = self.counters
        c["readings"] += n
        c["duplicates"] += int(duplicate.sum())
        if not fit.all() or len(stale_pos):
            self._reject_batch(readings, spans, out, idx_list, invalid, wrong_sender, known,
                               future, too_old, suspect, bad_value, stale_pos)

    def _screen_small(self, readings: list, now_ms: int | None, out: Output,
                      claims: tuple | None, ends: Sequence[int], single: bool) -> bool:
        """The batch screen for a batch of a few readings, reading by reading in plain Python:
        the same answers as ``_screen_and_evaluate`` (both are fuzzed against the reference
        model, tests/core/test_engine_model.py) without its ~60 numpy calls, whose fixed cost is
        most of what a batch of 20 readings costs. Only for the common batch, where every
        reading is taken: at the first one that would be refused (unknown, invalid, stale ...)
        or with a time quorum it returns False having changed nothing, and the batch screen
        takes the batch."""
        s = self.settings
        if s.time_quorum > 1:
            return False
        n = len(readings)
        idx = self._numbers(list(map(_SENSOR_ID, readings)))
        if min(idx) < 0:
            return False
        for r in readings:
            if r.ts.__class__ is not int:   # RFC 3339 times from a fast batch decode: to ms
                r.ts = int(r.ts.timestamp() * 1000)
        ts = list(map(_TS, readings))
        vals = list(map(_VALUE, readings))
        events = list(map(_EVENT, readings))
        kind_of, wants_value = self._kind_list, self._wants_value
        kinds = [kind_of[x] for x in idx]
        ceiling = now_ms + s.max_future if now_ms is not None else 1 << 62
        never = -(1 << 62)
        lateness, watermark, max_age = s.allowed_lateness, self.watermark, s.max_age
        last_seen = self.last_seen
        if single and claims is None and self._all_new(idx, ts, vals, events, kinds, ceiling):
            pay = range(n)
            late: list = []
            good, duplicates = list(pay), 0
        else:
            for v, e, t, k in zip(vals, events, ts, kinds, strict=True):
                if v is None:                   # an event, of a kind that reports events
                    if e is None or wants_value[k]:
                        return False
                elif e is not None or not abs(v) < 1e15 or not wants_value[k]:    # NaN too
                    return False
                if t > ceiling or t < EARLIEST:
                    return False
            if claims is not None:
                gateway_of = self._gateway_np
                for x, g, c in zip(idx, claims[0].tolist(), claims[1].tolist(), strict=True):
                    if (g != -1 and gateway_of[x] != g) or (c != -1 and x != c):
                        return False
            if single:
                pay = range(n)
            else:
                pay = [0] * n
                p = 0
                for i in range(n):
                    while ends[p] <= i:
                        p += 1
                    pay[i] = p
            # too old: behind the watermark as the reading's payload arrived (earlier payloads count)
            newest, cur, cur_max = never, 0, never
            limit = watermark - max_age
            if single:
                for t in ts:
                    if t < limit:
                        return False
                    if t > newest:
                        newest = t
                        if newest - lateness > watermark:
                            limit = newest - lateness - max_age
            else:
                for p, t in zip(pay, ts, strict=True):
                    if p != cur:
                        if cur_max > newest:
                            newest = cur_max
                            if newest - lateness > watermark:
                                limit = newest - lateness - max_age
                        cur, cur_max = p, never
                    if t < limit:
                        return False
                    if t > cur_max:
                        cur_max = t
            # per sensor, in arrival order (payloads one after another, each in event-time order):
            # newer than every reading before it, stored or earlier here? equal: a duplicate
            order = pay if single else sorted(range(n), key=lambda i: (pay[i], ts[i]))
            so_far: dict[int, int] = {}
            good, late = [], []
            duplicates = 0
            for i in order:
                x, t = idx[i], ts[i]
                before = so_far.get(x, 0)
                if t > before:
                    so_far[x] = t
                seen = last_seen[x]
                if before > seen:
                    seen = before
                if t > seen:
                    good.append(i)
                elif t == seen:
                    duplicates += 1
                elif t >= seen - lateness:
                    late.append(i)
                else:
                    return False                # stale: a dead letter
        # taken: from here on the batch is this screen's
        if late:
            self._late = [(pay[i], i) for i in late]
            self.counters["late"] += len(late)
        g_idx = [idx[i] for i in good]
        g_ts = [ts[i] for i in good]
        g_pay = good if single else [pay[i] for i in good]
        self._seen_idx = np.array(g_idx, dtype=np.int64)
        self._seen_ts = np.array(g_ts, dtype=np.int64)
        self._seen_pay = np.array(g_pay, dtype=np.int64)
        self._seen_at = 0
        self._cur = 0
        self._positions = good
        before_max = self.max_ts
        if good:
            self.max_ts = max(self.max_ts, max(g_ts))
            if not self.watch_start:
                self._watch_from = (g_pay[0], g_ts[0])
        top = [never] * len(ends)
        for p, t in zip(g_pay, g_ts, strict=True):
            if t > top[p]:
                top[p] = t
        if self._clock is not None:
            bound = max(self._clock, before_max)
            top = [min(t, bound) for t in top]
        horizons = []
        run, h = never, watermark
        for t in top:
            if t > run:
                run = t
                if run - lateness > h:
                    h = run - lateness
            horizons.append(h)
        self._horizons = horizons
        # which taken readings can change anything (the batch screen's `matter`)
        floor, event_rules, names = self._floor_list, self._has_event_rules_list, self._event_names
        tracks = [t for t in self._quiet_tracks if t]
        silent = self.silent
        battery = self._battery_kinds_any
        if len(good) == n and single and None not in vals and not self.keep_accepted and (
                not battery or list(map(_BATTERY, readings)).count(None) == n):
            # measurements only, every one taken, no battery level: which sensors matter, asked
            # of the batch at once (over its floor, an incident open, silent)
            hit = set(compress(idx, map(ge, vals, map(floor.__getitem__, kinds))))
            hit.update(silent.intersection(idx))
            for t in tracks:
                hit.update(filter(t.__contains__, idx))
            self._visit = [j for j, x in enumerate(idx) if x in hit] if hit else []
            return self._take_small(readings, idx, n, 0, out)
        # The same questions reading by reading, asked of sets where they can be: a measurement
        # matters over its floor, or of a sensor with one over its floor here, or late here (it
        # may open an incident a later reading ends, as in the batch screen), or with an incident
        # open; an event, if a rule names it; any reading of a silent sensor; a battery level at
        # or under its ceiling, or over it with a battery incident open (it was changed).
        g_vals = [vals[i] for i in good]
        g_kinds = [kinds[i] for i in good]
        over = [v is not None and v >= floor[k] for v, k in zip(g_vals, g_kinds, strict=True)]
        hot = set(compress(g_idx, over))
        hot.update(idx[i] for i in late)
        for t in tracks:
            hot.update(filter(t.__contains__, g_idx))
        matter = [(x in hot) if v is not None else (event_rules[k] and events[i] in names)
                  for x, v, k, i in zip(g_idx, g_vals, g_kinds, good, strict=True)]
        if silent and not silent.isdisjoint(g_idx):
            matter = [m or x in silent for m, x in zip(matter, g_idx, strict=True)]
        if battery:
            bats = [readings[i].battery for i in good]
            if bats.count(None) < len(bats):
                battery_tracks = [t for t in (e.tracks for e in self._battery_rules) if t]
                ceiling_of = self._battery_ceiling_list
                for j, b in enumerate(bats):
                    if b is not None and not matter[j] and (b <= ceiling_of[g_kinds[j]] or any(
                            g_idx[j] in t for t in battery_tracks)):
                        matter[j] = True
        if self.keep_accepted and (good or late):
            kept = sorted(good + late)
            out.accepted.append((np.array([idx[i] for i in kept], dtype=np.int64),
                                 np.array([ts[i] for i in kept], dtype=np.int64),
                                 np.array([vals[i] for i in kept], dtype=np.float64)))
        self._visit = [j for j, m in enumerate(matter) if m]
        return self._take_small(readings, idx, n, duplicates, out)

    def _take_small(self, readings: list, idx: list[int], n: int, duplicates: int,
                    out: Output) -> bool:
        """The end of ``_screen_small``: the readings to visit are chosen; act."""
        self._readings, self._idx_list = readings, idx
        self._evaluate(readings, idx, out)
        self.counters["readings"] += n
        self.counters["duplicates"] += duplicates
        return True

    def _all_new(self, idx: list[int], ts: list[int], vals: list, events: list, kinds: list,
                 ceiling: int) -> bool:
        """``_screen_small``'s checks at once, for the batch of one reading a payload where all
        hold (the common one): every reading a finite measurement or an event, as its kind
        reports, within the time bounds, of a different sensor, and newer than its last."""
        s = self.settings
        wants_value = self._wants_value
        for v, e, k in zip(vals, events, kinds, strict=True):
            if (v is None) == (e is None) or (v is None) == wants_value[k]:
                return False
        measured = [v for v in vals if v is not None] if None in vals else vals
        if measured and (not all(map(isfinite, measured)) or not -1e15 < min(measured)
                         or not max(measured) < 1e15):
            return False
        lo, hi = min(ts), max(ts)
        # no reading behind the watermark as its payload arrived, by the widest margin
        if lo < EARLIEST or hi > ceiling or lo < max(hi - s.allowed_lateness, self.watermark) - s.max_age:
            return False
        return len(set(idx)) == len(idx) and all(map(gt, ts, map(self.last_seen.__getitem__, idx)))

    def _quorum_time(self, pay: np.ndarray, idx: np.ndarray, ts: np.ndarray, could: np.ndarray,
                     npay: int) -> np.ndarray:
        """Per payload, the time ``time_quorum`` sources have reached once it is taken (-inf:
        the payload took nothing): the q-th newest of the newest readings of the sources heard
        in the last ``quorum_window`` payloads (all of them, while fewer). Arrival order is the
        one clock a wrong gateway clock cannot fake: a gateway running ahead is outvoted by the
        others still sending, and a source gone quiet leaves the window instead of holding
        time back. A too_old reading (judged, like the reference model's, against the
        watermark as its payload arrives) is not heard; a stale, late or duplicate one is, and
        is older than its own source's newest."""
        s = self.settings
        q, window = s.time_quorum, s.quorum_window
        qs = self._quorum
        newest, count, ranked, recent = qs.newest, qs.count, qs.ranked, qs.recent
        out = np.full(npay, -(1 << 62), dtype=np.int64)
        cand = np.flatnonzero(could)
        if not len(cand):
            return out
        src = self._source_np[idx[cand]]
        c_pay, c_ts = pay[cand], ts[cand]
        order = np.lexsort((c_ts, src, c_pay))            # each (payload, source): its newest last
        last = np.ones(len(order), dtype=bool)
        last[:-1] = (c_pay[order][1:] != c_pay[order][:-1]) | (src[order][1:] != src[order][:-1])
        pick = order[last]
        n_pick = len(pick)
        g_pay, g_src, g_ts = c_pay[pick].tolist(), src[pick].tolist(), c_ts[pick].tolist()
        floor = self.watermark - s.max_age
        reached = -(1 << 62)
        lateness, max_age = s.allowed_lateness, s.max_age
        insort, bisect_left = bisect.insort, bisect.bisect_left
        i = 0
        while i < n_pick:                   # a payload at a time
            p = g_pay[i]
            heard = []
            while i < n_pick and g_pay[i] == p:
                x, t = g_src[i], g_ts[i]
                i += 1
                if t < floor:               # too_old: not heard
                    continue
                heard.append(x)
                old = newest.get(x)
                if old is None or t > old:
                    if x in count:          # counted: move it to its new place
                        del ranked[bisect_left(ranked, (old, x))]
                        insort(ranked, (t, x))
                    newest[x] = t
            if not heard:
                continue
            recent.append(heard)
            for x in heard:
                c = count.get(x, 0)
                count[x] = c + 1
                if not c:                   # back in the window: counted again
                    insort(ranked, (newest[x], x))
            if len(recent) > window:
                for x in recent.popleft():
                    c = count[x] - 1
                    if c:
                        count[x] = c
                    else:
                        del count[x]
                        del ranked[bisect_left(ranked, (newest[x], x))]
            now = ranked[-q][0] if len(ranked) >= q else ranked[0][0]
            out[p] = now
            if now > reached:               # the watermark the next payload arrives to
                reached = now
                floor = max(self.watermark, reached - lateness) - max_age
        return out

    @staticmethod
    def _tracked(idx: np.ndarray, among: np.ndarray, tracks: list[dict]) -> np.ndarray:
        """``among`` & the reading's sensor has a track (an incident) in one of ``tracks``."""
        found = np.zeros(len(idx), dtype=bool)
        tracks = [t for t in tracks if t]
        if tracks:
            pos = np.flatnonzero(among)
            sensors = idx[pos].tolist()
            hit = np.zeros(len(pos), dtype=bool)
            for t in tracks:                # a dict lookup per reading, in C
                hit |= np.fromiter(map(t.__contains__, sensors), dtype=bool, count=len(sensors))
            found[pos[hit]] = True
        return found

    def _evaluate(self, readings: list, idx_list: list[int], out: Output) -> None:
        """The rules, reading by reading, for the readings that can change something, in rank
        order, with each payload's end between them; a timer that fell due before a reading (and
        within its payload's horizon) acts before it."""
        kind_of = self.registry.kind_of
        vh, bh, eh = self._value, self._battery, self._event
        silent = self.silent
        changes = self.changes
        heap = self.timers.heap
        horizons = self._horizons
        assert horizons is not None         # (set for the batch being taken)
        npay = len(horizons)
        visit = self._visit                 # a scan may add to it (a sensor found silent)
        positions = self._positions
        pay = self._seen_pay
        j = 0
        self._take_late(out)                # the first payload's, as it arrives
        while True:
            if j == len(visit):
                if self._cur == npay:
                    break
                self._next_visit = j
                self._finish_payloads(npay, out)
                continue
            rk = visit[j]
            q = int(pay[rk])
            if q != self._cur:
                self._next_visit = j
                self._finish_payloads(q, out)
                continue                    # an earlier reading may have been given a visit
            j += 1
            self._next_visit = j
            self._passed = self._current = rk
            i = positions[rk]
            r = readings[i]
            ts = r.ts
            upto = min(ts - 1, horizons[q])
            if heap and heap[0][0] < ts and heap[0][0] <= horizons[q]:
                # (the frontier moves as they run: a reading a scan finds, acting in its place
                # among them, must not count the scan times after it as done)
                self._run_timers(upto, out)
            elif upto > self._frontier:
                self._frontier = upto
            if self._recoveries:
                self._recover_pending(rk, out, by_rank=True)
            s = idx_list[i]
            k = kind_of[s]
            if silent and s in silent:
                self._recover(s, ts)
            v = r.value
            if v is not None:
                for h in vh[k]:
                    h(s, ts, v)
            else:
                for h in eh[k]:
                    h(s, ts, r.event)
            b = r.battery
            if b is not None:
                for h in bh[k]:
                    h(s, ts, b)
            if changes:
                self._drain(out)

    def _take_late(self, out: Output) -> None:
        """The late readings of the payload now arriving (``_cur``), before any of its own
        readings or timers, in event-time order."""
        late = self._late
        while self._late_at < len(late) and late[self._late_at][0] == self._cur:
            i = late[self._late_at][1]
            self._late_at += 1
            r = self._readings[i]
            s = self._idx_list[i]
            k = self.registry.kind_of[s]
            if r.value is not None:
                for h in self._late_value[k]:
                    h(s, r.ts, r.value)
            else:
                for h in self._late_event[k]:
                    h(s, r.ts, r.event)
            if self.changes:
                self._drain(out)

    def _reject_batch(self, readings: list, spans: wire.Spans | None, out: Output, idx_list: list[int],
                      invalid: np.ndarray, wrong_sender: np.ndarray, known: np.ndarray,
                      future: np.ndarray,
                      too_old: np.ndarray, suspect: np.ndarray, bad_value: np.ndarray,
                      stale_pos: np.ndarray) -> None:
        s = self.settings
        rejects: list[tuple[Any, str, str]] = []
        for i in np.flatnonzero(invalid).tolist():
            r = readings[i]
            if r.value is not None and r.event is None:      # a NaN value, not a missing one
                rejects.append((r, "not_finite", f"value {r.value} is not a finite measurement"))
            else:
                rejects.append((r, "invalid", "a reading carries exactly one of `value` or `event`"))
        for i in np.flatnonzero(wrong_sender).tolist():
            rejects.append((readings[i], "wrong_sender", f"sensor {readings[i].sensor_id} is not "
                            "the sender's: a gateway publishes only its own sensors' readings"))
        for i in np.flatnonzero(~known & ~invalid & ~wrong_sender).tolist():
            rejects.append((readings[i], "unknown_sensor",
                            f"sensor {readings[i].sensor_id} is not in the registry"))
        for i in np.flatnonzero(future).tolist():
            rejects.append((readings[i], "future", f"ts {readings[i].ts} is more than "
                            f"{s.max_future // 1000}s ahead of the clock; check the gateway's clock (NTP)"))
        for i in np.flatnonzero(too_old).tolist():
            ts = readings[i].ts
            rejects.append((readings[i], "too_old", f"ts {ts} is more than "
                            f"{s.max_age // 86_400_000} days behind the watermark"
                            + ("; epoch seconds? send milliseconds" if ts < 10_000_000_000 else "")))
        for i in np.flatnonzero(suspect).tolist():
            r = readings[i]
            k = self.registry.kind_of[idx_list[i]]
            if r.value is not None and self._wants_value[k]:
                rejects.append((r, "not_finite", f"value {r.value} is not a finite measurement"))
            else:
                rejects.append((r, "wrong_kind", f"sensor {r.sensor_id} reports "
                                f"{'`value`' if self._wants_value[k] else '`event`'} readings"))
        for i in np.flatnonzero(bad_value).tolist():
            rejects.append((readings[i], "not_finite", f"value {readings[i].value} is not a "
                            "finite measurement"))
        for i in stale_pos.tolist():
            r = readings[i]
            rejects.append((r, "stale", f"older than sensor {r.sensor_id}'s newest reading "
                            f"({self._stale_newest[i]})"))
        self._reject(rejects, readings, spans, out)

    def _reject(self, rejects: list, arrival: list, spans: wire.Spans | None, out: Output) -> None:
        where = {id(r): i for i, r in enumerate(arrival)} if spans else {}
        ends = spans.ends if spans else []
        arrays: dict[int, wire.GatewayArray] = {}
        for r, reason, detail in rejects:
            self.counters["dead_letters"] += 1
            self.counters["dead." + reason] += 1
            if spans:
                pos = where[id(r)]
                i = bisect.bisect_right(ends, pos)
                start = ends[i - 1] if i else 0
                _, payload, source, positions = spans[i]
                if positions is not None:         # the array had bad elements: real indexes
                    index = positions[pos - start]
                else:
                    index = pos - start if payload.lstrip()[:1] == b"[" else None
                if index is None:
                    out.dead_letters.append(wire.dead_letter(reason, detail, payload, None, source))
                else:
                    array = arrays.get(i) or arrays.setdefault(i, wire.GatewayArray(payload))
                    out.dead_letters.append(array.dead_letter(reason, detail, index, source))
            else:
                out.dead_letters.append(wire.dead_letter(reason, detail, msgspec.json.encode(r)))

    def ack(self, acks: Sequence[Ack | dict | bytes], out: Output | None = None,
            now_ms: int | None = None,
            may_ack: Callable[[Ack, Any, str], str | None] | None = None) -> Output:
        """Acknowledgements from dashboards or a worker's push; a bad one is a dead letter.
        Their time is held to the bounds of a reading's (``now_ms``: the clock, as in ingest):
        an ack stamped far in the future would stamp its incident's notices there.
        ``may_ack``: the runtimes' check of who may acknowledge what (pipeline/core/identity.py);
        an ack it refuses is a `forbidden` dead letter."""
        out = out if out is not None else Output()
        s = self.settings
        for a in acks:
            raw = a if isinstance(a, bytes) else None
            try:
                if isinstance(a, bytes):
                    a = Ack.model_validate_json(a)
                elif isinstance(a, dict):
                    a = Ack.model_validate(a)
            except ValidationError as exc:
                self._refuse_ack(out, wire.ack_refusal(exc), raw or msgspec.json.encode(a))
                continue
            ts = a.ts_ms
            refused: tuple[str, str] | None = None
            if now_ms is not None and ts > now_ms + s.max_future:
                refused = "bad_ack", (f"ts {ts} is more than {s.max_future // 1000}s ahead of "
                                      "the clock; check the sender's clock (NTP)")
            elif ts < self.watermark - s.max_age:
                refused = "bad_ack", (f"ts {ts} is more than {s.max_age // 86_400_000} days "
                                      "behind the watermark")
            refused = refused or self.book.ack(a, out.notices, may_ack)
            if refused:
                self._refuse_ack(out, refused[1], raw or a.model_dump_json().encode(), refused[0])
            else:
                self.counters["acks"] += 1
        return out

    def silence(self, commands: Sequence[bytes | dict], out: Output | None = None) -> Output:
        """Silences made and ended (pipeline/core/silences.py); they act at the watermark, so a
        replay of the same inputs mutes the same notices. A bad one is a `bad_silence` dead
        letter."""
        out = out if out is not None else Output()
        for c in commands:
            refused = silences.apply(self.book, c, self.watermark, out.notices)
            if refused:
                self._refuse_ack(out, refused, c if isinstance(c, bytes) else msgspec.json.encode(c),
                                 "bad_silence")
            else:
                self.counters["silences"] += 1
        return out

    def _refuse_ack(self, out: Output, why: str, payload: bytes, reason: str = "bad_ack") -> None:
        self.counters["dead_letters"] += 1
        self.counters["dead." + reason] += 1
        out.dead_letters.append(wire.dead_letter(reason, why, payload))

    # ---- time ---------------------------------------------------------------------------
    def advance(self, watermark: int, out: Output | None = None) -> Output:
        """Move the watermark on; everything due by then happens, in time order."""
        out = out if out is not None else Output()
        if watermark <= self.watermark:
            return out
        self.watermark = watermark
        if not self.watch_start and self.absence and watermark > 0:
            self._start_watching(watermark)
        self._run_timers(watermark, out)
        return out

    def _run_timers(self, upto: int, out: Output) -> None:
        heap = self.timers.heap
        pop = self.timers.pop_due
        evaluators = self.evaluators
        while True:
            if self._recoveries and (not heap or heap[0][0] >= self._recoveries[0][0]) \
                    and self._recoveries[0][0] <= upto:
                self._recover_pending(self._recoveries[0][0], out)   # that reading came first
                continue
            t = pop(upto)
            if t is None:
                break
            due, owner, key = t
            self._frontier = max(self._frontier, due)
            if owner >= 0:
                evaluators[owner].on_timer(due, key)
            elif owner == LIFECYCLE:
                self.book.on_timer(due, key, out.notices)
            elif owner == SILENCE:
                self.book.on_silence_timer(due, key, out.notices)
            elif owner == SCAN and key == self._scan_gen:    # else replaced by an earlier plan
                self._apply_seen(due)
                nxt = self._scan_absence(due, out)
                self._plan_scan(self._on_cadence(max(due + 1, nxt)) if nxt < NEVER else NEVER,
                                replace=True)
            self._drain(out)
        if upto > self._frontier:
            self._frontier = upto

    def _start_watching(self, ts: int) -> None:
        self.watch_start = ts
        if self.absence:
            self._plan_scan(ts + self.settings.absence_scan_every)

    def _on_cadence(self, t: int) -> int:
        """The first scan time (watch start + k * absence_scan_every) at or after ``t``."""
        every = self.settings.absence_scan_every
        return self.watch_start + -(-(t - self.watch_start) // every) * every

    def _plan_scan(self, at: int, replace: bool = False) -> None:
        """Absence is checked at the scan times; scans that can find nothing are left out (the
        next one is planned for when the next sensor could fall silent), and a sensor that comes
        back moves the plan earlier if it must."""
        if not replace and at >= self._scan_due:
            return
        self._scan_gen += 1
        self._scan_due = at
        if at < NEVER:
            self.timers.push(at, SCAN, self._scan_gen)

    def _drain(self, out: Output) -> None:
        changes = self.changes
        notices = out.notices
        while changes:
            batch = changes[:]
            changes.clear()
            for ch in batch:
                for c in self._listeners.get(ch.rule.id, ()):
                    c.on_change(ch)
                self.book.apply(ch, notices)
                self.counters["changes." + ch.what] += 1

    # ---- absence --------------------------------------------------------------------------
    def _scan_absence(self, at: int, out: Output) -> int:
        """Silence as of event time ``at``; returns when the next sensor could fall silent
        (readings only push that later), so a scan never runs for nothing in a long replay."""
        seen = np.maximum(self._last_seen_np, self.watch_start)
        upcoming = NEVER
        found: list[int] = []
        for a, members in zip(self.absence, self._gateway_members, strict=True):
            due = seen + a.absent_ms
            watched = a.absent_ms > 0
            mask = watched & (due <= at)
            later = due[watched & ~mask]
            if len(later):
                upcoming = min(upcoming, int(later.min()))
            new_mask = mask & ~a.silent_mask
            if not new_mask.any():
                continue
            new = np.flatnonzero(new_mask).tolist()
            found += new
            whole: set[int] = set()
            gw = a.gateway_of
            if members is not None:
                total, starts, by_gw = members
                quiet = np.bincount(gw[mask & (gw >= 0)], minlength=len(total))
                whole = set(np.flatnonzero((total >= 2) & (quiet == total)).tolist())
            by_gateway: dict[int, list[int]] = {}
            for i in new:
                g = int(gw[i]) if gw is not None else -1
                if g in whole:
                    by_gateway.setdefault(g, []).append(i)
                else:
                    a.mark(i, "")
                    self._silence(i)
                    a.fire(i, int(due[i]), int(self.last_seen[i]), None)
            for g, new_members in by_gateway.items():
                subject = "gw:" + self.registry.gateways[g]
                if subject not in a.tracks:
                    all_members = by_gw[starts[g]:starts[g + 1]]
                    when = int(due[all_members].max())
                    a.fire(subject, when, int(self._last_seen_np[all_members].max()),
                           all_members.tolist())
                for i in new_members:
                    a.mark(i, subject)
                    self._silence(i)
        if found and self._horizons is not None:
            self._drain(out)
            self._readings_after_scan(found)
        return upcoming

    def _readings_after_scan(self, found: list[int]) -> None:
        """Sensors just found silent that have a reading in this batch after the scan's point:
        that reading resolves them, in its place. One the loop has passed already (it needed no
        visit) acts before the next timer or reading after it; a later one is visited."""
        lo = self._seen_at
        rest = self._seen_idx[lo:]
        if not len(rest):
            return
        hit = np.flatnonzero(np.isin(rest, np.array(found, dtype=np.int64)))
        if not len(hit):
            return
        _, first = np.unique(rest[hit], return_index=True)
        ranks = (lo + hit[first]).tolist()
        for rk in sorted(ranks):
            if rk < self._passed:
                heapq.heappush(self._recoveries, (int(self._seen_ts[rk]), rk,
                                                  int(self._seen_idx[rk])))
            elif rk != self._current:
                k = bisect.bisect_left(self._visit, rk, self._next_visit)
                if k == len(self._visit) or self._visit[k] != rk:
                    self._visit.insert(k, rk)

    def _recover_pending(self, upto: int, out: Output, by_rank: bool = False) -> None:
        """Readings of silent sensors that the loop passed before a scan found them silent."""
        rec = self._recoveries
        while rec and (rec[0][1] < upto if by_rank else rec[0][0] <= upto):
            ts, _, s = heapq.heappop(rec)
            # the reading acts in its place: after every timer due before it that the payload's
            # horizon reaches, whether or not one was planned
            horizons = self._horizons
            assert horizons is not None     # (a reading to recover is of the batch being taken)
            self._frontier = max(self._frontier, min(ts - 1, horizons[self._cur]))
            if s in self.silent:
                self._recover(s, ts)
                self._drain(out)

    def _silence(self, idx: int) -> None:
        self.silent.add(idx)
        self._silent_np[idx] = True

    def _recover(self, idx: int, ts: int) -> None:
        freed: list[int] = []
        for a in self.absence:
            freed += a.recover(idx, ts)
        # a gateway that is back frees its other sensors too (in place: the hot loop holds a
        # reference to this set); one still silent under another absence rule stays
        for i in freed:
            if i in self.silent and not any(a.silent_mask[i] for a in self.absence):
                self.silent.discard(i)
                self._silent_np[i] = False
        # it, or its gateway's others (silent still, and now one by one), can fall silent: check
        # at the first scan time the scans have not covered yet (every scan time up to the
        # timers' frontier counts as done, found something or not, so a late reading does not
        # take the checks back in time)
        self._plan_scan(self._on_cadence(max(self.watermark, self._frontier) + 1))

    # ---- state ----------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for sid in self.registry.sensor_ids:
            h.update(sid.encode())
            h.update(b"\n")
        return h.hexdigest()

    def snapshot(self) -> bytes:
        """All state, keyed by sensor ids and rule ids so a changed registry still restores."""
        reg = self.registry

        def sid(s: Any) -> Any:
            return ["s", reg.sensor_ids[s]] if isinstance(s, int) else ["g", s]

        lateness = self.settings.allowed_lateness
        for e in self.evaluators:       # an end before (newest - lateness) stops no late reading
            if e.ended:
                e.ended = {k: t for k, t in e.ended.items()
                           if not isinstance(k, int) or t >= self.last_seen[k] - lateness}
        timers = []
        for due, n, owner, key in self.timers.heap:
            if owner >= 0:
                timers.append([due, n, self.evaluators[owner].id, sid(key)])
            else:
                timers.append([due, n, owner, list(key) if isinstance(key, tuple) else key])
        state = {
            "version": SNAPSHOT_VERSION, "registry": self._fingerprint(),
            "watermark": self.watermark, "max_ts": self.max_ts, "watch_start": self.watch_start,
            "last_seen": self.last_seen.tobytes(),
            "sensor_ids": "\n".join(reg.sensor_ids),
            "timers": timers, "timer_n": self.timers.n, "scan": [self._scan_due, self._scan_gen],
            "rules": {e.id: e.dump(sid) for e in self.evaluators},
            "book": self.book.dump(sid),
            "counters": dict(self.counters),
        }
        if self._quorum.newest:             # time_quorum: sources by name
            ngw = len(reg.gateways)

            def source(src: int) -> Any:
                return ["g", reg.gateways[src]] if src < ngw else sid(src - ngw)
            state["quorum"] = {"newest": [[source(x), t] for x, t in self._quorum.newest.items()],
                               "recent": [[source(x) for x in heard]
                                          for heard in self._quorum.recent]}
        return msgspec.msgpack.encode(state)

    def restore(self, blob: bytes) -> dict[str, int]:
        """Load a snapshot into this (fresh) engine; returns what could not be restored."""
        state = msgspec.msgpack.decode(blob)
        version = state.get("version") if isinstance(state, dict) else None
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"snapshot version {version!r}: not a cityops engine snapshot")
        if version > SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {version} is newer than this engine's "
                             f"({SNAPSHOT_VERSION}): restore it with the cityops that made it")
        while version < SNAPSHOT_VERSION:
            state = MIGRATIONS[version](state)
            version += 1
        reg = self.registry
        lost: Counter[str] = Counter()
        same = state["registry"] == self._fingerprint()

        def sidx(key: Any) -> Any:
            if key is None:
                return None
            tag, val = key
            if tag == "s":
                return reg.index.get(val)
            return val

        self.watermark, self.max_ts = state["watermark"], state["max_ts"]
        self.watch_start = state["watch_start"]
        saved = array("q", state["last_seen"])
        if same:
            self.last_seen[:] = saved
        else:   # the registry changed: carry over what matches by sensor id, count the rest
            for old, sid_ in enumerate(state["sensor_ids"].split("\n")):
                i = reg.index.get(sid_)
                if i is None:
                    lost["sensors"] += 1
                else:
                    self.last_seen[i] = saved[old]
        for e in self.evaluators:
            if e.id in state["rules"]:
                lost["tracks"] += e.load(state["rules"][e.id], sidx)
        lost["incidents"] += self.book.load(state["book"], sidx)
        self.silent.clear()
        self._silent_np[:] = False
        for a in self.absence:
            self.silent.update(a.silent)
            self._silent_np |= a.silent_mask
        heap = []
        for due, n, owner, key in state["timers"]:
            if isinstance(owner, str):
                e = self.by_id.get(owner)
                k = sidx(key)
                if e is None or k is None:
                    lost["timers"] += 1
                    continue
                heap.append((due, n, e.number, k))
            else:
                heap.append((due, n, owner, tuple(key) if isinstance(key, list) else key))
        heapq.heapify(heap)
        self.timers.heap[:] = heap
        self.timers.n = state["timer_n"]
        scans = [(due, key) for due, _, owner, key in heap if owner == SCAN]
        self._scan_due, self._scan_gen = state.get("scan") or (min(scans) if scans else (NEVER, 0))
        self.counters = Counter(state["counters"])
        if "quorum" in state:
            def source(key: list) -> int | None:
                tag, name = key
                x = self._gateway_numbers.get(name) if tag == "g" else reg.index.get(name)
                return x if x is None or tag == "g" else int(self._source_np[x])
            qs = self._quorum
            for key, t in state["quorum"]["newest"]:
                x = source(key)
                if x is not None:
                    qs.newest[x] = max(qs.newest.get(x, t), t)
            for heard in state["quorum"]["recent"]:
                known = [x for x in map(source, heard) if x is not None]
                qs.recent.append(known)
                for x in known:
                    qs.count[x] = qs.count.get(x, 0) + 1
            qs.ranked[:] = sorted((qs.newest[x], x) for x in qs.count)
        return {k: v for k, v in lost.items() if v}
