"""The site's owner is pushed (issue 16), end to end: `cityops run` with push on, a real
Mosquitto, and the far end of the SMS channel a real HTTP server (tests/push_endpoints.py).

A construction-site AI camera publishes `no_helmet` through its gateway. The project's
responsible party (registry `owners:` site-510108-wannianchang, 李工) gets one SMS at the
site's number with the message written for the owner and the acknowledge link — exactly once:
the gateway's first answer is a 500 (retried with backoff, the same idempotency key), and
`cityops run` killed (-9) and started again replays its journal without sending it again.
The owner's link then acknowledges the incident as the owner, and every tier told — street,
grid worker, owner — is told `acknowledged` by the owner.
"""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.harness.brokers import Mosquitto, Subscriber, free_port, publish
from pipeline.core.models import AlertNotice
from pipeline.shared.config import SmsPushSettings
from tests.push_endpoints import Endpoints
from tests.support import Running, http, of, settle, start_run, stop_run

pytestmark = pytest.mark.broker

SECRET = "owner-ack-secret-for-the-e2e-tests-0123"
GATEWAY = "cityops/gateways/gw-510108-site01"
CAMERA = "cam-510108-000001"
OWNER, OWNER_PHONE = "site-510108-wannianchang", "13900000001"
TIERS = '{"grid": ["mqtt"], "owner": ["sms"]}'


def violation(event: str = "no_helmet") -> bytes:
    return json.dumps([{"sensor_id": CAMERA, "ts": int(time.time() * 1000),
                        "event": event}]).encode()


def texts(ep: Endpoints) -> list[dict]:
    """The SMS gateway's requests, as {"phone", "text", "idempotency_key"} with the header."""
    return [{**r.json, "header": r.headers["idempotency-key"]} for r in ep.received("/sms")]


def test_a_no_helmet_event_reaches_the_owner_by_sms_once_across_a_retry_and_a_restart(
        mosquitto: Mosquitto, tmp_path: Path, endpoints: Endpoints, sub: Subscriber) -> None:
    endpoints.answer("/sms", 500)                    # the gateway fails once, then takes it
    client_id = f"cityops-owner-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {"CITYOPS_PUSH__ENABLED": "true", "CITYOPS_PUSH__SECRET": SECRET,
           "CITYOPS_PUSH__TIERS": TIERS, "CITYOPS_PUSH__SMS__URL": endpoints.url("/sms"),
           "CITYOPS_PUSH__BACKOFF": "20ms", "CITYOPS_PUSH__BACKOFF_CAP": "100ms",
           "CITYOPS_HTTP__PORT": str(port), "CITYOPS_MQTT__CLIENT_ID": client_id,
           "CITYOPS_STATE__SNAPSHOT_EVERY": "1h"}      # the journal, not a snapshot, holds it
    proc = start_run(tmp_path, mosquitto, env, 1)
    try:
        publish(mosquitto.url, GATEWAY, violation())
        got = sub.wait_for(lambda m: any(r["tier"] == "owner" for r in of(m, "receipts"))
                           and of(m, "cityops/alerts/street/"))     # two connections: any order
        [receipt] = [r for r in of(got, "receipts") if r["tier"] == "owner"]
        assert receipt == {**receipt, "recipient": OWNER, "channel": "sms",
                           "outcome": "delivered", "attempts": 2}
        [street] = [n for n in of(got, "cityops/alerts/street/")]
        aid = street["alert_id"]
        assert receipt["key"] == f"{aid}:firing:1:{OWNER}:sms"

        sent = texts(endpoints)
        assert len(sent) == 2                        # the 500, then the one delivered
        assert {(s["phone"], s["idempotency_key"], s["header"]) for s in sent} == \
            {(OWNER_PHONE, receipt["key"], receipt["key"])}
        text = sent[1]["text"]
        assert text.startswith("【蓝色预警】成华区双桥子街道万年场社区工地违规：未佩戴安全帽。"
                               "成华区万年场安置房项目负责人李工：")
        assert "成都市成华区双桥路35号 成华区万年场安置房项目工地 1号摄像头，工地AI摄像头报告“未佩戴安全帽”" in text
        assert "请立即整改“未佩戴安全帽”，整改完毕后点击链接确认整改。确认整改：" \
               f"http://127.0.0.1:{port}/ack?t=" in text
        # the owner's notice is a push: not published on a tier topic by the runtime as well
        assert not [t for t, _ in sub.messages if t.startswith(f"cityops/push/{OWNER}")]

        stop_run(proc, signal.SIGKILL)
        proc = start_run(tmp_path, mosquitto, env, 2)
        streets = lambda m: [n for n in of(m, "cityops/alerts/street/") if n["alert_id"] == aid]
        sub.wait_for(lambda m: len(streets(m)) == 2)  # the replay made the notices again ...
        settle(sub)
        assert len(texts(endpoints)) == 2            # ... the owner was not texted again
        metrics = http(f"http://127.0.0.1:{port}/metrics")[2]
        assert re.search(r"^cityops_push_duplicates_total [1-9]", metrics, re.M), metrics
        assert 'cityops_notices_total{tier="owner"}' in metrics
    finally:
        stop_run(proc, signal.SIGTERM)
        assert proc.returncode in (0, -signal.SIGKILL)
        Subscriber(mosquitto.url, "cityops/test/purge", client_id=client_id).start(3).close()


@pytest.fixture
def running(mosquitto: Mosquitto, tmp_path: Path, endpoints: Endpoints) -> Iterator[Running]:
    r = Running(mosquitto, tmp_path, tiers=json.loads(TIERS),
                sms=SmsPushSettings(url=endpoints.url("/sms")))
    yield r
    r.close()


def test_the_owners_link_acknowledges_as_the_owner_for_every_tier(
        mosquitto: Mosquitto, running: Running, endpoints: Endpoints, sub: Subscriber) -> None:
    publish(mosquitto.url, GATEWAY, violation("fence_missing"))      # yellow: the district too
    endpoints.wait_for(lambda r: len(r) >= 1)
    [sms] = texts(endpoints)
    link = re.search(r"(http://\S+/ack\?t=(\S+))$", sms["text"])
    assert link, sms["text"]
    url, token = link[1], link[2]

    code, _, page = http(url)                         # opening it acknowledges nothing
    assert code == 200 and "确认整改</button>" in page
    code, _, page = http(url.split("?")[0], f"t={token}".encode())
    assert code == 200 and "已确认" in page

    def told(state: str) -> Callable[[list], list[dict]]:
        return lambda m: [n for n in of(m, "cityops/alerts/") + of(m, "cityops/push/")
                          if n["sensor_id"] == CAMERA and n["state"] == state]

    firing = {"street", "grid", "district"}          # and the owner, by SMS
    sub.wait_for(lambda m: {n["tier"] for n in told("firing")(m)} == firing)
    got = sub.wait_for(lambda m: {n["tier"] for n in told("acknowledged")(m)} == firing)
    for n in told("acknowledged")(got):
        AlertNotice.model_validate(n)
        assert (n["acked_by"], n["acked_tier"]) == (OWNER, "owner")
    owner_texts = endpoints.wait_for(lambda r: len(r) >= 2)
    acked = json.loads(owner_texts[1].body)
    assert ":acknowledged:" in acked["idempotency_key"] and acked["phone"] == OWNER_PHONE
    assert acked["text"].startswith("【黄色预警·已确认】")
    assert acked["text"].endswith("整改完毕后点击链接确认整改。")    # no link: nothing to confirm
