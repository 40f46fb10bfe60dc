"""`cityops worker`: the engine on Kafka, as a Faust app. Start as many as the partitions allow.

    {prefix}.readings  ──▶ agent "evaluate" (batches: stream.noack_take) ─┐
    {prefix}.acks ─▶ agent "acks" ─▶ {app_id}-acks-fanout ─▶ "apply-acks" ─┤ one Engine per
    wall clock ─▶ timer "tick" (escalations, reminders, silence)          ─┘ readings partition
        └──▶ notices to {prefix}.alerts.{city,district,street,dept}, {prefix}.push,
             dead letters to {prefix}.deadletter, [mirror onto the MQTT tier topics]

State. Each readings partition has its own Engine over the sensors of the streets that hash to
it (connectors/kafka.py: correlation and gateway silence stay within one engine). Every
`checkpoint_every` the engine's snapshot and the input offsets it covers are written to the
Faust table `engine` (changelog-backed, partition p in changelog partition p) and only then are
the inputs acknowledged, so the committed offsets never pass the state that holds them. After a
crash or a rebalance the new owner restores the snapshot and replays from its offsets: records it
already covers are skipped, the rest evaluated again; the notices they make again are the same
(alert_id/state/seq), so a redelivery never makes a second incident. Acks are keyed by alert_id,
not by place, so each is fanned out to every partition; the engine that holds the incident
applies it, the others pass.

Per-event framework overhead is what limits a Python stream processor (INFRA.md: a naive Faust
agent does ~1,000 events/s): records are taken in batches and each batch is one engine call.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import re
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from operator import attrgetter
from typing import Any, NamedTuple

import faust
import msgspec
import numpy as np
import orjson
from faust.types import TP
from prometheus_client.core import Metric

from connectors import kafka as kt
from connectors.faust_bulk import bulk_consumer
from pipeline.core import silences
from pipeline.core.close_figures import CloseFigures, closed_fields
from pipeline.core.engine import Engine, Output
from pipeline.core.identity import AckUsers
from pipeline.core.models import Ack
from pipeline.core.registry import load as load_registry
from pipeline.core.registry_cache import release_pages
from pipeline.core.reload import CitySet, carry, files_digest, watched_files
from pipeline.core.wire import ack_refusal, dead_letter
from pipeline.runtimes.reload_kafka import KafkaReload
from pipeline.shared.config import Settings
from pipeline.shared.kept_sets import KeptSets
from pipeline.shared.logs import setup_logging
from pipeline.shared.metrics import counter, dead_letters, gauge, notices_by_tier
from pipeline.shared.ops_runtime import health_of
from pipeline.shared.quarantine import evaluate_isolating, poison_detail
from pipeline.shared.reading_router import ReadingRouter
from pipeline.shared.reload_runtime import ReloadStats, Requests
from pipeline.shared.silence_http import in_force
from pipeline.shared.topics import notice_topic as mqtt_notice_topic
from rules.compiler import load_rules
from rules.yamlfile import ConfigError

log = logging.getLogger("cityops.worker")
READINGS, ACKS = "readings", "acks"
SILENCE_KEY = "silence:"        # a fanned-out silence command's key: silence:{id}@{partition}:{offset}


def _runs(messages: list) -> list[tuple[list, bool]]:
    """The fanned-out records as runs of acks and of silence commands, in their order."""
    runs: list[tuple[list, bool]] = []
    for m in messages:
        silent = (m.key or b"").startswith(SILENCE_KEY.encode())
        if runs and runs[-1][1] == silent:
            runs[-1][0].append(m)
        else:
            runs.append(([m], silent))
    return runs


def _process_name() -> str:
    """This process, for client ids: host (a pod's name) and pid."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:32]
    return f"{host}-{os.getpid()}"


class PartitionTable(faust.Table):
    """A table whose keys start with the readings partition number they belong to ("7" for
    partition 7's checkpoint, "7/0", "7/1" … for its pieces): an entry's changelog record goes
    to that partition, so whoever is assigned readings partition p restores it."""

    def partition_for_key(self, key: Any) -> int:
        return int(str(key).partition("/")[0])


class Taken(NamedTuple):
    """A partition's checkpoint as taken between two turns, to be written after them."""

    ps: PartitionState
    head: bytes                     # names the pieces (already in the table) and what they hold
    offsets: dict                   # the inputs the state covers ...
    switch_at: int | None           # ... the switch it keeps ...
    pending: list                   # ... and what to acknowledge once the head is written
    pending_events: list


class PartitionState:
    """One readings partition's engine and its place in the input logs."""

    def __init__(self, p: int, engine: Engine, sensors: np.ndarray) -> None:
        self.p = p
        self.engine = engine
        self.sensors = sensors                    # its sensor numbers → the full registry's
        self.offsets = {READINGS: 0, ACKS: 0}     # next offset not yet in the engine's state
        # inputs to acknowledge at the next checkpoint: readings records (Faust messages) and
        # fanned-out acks ((stream, event): they come through a Faust agent)
        self.pending: list[Any] = []
        self.pending_events: list[tuple[Any, Any]] = []
        self.last_checkpoint = time.monotonic()
        self.checkpointed = {READINGS: 0, ACKS: 0}
        self.last_progress = time.time()
        self.gaps = 0
        self.restored = False
        self.digest = ""                          # the set its engine judges by (hot reload)
        self.switch: Any = None                   # an announced reload not reached yet
        self.switch_kept: int | None = None       # its event time, once in a checkpoint
        self.owed: Output | None = None           # resolves of a restore across sets, to send
        self.carried = False                      # ... sent: checkpoint the carried state


class CityWorker:
    def __init__(self, settings: Settings) -> None:
        self.s = s = settings
        digest = files_digest(watched_files(s))   # of the files as they are read now
        self.rules = load_rules(s.packs, s.routing, params=s.params)
        self.registry = load_registry(s.registry, self.rules.kinds)
        self.partitions = s.kafka.partitions
        self.router = ReadingRouter(self.registry, self.partitions)
        self.users = AckUsers(self.registry, s.acks.users)     # who may acknowledge what
        self.city = CitySet(self.rules, self.registry, digest)  # what a reload replaces
        self.reloads, self.reload_stats = Requests(), ReloadStats()
        self.reload = KafkaReload(self)               # pipeline/runtimes/reload_kafka.py
        self.kept = KeptSets(s.worker.data_dir / "sets")     # sets checkpoints were made under
        self.names = kt.topic_names(s.kafka.prefix)
        self.parts: dict[int, PartitionState] = {}
        self.counters: dict[str, int] = defaultdict(int)
        self.close_figures = CloseFigures()      # time to close (快速处置), for /metrics
        self.http_acks: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.http_silences: queue.SimpleQueue[bytes] = queue.SimpleQueue()     # POST /silences
        self._ack_misses: dict[bytes, set[int]] = {}     # see _missed
        # A turn (a fetch of readings, of acks, an announcement, a tick) takes its input, judges
        # it and sends what it made; a checkpoint takes the state between turns, never inside
        # one (where it would keep state whose notices are not sent, or acknowledge input not
        # judged yet): each holds this while it touches partitions; it is never held twice.
        self.turn = asyncio.Lock()
        self.checkpointing = False        # one checkpoint at a time: it writes while turns go on
        # the checkpoint being written: held here, as the loop keeps only a weak reference to a
        # task and one nobody holds may be collected before it is done
        self._writing: asyncio.Future | None = None
        self.started = time.time()
        self.ready = False
        self.recovered = False
        self.mirror: Any = None
        self.http: Any = None
        # Replicas share one configuration, but each MQTT connection needs its own client id
        # (the broker drops the older of two); the mirror and the push only publish.
        self.mqtt_id = f"{s.mqtt.client_id}-{_process_name()}"
        self.push: Any = None             # pushes to on-call workers (pipeline/shared/delivery.py)
        if s.push.enabled:
            from pipeline.shared.delivery import PushDispatcher
            own = s.mqtt.model_copy(update={"client_id": self.mqtt_id})
            self.push = PushDispatcher(s.model_copy(update={"mqtt": own}), self.registry)
        self.history: Any = None          # readings and notices into InfluxDB
        if s.influx.url:
            from connectors.influx import InfluxSink
            self.history = InfluxSink(s.influx, self.registry, closed_fields)
        self.app = self._app()

    # ---- the Faust app ------------------------------------------------------------------
    def _app(self) -> faust.App:
        s = self.s
        k = s.kafka
        creds = None
        if k.security_protocol.startswith("SASL"):
            creds = faust.SASLCredentials(
                username=k.username, password=k.password.get_secret_value() if k.password else None,
                mechanism=k.sasl_mechanism)
        app = faust.App(
            s.worker.app_id,
            broker=";".join(f"kafka://{b}" for b in kt.bootstrap_list(k.bootstrap)),
            broker_credentials=creds,
            store="memory://",            # the changelog is the durable copy; restored on assign
            datadir=str(s.worker.data_dir),
            topic_partitions=self.partitions, topic_replication_factor=k.replication,
            broker_session_timeout=s.worker.session_timeout / 1000,
            broker_heartbeat_interval=max(s.worker.session_timeout / 6000, 0.5),
            consumer_auto_offset_reset="earliest",
            producer_acks=-1, producer_linger_ms=k.linger,
            processing_guarantee="at_least_once",
            # Inputs are acknowledged at checkpoints, not per event: a rebalance must not wait
            # for them (the next owner replays from the checkpoint instead).
            stream_wait_empty=False,
            broker_max_poll_records=s.worker.max_batch,
            web_enabled=False)          # /healthz and /metrics are served by OpsHttpServer
        raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
               "value_serializer": "raw"}
        n = self.partitions
        self.t_readings = app.topic(self.names[READINGS], partitions=n, **raw)
        self.t_acks = app.topic(self.names[ACKS], partitions=n, **raw)
        self.t_fanout = app.topic(f"{s.worker.app_id}-acks-fanout", partitions=n, internal=True,
                                  **raw)
        self.t_reload = app.topic(f"{s.worker.app_id}-reload", partitions=n, internal=True, **raw)
        self.t_dead = app.topic(self.names["deadletter"], **raw)
        self.t_out = {topic: app.topic(topic, **raw) for name, topic in self.names.items()
                      if name.startswith("alerts.") or name == "push"}
        self.table = app.tables.add(PartitionTable(app, name="engine", partitions=n,
                                                   key_type=str, value_type=bytes))
        # Readings come a fetch at a time (connectors/faust_bulk.py says why); subscribing the
        # topic with the app's conductor makes them part of the group's assignment.
        app.topics.add(self.t_readings)
        app.transport.Consumer = bulk_consumer({self.names[READINGS]: self._readings_batch},
                                               s.worker.fetch_max_wait)
        app.agent(self.t_acks, name="acks")(self._acks_agent)
        app.agent(self.t_fanout, name="apply-acks")(self._apply_acks_agent)
        app.agent(self.t_reload, name="reload")(self.reload.agent)
        app.timer(interval=s.tick / 1000, name="tick")(self._tick)
        app.task(self._on_start)
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_rebalance_complete.connect(self._on_recovered)
        return app

    async def _on_start(self) -> None:
        self.ready = True
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: self.reloads.ask("SIGHUP"))      # hot reload: announced
        log.info("worker %s started: %d sensors in %d partitions", self.s.worker.app_id,
                 len(self.registry), self.partitions)

    async def _on_recovered(self, sender: Any, **_: Any) -> None:
        self.recovered = True               # the table holds the assigned partitions' state

    async def _on_revoked(self, sender: Any, revoked: set, **_: Any) -> None:
        self.recovered = False
        for tp in revoked:
            if tp.topic == self.names[READINGS] and tp.partition in self.parts:
                # not acknowledged past its checkpoint: the next owner takes it from there
                del self.parts[tp.partition]

    def _table_ready(self) -> bool:
        """The table holds the assigned partitions' state: told so by Faust's signal, or seen in
        its own flags (no rebalance, no recovery in flight) — a signal out of order across two
        quick rebalances must not keep a partition without readings from being taken."""
        return self.recovered or not (self.app.rebalancing or self.app.in_recovery)

    def _assigned(self, p: int) -> bool:
        return TP(self.names[READINGS], p) in self.app.assignor.assigned_actives()

    def partition(self, p: int) -> PartitionState:
        ps = self.parts.get(p)
        if ps is None:
            # its sensors, found when it is taken: a worker holds no list of the whole city
            members = np.flatnonzero(self.router.partition_of == p)
            engine = Engine(self.registry.subset(members), self.rules, self.s.engine)
            # the subset read scattered rows, so nearly every page of the city's mapped columns
            # came in: give them back, and this worker holds its share, not the city
            release_pages(self.registry)
            engine.keep_accepted = self.history is not None
            engine.clock_bound = True       # one sensor's clock does not move the partition's
            ps = PartitionState(p, engine, members.astype(np.int64))
            ps.digest = self.city.digest
            head = self.table.get(str(p))
            if head:
                self._restore(ps, msgspec.msgpack.decode(head))
            self.parts[p] = ps
        return ps

    def _restore(self, ps: PartitionState, head: dict) -> None:
        p = ps.p
        snap = b"".join(self.table.get(f"{p}/{k}") or b"" for k in range(head["chunks"]))
        if hashlib.blake2b(snap, digest_size=16).digest() != head["digest"]:
            # the changelog gave back less than was written: no state is better than a wrong one
            log.error("partition %d: checkpoint at offsets %s is incomplete in the changelog; "
                      "starting the partition empty from there", p, head["offsets"])
            self.counters["checkpoints_unreadable"] += 1
        # made under other files: judged by its set and carried into this worker's, if kept here
        elif head.get("set", ps.digest) == ps.digest or not self._across(ps, snap, head["set"]):
            lost = ps.engine.restore(snap)
            if lost:
                log.warning("partition %d: not carried over (registry or rules changed): %s",
                            p, lost)
            if head.get("set", ps.digest) != ps.digest:     # hot reload: README, Hot reload
                log.warning("partition %d: its checkpoint was made under the set %s, not kept "
                            "on this machine; this worker's files are %s, and judge it from "
                            "here (what they cannot carry ends without a notice)", p,
                            head["set"], ps.digest)
        ps.offsets = dict(head["offsets"])
        ps.checkpointed = dict(head["offsets"])
        if head.get("switch"):          # announced, not reached: its record is acknowledged
            self.reload.announced(ps, head["switch"])
            ps.switch_kept = head["switch"]["at"]
        ps.restored = True
        log.info("partition %d: state restored at offsets %s, %d open incidents", p, ps.offsets,
                 len(ps.engine.book.open))

    def _across(self, ps: PartitionState, snap: bytes, made_by: str) -> bool:
        """A checkpoint made under another set (the files changed while no worker ran them):
        restored into that set's engine, from its kept copy, and carried into this worker's
        as a switch would (pipeline/runtimes/reload_kafka.py); the resolves go out at the next tick.
        False without a copy here."""
        if not self.kept.has(made_by):
            return False
        try:
            old = self.kept.load(made_by)
        except (OSError, ValueError, ConfigError) as exc:
            log.error("partition %d: the set %s its checkpoint was made under does not load "
                      "from its kept copy: %s", ps.p, made_by, exc)
            return False
        members = np.flatnonzero(ReadingRouter(old.registry, self.partitions).partition_of == ps.p)
        engine = Engine(old.registry.subset(members), old.rules, self.s.engine)
        release_pages(old.registry)
        engine.keep_accepted, engine.clock_bound = ps.engine.keep_accepted, True
        lost = engine.restore(snap)
        if lost:
            log.warning("partition %d: not carried over from its checkpoint: %s", ps.p, lost)
        index = self.registry.index
        ps.owed = carry(engine, ps.engine, int(time.time() * 1000),
                        in_city=lambda sid: index.get(sid) is not None)
        resolved = len({n["alert_id"] for n in ps.owed.notices})
        self.reload_stats.c["resolved"] += resolved
        log.warning("partition %d: its checkpoint was made under the set %s; the files are now "
                    "%s: carried into them, %d incidents resolved, %d open go on", ps.p, made_by,
                    ps.digest, resolved, len(ps.engine.book.open))
        return True

    # ---- agents ---------------------------------------------------------------------------
    async def _readings_batch(self, messages: list) -> None:
        """One fetch of readings records: one engine call per partition."""
        by_p: dict[int, list] = defaultdict(list)
        for m in messages:
            by_p[m.partition].append(m)
        now = int(time.time() * 1000)
        async with self.turn:
            for p, msgs in by_p.items():
                if self._assigned(p):
                    await self._readings(self.partition(p), msgs, now)
        await self._checkpoint_due()

    async def _readings(self, ps: PartitionState, messages: list, now: int) -> None:
        ps.pending += messages
        fresh = self._fresh(ps, READINGS, messages)
        if not fresh:
            return
        payloads, sources = [], []
        topic = self.names[READINGS]
        for m, where in zip(fresh, self.router.partitions_of_keys([m.key for m in fresh]), strict=True):
            if where == ps.p:
                payloads.append(m.value)
                sources.append(f"{topic}[{ps.p}]@{m.offset}")
            else:
                await self._misrouted(ps, m, payloads, sources)
        cut = self.reload.cut(ps, payloads)        # a reload's switch within the batch
        out = self._ingest(ps, payloads[:cut], sources[:cut], now)
        if cut < len(payloads):
            await self._emit(out, ps)              # its sensors numbered as the old set's
            out = self.reload.switch(ps)
            more = self._ingest(ps, payloads[cut:], sources[cut:], now)
            out.notices += more.notices
            out.dead_letters += more.dead_letters
            out.accepted = more.accepted
        self.counters["readings"] += len(payloads)
        ps.offsets[READINGS] = fresh[-1].offset + 1
        ps.last_progress = time.time()
        await self._emit(out, ps)

    def _ingest(self, ps: PartitionState, payloads: list, sources: list, now: int) -> Output:
        engine = ps.engine

        def attempt(lo: int, hi: int, out: Output) -> None:
            engine.ingest(payloads[lo:hi], source=sources[lo:hi], now_ms=now, out=out)
        return self._isolating(ps, attempt, payloads, sources)

    async def _misrouted(self, ps: PartitionState, m: Any, payloads: list, sources: list) -> None:
        """A record not keyed by a sensor of this partition (a producer that hashed the key
        itself, or sent a gateway array): route each reading to its street's partition."""
        source = f"{self.names[READINGS]}[{ps.p}]@{m.offset}"
        records, dead = self.router.route([m.value], [source])
        for p, key, value in records:
            if p == ps.p:
                payloads.append(value)
                sources.append(source)
            else:
                await self.t_readings.send(key=key, value=value, partition=p)
                self.counters["forwarded"] += 1
        for d in dead:
            await self.t_dead.send(value=d.model_dump_json().encode())
            self.counters["dead." + d.reason] += 1

    def _fresh(self, ps: PartitionState, log_name: str, messages: list) -> list:
        """The records the partition's state does not hold yet (a replay after a restore starts
        at the committed offset, which may be behind the checkpoint)."""
        start = ps.offsets[log_name]
        fresh = [m for m in messages if m.offset >= start]
        if fresh and ps.restored and fresh[0].offset > start and start == ps.checkpointed[log_name]:
            # The log moved past the state: records between were committed without it.
            ps.gaps += fresh[0].offset - start
            log.error("partition %d: %s offsets %d..%d are not in the restored state", ps.p,
                      log_name, start, fresh[0].offset - 1)
        ps.restored = False
        return fresh

    def _isolating(self, ps: PartitionState, attempt: Any, inputs: list[bytes],
                   sources: list[str | None]) -> Output:
        """A record the engine fails on costs only itself: it is found by halving the batch
        and dead-lettered `poison`; the rest is evaluated (pipeline.shared.quarantine)."""
        out, poisoned = evaluate_isolating(attempt, len(inputs), ps.engine.counters)
        for i, why in poisoned:
            out.dead_letters.append(dead_letter("poison", poison_detail(why), inputs[i],
                                                source=sources[i]))
        self.counters["engine_errors"] += len(poisoned)
        return out

    def _apply(self, ps: PartitionState, call: Any, *args: Any, **kw: Any) -> Output:
        """A bug in the engine must not stop a city's partition: the input is counted, logged
        and passed over (it is acknowledged with the rest at the next checkpoint)."""
        try:
            return call(*args, **kw)
        except Exception:
            log.exception("engine failed on partition %d; input passed over", ps.p)
            self.counters["engine_errors"] += 1
            return Output()

    async def _acks_agent(self, stream: Any) -> None:
        """Acks arrive keyed by alert_id; which partition holds the incident is not known
        here, so a good ack goes to every partition (acks come at human pace)."""
        async for event in stream.events():
            payload = event.message.value or b""
            if silences.is_command(payload):      # silences travel like acks, to every partition
                await self._fan_out_silence(event, payload)
                continue
            try:
                ack = Ack.model_validate_json(payload)
            except ValueError as exc:
                await self._refuse_on_acks(event, payload, "bad_ack", ack_refusal(exc))
                continue
            # the key names this ack (not only its alert), so that the partitions' misses add up
            await self._to_every_partition(event, payload, ack.alert_id)
            self.counters["acks"] += 1

    async def _fan_out_silence(self, event: Any, payload: bytes) -> None:
        try:
            cmd = silences.parse_command(payload)
        except ValueError as exc:
            await self._refuse_on_acks(event, payload, "bad_silence", silences.refusal(exc))
            return
        await self._to_every_partition(event, payload, f"{SILENCE_KEY}{cmd.id}")
        self.counters["silences"] += 1

    async def _refuse_on_acks(self, event: Any, payload: bytes, reason: str, detail: str) -> None:
        d = dead_letter(reason, detail, payload, source=f"{self.names[ACKS]}@{event.message.offset}")
        await self.t_dead.send(value=d.model_dump_json().encode())
        self.counters[f"dead.{reason}"] += 1

    async def _to_every_partition(self, event: Any, payload: bytes, name: str) -> None:
        origin = f"{name}@{event.message.partition}:{event.message.offset}".encode()
        for p in range(self.partitions):
            await self.t_fanout.send(key=origin, value=payload, partition=p)
        await self.app.producer.flush()

    def _apply_silences(self, ps: PartitionState, messages: list) -> Output:
        """Silence commands, in the order they came, at the partition's watermark. Every
        partition takes each; one refused is told once, by partition 0 (the others refuse it
        alike)."""
        out = Output()
        for m in messages:
            got = self._apply(ps, ps.engine.silence, [m.value])
            if ps.p != 0:
                got.dead_letters = []
            out.notices += got.notices
            out.dead_letters += got.dead_letters
        return out

    async def _apply_acks_agent(self, stream: Any) -> None:
        async for events in stream.noack_take(500, within=0.05):
            by_p: dict[int, list] = defaultdict(list)
            for e in events:
                by_p[e.message.partition].append(e)
            async with self.turn:
                for p, evs in by_p.items():
                    if not self._assigned(p):
                        continue
                    ps = self.partition(p)
                    ps.pending_events.extend((stream, e) for e in evs)
                    for fresh, silent in _runs(self._fresh(ps, ACKS, [e.message for e in evs])):
                        # acks and silences, in their order
                        if silent:          # silence commands: every partition takes each
                            await self._emit(self._apply_silences(ps, fresh), ps)
                            ps.offsets[ACKS] = fresh[-1].offset + 1
                            continue
                        # `by` is who the bridge (or the HTTP face) authenticated; the engine
                        # holding the incident checks that it lies within that user's scope
                        acks = [m.value for m in fresh]
                        now = int(time.time() * 1000)

                        def attempt(lo: int, hi: int, out: Output, engine: Engine = ps.engine,
                                    acks: list = acks, now: int = now) -> None:
                            engine.ack(acks[lo:hi], out=out, now_ms=now, may_ack=self.users.may_ack)
                        out = self._isolating(ps, attempt, acks,
                                              [f"{self.names[ACKS]}@{m.offset}" for m in fresh])
                        ps.offsets[ACKS] = fresh[-1].offset + 1
                        # Refusals for incidents this partition does not hold are the fan-out's
                        # doing: an ack is refused only once every partition has missed it (_missed).
                        out.dead_letters = [d for d in out.dead_letters
                                            if not d.detail.startswith("no open incident")]
                        self._missed(ps, fresh, out)
                        await self._emit(out, ps)
            await self._checkpoint_due()

    def _missed(self, ps: PartitionState, fresh: list, out: Output) -> None:
        """Count, per ack, the partitions that do not hold its incident; when they are all of
        them, the ack is a dead letter `bad_ack`, as in cityops run. The count is this
        process's: with the partitions spread over several workers, none sees them all and an
        unknown alert_id is counted (cityops_acks_unmatched_total) but not dead-lettered."""
        misses = self._ack_misses
        for m in fresh:
            key = m.key or b""
            alert_id = key.decode("utf-8", "replace").rpartition("@")[0]
            if ps.engine.book.holds(alert_id):       # open, or resolved awaiting its closing
                continue
            seen = misses.setdefault(key, set())
            seen.add(ps.p)
            if len(seen) == self.partitions:
                del misses[key]
                self.counters["acks_unmatched"] += 1
                out.dead_letters.append(dead_letter(
                    "bad_ack", f"no open incident {alert_id} in any partition (resolved "
                    "already, or never existed)", m.value, source=self.names[ACKS]))
        while len(misses) > 10_000:           # acks some partition held: forgotten in time
            misses.pop(next(iter(misses)))

    async def _tick(self) -> None:
        """The wall clock moves every partition's watermark: escalations, reminders and silence
        happen on time when no readings come."""
        while not self.http_acks.empty():
            payload = self.http_acks.get_nowait()
            ack = Ack.model_validate_json(payload)
            await self.t_acks.send(key=ack.alert_id.encode(), value=payload)
        await self.reload.take_requests()         # SIGHUP, POST /reload: announced
        while not self.http_silences.empty():          # made by the HTTP face, checked there
            payload = self.http_silences.get_nowait()
            cmd = silences.parse_command(payload)
            await self.t_acks.send(key=f"{SILENCE_KEY}{cmd.id}".encode(), value=payload)
        now = int(time.time() * 1000)
        # A partition's state may be made from the table only once the table is recovered
        # (records arrive only then; the clock does not wait): until then only engines that
        # already run move on.
        async with self.turn:
            for tp in sorted(self.app.assignor.assigned_actives()):
                if tp.topic != self.names[READINGS]:
                    continue
                if tp.partition not in self.parts and not self._table_ready():
                    continue
                ps = self.partition(tp.partition)
                if ps.owed is not None:               # a restore across sets: its resolves
                    owed, ps.owed = ps.owed, None
                    await self._emit(owed, ps)
                    ps.carried = True
                if self.reload.due_by_clock(ps, now - self.s.engine.allowed_lateness):
                    await self._emit(self.reload.switch(ps), ps)
                out = self._apply(ps, ps.engine.advance, now - self.s.engine.allowed_lateness)
                await self._emit(out, ps)
        await self._checkpoint_due()

    # ---- out --------------------------------------------------------------------------------
    async def _emit(self, out: Output, ps: PartitionState) -> None:
        kafka_prefix, mqtt_prefix = self.s.kafka.prefix, self.s.mqtt.prefix
        push = self.push
        for n in out.notices:
            value = orjson.dumps(n)
            await self.t_out[kt.notice_topic(kafka_prefix, n)].send(key=kt.notice_key(n).encode(),
                                                                     value=value)
            self.counters["notices." + n["tier"]] += 1
            self.close_figures.observe([n])
            if self.mirror is not None and (push is None or not push.owns(n)):
                self.mirror.publish(mqtt_notice_topic(mqtt_prefix, n), value)
        for d in out.dead_letters:
            await self.t_dead.send(value=d.model_dump_json().encode())
            self.counters["dead." + d.reason] += 1
        # Neither waits: the push has a queue per channel, the history a bounded buffer.
        if push is not None and out.notices:
            push.submit(out.notices)
        if self.history is not None:
            # the engine numbers its partition's sensors; the sink knows the whole registry's
            out.accepted = [(ps.sensors[idx], ts, val) for idx, ts, val in out.accepted]
            if ps.digest != self.city.digest:   # still to switch: a sensor the reload retired
                # is -1, not in the sink's registry (pipeline/runtimes/reload_kafka.py, _adopt)
                out.accepted = [(s[s >= 0], ts[s >= 0], val[s >= 0]) for s, ts, val in out.accepted]
            self.history.add(out)

    async def _checkpoint_due(self) -> None:
        every = self.s.worker.checkpoint_every / 1000
        now = time.monotonic()
        due = [ps for ps in list(self.parts.values())
               if (ps.pending or ps.pending_events or ps.carried)
               and now - ps.last_checkpoint >= every]
        if due:
            await self.checkpoint(due)

    async def checkpoint(self, parts: list[PartitionState]) -> None:
        """The state and the inputs it covers, taken between turns (self.turn) and at once;
        written while the turns go on: the pieces, then the head that names them, then the
        inputs acknowledged. What turns take meanwhile waits for the next checkpoint."""
        if self.checkpointing:
            return
        async with self.turn:
            taken = self._take_checkpoint(parts)
        if taken:               # off the turns' path: readings go on while the broker takes it
            self.checkpointing = True
            self._writing = asyncio.ensure_future(self._written(taken))

    async def _written(self, taken: list[Taken]) -> None:
        try:
            await self._write_checkpoint(taken)
        except Exception:       # its inputs stay unacknowledged: a restart replays them
            log.exception("checkpoint of partitions %s not written", [t.ps.p for t in taken])
        finally:
            self.checkpointing = False

    def _take_checkpoint(self, parts: list[PartitionState]) -> list[Taken]:
        if self.mirror is not None and self.mirror.unpublished():
            return []                   # the MQTT mirror still owes notices: next time
        # not revoked, nor checkpointed by another turn's checkpoint while this one waited
        parts = [ps for ps in parts if self.parts.get(ps.p) is ps
                 and (ps.pending or ps.pending_events or ps.carried)]
        # A city partition's snapshot is megabytes; a Kafka record is limited (1 MB by
        # default): the pieces first, then the head that names them, in one changelog
        # partition, so a head that was restored has its pieces before it. The head goes in a
        # batch of its own: tansu's "latest offset" is wrong after a multi-record batch
        # (INFRA.md), and a table restored one record short would lose exactly the head.
        taken: list[Taken] = []
        for ps in parts:
            snap = ps.engine.snapshot()
            size = self.s.worker.checkpoint_piece
            pieces = [snap[i:i + size] for i in range(0, len(snap), size)]
            for k, piece in enumerate(pieces):
                self.table[f"{ps.p}/{k}"] = piece
            head = msgspec.msgpack.encode({
                "offsets": ps.offsets, "chunks": len(pieces), "at": int(time.time() * 1000),
                "set": ps.digest, "switch": self.reload.pending(ps),
                "digest": hashlib.blake2b(snap, digest_size=16).digest()})
            # the inputs this state covers; a turn from here on fills new lists
            taken.append(Taken(ps, head, dict(ps.offsets), ps.switch.at if ps.switch is not None else None,
                               ps.pending, ps.pending_events))
            ps.pending, ps.pending_events, ps.carried = [], [], False
        return taken

    async def _write_checkpoint(self, taken: list[Taken]) -> None:
        # every notice sent before the state was taken is delivered with its pieces, before the
        # head that makes the state the one a restart restores
        await self.app.producer.flush()
        for t in taken:
            self.table[str(t.ps.p)] = t.head
        await self.app.producer.flush()
        for t in taken:
            ps = t.ps
            # the checkpoint is in the changelog: what /metrics and /healthz say it holds
            ps.checkpointed, ps.switch_kept = t.offsets, t.switch_at
            if t.pending:       # a committed offset covers every record before it: ack the
                # newest (acking each of a 5 s checkpoint's ~25,000 held the loop ~0.3 s)
                self.app.consumer.ack(max(t.pending, key=attrgetter("offset")))
            for stream, event in t.pending_events:
                await stream.ack(event)
            ps.last_checkpoint = time.monotonic()
            self.counters["checkpoints"] += 1

    # ---- operability ------------------------------------------------------------------------
    def silences_in_force(self) -> list:
        """This worker's partitions' silences (each partition has every one) and what they mute."""
        parts = list(self.parts.values())
        return in_force([ps.engine.book for ps in parts],
                        min((ps.engine.watermark for ps in parts), default=None))

    def health(self) -> dict[str, Any]:
        parts = sorted(self.parts.items())
        return health_of("ok" if self.ready else "starting", self.started,
                         partitions=sorted(self.parts),
                         open_incidents=sum(len(ps.engine.book.open) for _, ps in parts),
                         rebalancing=bool(getattr(self.app, "rebalancing", False)),
                         sets={p: ps.digest for p, ps in parts},
                         switching={p: ps.switch.at for p, ps in parts if ps.switch},
                         # a switch a restart or a rebalance would keep: the checkpoint has it
                         switching_checkpointed={p: ps.switch_kept for p, ps in parts
                                                 if ps.switch_kept is not None})

    def collect(self) -> Iterator[Metric]:
        """/metrics (pipeline/shared/metrics.py): computed now, the partitions' figures included."""
        c = self.counters
        yield counter("cityops_readings_total", "Reading records taken by the engines.",
                      c["readings"])
        yield notices_by_tier(c, "produced")
        yield from self.close_figures.collect()
        yield dead_letters(c)
        yield counter("cityops_forwarded_total", "Readings moved to their street's partition.",
                      c["forwarded"])
        yield counter("cityops_acks_total", "Acknowledgements taken and fanned out to the "
                      "partitions.", c["acks"])
        yield counter("cityops_acks_unmatched_total", "Acknowledgements no partition of this "
                      "worker had an open incident for.", c["acks_unmatched"])
        yield counter("cityops_engine_errors_total", "Inputs the engine failed on (a bug: see "
                      "the logs).", c["engine_errors"])
        yield counter("cityops_checkpoints_total", "Partition checkpoints written.",
                      c["checkpoints"])
        yield counter("cityops_checkpoints_unreadable_total", "Checkpoints the changelog gave "
                      "back incomplete (the partition started empty; see the logs).",
                      c["checkpoints_unreadable"])
        if self.push is not None:
            yield from self.push.collect()
        if self.history is not None:
            yield from self.history.collect()
        yield from self.reload_stats.collect()
        # Per partition: a stalled partition shows as lag that grows while progress stands still.
        topic, now = self.names[READINGS], time.time()
        parts = sorted(self.parts.items())
        lag = {}
        for p, ps in parts:
            try:
                high = self.app.consumer.highwater(TP(topic, p))
            except Exception:            # not fetched from yet: no high-water mark known
                high = None
            lag[p] = max(0, high - ps.offsets[READINGS]) if high is not None else 0
        gauges = [
            ("cityops_partition_offset", "Next readings offset not yet evaluated.",
             {p: ps.offsets[READINGS] for p, ps in parts}),
            ("cityops_partition_checkpoint_offset", "Readings offset the last checkpoint covers.",
             {p: ps.checkpointed[READINGS] for p, ps in parts}),
            ("cityops_partition_lag", "Readings in the partition not yet evaluated.", lag),
            ("cityops_partition_seconds_since_progress", "Seconds since the partition last "
             "evaluated a reading.", {p: round(now - ps.last_progress, 1) for p, ps in parts}),
            ("cityops_partition_event_lag_seconds", "Wall clock minus the partition's newest "
             "reading's event time.",
             {p: round(max(0.0, now - ps.engine.max_ts / 1000), 1) if ps.engine.max_ts else 0
              for p, ps in parts}),
            ("cityops_partition_open_incidents", "Incidents firing now.",
             {p: len(ps.engine.book.open) for p, ps in parts}),
            ("cityops_partition_gap_records", "Records committed without being in the restored "
             "state (should stay 0).", {p: ps.gaps for p, ps in parts}),
        ]
        for name, help_, values in gauges:
            yield gauge(name, help_, values, "partition")

    # ---- start / stop -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Before Faust starts: the topics exist with the configured partitions, the HTTP face
        and the MQTT mirror are up."""
        s = self.s
        s.worker.data_dir.mkdir(parents=True, exist_ok=True)
        if self.kept.keep(s, self.city.digest):   # for a restore under other files, later
            self.kept.prune({self.city.digest}, newest=4)
        created = kt.ensure_topics(s.kafka)
        if created:
            log.info("created topics: %s", ", ".join(created))
        if s.worker.mirror_mqtt:
            from connectors.mqtt import MqttLink
            self.mirror = MqttLink(
                s.mqtt.host, s.mqtt.port, client_id=f"{self.mqtt_id}-mirror",
                prefix=s.mqtt.prefix, protocol=s.mqtt.protocol, username=s.mqtt.username,
                password=s.mqtt.password.get_secret_value() if s.mqtt.password else None,
                session_expiry_s=0)       # it subscribes to nothing: no session to keep
            self.mirror.topics = []
            self.mirror.start()
        if self.push is not None:
            self.push.start()
        if s.http.port:
            from pipeline.shared.http_api import OpsHttpServer
            self.http = OpsHttpServer(self, s.http)
            self.http.start()

    def close(self) -> None:
        if self.push is not None:          # unsent pushes wait in its outbox
            self.push.close(5.0)
        if self.history is not None:
            self.history.close(10.0)
        if self.mirror is not None:
            self.mirror.wait_published(10.0)
            self.mirror.stop()
        if self.http is not None:
            self.http.stop()


def serve(settings: Settings) -> int:
    setup_logging()
    worker = CityWorker(settings)
    worker.prepare()
    s = settings
    print(f"cityops worker {s.worker.app_id}: kafka {s.kafka.bootstrap}, "
          f"{worker.names[READINGS]} ({s.kafka.partitions} partitions), "
          f"{len(worker.registry):,} sensors, "
          f"{len(worker.rules.rules)} rules; "
          f"notices to {s.kafka.prefix}.alerts.*, {s.kafka.prefix}.push"
          + (f"; health http://{s.http.host}:{s.http.port}/healthz" if s.http.port else ""),
          flush=True)
    try:
        # our JSON log lines, not Faust's own logging set-up (and no stdout redirection)
        fw = faust.Worker(worker.app, quiet=True, override_logging=False, redirect_stdouts=False)
        if not fw.stdout.isatty():
            fw.spinner = None       # it writes "show the cursor" (ESC [?25h) to a log file too
        fw.execute_from_commandline()
    finally:
        worker.close()
    return 0
