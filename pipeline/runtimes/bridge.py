"""`cityops bridge`: MQTT readings into Kafka, for the distributed runtime.

    MQTT $share/{group}/{prefix}/readings/+ , gateways/+ , acks
        │  take a batch (paho's thread only fills the inbox)
        ▼
    ReadingRouter: one record per reading, key = sensor id, partition = its street's
        │          (connectors/kafka.py says why); bad input → {prefix}.deadletter
        ▼
    kafka-python producer (acks=all) ── flush ──▶ only then the MQTT messages are acknowledged

A crash before the flush leaves the MQTT messages unacknowledged on a persistent session: the
broker delivers them again (at least once; the worker's engine drops a redelivered reading as a
duplicate). Acks on `{prefix}/acks/{user}` go to `{prefix}.acks`, keyed by alert_id, as that
user's (pipeline/core/identity.py); the worker's engine checks the user's scope.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import Metric

from connectors import kafka as kt
from connectors.mqtt import MqttLink, sender_of
from pipeline.core.ack_tokens import REPLY_NOTE, AckTokens, BadToken, read_reply, refused, reply_worker
from pipeline.core.identity import AckUsers, acks_user
from pipeline.core.models import Ack, DeadLetter
from pipeline.core.registry import load as load_registry
from pipeline.shared.config import Settings
from pipeline.shared.logs import setup_logging
from pipeline.shared.metrics import counter, dead_letters, gauge
from pipeline.shared.ops_runtime import health_of, link_facts, serve_until_signalled
from pipeline.shared.reading_router import ReadingRouter
from rules.compiler import load_rules

log = logging.getLogger("cityops.bridge")


def _ack_key(ack: bytes) -> bytes:
    """An Ack's Kafka key: its alert_id."""
    return Ack.model_validate_json(ack).alert_id.encode()


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        rules = load_rules(settings.packs, settings.routing, params=settings.params)
        self.registry = load_registry(settings.registry, rules.kinds)
        self.router = ReadingRouter(self.registry, settings.kafka.partitions)
        self.users = AckUsers(self.registry, settings.acks.users)   # who may acknowledge what
        self.topics = kt.topic_names(settings.kafka.prefix)
        self.prefix = settings.mqtt.prefix
        self.stopping = threading.Event()
        self.metrics: Counter[str] = Counter()
        self.started = time.time()
        self.link: Any = None
        self.producer: Any = None
        self.http: Any = None
        self.http_acks: queue.SimpleQueue[bytes] = queue.SimpleQueue()   # POST /acks → Kafka
        self.push = None                  # the worker pushes; no acknowledge links here
        self.kafka_ok = False
        # Grid workers reply to a push with its token on {prefix}/push/{worker_id}/ack (as in
        # `cityops run`): with push on, the bridge checks the token and forwards the Ack.
        self.tokens = None
        if settings.push.enabled and settings.push.secret is not None:
            self.tokens = AckTokens(settings.push.secret.get_secret_value().encode(),
                                    settings.push.ack_ttl)

    def start(self) -> None:
        from kafka import KafkaProducer

        s = self.s
        created = kt.ensure_topics(s.kafka)
        if created:
            log.info("created topics: %s", ", ".join(created))
        self.kafka_ok = True
        self.producer = KafkaProducer(
            bootstrap_servers=kt.bootstrap_list(s.kafka.bootstrap), client_id="cityops-bridge",
            acks="all", linger_ms=s.kafka.linger, batch_size=256 * 1024,
            max_request_size=2 * 1024 * 1024, retries=10, **kt.client_options(s.kafka))
        share = f"$share/{s.bridge.shared_group}/"
        self.link = MqttLink(
            s.mqtt.host, s.mqtt.port, client_id=s.mqtt.client_id, prefix=self.prefix,
            protocol=s.mqtt.protocol, username=s.mqtt.username,
            password=s.mqtt.password.get_secret_value() if s.mqtt.password else None,
            keepalive=s.mqtt.keepalive, session_expiry_s=s.mqtt.session_expiry // 1000,
            max_inflight=s.mqtt.max_inflight)
        # Every bridge in the group shares all three, so an ack reaches Kafka once, not once
        # per bridge.
        self.link.topics = [f"{share}{self.prefix}/readings/+", f"{share}{self.prefix}/gateways/+",
                            f"{share}{self.prefix}/acks/+", f"{share}{self.prefix}/acks"]
        if self.tokens is not None:
            self.link.topics.append(f"{share}{self.prefix}/push/+/ack")
        self.link.start()
        if s.http.port:
            from pipeline.shared.http_api import OpsHttpServer
            self.http = OpsHttpServer(self, s.http)
            self.http.start()
        print(f"cityops bridge: mqtt://{s.mqtt.host}:{s.mqtt.port} "
              f"({self.prefix}/readings/+, {self.prefix}/gateways/+, {self.prefix}/acks/+, shared "
              f"group {s.bridge.shared_group}) → kafka {s.kafka.bootstrap} "
              f"{self.topics['readings']} ({s.kafka.partitions} partitions by street), "
              f"{self.topics['acks']}", flush=True)

    def run(self) -> None:
        s, link = self.s, self.link
        while not self.stopping.is_set():
            msgs = link.take(s.bridge.max_batch, s.bridge.max_wait / 1000)
            if msgs or not self.http_acks.empty():
                self._forward(msgs)
        self._shutdown()

    def _forward(self, msgs: list) -> None:
        acks_topic, replies = f"{self.prefix}/acks", f"{self.prefix}/push/"

        def is_ack(topic: str) -> bool:
            return topic == acks_topic or topic.startswith((acks_topic + "/", replies))
        readings = [m for m in msgs if not is_ack(m.topic)]
        records, dead = self.router.route([m.payload for m in readings], [m.topic for m in readings],
                                          [sender_of(m.topic, self.prefix) for m in readings])
        acks = []
        for m in msgs:      # the sender's identity goes to Kafka in the Ack (`by`, `tier`)
            if m.topic.startswith(replies):
                got = self._reply(m)
            elif is_ack(m.topic):
                got = self.users.from_topic(acks_user(m.topic, acks_topic), m.payload, m.topic)
            else:
                continue
            if isinstance(got, bytes):
                acks.append((_ack_key(got), got))
            else:
                dead.append(got)
        while not self.http_acks.empty():          # made by the HTTP face from its user
            payload = self.http_acks.get_nowait()
            acks.append((_ack_key(payload), payload))
        # Until Kafka has the whole batch, MQTT keeps it: a failed attempt is tried again (the
        # engine drops the readings that did get through as duplicates).
        while not self._produce(records, acks, dead):
            if self.stopping.wait(1.0):
                return
        self.link.ack(msgs)
        m = self.metrics
        m["payloads"] += len(readings)
        m["records"] += len(records)
        m["acks"] += len(acks)
        for d in dead:
            m["dead." + d.reason] += 1

    def _reply(self, m: Any) -> bytes | DeadLetter:
        """A worker's reply to a push: its token (or {token, state, note}: a handling state),
        on its own topic, becomes its Ack."""
        now = int(time.time() * 1000)
        try:
            reply = read_reply(m.payload)
            claim = self.tokens.verify(reply.token, now, reply_worker(m.topic, self.prefix))
        except BadToken as exc:
            return refused(exc, m.payload, m.topic)
        return claim.ack(now, reply.note or REPLY_NOTE, reply.state, reply.to).model_dump_json().encode()

    def _produce(self, records: list, acks: list, dead: list) -> bool:
        producer, t = self.producer, self.topics
        try:
            for p, key, value in records:
                producer.send(t["readings"], key=key, value=value, partition=p)
            for key, value in acks:
                producer.send(t["acks"], key=key, value=value)
            for d in dead:
                producer.send(t["deadletter"], value=d.model_dump_json().encode())
            producer.flush(timeout=30)
        except Exception as exc:          # Kafka away or refusing: keep the batch, say so
            if self.kafka_ok:
                log.error("Kafka did not take a batch (%s); holding it and retrying", exc)
            self.kafka_ok = False
            self.metrics["kafka_errors"] += 1
            return False
        if not self.kafka_ok:
            log.info("Kafka takes batches again")
        self.kafka_ok = True
        return True

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def _shutdown(self) -> None:
        if self.link is not None:
            self.link.stop()
        if self.producer is not None:
            self.producer.flush()
            self.producer.close()
        if self.http is not None:
            self.http.stop()
        log.info("bridge stopped")

    def health(self) -> dict[str, Any]:
        link, kafka_ok = link_facts(self.link), self.kafka_ok
        return health_of("ok" if link["broker_connected"] and kafka_ok else "degraded",
                         self.started, broker_connected=link["broker_connected"],
                         kafka_connected=kafka_ok, inbox=link["inbox"])

    def collect(self) -> Iterator[Metric]:
        """/metrics (pipeline/shared/metrics.py)."""
        m = self.metrics
        yield counter("cityops_bridge_payloads_total", "MQTT reading payloads taken.", m["payloads"])
        yield counter("cityops_bridge_records_total", "Readings written to Kafka.", m["records"])
        yield counter("cityops_bridge_acks_total", "Acks forwarded to Kafka.", m["acks"])
        yield counter("cityops_bridge_kafka_errors_total", "Batches Kafka did not take "
                      "(held and retried).", m["kafka_errors"])
        yield dead_letters(m)
        yield gauge("cityops_inbox_depth", "MQTT messages received, not yet taken.",
                    self.link.depth() if self.link else 0)


def serve(settings: Settings) -> int:
    setup_logging()
    return serve_until_signalled(Bridge(settings))
