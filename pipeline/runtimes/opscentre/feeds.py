"""Where the console's incidents come from, and where its acknowledgements go.

MQTT: `{prefix}/alerts/#`, `{prefix}/push/+` (grid pushes) and `{prefix}/receipts`, QoS 1 on a
persistent session (connectors/mqtt.py's MqttLink, manual acks): a message is acknowledged to
the broker only after the store committed it, so a console stopped or killed catches up from
its session when it is back. An acknowledgement is published on `{prefix}/acks/{user}`, the
user who pressed the button: the pipeline checks that user's scope again.

Kafka: the tier topics `{prefix}.alerts.*` and `{prefix}.push`, every partition, each one's
position kept in the store in the same transaction as what it applied. An acknowledgement is the Ack the
pipeline applies (`by`, `tier` of the user) on `{prefix}.acks`, keyed by alert id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from connectors import kafka as kt
from connectors.mqtt import MqttLink
from pipeline.core.models import Ack, AckRequest, AlertNotice
from pipeline.runtimes.opscentre.store import Change, Store

log = logging.getLogger("cityops.console")

OnChange = Callable[[list[Change]], None]


def _decoded(kind: str, where: str, payload: bytes) -> tuple[str, dict] | None:
    """A notice (the public contract, AlertNotice) or a push receipt as a dict; None, with a
    warning, for anything else: the pipeline never writes such a message, so someone else
    published there, and one bad message must not stop the console (nor come back at every
    restart: it is acknowledged like the rest)."""
    try:
        doc = orjson.loads(payload)
        if kind == "notice":
            AlertNotice.model_validate(doc)
        elif not (isinstance(doc, dict) and isinstance(doc.get("alert_id"), str)
                  and isinstance(doc.get("at"), str) and datetime.fromisoformat(doc["at"])):
            raise ValueError("a receipt names its alert_id and says when (at, RFC 3339)")
    except (orjson.JSONDecodeError, ValidationError, ValueError) as exc:
        log.warning("not a %s on %s, skipped (%s): %r", kind, where,
                    str(exc).splitlines()[0][:200], payload[:200])
        return None
    return kind, doc


@contextmanager
def _failing_loudly(feed: Any) -> Iterator[None]:
    """A feed that cannot apply what it took (its database unwritable, or a bug) stops taking
    more — nothing is acknowledged that was not applied — says so in the log, and /healthz
    answers 503 from then on."""
    try:
        yield
    except Exception:
        feed.failed = True
        log.exception("the console stopped taking notices; restart it once the cause is fixed")


class MqttFeed:
    def __init__(self, store: Store, on_change: OnChange, *, host: str, port: int, prefix: str,
                 client_id: str, username: str | None = None, password: str | None = None) -> None:
        self.store, self.on_change, self.prefix = store, on_change, prefix

        def link() -> MqttLink:
            # MQTT 3.1.1: the embedded broker of `cityops run --simulate` speaks nothing else,
            # and a 3.1.1 clean_session=false session is as persistent on Mosquitto
            made = MqttLink(host, port, client_id=client_id, prefix=prefix, protocol=311,
                            username=username, password=password)
            made.topics = [f"{prefix}/alerts/#", f"{prefix}/push/+", f"{prefix}/receipts",
                           f"{prefix}/silence-list"]
            made.retired = []
            return made

        self._link = link
        self.link = link()
        self.silences: dict | None = None       # the pipeline's list, retained: see silences.py
        self.failed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-feed", daemon=True)

    def start(self, wait_s: float = 0.0) -> None:
        """Connects (retrying for up to ``wait_s``: `make run` starts the console beside the
        broker it embeds) and starts applying what arrives."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.link.start()
                break
            except ConnectionError:
                if time.monotonic() >= deadline:
                    raise
                self.link = self._link()     # a paho client starts once
                time.sleep(0.5)
        self._thread.start()

    def _kind(self, topic: str) -> str | None:
        p = self.prefix
        if topic.startswith(f"{p}/alerts/") or topic.startswith(f"{p}/push/"):
            return "notice"
        if topic == f"{p}/receipts":
            return "receipt"
        return None

    def _run(self) -> None:
        with _failing_loudly(self):
            self._apply_until_stopped()

    def _apply_until_stopped(self) -> None:
        while not self._stop.is_set():
            batch = self.link.take(1000, 0.2)
            if not batch:
                continue
            docs = [d for m in batch if (kind := self._kind(m.topic))
                    and (d := _decoded(kind, m.topic, m.payload))]
            for m in batch:
                if m.topic == f"{self.prefix}/silence-list":
                    self._silence_list(m.payload)
            changes = self.store.apply(docs)
            self.link.ack(batch)               # only now: a crash before this redelivers them
            if changes:
                self.on_change(changes)

    def publish_ack(self, user: str, request: AckRequest, ack: Ack) -> None:
        self.link.publish(f"{self.prefix}/acks/{user}",
                          request.model_dump_json(exclude_none=True).encode())

    def _silence_list(self, payload: bytes) -> None:
        try:
            doc = orjson.loads(payload)
            if not isinstance(doc, dict) or not isinstance(doc.get("silences"), list):
                raise ValueError("not the pipeline's silence list")
        except ValueError as exc:
            log.warning("not a silence list on %s/silence-list, skipped (%s)", self.prefix, exc)
            return
        self.silences = doc

    def publish_silence(self, user: str, spec: dict) -> None:
        """A silence made or ended by ``user``, on their own topic (the pipeline checks it)."""
        self.link.publish(f"{self.prefix}/silences/{user}", orjson.dumps(spec))

    def healthy(self) -> bool:
        return self.link.connected.is_set() and not self.failed

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.link.wait_published(5)
        self.link.stop()


class KafkaFeed:
    def __init__(self, store: Store, on_change: OnChange, kafka: Any, *, group: str) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        self.store, self.on_change = store, on_change
        names = kt.topic_names(kafka.prefix)
        self.acks_topic = names["acks"]
        self.topics = [names[f"alerts.{t}"] for t in kt.TIER_TOPICS] + [names["push"]]
        kt.ensure_topics(kafka, self.topics + [self.acks_topic])
        opts = kt.client_options(kafka)
        # No consumer group: the console reads every partition, and where it is in each is
        # kept in its own database, in the transaction that applied the records (a restart
        # goes on exactly after the last record it applied)
        self.consumer = KafkaConsumer(
            bootstrap_servers=kt.bootstrap_list(kafka.bootstrap), group_id=None, client_id=group,
            enable_auto_commit=False, auto_offset_reset="earliest", **opts)
        self.producer = KafkaProducer(bootstrap_servers=kt.bootstrap_list(kafka.bootstrap),
                                      client_id=group, acks="all", **opts)
        self.connected = True
        self.failed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-feed", daemon=True)

    def start(self, wait_s: float = 0.0) -> None:
        from kafka import TopicPartition

        deadline = time.monotonic() + max(wait_s, 15.0)
        tps = []
        for topic in self.topics:
            while not (parts := self.consumer.partitions_for_topic(topic)):
                if time.monotonic() > deadline:
                    raise ConnectionError(f"kafka: topic {topic} has no partitions")
                time.sleep(0.2)
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        done = self.store.offsets()
        for tp in tps:
            if (tp.topic, tp.partition) in done:
                self.consumer.seek(tp, done[tp.topic, tp.partition])
            else:
                self.consumer.seek_to_beginning(tp)
        self._thread.start()

    def _run(self) -> None:
        with _failing_loudly(self):
            self._apply_until_stopped()

    def _apply_until_stopped(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.consumer.poll(timeout_ms=200, max_records=1000)
            except Exception as exc:        # the broker away: kafka-python reconnects
                self.connected = False
                log.warning("kafka: %s; retrying", exc)
                time.sleep(1)
                continue
            self.connected = True
            if not got:
                continue
            docs = [d for tp, records in got.items() for r in records
                    if (d := _decoded("notice", tp.topic, r.value))]
            positions = {(tp.topic, tp.partition): records[-1].offset + 1
                         for tp, records in got.items() if records}
            changes = self.store.apply(docs, positions)
            if changes:
                self.on_change(changes)

    def publish_ack(self, user: str, request: AckRequest, ack: Ack) -> None:
        self.producer.send(self.acks_topic, key=ack.alert_id.encode(),
                           value=ack.model_dump_json(exclude_none=True).encode())
        self.producer.flush(10)

    def healthy(self) -> bool:
        return self.connected and not self.failed

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.consumer.close()
        self.producer.close(5)
