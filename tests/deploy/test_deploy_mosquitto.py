"""deploy/mosquitto does what it says: a real mosquitto started with the production config and
ACL (listener and file paths swapped for a temp dir and a free port; users made with
mosquitto_passwd -b) refuses anonymous clients and keeps every account to its own topics: each
account's allowed and refused topics, read and write, with real clients."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest

from bench.harness.brokers import (
    CliSubscriber,
    Mosquitto,
    MqttRefused,
    Subscriber,
    mosquitto_pub,
    mosquitto_sub,
    publish,
)
from tests.support import DEPLOY, NOT_AUTHORIZED, deploy_broker

pytestmark = pytest.mark.broker

PASSWORDS = {
    "cityops": "pipeline-secret",
    "gw-510104-0001": "gw1-secret",
    "gw-510104-0002": "gw2-secret",
    "dashboard-city": "dash-secret",
    "w-510104020001-01": "w1-secret",
    "w-510104020001-02": "w2-secret",
    "cityops-monitor": "monitor-secret",
    "duty-510104": "duty-secret",          # an acknowledging user of the pipeline's acks.users
    "cityops-console": "console-secret",   # the web console: acknowledges as its users
}
NO_SUBSCRIBERS = 16
READING = b'{"sensor_id": "gas-510104-000001", "ts": 1782885780000, "value": 27.5}'


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = deploy_broker(tmp_path_factory.mktemp("deploy-mosquitto"), PASSWORDS,
                      (DEPLOY / "acl").read_text())
    yield b
    b.stop()


def as_user(user: str) -> dict[str, str]:
    return {"username": user, "password": PASSWORDS[user]}


@pytest.fixture
def pipeline(broker: Mosquitto):
    """The pipeline's subscriptions, as the cityops account."""
    with Subscriber(broker.url, "cityops/gateways/#", "cityops/readings/#", "cityops/acks/+",
                    **as_user("cityops")) as sub:
        assert sub.granted == [1, 1, 1]
        yield sub


def delivered_before(sub: Subscriber, publish_sentinel: Callable[[], object],
                     sentinel: tuple[str, bytes]) -> list[tuple[str, bytes]]:
    """Publish a sentinel the subscriber may receive and wait for it: whatever else the broker
    was going to deliver from earlier publishes has arrived by then (one broker, in order)."""
    publish_sentinel()
    got = sub.wait_for(lambda m: sentinel in m)
    return got[:got.index(sentinel)]


def test_config_is_the_production_one() -> None:
    conf = (DEPLOY / "mosquitto.conf").read_text()
    for line in ("allow_anonymous false", "persistence true", "max_inflight_messages 1000",
                 "max_queued_messages 1000000", "listener 1883 ", "#listener 8883"):
        assert re.search(rf"(?m)^{re.escape(line)}", conf), line
    assert not re.search(r"(?m)^listener 1883 0\.0\.0\.0", conf)
    assert not re.search(r"(?m)^persistent_client_expiration .*[hm]$", conf)


def test_anonymous_is_refused(broker: Mosquitto) -> None:
    with pytest.raises(MqttRefused) as e:
        Subscriber(broker.url, "cityops/#").start()
    assert e.value.code == NOT_AUTHORIZED
    with pytest.raises(MqttRefused):
        publish(broker.url, "cityops/gateways/gw-510104-0001", READING, protocol=311)
    with pytest.raises(RuntimeError, match="not authori[sz]ed"):
        mosquitto_sub(broker.url, "cityops/#", 1, 2)
    with pytest.raises(RuntimeError, match="not authori[sz]ed"):
        mosquitto_pub(broker.url, "cityops/gateways/gw-510104-0001", READING)


def test_wrong_password_is_refused(broker: Mosquitto) -> None:
    with pytest.raises(MqttRefused) as e:
        Subscriber(broker.url, "cityops/alerts/#", username="dashboard-city",
                   password="guess").start()
    assert e.value.code in (134, 135)      # bad user name or password / not authorized


def test_gateway_publishes_to_its_own_topic_only(broker: Mosquitto, pipeline: Subscriber) -> None:
    own, other = "cityops/gateways/gw-510104-0001", "cityops/gateways/gw-510104-0002"
    gw1 = as_user("gw-510104-0001")
    assert publish(broker.url, own, READING, **gw1) == 0
    assert publish(broker.url, other, b"[forged]", **gw1) == NOT_AUTHORIZED
    mosquitto_pub(broker.url, other, "[forged by cli]", **gw1)      # 3.1.1: acked, dropped
    for topic in ("cityops/readings/gas-510104-000001", "cityops/acks",
                  "cityops/alerts/city", "cityops/push/w-510104020001-01"):
        assert publish(broker.url, topic, b"forged", **gw1) == NOT_AUTHORIZED, topic
    got = delivered_before(pipeline, lambda: publish(broker.url, other, b"sentinel",
                                                      **as_user("gw-510104-0002")),
                           (other, b"sentinel"))
    assert got == [(own, READING)]


def test_dashboard_reads_alerts_not_readings(broker: Mosquitto) -> None:
    dash = as_user("dashboard-city")
    with Subscriber(broker.url, "cityops/alerts/#", "cityops/readings/#", "cityops/gateways/#",
                    **dash) as sub:
        # mosquitto 2.0 grants every SUBSCRIBE; the ACL is applied to each message delivered
        assert sub.granted == [1, 1, 1]
        publish(broker.url, "cityops/gateways/gw-510104-0001", READING, **as_user("gw-510104-0001"))
        alert = '{"alert_id": "a1", "tier": "city", "title": "燃气泄漏报警"}'.encode()
        assert publish(broker.url, "cityops/alerts/city", alert, **as_user("cityops")) == 0
        assert publish(broker.url, "cityops/alerts/city", b"forged", **dash) == NOT_AUTHORIZED
        got = sub.wait_count(1)
    assert got == [("cityops/alerts/city", alert)]

    # the command-line client too, subscribed to everything: only the alert comes through
    with CliSubscriber(broker.url, "cityops/#", count=1, timeout=10, **dash) as cli:
        publish(broker.url, "cityops/gateways/gw-510104-0001", READING, **as_user("gw-510104-0001"))
        publish(broker.url, "cityops/alerts/district/510104", b"district alert",
                **as_user("cityops"))
    assert cli.lines() == ["cityops/alerts/district/510104 district alert"]


def test_grid_worker_reads_own_pushes_and_acks_as_itself(broker: Mosquitto,
                                                          pipeline: Subscriber) -> None:
    w1 = as_user("w-510104020001-01")
    mine, theirs = "cityops/push/w-510104020001-01", "cityops/push/w-510104020001-02"
    with Subscriber(broker.url, mine, theirs, "cityops/alerts/#", **w1) as sub:
        for topic in (theirs, "cityops/alerts/street/510104020", mine):
            assert publish(broker.url, topic, topic.encode(), **as_user("cityops")) == 0
        got = sub.wait_for(lambda m: any(t == mine for t, _ in m))
        assert got == [(mine, mine.encode())]
    ack = b'{"alert_id": "a1", "ts": 1782885900000}'
    assert publish(broker.url, "cityops/acks/w-510104020001-01", ack, **w1) == 0
    assert pipeline.wait_for(lambda m: ("cityops/acks/w-510104020001-01", ack) in m)
    for forged in ("cityops/acks/w-510104020001-02", "cityops/acks", "cityops/alerts/city"):
        assert publish(broker.url, forged, b"forged", **w1) == NOT_AUTHORIZED, forged


# Every account against every topic it might try. Writes: the topics each account may publish
# to ({me} is its own username); every other one is refused with reason code 135.
ME = "{me}"
WRITE_TOPICS = [
    "cityops/gateways/gw-510104-0001", f"cityops/gateways/{ME}",
    "cityops/readings/gas-510104-000001", "cityops/acks", f"cityops/acks/{ME}",
    "cityops/acks/w-510104020001-02", "cityops/alerts/city", "cityops/alerts/district/510104",
    "cityops/push/w-510104020001-01", f"cityops/push/{ME}/ack",
    "cityops/push/w-510104020001-02/ack", "cityops/deadletter", "cityops/receipts",
]
OWN = {f"cityops/acks/{ME}", f"cityops/push/{ME}/ack"}      # every account: its own topics
MAY_WRITE = {
    "cityops": OWN | {"cityops/alerts/city", "cityops/alerts/district/510104",
                      "cityops/push/w-510104020001-01", "cityops/push/w-510104020001-02/ack",
                      "cityops/deadletter", "cityops/receipts"},
    "gw-510104-0001": OWN | {"cityops/gateways/gw-510104-0001", f"cityops/gateways/{ME}"},
    "gw-510104-0002": OWN | {f"cityops/gateways/{ME}"},
    "dashboard-city": OWN,
    "w-510104020001-01": OWN | {"cityops/push/w-510104020001-01/ack"},
    "w-510104020001-02": OWN | {"cityops/acks/w-510104020001-02",
                                "cityops/push/w-510104020001-02/ack"},
    "cityops-monitor": OWN,
    "duty-510104": OWN,
    "cityops-console": OWN | {"cityops/acks/w-510104020001-02"},
}


@pytest.mark.parametrize("account", sorted(PASSWORDS))
def test_what_each_account_may_write(broker: Mosquitto, account: str) -> None:
    allowed = {t.replace(ME, account) for t in MAY_WRITE[account]}
    for topic in dict.fromkeys(t.replace(ME, account) for t in WRITE_TOPICS):
        rc = publish(broker.url, topic, b"x", **as_user(account))
        # taken: 0, or 16 "no matching subscribers"; refused: 135
        want = (0, NO_SUBSCRIBERS) if topic in allowed else (NOT_AUTHORIZED,)
        assert rc in want, (account, topic, rc)


# Reads: what each account's subscription to everything receives when every topic carries a
# message from its rightful writer.
SOURCES = [
    ("gw-510104-0001", "cityops/gateways/gw-510104-0001"),
    ("cityops", "cityops/alerts/city"),
    ("cityops", "cityops/alerts/street/510104020"),
    ("cityops", "cityops/push/w-510104020001-01"),
    ("cityops", "cityops/push/w-510104020001-02"),
    ("w-510104020001-01", "cityops/acks/w-510104020001-01"),
    ("w-510104020001-01", "cityops/push/w-510104020001-01/ack"),
    ("cityops", "cityops/deadletter"),
    ("cityops", "cityops/receipts"),
]
MAY_READ = {
    "cityops": {"cityops/gateways/gw-510104-0001", "cityops/acks/w-510104020001-01",
                "cityops/push/w-510104020001-01/ack"},
    "gw-510104-0001": set(),
    "gw-510104-0002": set(),
    "dashboard-city": {"cityops/alerts/city", "cityops/alerts/street/510104020"},
    "w-510104020001-01": {"cityops/push/w-510104020001-01"},
    "w-510104020001-02": {"cityops/push/w-510104020001-02"},
    "cityops-monitor": {"cityops/deadletter", "cityops/receipts"},
    "duty-510104": set(),
    "cityops-console": {"cityops/alerts/city", "cityops/alerts/street/510104020",
                        "cityops/push/w-510104020001-01", "cityops/push/w-510104020001-02",
                        "cityops/receipts",
                        "cityops/push/cityops"},    # every push: the sentinel of `cityops` too
}


def test_what_each_account_may_read(broker: Mosquitto) -> None:
    subs = {a: Subscriber(broker.url, "#", **as_user(a)).start() for a in sorted(PASSWORDS)}
    try:
        for writer, topic in SOURCES:
            assert publish(broker.url, topic, topic.encode(), **as_user(writer)) == 0, topic
        for account, sub in subs.items():
            # its own push topic (every account may read it) closes what it was going to get
            sentinel = (f"cityops/push/{account}", b"sentinel")
            got = delivered_before(sub, lambda: publish(broker.url, *sentinel,
                                                        **as_user("cityops")), sentinel)
            assert {t for t, _ in got} == MAY_READ[account], account
    finally:
        for sub in subs.values():
            sub.close()


def test_only_the_monitor_reads_broker_statistics(broker: Mosquitto) -> None:
    """$SYS/broker/version is retained: a subscriber allowed to read it gets it at once."""
    with Subscriber(broker.url, "$SYS/broker/version", **as_user("cityops-monitor")) as sub:
        assert sub.wait_count(1)[0][0] == "$SYS/broker/version"
    for account in ("cityops", "dashboard-city", "gw-510104-0001"):
        with Subscriber(broker.url, "$SYS/broker/version", f"cityops/push/{account}",
                        **as_user(account)) as sub:
            sentinel = (f"cityops/push/{account}", b"sentinel")
            assert delivered_before(sub, lambda: publish(broker.url, *sentinel,
                                                         **as_user("cityops")), sentinel) == []


def test_gateway_blocks_are_the_registry_acl() -> None:
    """The deploy ACL's gateway blocks are what `cityops registry acl` writes for the fixture."""
    import subprocess
    import sys
    acl = (DEPLOY / "acl").read_text()
    blocks = re.findall(r"(?m)^user (gw-\S+)\ntopic write (\S+)$", acl)
    assert blocks, "the deploy ACL should show its gateway blocks"
    generated = subprocess.run([sys.executable, "-m", "pipeline.cli", "registry", "acl"],
                               capture_output=True, text=True, check=True).stdout
    for user, topic in blocks:
        assert f"user {user}\ntopic write {topic}\n" in generated
    assert not re.search(r"(?m)^pattern write cityops/(gateways|readings)/", acl)


def test_pipeline_shared_subscription(broker: Mosquitto) -> None:
    """The pipeline may split readings over processes with an MQTT 5 shared subscription."""
    with Subscriber(broker.url, "$share/cityops/cityops/gateways/#", **as_user("cityops")) as sub:
        assert sub.granted == [1]
        assert publish(broker.url, "cityops/gateways/gw-510104-0002", READING,
                       **as_user("gw-510104-0002")) == 0
        assert sub.wait_count(1) == [("cityops/gateways/gw-510104-0002", READING)]


def test_full_size_gateway_batch_passes_the_broker(broker: Mosquitto, pipeline: Subscriber) -> None:
    """A payload right at the pipeline's 256 KiB limit must reach the pipeline (which decides),
    not be cut off by max_packet_size."""
    from pipeline.core.wire import MAX_PAYLOAD_BYTES
    topic = "cityops/gateways/gw-510104-0001"
    big = b"[" + b" " * (MAX_PAYLOAD_BYTES - 2) + b"]"
    assert publish(broker.url, topic, big, **as_user("gw-510104-0001")) == 0
    assert pipeline.wait_for(lambda m: (topic, big) in m)


def test_oversize_packet_disconnects_the_sender(broker: Mosquitto) -> None:
    with pytest.raises(ConnectionError, match="closed the connection"):
        publish(broker.url, "cityops/gateways/gw-510104-0001", b"x" * 300_000,
                **as_user("gw-510104-0001"))
    assert "disconnected due to oversize packet" in broker.log()
