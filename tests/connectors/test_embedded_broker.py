"""The embedded amqtt broker (connectors/embedded_broker.py) with a real paho-mqtt 2.x client."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.harness.brokers import free_port
from connectors.embedded_broker import EmbeddedBroker

WAIT = 10.0


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker("127.0.0.1", free_port())
    b.start()
    try:
        yield b
    finally:
        b.stop()


class Client:
    """A paho 2.x client (callback API 2, MQTT 3.1.1) that records what happens to it."""

    def __init__(self, port: int, client_id: str = "", clean_session: bool = True,
                 protocol: int = mqtt.MQTTv311) -> None:
        self.port = port
        kw = {} if protocol == mqtt.MQTTv5 else {"clean_session": clean_session}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kw)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.got_message = threading.Event()
        self.disconnected = threading.Event()
        self.connack: tuple | None = None
        self.granted: list = []
        self.messages: list[mqtt.MQTTMessage] = []
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = lambda *a: self.disconnected.set()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = (flags.session_present, reason_code)
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.granted = list(reason_codes)
        self.subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:
        self.messages.append(msg)
        self.got_message.set()

    def connect(self) -> Client:
        self.c.connect("127.0.0.1", self.port, keepalive=30)
        self.c.loop_start()
        assert self.connected.wait(WAIT), "no CONNACK from the embedded broker"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.c.subscribe(topic, qos=qos)
        assert self.subscribed.wait(WAIT), "no SUBACK"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_url_and_a_qos1_round_trip_then_stop() -> None:
    port = free_port()
    b = EmbeddedBroker(port=port)
    assert b.url == f"mqtt://127.0.0.1:{port}"
    b.start()
    sub = pub = None
    try:
        sub = Client(port).connect()
        assert sub.connack is not None and not sub.connack[1].is_failure
        sub.subscribe("cityops/readings/#", qos=1)
        assert [rc.value for rc in sub.granted] == [1]            # granted QoS 1
        pub = Client(port).connect()
        payload = b'{"sensor_id": "gas-510104-000001", "ts": 1782885780000, "value": 27.5}'
        info = pub.c.publish("cityops/readings/gas-510104-000001", payload, qos=1)
        info.wait_for_publish(WAIT)
        assert info.is_published()                                  # PUBACK came back
        assert sub.got_message.wait(WAIT)
        msg = sub.messages[0]
        assert (msg.topic, msg.payload, msg.qos) == ("cityops/readings/gas-510104-000001", payload, 1)
    finally:
        for c in (sub, pub):
            if c is not None:
                c.close()
        b.stop()
    assert not b.running
    assert port_is_free(port)                     # the listener is closed
    b.stop()                                      # a second stop is harmless


def test_stop_disconnects_connected_clients() -> None:
    b = EmbeddedBroker(port=free_port())
    b.start()
    c = Client(b.port).connect()
    try:
        b.stop()
        assert c.disconnected.wait(WAIT)
    finally:
        c.c.loop_stop()


def test_persistent_session_keeps_subscription_and_queues_qos1(broker: EmbeddedBroker) -> None:
    sub = Client(broker.port, client_id="cityops-runtime-1", clean_session=False).connect()
    assert sub.connack[0] is False                                  # a new session
    sub.subscribe("cityops/alerts/#", qos=1)
    sub.close()
    pub = Client(broker.port).connect()
    try:
        pub.c.publish("cityops/alerts/city", b"while you were away", qos=1).wait_for_publish(WAIT)
        again = Client(broker.port, client_id="cityops-runtime-1", clean_session=False).connect()
        try:
            assert again.connack[0] is True                         # session present
            assert again.got_message.wait(WAIT), "the queued QoS 1 message was not delivered"
            assert again.messages[0].payload == b"while you were away"
            assert again.messages[0].qos == 1
            # and the subscription itself survived: no new SUBSCRIBE needed
            again.got_message.clear()
            pub.c.publish("cityops/alerts/district/510104", b"live", qos=1).wait_for_publish(WAIT)
            assert again.got_message.wait(WAIT)
            assert again.messages[-1].payload == b"live"
        finally:
            again.close()
    finally:
        pub.close()


def test_second_broker_on_the_same_port_fails_clearly(broker: EmbeddedBroker) -> None:
    second = EmbeddedBroker("127.0.0.1", broker.port)
    with pytest.raises(RuntimeError, match=rf"127\.0\.0\.1:{broker.port} is already in use"):
        second.start()
    assert not second.running
    c = Client(broker.port).connect()                               # the first one is unharmed
    c.close()


def test_port_zero_reports_the_port_it_got() -> None:
    b = EmbeddedBroker(port=0)
    b.start()
    try:
        assert b.port != 0 and b.url == f"mqtt://127.0.0.1:{b.port}"
        Client(b.port).connect().close()
    finally:
        b.stop()


def test_mqtt5_clients_are_refused(broker: EmbeddedBroker) -> None:
    """amqtt is MQTT 3.1.1 only: an MQTT 5 CONNECT gets 'unsupported protocol version'."""
    c = Client(broker.port, protocol=mqtt.MQTTv5)
    c.c.reconnect_delay_set(5, 5)
    try:
        c.connect()
        assert c.connack[1].is_failure
        assert "protocol version" in str(c.connack[1]).lower()
    finally:
        c.close()
