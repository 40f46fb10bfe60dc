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
batch; a sensor's reading older than its newest one is stale (dead-lettered) and an exact
repeat is a duplicate (counted, dropped: at-least-once delivery redelivers). Timers fire when
the watermark passes them.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import wire
from pipeline.lifecycle import LIFECYCLE, AlertBook
from pipeline.models import Ack, DeadLetter
from pipeline.registry import Registry
from pipeline.routing import Router
from rules import evaluators as ev
from rules.compiler import RuleSet, compile_rules
from rules.schema import Duration

SCAN = -2                  # timer owner number of the absence scan
SNAPSHOT_VERSION = 1
_BY_TS = attrgetter("ts")


class EngineSettings(BaseModel):
    """The engine's few knobs, validated once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_lateness: Duration = Field(default=60_000, description="how late a reading may come "
                                       "before timers stop waiting for it")
    max_future: Duration = Field(default=300_000, description="readings further ahead than this "
                                 "(of the clock, or of the newest reading) are refused")
    max_age: Duration = Field(default=7 * 86_400_000, description="readings older than this "
                              "behind the watermark are refused")
    absence_scan_every: Duration = Field(default=60_000, description="how often silence is checked")


@dataclass
class Output:
    notices: list[dict] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def extend(self, other: "Output") -> None:
        self.notices.extend(other.notices)
        self.dead_letters.extend(other.dead_letters)


class Engine:
    def __init__(self, registry: Registry, rules: RuleSet,
                 settings: EngineSettings | None = None) -> None:
        self.registry = registry
        self.rules = rules
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
        kinds = registry.kinds
        wants_value = [rules.kinds[k].reading == "value" if k in rules.kinds else True for k in kinds]
        self._wants_value = bytes(wants_value)
        self._value = [tuple(e.observe for e in self.evaluators
                             if e.reads == "value" and k in e.spec.sensors) for k in kinds]
        self._battery = [tuple(e.observe for e in self.evaluators
                               if e.reads == "battery" and k in e.spec.sensors) for k in kinds]
        self._event = [tuple(e.observe for e in self.evaluators
                             if e.reads == "event" and k in e.spec.sensors) for k in kinds]
        self.absence = [e for e in self.evaluators if isinstance(e, ev.Absence)]
        self._listeners: dict[str, list[ev.Correlation]] = {}
        for e in self.evaluators:
            if isinstance(e, ev.Correlation):
                for rid in e.spec.of:
                    self._listeners.setdefault(rid, []).append(e)
        self.silent: set[int] = set()       # sensors in an absence incident (any absence rule)
        self.watermark = -(1 << 62)
        self.max_ts = 0
        self.watch_start = 0                # when absence watching began (event time)
        self.counters: Counter[str] = Counter()

    # ---- names of subjects (sensor numbers or group keys) -----------------------------
    def _subject_name(self, s: int | str) -> str:
        return self.registry.sensor_ids[s] if isinstance(s, int) else s

    # ---- input ------------------------------------------------------------------------
    def ingest(self, payloads: Iterable[bytes], source: str | None = None,
               now_ms: int | None = None) -> Output:
        """Decode payloads (objects or gateway arrays) and process them as one batch."""
        readings: list = []
        dead: list[DeadLetter] = []
        spans: list[tuple[int, bytes, str | None]] = []
        for p in payloads:
            wire.decode(p, source, readings, dead)
            spans.append((len(readings), p, source))
        out = Output(dead_letters=dead)
        self.counters["dead_letters"] += len(dead)
        for d in dead:
            self.counters["dead." + d.reason] += 1
        self.process(readings, now_ms, out, _spans=spans)
        return out

    def process(self, readings: list, now_ms: int | None = None, out: Output | None = None,
                _spans: list | None = None) -> Output:
        """Evaluate a batch of decoded readings (``wire.WireReading``, ts in epoch ms)."""
        out = out if out is not None else Output()
        arrival = readings
        readings = sorted(readings, key=_BY_TS)   # timsort: near-sorted batches cost ~O(n)
        index = self.registry.index
        kind_of = self.registry.kind_of
        last_seen = self.last_seen
        wants_value = self._wants_value
        vh, bh, eh = self._value, self._battery, self._event
        silent = self.silent
        s = self.settings
        max_ts = self.max_ts
        # "future" needs a clock (the runtimes and replay pass the wall clock; history is never
        # ahead of it); "too old" is judged against the watermark, so old history replays
        ceiling = now_ms + s.max_future if now_ms is not None else 1 << 62
        floor = self.watermark - s.max_age
        rejects: list[tuple[Any, str, str]] = []
        duplicates = 0
        for r in readings:
            idx = index.get(r.sensor_id)
            if idx is None:
                rejects.append((r, "unknown_sensor", f"sensor {r.sensor_id} is not in the registry"))
                continue
            ts = r.ts
            if ts > ceiling or ts < floor:
                if ts > ceiling:
                    rejects.append((r, "future", f"ts {ts} is more than {s.max_future // 1000}s "
                                    "ahead of the clock; check the gateway's clock (NTP)"))
                else:
                    rejects.append((r, "too_old", f"ts {ts} is older than the {s.max_age // 86_400_000}-day limit"
                                    + ("; epoch seconds? send milliseconds" if ts < 10_000_000_000 else "")))
                continue
            k = kind_of[idx]
            v = r.value
            if (v is not None) != wants_value[k]:
                rejects.append((r, "wrong_kind", f"sensor {r.sensor_id} reports "
                                f"{'`value`' if wants_value[k] else '`event`'} readings"))
                continue
            if v is not None and not -1e15 < v < 1e15:
                rejects.append((r, "not_finite", f"value {v} is not a finite measurement"))
                continue
            last = last_seen[idx]
            if ts <= last:
                if ts == last:
                    duplicates += 1
                else:
                    rejects.append((r, "stale", f"older than the sensor's reading at {last}"))
                continue
            last_seen[idx] = ts
            if ts > max_ts:
                max_ts = ts
            if silent and idx in silent:
                self._recover(idx, ts)
            if v is not None:
                for h in vh[k]:
                    h(idx, ts, v)
            else:
                for h in eh[k]:
                    h(idx, ts, r.event)
            b = r.battery
            if b is not None:
                for h in bh[k]:
                    h(idx, ts, b)
        self.max_ts = max_ts
        c = self.counters
        c["readings"] += len(readings)
        c["duplicates"] += duplicates
        if rejects:
            self._reject(rejects, arrival, _spans, out)
        if not self.watch_start and max_ts:
            self._start_watching(readings[0].ts if readings else max_ts)
        self._drain(out)
        self.advance(max_ts - s.allowed_lateness, out)
        return out

    def _reject(self, rejects: list, arrival: list, spans: list | None, out: Output) -> None:
        where = {id(r): i for i, r in enumerate(arrival)} if spans else {}
        ends = [e for e, _, _ in spans] if spans else []
        for r, reason, detail in rejects:
            self.counters["dead_letters"] += 1
            self.counters["dead." + reason] += 1
            if spans:
                pos = where[id(r)]
                i = bisect.bisect_right(ends, pos)
                start = ends[i - 1] if i else 0
                _, payload, source = spans[i]
                array_like = payload.lstrip()[:1] == b"["
                out.dead_letters.append(wire.dead_letter(reason, detail, payload,
                                                         pos - start if array_like else None, source))
            else:
                out.dead_letters.append(wire.dead_letter(reason, detail, msgspec.json.encode(r)))

    def ack(self, acks: Sequence[Ack | dict | bytes], out: Output | None = None) -> Output:
        """Acknowledgements from dashboards or a worker's push; a bad one is a dead letter."""
        out = out if out is not None else Output()
        for a in acks:
            raw = a if isinstance(a, bytes) else None
            try:
                if isinstance(a, bytes):
                    a = Ack.model_validate_json(a)
                elif isinstance(a, dict):
                    a = Ack.model_validate(a)
            except ValidationError as exc:
                out.dead_letters.append(wire.dead_letter("bad_ack", str(exc.errors()[0]["msg"]),
                                                         raw or msgspec.json.encode(a)))
                continue
            why = self.book.ack(a, out.notices)
            if why:
                self.counters["acks_refused"] += 1
                out.dead_letters.append(wire.dead_letter("bad_ack", why, raw or a.model_dump_json().encode()))
            else:
                self.counters["acks"] += 1
        return out

    # ---- time ---------------------------------------------------------------------------
    def advance(self, watermark: int, out: Output | None = None) -> Output:
        """Move the watermark on; everything due by then happens, in time order."""
        out = out if out is not None else Output()
        if watermark <= self.watermark:
            return out
        self.watermark = watermark
        if not self.watch_start and self.absence and watermark > 0:
            self._start_watching(watermark)
        pop = self.timers.pop_due
        evaluators = self.evaluators
        while (t := pop(watermark)) is not None:
            due, owner, key = t
            if owner >= 0:
                evaluators[owner].on_timer(due, key)
            elif owner == LIFECYCLE:
                self.book.on_timer(due, key, out.notices)
            elif owner == SCAN:
                self._scan_absence(watermark)
                self.timers.push(watermark + self.settings.absence_scan_every, SCAN, None)
            self._drain(out)
        return out

    def _start_watching(self, ts: int) -> None:
        self.watch_start = ts
        if self.absence:
            self.timers.push(ts + self.settings.absence_scan_every, SCAN, None)

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
    def _scan_absence(self, at: int) -> None:
        seen = np.maximum(self._last_seen_np, self.watch_start)
        for a in self.absence:
            due = seen + a.absent_ms
            mask = (a.absent_ms > 0) & (due <= at)
            idxs = np.flatnonzero(mask)
            if not len(idxs):
                continue
            new = [i for i in idxs.tolist() if i not in a.silent]
            if not new:
                continue
            whole: set[int] = set()
            gw = a.gateway_of
            if gw is not None:
                watched = a.absent_ms > 0
                has_gw = gw >= 0
                total = np.bincount(gw[watched & has_gw], minlength=len(self.registry.gateways))
                quiet = np.bincount(gw[mask & has_gw], minlength=len(self.registry.gateways))
                whole = set(np.flatnonzero((total >= 2) & (quiet == total)).tolist())
            by_gateway: dict[int, list[int]] = {}
            for i in new:
                g = int(gw[i]) if gw is not None else -1
                if g in whole:
                    by_gateway.setdefault(g, []).append(i)
                else:
                    a.silent[i] = ""
                    self.silent.add(i)
                    last = int(self.last_seen[i])
                    a.fire(i, int(due[i]), last, None)
            for g, members in by_gateway.items():
                subject = "gw:" + self.registry.gateways[g]
                if subject not in a.tracks:
                    all_members = np.flatnonzero((gw == g) & watched).tolist()
                    when = int(due[all_members].max())
                    a.fire(subject, when, int(self.last_seen[all_members].max()), all_members)
                for i in members:
                    a.silent[i] = subject
                    self.silent.add(i)

    def _recover(self, idx: int, ts: int) -> None:
        for a in self.absence:
            a.recover(idx, ts)
        # a gateway that is back frees its other sensors too; rare, so recount (in place: the
        # hot loop holds a reference to this set)
        self.silent.clear()
        for a in self.absence:
            self.silent.update(a.silent)

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
            "timers": timers, "timer_n": self.timers.n,
            "rules": {e.id: e.dump(sid) for e in self.evaluators},
            "book": self.book.dump(sid),
            "counters": dict(self.counters),
        }
        return msgspec.msgpack.encode(state)

    def restore(self, blob: bytes) -> dict[str, int]:
        """Load a snapshot into this (fresh) engine; returns what could not be restored."""
        state = msgspec.msgpack.decode(blob)
        if state.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {state.get('version')} is not {SNAPSHOT_VERSION}")
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
        for a in self.absence:
            self.silent.update(a.silent)
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
        self.counters = Counter(state["counters"])
        return {k: v for k, v in lost.items() if v}
