"""The push channels (connectors/push.py) against a local HTTP server and a real Mosquitto.

What each far end receives: the webhook's JSON with an HMAC signature over timestamp and body
and an Idempotency-Key; the WeCom and DingTalk robots' markdown (place, reading against
threshold, severity colour, acknowledge link; DingTalk's @-mention and signed query); the SMS
gateway's phone and text; the MQTT push on the worker's topic, once. And how answers are read:
5xx, 429, timeouts and a robot's rate limit are worth another try, other 4xx, a redirect and a
robot's refusal are not — and no error message shows a URL, which carries the robot's key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time

import pytest

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
    verify_webhook,
)
from bench.harness.brokers import Mosquitto, Subscriber, free_port
from pipeline.core.ack_tokens import AckTokens
from pipeline.core.engine import Engine
from pipeline.core.models import AlertNotice
from pipeline.core.notices import render
from pipeline.core.registry import load as load_registry
from rules.compiler import load_rules
from tests.push_endpoints import Endpoints
from tests.support import settle

pytestmark = pytest.mark.broker

TS = 1_782_885_780_000                   # 2026-07-01T14:03:00+08:00: 张敏 is on shift
GAS_ALONE = "gas-510104-000001"
WORKER = Recipient("w-510104020001-01", "张敏", "13800000001")
SECRET = b"webhook-secret-known-to-the-receiver"
ROBOT_KEY = "robot-key-3f9a-never-in-a-log"


@pytest.fixture(scope="module")
def notice() -> dict:
    """The grid worker's notice of a real incident: 55 %LEL at an elderly resident living
    alone, with the acknowledge link a dispatcher adds."""
    rules = load_rules()
    engine = Engine(load_registry(None, rules.kinds), rules)
    out = engine.ingest([json.dumps({"sensor_id": GAS_ALONE, "ts": TS, "value": 55.0}).encode()])
    n = next(n for n in out.notices if n["tier"] == "grid")
    assert n["worker_id"] == WORKER.id
    token = AckTokens(b"a" * 32, 3_600_000).issue(n["alert_id"], "grid", WORKER.id, n["seq"], TS)
    return {**n, "ack_url": f"https://ops.example.cn/cityops/ack?t={token}", "ack_token": token}


def delivery(notice: dict, channel: str, attempt: int = 1) -> Delivery:
    key = f"{notice['alert_id']}:{notice['state']}:{notice['seq']}:{WORKER.id}:{channel}"
    return Delivery(key, channel, WORKER, notice, attempt)


def test_webhook_posts_signed_json_with_an_idempotency_key(endpoints: Endpoints,
                                                           notice: dict) -> None:
    d = delivery(notice, "webhook")
    Webhook(endpoints.url("/webhook"), SECRET, 5).send(d)
    [req] = endpoints.received("/webhook")
    assert req.headers["content-type"].startswith("application/json")
    assert req.headers["idempotency-key"] == d.key
    body = req.json
    assert body["idempotency_key"] == d.key and body["attempt"] == 1
    assert body["recipient"] == {"id": WORKER.id, "name": "张敏"}
    AlertNotice.model_validate(body["notice"])
    assert body["notice"]["ack_url"] == notice["ack_url"]

    # the receiver's check: HMAC-SHA256 over "timestamp.body" with the shared secret
    ts, sig = req.headers["x-cityops-timestamp"], req.headers["x-cityops-signature"]
    expected = hmac.new(SECRET, ts.encode() + b"." + req.body, hashlib.sha256).hexdigest()
    assert sig == f"sha256={expected}"
    assert abs(int(ts) - time.time()) < 60
    assert verify_webhook(SECRET, ts, req.body, sig, time.time())
    assert not verify_webhook(b"another secret", ts, req.body, sig, time.time())
    assert not verify_webhook(SECRET, ts, req.body.replace(b"55", b"5"), sig, time.time())
    # a replay an hour later, or with a fresh timestamp on the old signature, is refused
    assert not verify_webhook(SECRET, ts, req.body, sig, time.time() + 3600)
    assert not verify_webhook(SECRET, str(int(ts) + 3600), req.body, sig, time.time() + 3600)


def test_wecom_robot_markdown(endpoints: Endpoints, notice: dict) -> None:
    robot = endpoints.url(f"/wecom?key={ROBOT_KEY}")
    WeCom(Robots(None, {WORKER.id: robot}), 5).send(delivery(notice, "wecom"))
    [req] = endpoints.received("/wecom")
    assert req.query == {"key": ROBOT_KEY}
    body = req.json
    assert body["msgtype"] == "markdown" and set(body) == {"msgtype", "markdown"}
    text = body["markdown"]["content"]
    assert len(text.encode()) <= 4096
    assert '<font color="warning">【红色预警】锦江区春熙路街道和平社区燃气泄漏报警</font>' in text
    for part in ("锦江区", "春熙路街道", "和平社区", "和平社区第1微网格", "**55%LEL**",
                 "阈值 50%LEL", "I级", "独居老人", "接收人：张敏", f"[确认接单]({notice['ack_url']})"):
        assert part in text, part


def test_dingtalk_robot_markdown_mentions_the_worker_and_signs(endpoints: Endpoints,
                                                               notice: dict) -> None:
    robot_secret = "SEC0123456789abcdef"
    robot = endpoints.url(f"/dingtalk?access_token={ROBOT_KEY}")
    DingTalk(Robots(robot, {}), robot_secret, 5).send(delivery(notice, "dingtalk"))
    [req] = endpoints.received("/dingtalk")
    body = req.json
    assert body["msgtype"] == "markdown"
    assert body["markdown"]["title"] == notice["title"]
    text = body["markdown"]["text"]
    assert '<font color="#E60000">' in text and "**55%LEL**" in text and "阈值 50%LEL" in text
    assert "和平社区第1微网格" in text and f"[确认接单]({notice['ack_url']})" in text
    assert body["at"] == {"atMobiles": ["13800000001"], "isAtAll": False}
    assert text.endswith("@13800000001")          # DingTalk notifies only if the text names it
    # 加签: sign = base64(HMAC-SHA256(secret, timestamp + "\n" + secret)), timestamp in ms
    assert req.query["access_token"] == ROBOT_KEY
    ts = req.query["timestamp"]
    assert abs(int(ts) - time.time() * 1000) < 60_000
    mac = hmac.new(robot_secret.encode(), f"{ts}\n{robot_secret}".encode(), hashlib.sha256)
    assert req.query["sign"] == base64.b64encode(mac.digest()).decode()


def test_sms_gateway_gets_phone_and_text(endpoints: Endpoints, notice: dict) -> None:
    sms = Sms(endpoints.url("/sms"), "gateway-token", "{title}：读数{value}{unit}，阈值"
              "{threshold}{unit}。确认：{ack_url}", 5, render=render)
    d = delivery(notice, "sms")
    sms.send(d)
    [req] = endpoints.received("/sms")
    assert req.headers["authorization"] == "Bearer gateway-token"
    assert req.headers["idempotency-key"] == d.key
    assert req.json == {"phone": "13800000001", "idempotency_key": d.key,
                        "text": f"{notice['title']}：读数55%LEL，阈值50%LEL。确认：{notice['ack_url']}"}
    nobody = Delivery(d.key, "sms", Recipient("w-x", "无号码"), notice)
    with pytest.raises(PermanentError, match="no phone"):
        sms.send(nobody)
    assert len(endpoints.received("/sms")) == 1


@pytest.mark.parametrize(("step", "error"), [
    (500, TransientError), (503, TransientError), (429, TransientError), (408, TransientError),
    (400, PermanentError), (401, PermanentError), (404, PermanentError), (302, PermanentError),
])
def test_http_answers_retry_or_not(endpoints: Endpoints, notice: dict, step: int,
                                   error: type[Exception]) -> None:
    endpoints.answer("/webhook", step)
    with pytest.raises(error, match=f"HTTP {step}"):
        Webhook(endpoints.url("/webhook"), SECRET, 5).send(delivery(notice, "webhook"))
    assert [r.path for r in endpoints.received()] == ["/webhook"]     # a redirect is not followed


@pytest.mark.parametrize(("answer", "error"), [
    ({"errcode": 45009, "errmsg": "api freq out of limit"}, TransientError),    # WeCom
    ({"errcode": 130101, "errmsg": "send too fast"}, TransientError),           # DingTalk
    ({"errcode": 93000, "errmsg": "invalid webhook url"}, PermanentError),
    ({"errcode": 310000, "errmsg": "keywords not in content"}, PermanentError),
])
def test_robot_errcodes(endpoints: Endpoints, notice: dict, answer: dict,
                        error: type[Exception]) -> None:
    endpoints.answer("/wecom", (200, answer))
    with pytest.raises(error, match=str(answer["errcode"])):
        WeCom(Robots(endpoints.url("/wecom?key=k"), {}), 5).send(delivery(notice, "wecom"))


def test_no_answer_is_transient_and_the_url_stays_secret(notice: dict) -> None:
    port = free_port()                     # nobody listens there
    robot = f"http://127.0.0.1:{port}/robot?key={ROBOT_KEY}"
    with pytest.raises(TransientError) as e:
        WeCom(Robots(robot, {}), 2).send(delivery(notice, "wecom"))
    assert ROBOT_KEY not in str(e.value) and str(port) not in str(e.value)

    with socket.socket() as silent:        # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook?token={ROBOT_KEY}"
        with pytest.raises(TransientError) as e:
            Webhook(url, SECRET, 0.3).send(delivery(notice, "webhook"))
    assert ROBOT_KEY not in str(e.value)


def test_mqtt_push_reaches_the_worker_topic_once(mosquitto: Mosquitto, notice: dict) -> None:
    host, port = mosquitto.host, mosquitto.port
    push = MqttPush(host, port, client_id="test-push-channel", prefix="cityops", protocol=5,
                    username=None, password=None, timeout_s=5)
    topic = f"cityops/push/{WORKER.id}"
    with Subscriber(mosquitto.url, "cityops/push/#") as sub:
        push.start()
        try:
            push.send(delivery(notice, "mqtt"))       # returns at the PUBACK
            got = sub.wait_count(1)
            settle(sub, quiet=0.3)                    # a second copy would have arrived by now
        finally:
            push.close()
    assert len(sub.messages) == 1
    assert got[0][0] == topic
    sent = AlertNotice.model_validate_json(got[0][1])
    assert sent.ack_url == notice["ack_url"] and sent.ack_token == notice["ack_token"]
    assert sent.worker_id == WORKER.id and sent.tier.value == "grid"


def test_mqtt_push_without_a_broker_is_transient(notice: dict) -> None:
    push = MqttPush("127.0.0.1", free_port(), client_id="test-push-nobroker", prefix="cityops",
                    protocol=5, username=None, password=None, timeout_s=0.3)
    push.start()
    try:
        with pytest.raises(TransientError, match="not connected"):
            push.send(delivery(notice, "mqtt"))
    finally:
        push.close(0)
