"""Push delivery (pipeline/shared/delivery.py): the right worker, each channel once, retries, dead
letters, receipts — against a local HTTP server and a real Mosquitto.

A small registry of its own: one micro-grid with a day worker (08:00-20:00, webhook) whose
backup works the evening (20:00-23:00, DingTalk), a night worker across midnight (22:00-06:00,
WeCom and MQTT) and the street's duty officer (SMS). Incidents come from the real engine and
rules at chosen local times, so the router picks the worker by grid and shift; the dispatcher
must deliver each notice to that worker on each of their channels exactly once — despite
retries, the same notices handed over twice, and a restart on the same outbox.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from pipeline.shared.config import (
    HttpSettings,
    MqttSettings,
    PushSettings,
    RobotPushSettings,
    Settings,
    SmsPushSettings,
    StateSettings,
    WebhookPushSettings,
)
from bench.harness.brokers import Mosquitto, Subscriber
from pipeline.core.engine import Engine
from pipeline.core.models import AlertNotice, DeadLetter
from pipeline.core.registry import Registry
from pipeline.core.registry import load as load_registry
from pipeline.shared.delivery import PushDispatcher
from pipeline.shared.metrics import text as exposition
from rules.compiler import load_rules
from tests.push_endpoints import Endpoints
from tests.support import settle_count

pytestmark = pytest.mark.broker

TZ = ZoneInfo("Asia/Shanghai")
GRID, STREET = "510104020001001", "510104020"
SECRET = "ack-secret-for-tests-0123456789abcdef"
HOOK_SECRET = "webhook-secret-0123456789"

REGISTRY = f"""
city: {{code: "510100", name: 成都市}}
timezone: Asia/Shanghai
departments:
  - {{id: gas, name: 市燃气安全监管分中心, categories: [gas]}}
districts:
  - code: "510104"
    name: 锦江区
    streets:
      - code: "{STREET}"
        name: 春熙路街道
        duty_officer: w-duty
        communities:
          - code: "510104020001"
            name: 和平社区
            grids:
              - {{code: "{GRID}", name: 和平社区第1微网格}}
workers:
  - {{id: w-day, name: 张敏, phone: "13800000001", grids: ["{GRID}"], shift: "08:00-20:00",
     backup: w-evening, channels: [webhook]}}
  - {{id: w-night, name: 罗川, phone: "13800000002", grids: ["{GRID}"], shift: "22:00-06:00",
     channels: [wecom, mqtt]}}
  - {{id: w-evening, name: 高春燕, phone: "13800000003", shift: "20:00-23:00", channels: [dingtalk]}}
  - {{id: w-duty, name: 曹家豪, phone: "13800000007", shift: "00:00-24:00", channels: [sms]}}
"""
SENSORS = "sensor_id,kind,grid,gateway_id,lat,lon,address,building,owner,owner_contact,attrs\n" + "".join(
    f"gas-t-{i},gas_household,{GRID},gw-t-1,30.65,104.08,成都市锦江区和平街{i}号,b{i},,,\n"
    for i in range(1, 8))

# (sensor, local time) -> who is on call then, and by which channels
ON_CALL = [
    ("gas-t-1", "2026-07-01T10:00", "w-day", {"webhook"}),           # the grid's day worker
    ("gas-t-2", "2026-07-01T21:00", "w-evening", {"dingtalk"}),      # both off: day's backup
    ("gas-t-3", "2026-07-01T23:30", "w-night", {"wecom", "mqtt"}),   # night shift, before ...
    ("gas-t-4", "2026-07-02T01:30", "w-night", {"wecom", "mqtt"}),   # ... and after midnight
    ("gas-t-5", "2026-07-02T06:30", "w-duty", {"sms"}),              # nobody: duty officer
]
PATHS = {"webhook": "/webhook", "wecom": "/wecom", "dingtalk": "/dingtalk", "sms": "/sms"}


def ms(local: str) -> int:
    return int(datetime.fromisoformat(local).replace(tzinfo=TZ).timestamp() * 1000)


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, object]:
    d = tmp_path_factory.mktemp("registry")
    (d / "registry.yaml").write_text(REGISTRY)
    (d / "sensors.csv").write_text(SENSORS)
    rules = load_rules().select(["gas.leak"])
    return load_registry(d, rules.kinds), rules


def incidents(city: tuple[Registry, object], cases: list[tuple[str, str, str, set[str]]]
              ) -> list[dict]:
    """The engine's notices for a 30 %LEL reading (yellow) of each sensor at its local time
    (an engine each: one would also remind and escalate the earlier ones as time passes)."""
    registry, rules = city
    out = []
    for sensor, local, _, _ in cases:
        out += Engine(registry, rules).ingest([json.dumps({"sensor_id": sensor, "ts": ms(local),
                                                           "value": 30.0}).encode()]).notices
    return out


class Harness:
    """Settings for a dispatcher on the module's Mosquitto and the local endpoints, each test
    on its own topic prefix and outbox; every dispatcher made is closed at the end."""

    def __init__(self, tmp: Path, broker: Mosquitto, ep: Endpoints, city) -> None:
        self.tmp, self.broker, self.ep, self.registry = tmp, broker, ep, city[0]
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.made: list[PushDispatcher] = []

    def settings(self, **push: object) -> Settings:
        ep = self.ep
        cfg = {"enabled": True, "secret": SECRET, "public_url": "https://ops.example.cn/cityops",
               "attempts": 3, "backoff": "20ms", "backoff_cap": "100ms", "timeout": "5s",
               "webhook": WebhookPushSettings(url=ep.url("/webhook"), secret=HOOK_SECRET),
               "wecom": RobotPushSettings(url=ep.url("/wecom?key=k1")),
               "dingtalk": RobotPushSettings(url=ep.url("/dingtalk?access_token=t1"),
                                             secret="SECdingtalk"),
               "sms": SmsPushSettings(url=ep.url("/sms"), token="gw-token"), **push}
        return Settings(mqtt=MqttSettings(url=self.broker.url, prefix=self.prefix,
                                          client_id=f"cityops-{self.prefix}"),
                        http=HttpSettings(port=0),
                        state=StateSettings(path=self.tmp / "state.sqlite"),
                        push=PushSettings(**cfg))

    def dispatcher(self, **push: object) -> PushDispatcher:
        d = PushDispatcher(self.settings(**push), self.registry)
        self.made.append(d)
        d.start()
        return d

    def subscriber(self, *suffixes: str) -> Subscriber:
        return Subscriber(self.broker.url, *(f"{self.prefix}/{s}" for s in suffixes)).start()

    def close(self) -> None:
        for d in self.made:
            d.close(2.0)


@pytest.fixture
def harness(tmp_path: Path, mosquitto: Mosquitto, endpoints: Endpoints, city) -> Iterator[Harness]:
    h = Harness(tmp_path, mosquitto, endpoints, city)
    yield h
    h.close()


def receipts(msgs: list[tuple[str, bytes]]) -> list[dict]:
    return [json.loads(p) for t, p in msgs if t.endswith("/receipts")]


def pushes(ep: Endpoints, sub: Subscriber, prefix: str) -> list[tuple[str, str, str]]:
    """Every push that reached a far end: (channel, worker id, alert id). Over HTTP they are
    read from the Idempotency-Key (alert_id:state:seq:recipient:channel)."""
    out = []
    for r in ep.received():
        key = r.headers["idempotency-key"].split(":")
        assert key[4] == r.path.strip("/"), key
        out.append((key[4], key[3], key[0]))
    for topic, payload in sub.messages:
        if topic.startswith(f"{prefix}/push/"):
            n = json.loads(payload)
            out.append(("mqtt", topic.rsplit("/", 1)[1], n["alert_id"]))
    return out


# ---- who gets it ---------------------------------------------------------------------------

def test_the_on_call_worker_gets_each_notice_once_on_each_channel(harness: Harness, city) -> None:
    notices = incidents(city, ON_CALL)
    grid = [n for n in notices if n["tier"] == "grid"]
    assert len(grid) == len(ON_CALL)
    want = {}
    for (sensor, _, worker, channels), n in zip(ON_CALL, grid, strict=True):
        assert n["sensor_id"] == sensor
        want[n["alert_id"]] = (worker, channels)
    total = sum(len(c) for _, c in want.values())
    ep = harness.ep
    sub = harness.subscriber("push/+", "receipts")
    d = harness.dispatcher()
    d.submit(notices)
    sub.wait_for(lambda m: len(receipts(m)) >= total)
    got = pushes(ep, sub, harness.prefix)
    assert sorted(got) == sorted((c, w, aid) for aid, (w, cs) in want.items() for c in cs)
    assert all(r["outcome"] == "delivered" and r["attempts"] == 1 for r in receipts(sub.messages))

    # what each far end saw names the place, the reading, the worker and the link
    night = next(r for r in ep.received("/wecom"))
    text = night.json["markdown"]["content"]
    assert "和平社区第1微网格" in text and "**30%LEL**" in text and "接收人：罗川" in text
    assert "[确认接单](https://ops.example.cn/cityops/ack?t=" in text
    [evening] = ep.received("/dingtalk")
    assert evening.json["at"]["atMobiles"] == ["13800000003"]
    [duty] = ep.received("/sms")
    assert duty.json["phone"] == "13800000007" and "曹家豪" in duty.json["text"]
    mqtt = [AlertNotice.model_validate_json(p) for t, p in sub.messages if "/push/" in t]
    assert {m.worker_id for m in mqtt} == {"w-night"} and len(mqtt) == 2
    for m in mqtt:
        claim = d.verify_token(m.ack_token)
        assert (claim.alert_id, claim.tier, claim.worker_id) == (m.alert_id, "grid", "w-night")
        assert m.ack_url == f"https://ops.example.cn/cityops/ack?t={m.ack_token}"

    # the same notices again (a redelivery, a journal replay): nothing more goes out
    d.submit(notices)
    settle_count(lambda: len(ep.received()) + len(sub.messages))
    assert len(pushes(ep, sub, harness.prefix)) == total
    d.close()

    # ... nor after a restart on the same outbox
    again = harness.dispatcher()
    again.submit(notices)
    settle_count(lambda: len(ep.received()) + len(sub.messages))
    assert len(pushes(ep, sub, harness.prefix)) == total
    metrics = exposition(again)
    assert f"cityops_push_duplicates_total {total}" in metrics
    sub.close()


def test_other_tiers_reach_their_group_robot(harness: Harness, city) -> None:
    """`push.tiers` may send a street's notices to the street's own WeCom group."""
    notices = incidents(city, ON_CALL[:1])
    ep = harness.ep
    d = harness.dispatcher(tiers={"grid": ["mqtt"], "street": ["wecom"]},
                           wecom=RobotPushSettings(robots={STREET: ep.url("/street-robot?key=s")}))
    d.submit(notices)
    ep.wait_for(lambda reqs: any(r.path == "/street-robot" for r in reqs))
    [req] = ep.received("/street-robot")
    text = req.json["markdown"]["content"]
    assert "接收人：春熙路街道" in text
    token = text.split("/ack?t=")[1].split(")")[0]
    claim = d.verify_token(token)
    assert (claim.tier, claim.worker_id) == ("street", STREET)


# ---- retries, dead letters, receipts --------------------------------------------------------

def test_500_then_200_delivers_once_with_two_attempts(harness: Harness, city) -> None:
    ep = harness.ep
    ep.answer("/webhook", 500)
    [n] = [n for n in incidents(city, ON_CALL[:1]) if n["tier"] == "grid"]
    sub = harness.subscriber("receipts", "deadletter")
    d = harness.dispatcher()
    d.submit([n])
    [receipt] = receipts(sub.wait_for(lambda m: receipts(m)))
    first, second = ep.received("/webhook")
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"] == receipt["key"]
    assert (first.json["attempt"], second.json["attempt"]) == (1, 2)
    assert receipt == {**receipt, "outcome": "delivered", "attempts": 2, "channel": "webhook",
                       "recipient": "w-day", "alert_id": n["alert_id"], "state": "firing"}
    settle_count(lambda: len(ep.received()))
    assert len(ep.received()) == 2 and not [t for t, _ in sub.messages if t.endswith("deadletter")]
    timeline = d.timeline(n["alert_id"])
    assert [e["event"] for e in timeline] == ["notice", "receipt"]
    assert timeline[1] == {**timeline[1], "outcome": "delivered", "attempts": 2,
                           "channel": "webhook", "recipient": "w-day"}
    metrics = exposition(d)
    assert 'cityops_push_attempts_total{channel="webhook"} 2' in metrics
    assert 'cityops_push_retries_total{channel="webhook"} 1' in metrics
    assert 'cityops_push_deliveries_total{channel="webhook",outcome="delivered"} 1' in metrics
    sub.close()


@pytest.mark.parametrize(("answers", "attempts", "detail"), [
    ((500, 502, 503), 3, "HTTP 503 (after 3 attempt(s))"),     # the last try fails
    ((400,), 1, "HTTP 400 (after 1 attempt(s))"),              # no use trying again
])
def test_a_push_that_cannot_be_delivered_is_a_dead_letter(harness: Harness, city, answers,
                                                          attempts: int, detail: str) -> None:
    ep = harness.ep
    ep.answer("/webhook", *answers)
    [n] = [n for n in incidents(city, ON_CALL[:1]) if n["tier"] == "grid"]
    sub = harness.subscriber("receipts", "deadletter")
    d = harness.dispatcher()
    d.submit([n])
    got = sub.wait_for(lambda m: receipts(m) and any(t.endswith("deadletter") for t, _ in m))
    [receipt] = receipts(got)
    assert (receipt["outcome"], receipt["attempts"]) == ("failed", attempts)
    [dead] = [DeadLetter.model_validate_json(p) for t, p in got if t.endswith("deadletter")]
    assert dead.reason == "undeliverable" and dead.source == "push/webhook"
    assert dead.detail == f"webhook to w-day: {detail}"
    payload = json.loads(dead.payload)
    assert payload["alert_id"] == n["alert_id"]
    assert "ack_token" not in payload and "ack_url" not in payload   # operators read dead letters
    settle_count(lambda: len(ep.received()))
    assert len(ep.received("/webhook")) == attempts
    assert 'cityops_push_dead_letters_total{reason="undeliverable"} 1.0' in exposition(d).splitlines()
    sub.close()


def test_a_slow_channel_holds_up_only_itself(harness: Harness, city) -> None:
    ep = harness.ep
    gate = ep.hold("/webhook")                  # the webhook's server does not answer yet
    notices = [n for n in incidents(city, [ON_CALL[0], ON_CALL[4]]) if n["tier"] == "grid"]
    sub = harness.subscriber("receipts")
    d = harness.dispatcher()
    d.submit(notices)                           # returns although the webhook hangs
    ep.wait_for(lambda reqs: any(r.path == "/webhook" for r in reqs))
    [sms] = receipts(sub.wait_for(lambda m: receipts(m)))       # while the webhook still hangs
    assert (sms["channel"], sms["outcome"]) == ("sms", "delivered")
    assert 'cityops_push_queue_depth{channel="webhook"} 1.0' in exposition(d).splitlines()
    gate.set()
    got = receipts(sub.wait_for(lambda m: len(receipts(m)) >= 2))
    assert {(r["channel"], r["outcome"]) for r in got} == {("sms", "delivered"),
                                                           ("webhook", "delivered")}
    sub.close()


def test_a_restart_sends_what_was_left_once(harness: Harness, city) -> None:
    ep = harness.ep
    ep.answer("/webhook", 503)
    [n] = [n for n in incidents(city, ON_CALL[:1]) if n["tier"] == "grid"]
    first = harness.dispatcher(backoff="1h", backoff_cap="1h")   # the retry is far off
    first.submit([n])
    ep.wait_for(lambda r: len(r) >= 1)
    pending = lambda: [e for e in first.timeline(n["alert_id"]) if e["event"] == "pending"]
    settle_count(lambda: pending()[0]["attempts"])
    assert pending()[0]["attempts"] == 1 and pending()[0]["detail"] == "HTTP 503"
    first.close()

    sub = harness.subscriber("receipts")
    second = harness.dispatcher()
    second.submit([n])                          # the replayed notice: already in the outbox
    [receipt] = receipts(sub.wait_for(lambda m: receipts(m)))
    assert (receipt["outcome"], receipt["attempts"]) == ("delivered", 2)
    settle_count(lambda: len(ep.received()))
    assert [r.json["attempt"] for r in ep.received("/webhook")] == [1, 2]
    sub.close()
