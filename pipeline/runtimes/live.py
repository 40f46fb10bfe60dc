"""The live runtime (`cityops run`): MQTT in, the engine, notices out, state that survives kill -9.

One loop on the main thread:

    take a batch from the inbox (paho's thread only fills it)  ─┐
    journal it (SQLite, one transaction)                        │ durable before the broker
    acknowledge it to the broker                                ─┘ may forget it
    evaluate it (Engine.ingest / ack / advance)
    publish notices to the tier topics, dead letters to the dead-letter topic
    now and then: a snapshot, once every notice before it has reached the broker

The wall clock moves the watermark every `tick`, so escalations, reminders and silence happen
on time when no readings come. On start the last snapshot is restored and the journal after it
replayed: the same state, the same notices again (idempotent by alert_id/state/seq), nothing
lost, no second incident.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import Metric, SummaryMetricFamily

from connectors.mqtt import MqttLink, sender_of
from pipeline.core.ack_tokens import BadToken, read_reply, refused, reply_worker
from pipeline.core.close_figures import CloseFigures, closed_fields
from pipeline.core.engine import Engine, Output
from pipeline.core.identity import AckUsers, acks_user
from pipeline.core.registry import check_districts
from pipeline.core.registry import load as load_registry
from pipeline.core.reload import CitySet, files_digest, watched_files
from pipeline.core.wire import MAX_PAYLOAD_BYTES, OVERSIZE_KEPT, dead_letter, oversize
from pipeline.shared.config import Settings
from pipeline.shared.console import StoryConsole
from pipeline.shared.kept_sets import KeptSets
from pipeline.shared.logs import setup_logging
from pipeline.shared.metrics import counter, dead_letters, gauge, notices_by_tier
from pipeline.shared.ops_runtime import health_of, link_facts, serve_until_signalled
from pipeline.shared.quarantine import evaluate_isolating, poison_detail
from pipeline.shared.reload_runtime import ReloadStats, Requests, Watch, apply_live, switch_to, take_requests
from pipeline.shared.silence_http import Refused, in_force, listed
from pipeline.shared.silence_http import command as silence_command
from pipeline.shared.statelock import StateLock
from pipeline.shared.store import ACKS, ADVANCE, READINGS, RELOAD, SILENCES, StateStore
from pipeline.shared.topics import notice_topic
from rules.compiler import load_rules
from rules.yamlfile import ConfigError

log = logging.getLogger("cityops.runtime")


class LiveRuntime:
    def __init__(self, settings: Settings, simulate: bool = False, resume: bool = False,
                 log_file: Path | None = None) -> None:
        self.s = settings
        self.log_file = log_file
        self.simulate = simulate
        self.lock = StateLock(settings.state.path)
        self.lock.acquire()                       # before anything reads or writes the state
        self.stopping = threading.Event()
        self.http_acks: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.http_silences: queue.SimpleQueue[bytes] = queue.SimpleQueue()     # POST /silences
        self.metrics: Counter[str] = Counter()
        self.close_figures = CloseFigures()      # time to close (快速处置), for /metrics
        self.batch_seconds = 0.0
        self.batches = 0
        self.started = time.time()
        self.broker = None
        self.link: MqttLink | None = None
        self.http = None
        self._sim_thread: threading.Thread | None = None
        self.console = StoryConsole() if settings.console or simulate else None
        digest = files_digest(watched_files(settings))     # of the files as they are read now
        rules = load_rules(settings.packs, settings.routing, params=settings.params)
        self.registry = load_registry(settings.registry, rules.kinds)
        check_districts(rules.packs, rules.sources, self.registry, settings.params)
        self.engine = Engine(self.registry, rules, settings.engine)
        self.users = AckUsers(self.registry, settings.acks.users)     # who may acknowledge what
        self.city = CitySet(rules, self.registry, digest)             # what a reload replaces
        self.start_set = self.city                # the files as read at this start
        self.reloads, self.reload_stats = Requests(), ReloadStats()
        self.engine.clock_bound = True            # one sensor's clock does not move the city's
        self.catching_up = True                   # see run()
        self.store = StateStore(settings.state.path)
        self.kept = KeptSets.beside(settings.state.path)     # the sets the state was judged by
        # The simulated story replays the same incidents on every start; resumed, they are
        # still open and make no notice. A fresh city tells the whole story again.
        self.fresh = simulate and not resume
        if self.fresh:
            self.store.clear()
        self.prefix = settings.mqtt.prefix
        self.acks_topic = f"{self.prefix}/acks"
        self.push_topics = f"{self.prefix}/push/"     # a worker's reply: …/push/{worker_id}/ack
        self.silences_topic = f"{self.prefix}/silences"     # …/{user}: the console's silences
        self._silence_list = b""                  # last published on {prefix}/silence-list
        self.push = None
        if settings.push.enabled:                 # pushes with receipts and acknowledge links
            from pipeline.shared.delivery import PushDispatcher
            self.push = PushDispatcher(settings, self.registry)
        self.history = None
        if settings.influx.url:                   # readings and notices into InfluxDB too
            from connectors.influx import InfluxSink
            self.history = InfluxSink(settings.influx, self.registry, closed_fields)
            self.engine.keep_accepted = True

    # ---- start ------------------------------------------------------------------------
    def start(self) -> None:
        s = self.s
        if s.http.port:          # first: a busy port stops the start before any broker session
            from pipeline.shared.http_api import OpsHttpServer
            self.http = OpsHttpServer(self, s.http)
            try:
                self.http.start()
            except ConnectionError as exc:
                raise ConfigError("http.port", None, f"{exc} (another cityops?); set "
                                  "CITYOPS_HTTP__PORT to a free port, or 0 for none") from None
        replayed = self._restore()
        host, port, protocol = s.mqtt.host, s.mqtt.port, s.mqtt.protocol
        if s.mqtt.url is None:
            from connectors.embedded_broker import EmbeddedBroker
            self.broker = EmbeddedBroker(s.embedded.host, s.embedded.port)
            try:
                self.broker.start()
            except RuntimeError as exc:           # it says what to do: a user's error
                raise ConnectionError(str(exc)) from None
            host, port, protocol = s.embedded.host, self.broker.port, 311   # amqtt: 3.1.1 only
        self.link = MqttLink(
            host, port, client_id=s.mqtt.client_id, prefix=self.prefix, protocol=protocol,
            username=s.mqtt.username,
            password=s.mqtt.password.get_secret_value() if s.mqtt.password else None,
            shared_group=s.mqtt.shared_group, keepalive=s.mqtt.keepalive,
            session_expiry_s=s.mqtt.session_expiry // 1000, max_inflight=s.mqtt.max_inflight,
            own_loop=True)
        # acknowledgements name their sender: {prefix}/acks/{user} (the bare topic is
        # subscribed only to dead-letter what arrives there)
        self.link.topics.append(f"{self.acks_topic}/+")
        if self.push is not None:
            self.link.topics.append(f"{self.push_topics}+/ack")
        self.link.topics.append(f"{self.silences_topic}/+")
        self.link.start()
        if self.push is not None:
            self.push.start(broker=(host, port, protocol))
        for notices, dead in replayed:            # what the journal regenerated goes out again
            self._publish(notices, dead)
        self._publish_silence_list()
        if self.simulate:
            self._start_simulator(host, port, protocol)
        if s.reload.watch_every:
            Watch(lambda: watched_files(s), s.reload.watch_every / 1000, self.reloads.ask,
                  self.stopping).start()
        self._banner(host, port, protocol)

    def _restore(self) -> list[tuple[list, list]]:
        """The last snapshot, judged again by the set it was made under (kept beside it), the
        journal replayed as it was judged, reloads included; then, if the files are now
        another set, a reload to them (pipeline/shared/kept_sets.py)."""
        current: CitySet = self.city
        if not self.kept.keep(self.s, current.digest):
            log.warning("the files changed while they were read at this start; a later restart "
                        "under other files could not carry this state")
        blob, entries = self.store.load()
        if blob is None and not self.store.journaled_since_snapshot:
            self.store.begin_with(current.digest)      # nothing yet: judged by these files
        made_by = self.store.judged_by()
        if made_by is not None and made_by != current.digest:
            self._judge_by(self._kept(made_by))
        if blob is not None:
            lost = self.engine.restore(blob)
            if lost:
                log.warning("restored state; not carried over (registry or rules changed): %s", lost)
        replayed = []
        n = 0
        poisoned = self.store.poisoned()
        for e in entries:
            if e.kind == RELOAD:
                out = self._judge_by(self._kept(e.items[0]), e.at)
            else:
                out = self._apply(e.kind, e.at, e.items, e.seq, poisoned.get(e.seq))
            replayed.append((out.notices, out.dead_letters))
            # written again: points are idempotent by series and time, and this recovers what
            # kill -9 took from its buffer (by the history's registry: a journal judged by
            # another registry numbered its sensors otherwise)
            if self.history is not None and self.history.registry is self.registry:
                self.history.add(out)
            n += 1
        if blob is not None or n:
            log.info("state restored: snapshot %s, %d journal entries replayed, %d open incidents",
                     "found" if blob is not None else "none", n, len(self.engine.book.open))
        if self.city.digest != current.digest:      # the files changed while it was stopped
            log.warning("the state was judged by the set %s; the files are now %s: reloading to "
                        "them", self.city.digest, current.digest)
            now = int(time.time() * 1000)
            self.store.append(RELOAD, now, [current.digest])
            out = self._judge_by(current, now)
            replayed.append((out.notices, out.dead_letters))
            if self.history is not None:
                self.history.add(out)
        return replayed

    def _kept(self, digest: str) -> CitySet | None:
        """The set ``digest`` as the state was judged by it: the files loaded at this start if
        they are that set, else its kept copy (None, said in the log, if there is none)."""
        if digest == self.start_set.digest:
            return self.start_set
        try:
            return self.kept.load(digest)
        except (OSError, ValueError, ConfigError) as exc:
            log.error("the state was judged by the set %s, whose kept copy does not load (%s): "
                      "it is restored into the files as they are now, and incidents it cannot "
                      "carry there end without a resolve notice", digest, exc)
            return None

    def _judge_by(self, new: CitySet | None, at: int | None = None) -> Output:
        """From here the runtime judges by ``new``. Before the snapshot is restored (``at``
        None) it is only swapped in; after, the state is carried (a reload)."""
        if new is None or new is self.city:
            return Output()
        if at is None:
            self.engine = new.engine(self.s.engine)
            self.engine.clock_bound = True
            self.engine.keep_accepted = self.history is not None
            self.registry, self.users, self.city = \
                new.registry, AckUsers(new.registry, self.s.acks.users), new
            return Output()
        return switch_to(self, new, at)

    def _start_simulator(self, host: str, port: int, protocol: int) -> None:
        from pipeline.shared.simulate import Simulator
        sim_link = MqttLink(host, port, client_id=f"{self.s.mqtt.client_id}-simulator",
                            prefix=self.prefix, protocol=protocol)
        sim_link.topics = []                      # it only publishes, as a gateway would
        sim_link.start()
        sim = Simulator(self.registry, sim_link.publish, prefix=self.prefix)
        console = self.console
        assert console is not None
        console.story_of = sim.story_of

        def loop() -> None:
            sim.run(self.stopping, report=console.heading)
            sim_link.stop()
        self._sim_thread = threading.Thread(target=loop, name="simulator", daemon=True)
        self._sim_thread.start()

    def _banner(self, host: str, port: int, protocol: int) -> None:
        s = self.s
        kind = "embedded, MQTT 3.1.1" if self.broker else f"MQTT {'5' if protocol == 5 else '3.1.1'}"
        http = f"http://{s.http.host}:{s.http.port}" if s.http.port else None
        lines = [
            f"cityops is running: {len(self.registry):,} sensors, {len(self.engine.evaluators)} rules, "
            f"{len(self.engine.book.open)} open incidents",
            f"  broker     mqtt://{host}:{port} ({kind})",
            f"  readings   publish to {self.prefix}/readings/{{sensor_id}} or "
            f"{self.prefix}/gateways/{{gateway_id}}",
            f"  watch      {_cityops()} tail{_tail_flags(s, host, port)}    (notices of every "
            f"tier, pushes, dead letters, acks)",
            f"  alerts     {self.prefix}/alerts/#, pushes {self.prefix}/push/#",
            f"  dead       {self.prefix}/deadletter",
            f"  acks       {self.acks_topic}/{{user}}" + (f", or POST {http}/acks (bearer token)"
                                                       if http else ""),
        ]
        if http:
            lines.append(f"  health     {http}/healthz    metrics {http}/metrics")
        lines.append(f"  reload     kill -HUP {os.getpid()}" + (f", POST {http}/reload" if http else "")
                     + (", or save its files (watched)" if s.reload.watch_every else ""))
        if self.push is not None:
            lines.append(f"  push       {', '.join(self.push.lanes)} to on-call workers; receipts "
                         f"{self.prefix}/receipts; replies {self.push_topics}{{worker_id}}/ack")
        lines.append(f"  state      {s.state.path}")
        if self.log_file is not None:
            lines.append(f"  logs       {self.log_file} (warnings on stderr too)")
        if self.fresh:
            lines.append("  story      a fresh simulated city (the last run's state is cleared; "
                         "--resume continues it)")
        elif self.simulate:
            n = len(self.engine.book.open)
            lines.append(f"  story      resumed: {n} incident{'s' if n != 1 else ''} still open "
                         "from the last run; the story's alarms for them are no news, the rest "
                         "goes on")
        if self.simulate:
            lines.append("  simulating gateways: a gas leak at an elderly resident living alone, a "
                         "rainstorm, a construction site violation, a sensor going silent, a "
                         "reading for an unknown sensor")
        print("\n".join(lines), flush=True)

    # ---- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        s = self.s
        link = self.link
        assert link is not None
        last_tick = 0
        # at once after a start that replayed a journal: a runtime restarted more often than
        # snapshot_every would otherwise replay an ever longer one. A start with nothing
        # journaled has nothing to save: its first batches are journaled as any others
        last_snapshot = -math.inf if self.store.journaled_since_snapshot else time.monotonic()
        # After a start or a reconnect the broker may hold readings for us that are older than
        # the wall clock: the clock does not move the watermark until they are in (connected,
        # inbox empty, nothing new for catch_up_quiet), else a leak still on could be resolved
        # by the clock and fire again from the backlog. At most catch_up_max: under a steady
        # stream the readings move the watermark themselves.
        connects = -1
        since = last_message = time.monotonic()
        while not self.stopping.is_set():
            take_requests(self, apply_live)           # SIGHUP, POST /reload, the watch
            msgs = link.take(s.max_batch, s.max_wait / 1000)
            now = int(time.time() * 1000)
            mono = time.monotonic()
            if msgs:
                last_message = mono
            if connects != link.connects or not link.connected.is_set():
                connects, since, last_message = link.connects, mono, mono
                self.catching_up = True
            elif self.catching_up and (mono - since >= s.catch_up_max / 1000 or (
                    mono - last_message >= s.catch_up_quiet / 1000 and not link.depth())):
                self.catching_up = False
                log.info("caught up with the broker's backlog in %.1f s; the clock moves time",
                         mono - since)
            entries: list[tuple[str, int, list]] = []
            # an oversize payload is journaled as what its dead letter keeps, and its size
            readings = [[m.topic, m.payload] if len(m.payload) <= MAX_PAYLOAD_BYTES
                        else [m.topic, m.payload[:OVERSIZE_KEPT], len(m.payload)]
                        for m in msgs
                        if not self._is_ack(m.topic) and not self._is_silence(m.topic)]
            acks = self._acks([m for m in msgs if self._is_ack(m.topic)]) \
                if len(readings) < len(msgs) else []
            while not self.http_acks.empty():
                acks.append(self.http_acks.get_nowait())
            if readings:
                entries.append((READINGS, now, readings))
            if acks:
                entries.append((ACKS, now, acks))
            silences = self._silences([m for m in msgs if self._is_silence(m.topic)], now) \
                if len(readings) < len(msgs) else []
            while not self.http_silences.empty():
                silences.append(self.http_silences.get_nowait())
            if silences:
                entries.append((SILENCES, now, silences))
            if now - last_tick >= s.tick and not self.catching_up:
                entries.append((ADVANCE, now - s.engine.allowed_lateness, []))
                last_tick = now
            if entries:
                seqs = self.store.append_many(entries)        # durable first ...
                link.ack(msgs)                        # ... then the broker may forget them
                self.metrics["payloads"] += len(readings)
                for (kind, at, items), seq in zip(entries, seqs, strict=True):
                    t = time.perf_counter()
                    out = self._apply(kind, at, items, seq)
                    self.batch_seconds += time.perf_counter() - t
                    self.batches += 1
                    self._publish(out.notices, out.dead_letters)
                    if self.history is not None:
                        self.history.add(out)
            if entries:
                self._publish_silence_list()
            if ((time.monotonic() - last_snapshot) * 1000 >= s.state.snapshot_every
                    or self.store.journaled_bytes >= s.state.snapshot_bytes):
                if self._snapshot():
                    last_snapshot = time.monotonic()
        self._shutdown()

    def _apply(self, kind: str, at: int, items: list, seq: int | None = None,
               quarantined: dict[int, str] | None = None) -> Output:
        """One journaled input (entry ``seq``) through the engine. The engine refuses bad input
        itself; a payload or ack it fails on is isolated, dead-lettered as `poison` and
        recorded beside the journal (pipeline.shared.quarantine), so the rest of the batch is
        evaluated and a restart does not replay it into the same failure."""
        engine = self.engine
        if kind == ADVANCE:
            try:
                return engine.advance(at)
            except Exception:
                log.exception("engine failed moving the watermark to %s; passed over", at)
                self.metrics["engine_errors"] += 1
                return Output()
        quarantined = quarantined or {}
        live = [i for i in range(len(items)) if i not in quarantined]
        aside: list = []                          # refused before the engine: no reading in it
        if kind == READINGS:
            live = [i for i in live if not self._aside(items[i], aside)]
            topics = [items[i][0] for i in live]
            payloads = [items[i][1] for i in live]
            senders = [sender_of(t, self.prefix) for t in topics]

            def attempt(lo: int, hi: int, out: Output) -> None:
                engine.ingest(payloads[lo:hi], source=topics[lo:hi], now_ms=at,
                              senders=senders[lo:hi], out=out)
        elif kind == SILENCES:
            commands = [items[i] for i in live]

            def attempt(lo: int, hi: int, out: Output) -> None:
                engine.silence(commands[lo:hi], out=out)
        else:
            acks = [items[i] for i in live]

            def attempt(lo: int, hi: int, out: Output) -> None:
                engine.ack(acks[lo:hi], out=out, now_ms=at, may_ack=self.users.may_ack)
        out, poisoned = evaluate_isolating(attempt, len(live), engine.counters, kind)
        fresh = [(live[i], why) for i, why in poisoned]
        if fresh and seq is not None:
            self.store.quarantine(seq, fresh)
        self.metrics["engine_errors"] += len(fresh)
        for i, why in sorted([*quarantined.items(), *fresh]):
            topic, payload = items[i][:2] if kind == READINGS else (self.acks_topic, items[i])
            aside.append(dead_letter("poison", poison_detail(why), payload, source=topic))
        for d in aside:
            engine.counters["dead_letters"] += 1
            engine.counters["dead." + d.reason] += 1
        out.dead_letters += aside
        return out

    def _aside(self, item: list, dead: list) -> bool:
        """A payload journaled only in part (over the size limit), or on a topic that names no
        sender (a level too deep): a dead letter, not the engine's business."""
        topic, payload, *size = item
        if size:
            dead.append(oversize(payload, size[0], topic))
        elif sender_of(topic, self.prefix) is None:
            dead.append(dead_letter(
                "wrong_topic", f"readings go to {self.prefix}/readings/{{sensor_id}} or "
                f"{self.prefix}/gateways/{{gateway_id}}, one level, not {topic}", payload,
                source=topic))
        else:
            return False
        return True

    def _is_silence(self, topic: str) -> bool:
        return topic.startswith(self.silences_topic + "/")

    def _silences(self, msgs: list, now: int) -> list[bytes]:
        """Silence requests on {prefix}/silences/{user} (the console publishes each as the
        user who made it, as it does acknowledgements) as the commands to journal; one out of
        the user's scope or malformed is a dead letter (`forbidden`, `bad_silence`)."""
        commands, dead = [], []
        for m in msgs:
            user = acks_user(m.topic, self.silences_topic)
            try:
                spec = orjson.loads(m.payload)
            except orjson.JSONDecodeError:
                dead.append(dead_letter("bad_silence", "not JSON", m.payload, source=m.topic))
                continue
            try:
                commands.append(silence_command(self, user or "", spec, now))
            except Refused as exc:
                dead.append(dead_letter(exc.reason, exc.why, m.payload, source=m.topic))
        self._publish([], dead)
        return commands

    def _publish_silence_list(self) -> None:
        """The silences in force and what they mute, retained on {prefix}/silence-list for the
        console, whenever it changed."""
        if not self._silence_list and not self.engine.book.silences.items:
            return
        body = orjson.dumps(listed(self))
        if body != self._silence_list and self.link is not None:
            self.link.publish(f"{self.prefix}/silence-list", body, retain=True)
            self._silence_list = body

    def _is_ack(self, topic: str) -> bool:
        return (topic == self.acks_topic or topic.startswith(self.acks_topic + "/")
                or topic.startswith(self.push_topics))

    def _acks(self, msgs: list) -> list[bytes]:
        """Acknowledgements as the Acks to journal, made from who sent them: a user's on
        {prefix}/acks/{user} (pipeline/core/identity.py), a worker's reply on
        {prefix}/push/{worker_id}/ack with the token of their push. What names nobody, comes
        from nobody who may acknowledge, or carries a forged, expired or someone else's token
        is a dead letter (`forbidden`, `bad_ack`)."""
        acks, dead = [], []
        for m in msgs:
            if not m.topic.startswith(self.push_topics):
                got = self.users.from_topic(acks_user(m.topic, self.acks_topic), m.payload, m.topic)
                (acks if isinstance(got, bytes) else dead).append(got)
                continue
            worker = reply_worker(m.topic, self.prefix)
            try:
                if self.push is None:
                    raise BadToken("malformed", "push is not enabled")
                reply = read_reply(m.payload)       # the token, or {token, state, note}
                ack = self.push.accept_token(reply.token, worker, reply.state, reply.note, reply.to)
            except BadToken as exc:
                dead.append(refused(exc, m.payload, m.topic))
            else:
                acks.append(ack.model_dump_json().encode())
        self._publish([], dead)
        return acks

    def _publish(self, notices: list[dict], dead: list) -> None:
        link = self.link
        assert link is not None
        push = self.push
        for n in notices:
            if push is None or not push.owns(n):   # else the push's MQTT channel publishes it
                link.publish(notice_topic(self.prefix, n), orjson.dumps(n))
            self.metrics["notices." + n["tier"]] += 1
            if self.console is not None:
                self.console.notice(n)
        self.close_figures.observe(notices)
        for d in dead:
            link.publish(f"{self.prefix}/deadletter", d.model_dump_json().encode())
            self.metrics["dead." + d.reason] += 1
            if self.console is not None:
                self.console.dead_letter(d.model_dump(mode="json"),
                                         (d.source or "").rpartition("/")[2])
        if push is not None:
            push.submit(notices)

    def _snapshot(self) -> bool:
        """Only when every notice so far has reached the broker: a snapshot ends the journal
        that could regenerate them."""
        if not self.store.journaled_since_snapshot:
            return True
        if self.link is not None and self.link.unpublished():
            return False
        self.store.save_snapshot(self.engine.snapshot(), self.city.digest)
        self.kept.prune({self.city.digest})       # no journal entry names another set now
        self.metrics["snapshots"] += 1
        return True

    # ---- stop -------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def _shutdown(self) -> None:
        log.info("shutting down: flushing notices")
        if self._sim_thread is not None:
            self._sim_thread.join(5.0)
        if self.push is not None:                 # unsent pushes wait in its outbox
            self.push.close(5.0)
        if self.link is not None:
            if self.link.wait_published(10.0):
                self._snapshot()
            else:
                log.warning("the broker did not take every notice in 10 s; the journal keeps them "
                            "and they go out again at the next start")
            self.link.stop()
        if self.http is not None:
            self.http.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.history is not None:
            self.history.close(10.0)
        self.store.close()
        self.lock.release()
        log.info("stopped; state saved in %s", self.s.state.path)

    # ---- operability ------------------------------------------------------------------
    def silences_in_force(self) -> list:
        return in_force([self.engine.book], self.engine.watermark)

    def health(self) -> dict[str, Any]:
        link = link_facts(self.link)
        return health_of("ok" if link["broker_connected"] else "degraded", self.started,
                         broker_connected=link["broker_connected"], catching_up=self.catching_up,
                         open_incidents=len(self.engine.book.open), inbox=link["inbox"])

    def collect(self) -> Iterator[Metric]:
        """/metrics (pipeline/shared/metrics.py): computed now, from the counters the loop keeps."""
        e = self.engine
        c = e.counters
        now = time.time() * 1000
        link = self.link
        yield counter("cityops_readings_total", "Readings the engine took: decoded, not refused "
                      "(dead letters) and not a redelivered duplicate.",
                      c['readings'] - c['refused'] - c['duplicates'])
        yield counter("cityops_payloads_total", "MQTT reading payloads received.",
                      self.metrics['payloads'])
        yield counter("cityops_duplicates_total", "Redelivered readings dropped (same sensor, "
                      "same ts).", c['duplicates'])
        yield counter("cityops_late_readings_total", "Readings older than their sensor's newest, "
                      "within allowed_lateness: taken, acting only where they can raise an "
                      "incident.", c['late'])
        yield notices_by_tier(self.metrics)
        yield dead_letters(self.metrics)        # every one published, the engine's and the loop's
        yield from self.close_figures.collect()
        yield counter("cityops_engine_errors_total", "Inputs the engine failed on (a bug: see the "
                      "logs).", self.metrics['engine_errors'])
        yield counter("cityops_acks_total", "Acknowledgements applied.", c['acks'])
        yield SummaryMetricFamily("cityops_engine_batch_seconds", "Engine time per batch.",
                                  count_value=self.batches, sum_value=round(self.batch_seconds, 6))
        yield gauge("cityops_inbox_depth", "Messages received, not yet taken by the engine.",
                    link.depth() if link else 0)
        yield gauge("cityops_event_lag_seconds", "Wall clock minus the newest reading's event "
                    "time.", max(0.0, (now - e.max_ts) / 1000) if e.max_ts else 0)
        yield gauge("cityops_open_incidents", "Incidents firing now.", len(e.book.open))
        yield gauge("cityops_unpublished_notices", "Notices handed to MQTT, not yet taken by the "
                    "broker.", link.unpublished() if link else 0)
        yield gauge("cityops_broker_connected", "1 while connected to the MQTT broker.",
                    int(bool(link and link.connected.is_set())))
        yield gauge("cityops_journal_entries", "Inputs journaled since the last snapshot.",
                    self.store.journaled_since_snapshot)
        yield gauge("cityops_journal_bytes", "Bytes journaled since the last snapshot.",
                    self.store.journaled_bytes)
        yield counter("cityops_retained_skipped_total", "Retained messages the broker replayed on "
                      "a (re)subscription: taken when published, not again.",
                      link.retained_skipped if link else 0)
        if self.history is not None:
            yield from self.history.collect()
        if self.push is not None:
            yield from self.push.collect()
        yield from self.reload_stats.collect()


def _cityops() -> str:
    """How the user started cityops (`.venv/bin/cityops` from `make run`), so the commands the
    banner suggests run as printed."""
    return sys.argv[0] if Path(sys.argv[0]).name == "cityops" else "cityops"


def _tail_flags(s: Settings, host: str, port: int) -> str:
    flags = "" if (host, port) == ("127.0.0.1", 1883) else f" --broker mqtt://{host}:{port}"
    return flags + ("" if s.mqtt.prefix == "cityops" else f" --prefix {s.mqtt.prefix}")


def serve(settings: Settings, simulate: bool = False, resume: bool = False) -> int:
    log_file = settings.state.path.with_suffix(".log") if simulate or settings.console else None
    setup_logging(file=log_file)
    rt = LiveRuntime(settings, simulate=simulate, resume=resume, log_file=log_file)
    signal.signal(signal.SIGHUP, lambda *_: rt.reloads.ask("SIGHUP"))
    return serve_until_signalled(rt)
