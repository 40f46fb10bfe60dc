"""Hot reload on Kafka: every partition switches at the same event time.

A worker asked to reload (SIGHUP, POST /reload) checks the new set whole; a bad one is refused
there, with file:line, and nothing is announced. A good one is announced: a record
``{"digest", "at", "by"}`` on the internal topic ``{app_id}-reload``, copied to each of its
partitions (co-partitioned with the readings, as the acks' fan-out is), ``at`` being the wall
clock plus ``reload.switch_after``. Each readings partition, wherever it runs, then:

- checks the announced digest against its own worker's files: a worker whose files differ
  refuses, says so in its log and counts it (cityops_reloads_total{result="mismatch"}), and
  its partitions go on with the set they have;
- switches when its event time reaches ``at``: readings stamped before ``at`` are judged by
  the old set, the first one at or after it by the new set (and the wall clock passing ``at``
  switches a quiet partition), so two partitions never judge the same moment by different
  rules. An announcement that comes after the partition has passed ``at`` switches it at once
  (logged as late). Two announcements of one digest (SIGHUP sent to every worker): the
  earliest ``at`` wins, in every partition.

The switch is pipeline/core/reload.py's: a new engine over the partition's streets under the new
set, the old one's state carried into it; a sensor that moved to another street's partition
is resolved here (设备已迁出本分区) and starts afresh there. The file watch does not run on
Kafka: every worker would announce the same change.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from pipeline.core.engine import Engine, Output
from pipeline.core.identity import AckUsers
from pipeline.core.registry_cache import release_pages
from pipeline.core.reload import CitySet, carry, diff, load_set, same_sensors, stamp, watched_files
from pipeline.shared.reading_router import ReadingRouter
from rules.yamlfile import ConfigError

log = logging.getLogger("cityops.reload")
RELOAD = "reload"          # the control log's name in a partition's offsets


@dataclass
class Switch:
    at: int                # event time (ms) of the switch
    new: CitySet


def event_time(payload: bytes) -> int | None:
    """The newest `ts` of a reading record (an object or a gateway array); None if unreadable
    (it goes with the old set, whose engine dead-letters it)."""
    try:
        got = orjson.loads(payload)
        items = got if isinstance(got, list) else [got]
        stamps = [x["ts"] for x in items if isinstance(x, dict) and isinstance(x.get("ts"), int)]
    except (orjson.JSONDecodeError, TypeError):
        return None
    return max(stamps) if stamps else None


class KafkaReload:
    """The worker's side of reloads (``w``: the CityWorker)."""

    def __init__(self, w: Any) -> None:
        self.w = w
        self.loaded: dict[str, CitySet] = {}      # sets read for an announcement, by digest
        self.latest = w.city.digest               # what the files were when last read
        self.unreadable = ""                      # ... or why they did not load
        self.read_stamp: tuple | None = None

    def _read(self) -> None:
        """The worker's files as they are now, for an announcement: read again only when they
        changed (sizes, times), not once per partition."""
        now = stamp(watched_files(self.w.s))
        if now == self.read_stamp:
            return
        self.read_stamp = now
        try:
            new = load_set(self.w.s)
        except ConfigError as exc:
            self.unreadable = f"its files do not load: {exc}"
            return
        self.loaded[new.digest], self.latest, self.unreadable = new, new.digest, ""

    # ---- asking ---------------------------------------------------------------------------
    async def take_requests(self) -> None:
        """Requests (SIGHUP, POST /reload) since the last tick: check, then announce."""
        w = self.w
        asked = w.reloads.take()
        if not asked:
            return
        source = ", ".join(sorted({r.source for r in asked}))
        reply = await self._announce(source)
        for r in asked:
            r.future.set_result(reply)

    async def _announce(self, source: str) -> dict[str, Any]:
        w = self.w
        try:                                     # off the loop: a city's registry takes a while
            new = await asyncio.to_thread(load_set, w.s)
            AckUsers(new.registry, w.s.acks.users)
        except ConfigError as exc:
            w.reload_stats.refused(str(exc))
            log.error("reload (%s) refused, nothing announced; the running rules go on: %s",
                      source, exc)
            return {"result": "refused", "error": str(exc)}
        if new.digest == w.city.digest:
            w.reload_stats.c["unchanged"] += 1
            return {"result": "unchanged", "digest": new.digest}
        self.loaded[new.digest] = new
        at = int(time.time() * 1000) + w.s.reload.switch_after
        value = orjson.dumps({"digest": new.digest, "at": at, "by": source})
        for p in range(w.partitions):
            await w.t_reload.send(key=new.digest.encode(), value=value, partition=p)
        await w.app.producer.flush()
        d = await asyncio.to_thread(diff, w.city, new)
        log.info("reload (%s) announced: digest %s → %s, every partition switches at event "
                 "time %d; %s", source, w.city.digest, new.digest, at,
                 {k: v for k, v in d.counts().items() if v})
        return {"result": "announced", "digest": new.digest, "previous": w.city.digest,
                "at": at, "diff": d.text()}

    # ---- the announcements, per partition -----------------------------------------------
    async def agent(self, stream: Any) -> None:
        w = self.w
        async for event in stream.events():
            p = event.message.partition
            if not w._assigned(p):
                continue
            rec = orjson.loads(event.message.value)
            if rec["digest"] not in self.loaded and w.city.digest != rec["digest"]:
                # the files are read while the partitions go on: the announcement is taken
                # (and may be checkpointed) only once they are (tests/slow_read_seam.py)
                await asyncio.to_thread(self._read)
            async with w.turn:
                await self._take(stream, event, rec)
            await w._checkpoint_due()

    async def _take(self, stream: Any, event: Any, rec: dict) -> None:
        w, p = self.w, event.message.partition
        if not w._assigned(p):
            return                              # revoked while the files were read
        ps = w.partition(p)
        ps.offsets.setdefault(RELOAD, 0)
        ps.checkpointed.setdefault(RELOAD, 0)
        ps.pending_events.append((stream, event))
        if not w._fresh(ps, RELOAD, [event.message]):
            return
        ps.offsets[RELOAD] = event.message.offset + 1
        self.announced(ps, rec)
        if ps.switch is not None and ps.engine.max_ts >= ps.switch.at:
            # a reading from `at` on was judged by the old set already
            log.warning("partition %d: the reload to %s came after its event time passed "
                        "%d: switching now", p, ps.switch.new.digest, ps.switch.at)
            await w._emit(self.switch(ps), ps)

    @staticmethod
    def pending(ps: Any) -> dict | None:
        """A switch announced and not reached, for the partition's checkpoint: the
        announcement's record is acknowledged with the checkpoint, so the switch is kept in it."""
        return {"digest": ps.switch.new.digest, "at": ps.switch.at, "by": "checkpoint"} \
            if ps.switch is not None else None

    def announced(self, ps: Any, rec: dict) -> None:
        digest, at = rec["digest"], rec["at"]
        if ps.digest == digest:
            return                               # switched already (a replay of the log)
        if ps.switch is not None and ps.switch.new.digest == digest:
            ps.switch.at = min(ps.switch.at, at)  # the same set announced twice: the earliest
            return
        if digest not in self.loaded:
            self._read()
        new = self.loaded.get(digest)
        if new is None:
            why = self.unreadable or f"its files have digest {self.latest}"
            self.w.reload_stats.refused(f"announced {digest}, {why}", "mismatch")
            log.error("partition %d: reload to %s (by %s) refused: %s. This partition goes on "
                      "with %s; make the files the same on every worker and reload again",
                      ps.p, digest, rec.get("by"), why, ps.digest)
            return
        self.loaded[digest] = new
        ps.switch = Switch(at, new)
        log.info("partition %d: switches to %s at event time %d", ps.p, digest, at)

    # ---- switching ---------------------------------------------------------------------------
    def cut(self, ps: Any, payloads: list[bytes]) -> int:
        """How many of a batch's payloads come before the switch (all, without one)."""
        if ps.switch is None:
            return len(payloads)
        at = ps.switch.at
        for i, payload in enumerate(payloads):
            ts = event_time(payload)
            if ts is not None and ts >= at:
                return i
        return len(payloads)

    def due_by_clock(self, ps: Any, watermark: int) -> bool:
        return ps.switch is not None and watermark >= ps.switch.at

    def _adopt(self, new: CitySet) -> None:
        w = self.w
        old = w.registry
        w.city, w.rules, w.registry = new, new.rules, new.registry
        w.router = ReadingRouter(new.registry, w.partitions)
        w.users = AckUsers(new.registry, w.s.acks.users)
        if w.push is not None:
            w.push.registry = new.registry
        if w.history is not None and not same_sensors(old, new.registry):
            # The history sink names sensors by the registry's numbers: a new sink for the new
            # registry, and the partitions still to switch renumbered into it (a sensor it
            # retired: -1, its readings not written until then; worker._emit).
            from connectors.influx import InfluxSink
            remap = new.registry.index.lookup(list(old.sensor_ids))
            for other in w.parts.values():
                if other.digest != new.digest:
                    other.sensors = remap[other.sensors]
            closing, w.history = w.history, InfluxSink(w.s.influx, new.registry,
                                                     w.history.closed_fields)
            threading.Thread(target=closing.close, args=(10.0,), name="influx-close",
                             daemon=True).start()     # writes what it holds, off the loop

    def switch(self, ps: Any) -> Output:
        """Partition ``ps`` to its announced set, now; the resolve notices of what ends."""
        w = self.w
        sw, old = ps.switch, ps.engine
        new = sw.new
        if w.city.digest != new.digest:          # the first partition here to switch: the
            self._adopt(new)                     # worker's set too
        members = np.flatnonzero(w.router.partition_of == ps.p)
        engine = Engine(new.registry.subset(members), new.rules, w.s.engine)
        release_pages(new.registry)              # as CityWorker.partition: its share only
        index = new.registry.index
        out = carry(old, engine, sw.at, in_city=lambda sid: index.get(sid) is not None)
        ps.engine, ps.sensors, ps.digest, ps.switch = engine, members.astype(np.int64), new.digest, None
        resolved = len({n["alert_id"] for n in out.notices})
        w.reload_stats.c["ok"] += 1
        w.reload_stats.c["resolved"] += resolved
        log.info("partition %d: switched to %s at event time %d; %d incidents resolved by it, "
                 "%d open go on", ps.p, new.digest, sw.at, resolved, len(engine.book.open))
        return out
