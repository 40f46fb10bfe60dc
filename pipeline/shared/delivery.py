"""Push delivery: each notice of a pushed tier reaches its recipient on each of their channels —
once, in time, and without holding anything else up.

    dispatcher = PushDispatcher(settings, registry)          # checks config and the registry
    dispatcher.start()                                       # resumes what the last run left
    dispatcher.submit(notices)                               # any notices; returns at once
    dispatcher.accept_token(token, worker_id=None) -> Ack    # an acknowledge link / MQTT reply
    dispatcher.timeline(alert_id); dispatcher.collect()
    dispatcher.close()

Recipient: the grid tier's notice names the on-call worker (chosen by the router at the notice's
time: on-shift grid worker, on-shift backup, the street's duty officer); the owner tier's, the
sensor's responsible party (registry `owners:`); other tiers, when `push.tiers` lists them, go
to their target (a street's or a department's group robot). Channels: the worker's or owner's
own `channels:` from the registry, else the tier's from `push.tiers`.

Each delivery is written to the outbox (pipeline/shared/push_store.py) under its idempotency key
(alert_id:state:seq:recipient:channel) before it is sent, then queued on its channel's lane: a
heap by due time and `push.concurrency` threads, so a slow or failing channel holds up only
itself, and the engine's loop never waits for any. A transient failure is tried again after
an exponential backoff with full jitter (a random wait up to min(cap, base·2^(n-1))); after
the last attempt, or a permanent failure, the delivery is a dead letter (`undeliverable`).
Every outcome is a receipt: on the alert's timeline and published to `{prefix}/receipts`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import orjson
from prometheus_client.core import CounterMetricFamily, Metric

from connectors.push import (
    Delivery,
    DingTalk,
    MqttPush,
    PermanentError,
    Recipient,
    Robots,
    Sms,
    TransientError,
    Webhook,
    WeCom,
)
from pipeline.core.ack_tokens import REASONS, REPLY_NOTE, AckClaim, AckTokens, BadToken
from pipeline.core.models import Ack, DeadLetter
from pipeline.core.notices import fmt_time, render
from pipeline.core.registry import Registry
from pipeline.shared.config import PERSONAL_TIERS, Settings
from pipeline.shared.metrics import counter, gauge
from pipeline.shared.push_store import DELIVERED, FAILED, PushStore
from rules.yamlfile import ConfigError

log = logging.getLogger("cityops.push")

ACKABLE = frozenset({"firing", "escalated", "reminder"})    # what a link may still acknowledge
PRUNE_EVERY_S = 3600


def _without_token(n: dict) -> dict:
    # a dead letter is read by operators: the token would let them acknowledge as the worker
    return {k: v for k, v in n.items() if k not in ("ack_url", "ack_token")}


def store_path(settings: Settings) -> Path:
    p = settings.state.path
    return settings.push.store or p.with_name(f"{p.stem}-push.sqlite")


class _Lane:
    """One channel's queue: deliveries ordered by when they are due, taken by its threads."""

    def __init__(self, name: str, send: Callable[[Delivery], None], threads: int,
                 attempt: Callable[[_Lane, Delivery], None]) -> None:
        self.name, self.send = name, send
        self._attempt = attempt
        self._heap: list[tuple[float, int, Delivery]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = 0
        self.threads = [threading.Thread(target=self._loop, name=f"push-{name}-{i}", daemon=True)
                        for i in range(threads)]

    def put(self, d: Delivery, due: float = 0.0) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._order), d))
            self._cond.notify()

    def depth(self) -> int:
        with self._cond:
            return len(self._heap) + self._busy

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    if wait is not None and wait <= 0:
                        d = heapq.heappop(self._heap)[2]
                        self._busy += 1
                        break
                    self._cond.wait(wait)
            try:
                self._attempt(self, d)
            finally:
                with self._cond:
                    self._busy -= 1


class PushDispatcher:
    def __init__(self, settings: Settings, registry: Registry, *,
                 publish: Callable[[str, bytes], None] | None = None,
                 broker: tuple[str, int, int] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``publish(suffix, payload)``: where receipts ("receipts") and dead letters
        ("deadletter") go, e.g. the Kafka topic `{prefix}.{suffix}`; default: this
        dispatcher's own MQTT connection, `{mqtt.prefix}/{suffix}`. ``broker``: (host, port,
        protocol 5|311) of that connection, default mqtt.url's."""
        cfg = settings.push
        if cfg.secret is None:
            raise ConfigError("push.secret", None, "set push.secret (CITYOPS_PUSH__SECRET): it "
                              "signs the acknowledge links")
        self.cfg, self.registry, self.clock = cfg, registry, clock
        self.tiers = {tier: tuple(chs) for tier, chs in cfg.tiers.items()}
        self.tokens = AckTokens(cfg.secret.get_secret_value().encode(), cfg.ack_ttl)
        self.public_url = cfg.public_url or (
            f"http://{settings.http.host}:{settings.http.port}" if settings.http.port else None)
        used = {c for chs in self.tiers.values() for c in chs}
        if "grid" in self.tiers:
            used |= self._check_people("worker", registry.workers.values(), registry)
        if "owner" in self.tiers:
            used |= self._check_people("owner", registry.owners.values(), registry)
        self.metrics: Counter[tuple[str, str]] = Counter()
        self._metrics_lock = threading.Lock()
        self._rng = random.Random()
        self._closed = False
        self._lock = threading.Lock()
        self._pruned = 0.0
        self.store = PushStore(store_path(settings))
        self._mqtt_settings, self._broker = settings.mqtt, broker
        self._needs_mqtt = "mqtt" in used or publish is None
        self.mqtt: MqttPush | None = None
        self._publish = publish or self._emit_mqtt
        self.lanes = {name: _Lane(name, self._channel(name), cfg.concurrency, self._attempt)
                      for name in sorted(used)}

    def _check_people(self, what: str, people, registry: Registry) -> set[str]:
        """The channels the registry's workers (or owners) name, each checked against the
        configuration: one that cannot send stops the start, naming whose it is."""
        used: set[str] = set()
        for p in people:
            for ch in p.channels:
                try:
                    self.cfg.check_channel(ch)
                except ValueError as exc:
                    raise ConfigError(registry.source, None, f"{what} {p.id}, channels: {exc}") from None
                if ch == "sms" and not p.phone:
                    raise ConfigError(registry.source, None, f"{what} {p.id} has the sms channel "
                                      "but no phone")
                used.add(ch)
        return used

    def _channel(self, name: str) -> Callable[[Delivery], None]:
        """The channel's send()."""
        cfg, timeout = self.cfg, self.cfg.timeout / 1000

        def secret(s) -> str | None:
            return s.get_secret_value() if s is not None else None

        def robots(r) -> Robots:
            return Robots(secret(r.url), {k: v.get_secret_value() for k, v in r.robots.items()})

        if name == "mqtt":
            return lambda d: self.mqtt.send(d)          # connected in start()
        if name == "webhook":
            return Webhook(secret(cfg.webhook.url), secret(cfg.webhook.secret).encode(), timeout,
                           self.clock).send
        if name == "wecom":
            return WeCom(robots(cfg.wecom), timeout).send
        if name == "dingtalk":
            return DingTalk(robots(cfg.dingtalk), secret(cfg.dingtalk.secret), timeout,
                            self.clock).send
        return Sms(secret(cfg.sms.url), secret(cfg.sms.token), cfg.sms.template, timeout,
                   cfg.sms.owner_template, render=render).send

    # ---- life cycle -------------------------------------------------------------------
    def start(self, broker: tuple[str, int, int] | None = None) -> None:
        """``broker``: as in the constructor, when only known now (an embedded broker's port)."""
        if self._needs_mqtt:
            m = self._mqtt_settings
            host, port, protocol = broker or self._broker or (m.host, m.port, m.protocol)
            self.mqtt = MqttPush(host, port, client_id=f"{m.client_id}-push", prefix=m.prefix,
                                 protocol=protocol, username=m.username,
                                 password=m.password.get_secret_value() if m.password else None,
                                 timeout_s=self.cfg.timeout / 1000)
            self.mqtt.start()
        for d in self.store.pending():        # handed over before the last stop, not finished
            lane = self.lanes.get(d.channel)
            if lane is None:
                self._finish(d, FAILED, d.attempt - 1, f"channel {d.channel} is no longer configured")
            else:
                lane.put(d)
        for lane in self.lanes.values():
            for t in lane.threads:
                t.start()
        self._prune()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking deliveries; an attempt under way has ``timeout`` to finish. What is left
        stays in the outbox and goes out at the next start."""
        if self._closed:
            return
        for lane in self.lanes.values():
            lane.stop()
        deadline = time.monotonic() + timeout
        for lane in self.lanes.values():
            for t in lane.threads:
                if t.is_alive():
                    t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closed = True
            self.store.close()
        if self.mqtt is not None:
            self.mqtt.close(max(0.0, deadline - time.monotonic()))

    # ---- in ------------------------------------------------------------------------------
    def owns(self, notice: dict) -> bool:
        """True when this dispatcher, not the runtime, publishes the notice on MQTT: a worker's
        (or an owner's) push topic is one of the push channels, with a receipt and at most one
        copy."""
        return notice["tier"] in PERSONAL_TIERS and notice["tier"] in self.tiers

    def submit(self, notices: list[dict]) -> None:
        """Record the notices on their timelines and queue their deliveries; a notice seen
        before (the same alert_id, state and seq) is not delivered again. Never waits for a
        channel."""
        if not notices:
            return
        now = self._now_ms()
        deliveries = []
        for n in notices:
            channels = self.tiers.get(n["tier"])
            if channels is None:
                continue
            recipient, channels = self._recipient(n, channels)
            pushed = self._with_ack(n, recipient, now)
            for ch in channels:
                key = f"{n['alert_id']}:{n['state']}:{n['seq']}:{recipient.id}:{ch}"
                deliveries.append(Delivery(key, ch, recipient, pushed))
        new = self.store.record(notices, deliveries, now)
        self._count(("duplicates", ""), len(deliveries) - len(new))
        for d in new:
            self.lanes[d.channel].put(d)
        if time.monotonic() - self._pruned > PRUNE_EVERY_S:
            self._prune()

    def _recipient(self, n: dict, channels: tuple[str, ...]) -> tuple[Recipient, tuple[str, ...]]:
        if n["tier"] == "grid":
            w = self.registry.workers.get(n["target"])
            if w is not None:
                return Recipient(w.id, w.name, w.phone), w.channels or channels
            return Recipient(n["target"], n.get("worker_name") or n["target"]), channels
        if n["tier"] == "owner":
            o = self.registry.owners.get(n["target"])
            if o is not None:
                return Recipient(o.id, o.contact or o.name, o.phone), o.channels or channels
            return Recipient(n["target"], n["target"]), channels
        name = {"street": n.get("street_name"), "district": n.get("district_name"),
                "dept": self.registry.departments.get(n["target"]),
                "city": self.registry.city_name, "community": n.get("community_name")}.get(n["tier"])
        return Recipient(n["target"], name or n["target"]), channels

    def _with_ack(self, n: dict, r: Recipient, now: int) -> dict:
        if n["state"] not in ACKABLE:
            return n
        token = self.tokens.issue(n["alert_id"], n["tier"], r.id, n["seq"], now)
        url = f"{self.public_url}/ack?t={token}" if self.public_url else None
        return {**n, "ack_url": url, "ack_token": token}

    def verify_token(self, token: str, worker_id: str | None = None) -> AckClaim:
        """What a token from a link or an MQTT reply claims; BadToken (and counted) if it is
        malformed, forged, expired or, with ``worker_id``, someone else's."""
        try:
            return self.tokens.verify(token, self._now_ms(), worker_id)
        except BadToken as exc:
            self._count(("tokens", exc.reason))
            raise

    def firing_over(self, claim: AckClaim) -> dict | None:
        """The `resolved` notice that ended the firing a link came with, if this process saw
        it (the engine refuses such a link's ack in any case; this is for the page)."""
        for e in self.timeline(claim.alert_id):
            if e["event"] == "notice" and e["state"] == "resolved" and e["seq"] > claim.seq:
                return e
        return None

    def accept_token(self, token: str, worker_id: str | None = None, state: str | None = None,
                     note: str | None = None, to: str | None = None) -> Ack:
        """The acknowledgement a good token stands for, made now (see verify_token); with
        ``state``, the handling state the recipient's reply says (pipeline/core/handling.py)."""
        c = self.verify_token(token, worker_id)
        self._count(("tokens", "accepted"))
        return c.ack(self._now_ms(), note or (REPLY_NOTE if worker_id else
                                              "the push's acknowledge link"), state, to)

    # ---- out ------------------------------------------------------------------------------
    def _attempt(self, lane: _Lane, d: Delivery) -> None:
        self._count(("attempts", d.channel))
        try:
            lane.send(d)
        except PermanentError as exc:
            self._finish(d, FAILED, d.attempt, str(exc))
        except Exception as exc:        # TransientError, or a surprise: both worth a retry
            detail = str(exc) if isinstance(exc, TransientError) else f"{exc.__class__.__name__}: {exc}"
            if not isinstance(exc, TransientError):
                log.exception("push: the %s channel failed unexpectedly", d.channel)
            if d.attempt >= self.cfg.attempts:
                self._finish(d, FAILED, d.attempt, detail)
            else:
                self._retry(lane, d, detail)
        else:
            self._finish(d, DELIVERED, d.attempt, None)

    def _retry(self, lane: _Lane, d: Delivery, detail: str) -> None:
        cfg = self.cfg
        wait_ms = self._rng.uniform(0, min(cfg.backoff_cap, cfg.backoff * 2 ** (d.attempt - 1)))
        with self._lock:
            if self._closed:
                return
            self.store.attempted(d.key, d.attempt, detail, self._now_ms())
        self._count(("retries", d.channel))
        lane.put(replace(d, attempt=d.attempt + 1), time.monotonic() + wait_ms / 1000)

    def _finish(self, d: Delivery, outcome: str, attempts: int, detail: str | None) -> None:
        now = self._now_ms()
        with self._lock:       # after close() the delivery stays pending: sent at the next start
            if self._closed:
                return
            self.store.finish(d.key, outcome, attempts, detail, now)
        n = d.notice
        receipt = {"alert_id": n["alert_id"], "state": n["state"], "seq": n["seq"],
                   "tier": n["tier"], "recipient": d.recipient.id, "channel": d.channel,
                   "key": d.key, "outcome": outcome, "attempts": attempts, "detail": detail,
                   "at": fmt_time(now, self.registry.tz)}
        self._count((outcome, d.channel))
        self._emit("receipts", orjson.dumps(receipt))
        if outcome == FAILED:
            log.warning("push %s to %s by %s failed after %d attempt(s): %s", n["alert_id"],
                        d.recipient.id, d.channel, attempts, detail)
            dead = DeadLetter(reason="undeliverable", detail=f"{d.channel} to {d.recipient.id}: "
                              f"{detail} (after {attempts} attempt(s))",
                              payload=orjson.dumps(_without_token(n)).decode(),
                              source=f"push/{d.channel}")
            self._count(("dead", "undeliverable"))
            self._emit("deadletter", dead.model_dump_json().encode())

    def _emit_mqtt(self, suffix: str, body: bytes) -> None:
        assert self.mqtt is not None
        self.mqtt.emit(f"{self._mqtt_settings.prefix}/{suffix}", body)

    def _emit(self, suffix: str, body: bytes) -> None:
        try:
            self._publish(suffix, body)
        except Exception:      # the outbox has the outcome; a lost receipt must not stop a lane
            log.exception("push: could not publish to %s", suffix)

    # ---- operability ------------------------------------------------------------------------
    def timeline(self, alert_id: str) -> list[dict]:
        with self._lock:
            return [] if self._closed else self.store.timeline(alert_id)

    def collect(self) -> Iterator[Metric]:
        """For /metrics (pipeline/shared/metrics.py)."""
        with self._metrics_lock:
            m = dict(self.metrics)
        done = CounterMetricFamily("cityops_push_deliveries_total", "Pushes finished, by channel "
                                   "and outcome.", labels=["channel", "outcome"])
        for ch in self.lanes:
            for outcome in (DELIVERED, FAILED):
                done.add_metric([ch, outcome], m.get((outcome, ch), 0))
        yield done
        for name, what in (("attempts", "Push attempts made"),
                           ("retries", "Push attempts that failed and will be tried again")):
            yield counter(f"cityops_push_{name}_total", f"{what}, by channel.",
                          {ch: m.get((name, ch), 0) for ch in self.lanes}, "channel")
        yield gauge("cityops_push_queue_depth", "Pushes waiting or under way, by channel.",
                    {ch: lane.depth() for ch, lane in self.lanes.items()}, "channel")
        yield counter("cityops_push_duplicates_total", "Deliveries handed over again, not sent "
                      "twice.", m.get(("duplicates", ""), 0))
        yield counter("cityops_push_dead_letters_total", "Pushes given up (dead letters).",
                      {"undeliverable": m.get(("dead", "undeliverable"), 0)}, "reason")
        yield counter("cityops_push_ack_tokens_total", "Acknowledge tokens presented, by outcome.",
                      {o: m.get(("tokens", o), 0) for o in ("accepted", *REASONS)}, "outcome")

    def _count(self, key: tuple[str, str], n: int = 1) -> None:
        if n:
            with self._metrics_lock:
                self.metrics[key] += n

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _prune(self) -> None:
        self._pruned = time.monotonic()
        with self._lock:
            if not self._closed:
                self.store.prune(self._now_ms() - self.cfg.keep)
