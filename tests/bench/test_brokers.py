"""The real-Mosquitto fixtures work: paho and the command-line clients both ways, persistent
sessions (MQTT 5 and 3.1.1) across disconnects and broker restarts, deep offline queues."""

from __future__ import annotations


import pytest

from bench.harness.brokers import (
    TEST_CONFIG,
    CliSubscriber,
    Mosquitto,
    MosquittoMissing,
    Subscriber,
    mosquitto_pub,
    mosquitto_sub,
    publish,
    publish_many,
    require_binary,
)
from tests.support import settle, wait_until

pytestmark = pytest.mark.broker

PERSISTENT = [
    pytest.param({"protocol": 5, "clean_start": False, "session_expiry": 3600}, id="mqtt5"),
    pytest.param({"protocol": 311, "clean_start": False}, id="mqtt311"),
]


def test_fixture_broker_is_private(mosquitto: Mosquitto) -> None:
    assert mosquitto.running
    assert mosquitto.host == "127.0.0.1"
    assert mosquitto.port not in (1883, 8883)
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    conf = mosquitto.conf_path.read_text()
    assert f"listener {mosquitto.port} 127.0.0.1" in conf
    assert "max_queued_messages 1000000" in conf


def test_paho_publish_reaches_paho_subscriber(mosquitto: Mosquitto) -> None:
    payloads = [b'{"sensor_id": "gas-510104-000001", "value": 27.5}', bytes(range(256)),
                "燃气泄漏".encode(), b"x" * 200_000]
    with Subscriber(mosquitto.url, "t/paho/#") as sub:
        assert sub.granted == [1]
        for i, p in enumerate(payloads):
            assert publish(mosquitto.url, f"t/paho/{i}", p) == 0   # PUBACK: success
        got = sub.wait_count(len(payloads))
    assert got == [(f"t/paho/{i}", p) for i, p in enumerate(payloads)]


def test_publish_reports_no_subscribers(mosquitto: Mosquitto) -> None:
    assert publish(mosquitto.url, "t/nobody/listens", b"1") == 16   # MQTT 5 reason code


def test_cli_pub_reaches_cli_sub(mosquitto: Mosquitto) -> None:
    with CliSubscriber(mosquitto.url, "t/cli/#", count=2, timeout=10) as sub:
        mosquitto_pub(mosquitto.url, "t/cli/a", "hello")
        mosquitto_pub(mosquitto.url, "t/cli/b", "成都 1")
    assert sub.lines() == ["t/cli/a hello", "t/cli/b 成都 1"]


def test_blocking_mosquitto_sub_reads_retained(mosquitto: Mosquitto) -> None:
    mosquitto_pub(mosquitto.url, "t/retained/x", "kept", retain=True)
    assert mosquitto_sub(mosquitto.url, "t/retained/#", 1, 5) == ["t/retained/x kept"]
    assert mosquitto_sub(mosquitto.url, "t/none/#", 1, 1) == []          # -W ran out


def test_paho_and_cli_interoperate(mosquitto: Mosquitto) -> None:
    with CliSubscriber(mosquitto.url, "t/mixed/to-cli", count=1, timeout=10) as cli:
        assert publish(mosquitto.url, "t/mixed/to-cli", b"from paho") == 0
    assert cli.lines() == ["t/mixed/to-cli from paho"]
    with Subscriber(mosquitto.url, "t/mixed/to-paho") as sub:
        mosquitto_pub(mosquitto.url, "t/mixed/to-paho", "from mosquitto_pub", protocol=5)
        assert sub.wait_count(1) == [("t/mixed/to-paho", b"from mosquitto_pub")]


@pytest.mark.parametrize("session", PERSISTENT)
def test_persistent_session_gets_what_was_published_while_away(
        mosquitto: Mosquitto, session: dict) -> None:
    cid = f"persist-{session['protocol']}"
    Subscriber(mosquitto.url, "t/away/#", client_id=cid, **session).start().close()
    for i in range(3):
        assert publish(mosquitto.url, f"t/away/{i}", f"m{i}".encode()) == 0
    with Subscriber(mosquitto.url, "t/away/#", client_id=cid, **session) as sub:
        assert sub.session_present
        got = sub.wait_count(3)
        assert settle(sub, quiet=0.2) == got        # and nothing more
    assert got == [(f"t/away/{i}", f"m{i}".encode()) for i in range(3)]


def test_mqtt5_session_without_expiry_ends_at_disconnect(mosquitto: Mosquitto) -> None:
    """MQTT 5: clean_start=False alone keeps nothing (session expiry 0 = end at disconnect)."""
    Subscriber(mosquitto.url, "t/noexp/#", client_id="noexp", clean_start=False).start().close()
    publish(mosquitto.url, "t/noexp/1", b"lost")
    with Subscriber(mosquitto.url, "t/noexp/#", client_id="noexp", clean_start=False) as sub:
        assert sub.session_present is False
        assert settle(sub, quiet=0.5) == []


@pytest.mark.parametrize("session", PERSISTENT)
def test_queued_messages_survive_broker_restart(mosquitto_factory, session: dict) -> None:
    broker = mosquitto_factory()
    port = broker.port
    Subscriber(broker.url, "t/restart/#", client_id="rs", **session).start().close()
    for i in range(5):
        assert publish(broker.url, f"t/restart/{i}", f"before-{i}".encode()) == 0
    broker.restart()                          # SIGTERM: the DB is written at shutdown
    assert broker.port == port and broker.db_path.exists()
    assert publish(broker.url, "t/restart/5", b"after") == 0
    with Subscriber(broker.url, "t/restart/#", client_id="rs", **session) as sub:
        assert sub.session_present
        got = sub.wait_count(6)
    assert [p for _, p in got] == [f"before-{i}".encode() for i in range(5)] + [b"after"]


def test_queued_messages_survive_a_crash_after_autosave(mosquitto_factory) -> None:
    broker = mosquitto_factory()
    session = {"clean_start": False, "session_expiry": 3600}
    Subscriber(broker.url, "t/crash/#", client_id="crash", **session).start().close()
    assert publish(broker.url, "t/crash/1", b"saved") == 0
    saves = broker.log().count("Saving in-memory database")
    wait_until(lambda: broker.log().count("Saving in-memory database") >= saves + 2, 10,
               "two autosaves (1 s) after the publish")
    broker.restart(hard=True)                         # SIGKILL: only the autosave survives
    with Subscriber(broker.url, "t/crash/#", client_id="crash", **session) as sub:
        assert sub.wait_count(1) == [("t/crash/1", b"saved")]


@pytest.mark.parametrize("n", [500, 2500])
def test_deep_offline_queue_is_delivered_whole(mosquitto_factory, n: int) -> None:
    """500 as the runtime's restart case; 2,500 is past 2.0's default limit of 1,000, and
    across a restart."""
    broker = mosquitto_factory()
    session = {"clean_start": False, "session_expiry": 3600}
    Subscriber(broker.url, "t/deep/#", client_id="deep", **session).start().close()
    msgs = [(f"t/deep/{i % 7}", str(i).encode()) for i in range(n)]
    assert set(publish_many(broker.url, msgs)) == {0}
    if n > 1000:
        broker.restart()
    with Subscriber(broker.url, "t/deep/#", client_id="deep", **session) as sub:
        got = sub.wait_count(n, timeout=30)
        assert len(settle(sub, quiet=0.3)) == n
    assert got == msgs


def test_default_queue_limit_drops_silently(mosquitto_factory) -> None:
    """Why TEST_CONFIG (and deploy/mosquitto) raise max_queued_messages: with mosquitto's
    default an offline session keeps 1,000 and the rest are dropped, PUBACK success and all."""
    default = TEST_CONFIG.replace("max_queued_messages 1000000", "")
    broker = mosquitto_factory(config=default)
    session = {"clean_start": False, "session_expiry": 3600}
    Subscriber(broker.url, "t/drop/#", client_id="drop", **session).start().close()
    assert set(publish_many(broker.url, [("t/drop/x", str(i).encode())
                                         for i in range(1200)])) == {0}
    with Subscriber(broker.url, "t/drop/#", client_id="drop", **session) as sub:
        sub.wait_count(1000)
        assert len(settle(sub, quiet=0.5)) == 1000
    assert "Outgoing messages are being dropped for client drop" in broker.log()


def test_connected_subscriber_follows_a_restart(mosquitto_factory) -> None:
    broker = mosquitto_factory()
    with Subscriber(broker.url, "t/follow/#") as sub:
        broker.restart()
        wait_until(lambda: publish(broker.url, "t/follow/x", b"again") == 0, 10,
                   "a publish to the restarted broker to go through", interval=0.1)
        assert sub.wait_count(1)[0] == ("t/follow/x", b"again")


def test_missing_binary_says_run_make_test() -> None:
    with pytest.raises(MosquittoMissing, match="make test"):
        require_binary("mosquitto-not-installed-here")
