"""MQTT in and out with paho-mqtt 2.x: the pipeline's one connection to the broker.

In: readings (`{prefix}/readings/+`, gateway batches `{prefix}/gateways/+`) and acks
(`{prefix}/acks`), QoS 1 on a persistent session, so the broker keeps what arrives while the
pipeline is away. Messages are acknowledged *manually*, only after the runtime has journaled
them: a crash before that makes the broker deliver them again.

Who runs paho's network loop: for a consumer that takes batches (`cityops run`, the bridge) the
consumer's own thread does, inside `take()` (`own_loop=True`): no second thread fights it for the
GIL, a message costs no queue lock, and acknowledgements and notices are written to the socket
at once. That drains a backlog about twice as fast as paho's background thread (README,
"Performance"). Links that only publish, or take from a thread of their own (the console's
feeds, the worker's mirror, the simulator), keep paho's background thread.

Out: notices and dead letters at QoS 1. paho keeps unacknowledged publishes and sends them again
after a reconnect; the runtime waits for them before it takes a snapshot.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger("cityops.mqtt")


def resolve(host: str, port: int) -> None:
    """ConnectionError naming DNS when ``host`` has no address: paho would retry it quietly
    until a timeout that blames the broker."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectionError(f"cannot resolve the MQTT broker's host {host!r} (DNS: "
                              f"{exc.strerror}); check the name in the broker URL") from None


_UNSUPPORTED = "it refused MQTT 5 (unsupported protocol version)"
# amqtt may close an MQTT 5 CONNECT that carries properties without a CONNACK
_DROPPED = "it closed the connection before answering"


def sender_of(topic: str, prefix: str) -> tuple[str, str] | None:
    """Who a readings topic says sent a payload: ("gateway", id) or ("sensor", id). The
    broker's ACL ties a gateway's login to `{prefix}/gateways/{its id}` (deploy/mosquitto/acl),
    so the topic vouches for the sender."""
    head, _, name = topic.rpartition("/")
    if head == f"{prefix}/gateways":
        return ("gateway", name)
    if head == f"{prefix}/readings":
        return ("sensor", name)
    return None


@dataclass(frozen=True, slots=True)
class Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int


class MqttLink:
    def __init__(self, host: str, port: int, *, client_id: str, prefix: str, protocol: int = 5,
                 username: str | None = None, password: str | None = None,
                 shared_group: str | None = None, keepalive: int = 30,
                 session_expiry_s: int = 7 * 86_400, max_inflight: int = 1000,
                 own_loop: bool = False) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.own_loop = own_loop
        self.protocol = protocol
        self.keepalive = keepalive
        self.session_expiry_s = session_expiry_s
        self.max_inflight = max_inflight
        share = f"$share/{shared_group}/" if shared_group else ""
        # `#`, not `+`: a reading published one level too deep must reach us to be
        # dead-lettered (`wrong_topic`) rather than vanish in the broker
        self.topics = [f"{share}{prefix}/readings/#", f"{share}{prefix}/gateways/#", f"{prefix}/acks"]
        self.retired = [f"{share}{prefix}/readings/+", f"{share}{prefix}/gateways/+"]
        self.retained_skipped = 0
        # queue.Queue, not SimpleQueue: on CPython 3.11 SimpleQueue.get(timeout=...) can sleep
        # past its timeout when a signal arrives, and SIGTERM would wait for the next message
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self._ready: list[Inbound] = []        # own_loop: the inbox, touched by one thread only
        self._retry_at = 0.0                   # own_loop: when to try the broker again ...
        self._backoff = 1.0                    # ... and the wait after that (paho's 1-10 s)
        self.connected = threading.Event()
        self.refused: str | None = None        # why the broker refused our CONNECT, if it did
        self._answered = threading.Event()     # CONNACK came: accepted or refused
        self.stopping = False
        self.connects = 0
        # mids handed to paho and not yet acknowledged by the broker. Tracked by on_publish,
        # not MQTTMessageInfo.is_published(), which raises for a message published while
        # disconnected although paho keeps it and sends it on reconnect.
        self._pending: set[int] = set()
        self._early: set[int] = set()        # acknowledged before publish() returned its mid
        self._sent_lock = threading.Lock()
        version = MQTTProtocolVersion.MQTTv5 if protocol == 5 else MQTTProtocolVersion.MQTTv311
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=version, manual_ack=True,
                                  clean_session=None if protocol == 5 else False)
        if username:
            self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)           # never drop a notice while away
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    # ---- lifecycle --------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> None:
        kw = {}
        if self.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            props.ReceiveMaximum = min(self.max_inflight, 65535)
            kw = {"clean_start": False, "properties": props}
        resolve(self.host, self.port)
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive, **kw)
        if self.own_loop:
            deadline = time.monotonic() + timeout
            while not self._answered.is_set() and time.monotonic() < deadline:
                self.pump(0.05)
        else:
            self.client.loop_start()
        if not self._answered.wait(0 if self.own_loop else timeout):
            listening = self.client.socket() is not None
            self._halt()
            if listening and self.protocol == 5:
                raise ConnectionError(
                    f"{self.host}:{self.port} took the connection but did not answer MQTT 5 "
                    f"within {timeout:.0f}s; for a broker that speaks only 3.1.1, such as the "
                    "one `cityops run` embeds, set mqtt.protocol: 311 (CITYOPS_MQTT__PROTOCOL=311)")
            raise ConnectionError(f"no MQTT broker answered at {self.host}:{self.port} within "
                                  f"{timeout:.0f}s; start one or leave mqtt.url unset for the "
                                  "embedded broker")
        if self.refused is not None:
            self.stop()
            where = f"the MQTT broker at {self.host}:{self.port}"
            if self.protocol == 5 and self.refused in (_UNSUPPORTED, _DROPPED):
                raise ConnectionError(f"{where}: {self.refused}; if it speaks only MQTT 3.1.1, as "
                                      "the broker `cityops run` embeds does, set mqtt.protocol: "
                                      "311 (CITYOPS_MQTT__PROTOCOL=311)")
            raise ConnectionError(f"{where}: {self.refused}")

    def stop(self) -> None:
        self.stopping = True
        self.client.disconnect()
        self._halt()

    def _halt(self) -> None:
        if self.own_loop:
            self.client.loop_write()          # the DISCONNECT, if the socket still takes it
            sock = self.client.socket()
            if sock is not None:
                sock.close()
        else:
            self.client.loop_stop()

    # ---- own_loop: paho's network loop on the caller's thread --------------------------
    def pump(self, timeout: float, max_packets: int = 1000) -> None:
        """One turn of the network loop: (re)connect when due, wait up to ``timeout`` for the
        socket, read what is there (up to ``max_packets`` packets), write what is queued, and
        keep the connection alive. paho's `loop()` reads one packet per select(); a backlog
        wants many."""
        c = self.client
        sock = c.socket()
        if sock is None:
            if self.stopping:
                return
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, timeout))
                return
            try:
                c.reconnect()
            except OSError:
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, 10.0)
                self._on_connect_fail(c, None)
                return
            sock = c.socket()
            if sock is None:
                return
        try:
            readable, writable, _ = select.select([sock], [sock] if c.want_write() else [], [],
                                                  timeout)
        except (OSError, ValueError):         # closed under us: loop_misc notices
            readable = writable = []
        if readable:
            ready = self._ready
            for _ in range(max_packets):
                before = len(ready)
                if c.loop_read() != paho.MQTT_ERR_SUCCESS or c.socket() is None:
                    break
                if len(ready) == before and not select.select([sock], [], [], 0)[0]:
                    break                     # nothing more buffered (or a PUBACK, then empty)
        if writable or c.want_write():
            c.loop_write()
        c.loop_misc()
        if c.socket() is None and not self.stopping:   # lost: paho's backoff, from now
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 10.0)

    # ---- paho callbacks (network thread: nothing but bookkeeping here) ----------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if self.connects:                 # a reconnect; at start, start() says it
                log.error("broker refused the connection: %s", reason_code)
            self._refused(_UNSUPPORTED if str(reason_code) == "Unsupported protocol version"
                          else f"it refused the connection ({reason_code})")
            return
        self.connects += 1
        self._backoff = 1.0
        if flags.session_present and self.retired:
            client.unsubscribe(self.retired)      # a session of an older version: no doubles
        if self.topics and self.protocol == 5:
            client.subscribe([(t, SubscribeOptions(qos=1)) for t in self.topics])
        elif self.topics:
            client.subscribe([(t, 1) for t in self.topics])
        self.connected.set()
        self._answered.set()
        log.info("connected to %s:%s (session present: %s)", self.host, self.port,
                 flags.session_present)

    def _refused(self, why: str) -> None:
        if not self._answered.is_set():       # at start: start() says why and stops
            self.refused = why
            self._answered.set()

    def _on_connect_fail(self, client, userdata) -> None:
        self._refused("nothing answers there (connection refused or unreachable); start the "
                      "broker, or leave mqtt.url unset for the embedded one")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._refused(_DROPPED)
        self.connected.clear()
        if not self.stopping and self.connects:
            log.warning("lost the broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        if msg.retain:
            # The broker replaying a retained message to a new subscription, on every
            # (re)connect: a reading is an event, not a state, and this one was taken (or
            # dead-lettered) when it was published. Counted, never evaluated again.
            self.retained_skipped += 1
            if msg.qos:
                client.ack(msg.mid, msg.qos)
            return
        if self.own_loop:
            self._ready.append(Inbound(msg.topic, msg.payload, msg.mid, msg.qos))
        else:
            self.inbox.put(Inbound(msg.topic, msg.payload, msg.mid, msg.qos))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._sent_lock:
            if mid in self._pending:
                self._pending.discard(mid)
            else:
                self._early.add(mid)

    # ---- in ----------------------------------------------------------------------------
    def take(self, max_n: int, max_wait_s: float) -> list[Inbound]:
        """Up to ``max_n`` messages: waits up to ``max_wait_s`` for the first, then takes what
        is there (a batch fills itself under load and costs no latency when quiet)."""
        if self.own_loop:
            return self._take_own(max_n, max_wait_s)
        try:
            first = self.inbox.get(timeout=max_wait_s)
        except queue.Empty:
            return []
        batch = [first]
        get = self.inbox.get_nowait
        while len(batch) < max_n:
            try:
                batch.append(get())
            except queue.Empty:
                break
        return batch

    def _take_own(self, max_n: int, max_wait_s: float) -> list[Inbound]:
        deadline = time.monotonic() + max_wait_s
        self.pump(0)
        while not self._ready and not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.pump(min(left, 0.1))         # 0.1: a stop request is seen that soon
        batch, self._ready = self._ready[:max_n], self._ready[max_n:]
        return batch

    def depth(self) -> int:
        """Messages received and not yet taken."""
        return len(self._ready) if self.own_loop else self.inbox.qsize()

    def ack(self, messages: list[Inbound]) -> None:
        for m in messages:
            if m.qos > 0:
                self.client.ack(m.mid, m.qos)

    # ---- out ---------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._sent_lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self._pending.add(info.mid)

    def unpublished(self) -> int:
        with self._sent_lock:
            return len(self._pending)

    def wait_published(self, timeout: float) -> bool:
        """True once the broker has every notice we handed to paho."""
        deadline = time.monotonic() + timeout
        while self.unpublished():
            if time.monotonic() >= deadline:
                return False
            if self.own_loop:
                self.pump(0.01)               # the broker's PUBACKs come in through our loop
            else:
                time.sleep(0.01)
        return True
