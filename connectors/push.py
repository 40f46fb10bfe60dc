"""Push channels: how one notice reaches one person (or one group chat).

Every channel has the same small contract, so the dispatcher (pipeline/shared/delivery.py) can retry,
dead-letter and receipt them alike:

    channel.send(delivery)    returns once the far end has taken it, or raises
        TransientError        worth another try: HTTP 5xx/408/429, a timeout, no connection,
                              a robot's "too many messages"
        PermanentError        another try fails the same way: other 4xx, a robot refusing the
                              message, a recipient without a phone number

Channels: MQTT (`{prefix}/push/{recipient}`, QoS 1, returns at the PUBACK), a generic webhook
(JSON, HMAC-signed), the WeCom (企业微信) and DingTalk (钉钉) group robots (markdown with the
place, the reading, the severity colour and the acknowledge link) and an SMS gateway over HTTP.
HTTP is the standard library's: one POST per delivery needs no client library. URLs of robots
and gateways carry credentials, so no error message here ever contains one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import logging
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

log = logging.getLogger("cityops.push")

MAX_ANSWER = 64 * 1024
# Robot answers (HTTP 200 with an errcode) that mean "later": WeCom -1 busy, 45009 over the
# rate limit; DingTalk 130101 sending too fast (20 messages a minute per robot).
ROBOT_RETRY = frozenset({-1, 45009, 130101})


class TransientError(Exception):
    """The delivery may succeed if tried again later."""


class PermanentError(Exception):
    """The delivery will not succeed by trying again."""


@dataclass(frozen=True, slots=True)
class Recipient:
    id: str                     # worker id, or the tier target (street code, dept id, ...)
    name: str
    phone: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    key: str                    # idempotency key: alert_id:state:seq:recipient:channel
    channel: str
    recipient: Recipient
    notice: dict                # the AlertNotice, with ack_url / ack_token when it can be acknowledged
    attempt: int = 1


# ---- what a message says -------------------------------------------------------------------

_STATE_CN = {"firing": "触发", "escalated": "升级", "acknowledged": "已确认", "resolved": "已解除",
             "reminder": "提醒", "dispatched": "已派遣", "on_site": "已到场", "handled": "已处置",
             "closed": "已结案"}
# WeCom markdown has three colours only (info green, comment grey, warning orange-red); the
# level is always written out as well.
WECOM_COLOUR = {"blue": "info", "yellow": "comment", "orange": "warning", "red": "warning"}
HEX_COLOUR = {"blue": "#1E6FFF", "yellow": "#E6A700", "orange": "#FF7F00", "red": "#E60000"}


def _num(v: Any) -> str:
    return "—" if v is None else f"{v:.6g}"


def fields(d: Delivery) -> dict[str, Any]:
    """The names a message template may use (SMS `template`)."""
    n = d.notice
    unit = n.get("unit") or ""
    place = "".join(n.get(k) or "" for k in ("district_name", "street_name", "community_name",
                                                 "grid_name"))
    return {"title": n["title"], "summary": n["summary"], "place": place,
            "address": n.get("address") or place, "value": _num(n.get("value")),
            "threshold": _num(n.get("threshold")), "unit": unit, "event": n.get("event") or "",
            "severity": n["severity"], "state_cn": _STATE_CN.get(n["state"], n["state"]),
            "ts": n["ts"], "worker_name": d.recipient.name, "ack_url": n.get("ack_url") or "",
            "ack_link": f"{ack_label(n)}：{n['ack_url']}" if n.get("ack_url") else "",
            "alert_id": n["alert_id"]}


def markdown(d: Delivery, colour: str) -> str:
    """The robot message: severity-coloured title, place, reading against threshold, time,
    summary, recipient and the acknowledge link."""
    f = fields(d)
    n = d.notice
    if n.get("event"):
        reading = f"事件：**{f['event']}**"
    else:
        reading = (f"读数：**{f['value']}{f['unit']}**（阈值 {f['threshold']}{f['unit']}）")
    lines = [
        f'### <font color="{colour}">{f["title"]}</font>',
        f"> 地点：{f['place']}",
        f"> 地址：{f['address']}",
        f"> {reading}",
        f"> 级别：<font color=\"{colour}\">{n['level']}级</font> · 状态：{f['state_cn']}",
        f"> 时间：{f['ts'][:19].replace('T', ' ')}",
        "",
        f["summary"],
        "",
        f"接收人：{d.recipient.name}",
    ]
    if f["ack_url"]:
        lines += ["", f"[{ack_label(n)}]({f['ack_url']})"]
    return "\n".join(lines)


def ack_label(n: dict) -> str:
    """The link's words: a worker takes the alert in hand, an owner confirms it corrected."""
    return "确认整改" if n.get("tier") == "owner" else "确认接单"


# ---- HTTP ----------------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would turn a redirected POST into a GET without the body
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> bytes:
    """POST and return the answer's body (2xx), or raise Transient/PermanentError."""
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json; charset=utf-8", "User-Agent": "cityops-push",
        **headers})
    try:
        with _opener.open(req, timeout=timeout_s) as r:
            return r.read(MAX_ANSWER)
    except urllib.error.HTTPError as e:
        code = e.code
        e.close()
        if code >= 500 or code in (408, 425, 429):
            raise TransientError(f"HTTP {code}") from None
        raise PermanentError(f"HTTP {code}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLCertVerificationError):
            raise PermanentError("the server's TLS certificate does not verify") from None
        raise TransientError(f"no answer: {e.reason}") from None
    except (TimeoutError, OSError, http.client.HTTPException) as e:
        raise TransientError(f"no answer: {e.__class__.__name__}: {e}") from None


def _robot_answer(raw: bytes) -> None:
    try:
        answer = orjson.loads(raw)
        code = int(answer.get("errcode", 0))
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise PermanentError("the robot's answer is not its JSON") from None
    if code in ROBOT_RETRY:
        raise TransientError(f"robot errcode {code}: {answer.get('errmsg', '')}")
    if code != 0:
        raise PermanentError(f"robot errcode {code}: {answer.get('errmsg', '')}")


def sign_webhook(secret: bytes, timestamp: str, body: bytes) -> str:
    """`X-Cityops-Signature`: the timestamp is signed with the body, so a captured request
    cannot be replayed later with a fresh timestamp."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body,
                                hashlib.sha256).hexdigest()


def verify_webhook(secret: bytes, timestamp: str, body: bytes, signature: str,
                   now_s: float, tolerance_s: float = 300) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent."""
    if not timestamp.isdigit() or abs(now_s - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign_webhook(secret, timestamp, body), signature)


def dingtalk_sign(secret: str, timestamp_ms: str) -> str:
    """DingTalk 加签: base64(HMAC-SHA256(key=secret, timestamp + "\\n" + secret))."""
    mac = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode("ascii")


class Robots:
    """A default robot address and per-recipient ones (a grid's own group chat)."""

    def __init__(self, url: str | None, robots: dict[str, str]) -> None:
        self.url, self.robots = url, robots

    def address(self, r: Recipient) -> str:
        url = self.robots.get(r.id) or self.url
        if not url:
            raise PermanentError(f"no robot address for {r.id}")
        return url


class Webhook:
    name = "webhook"

    def __init__(self, url: str, secret: bytes, timeout_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.url, self.secret, self.timeout_s, self.clock = url, secret, timeout_s, clock

    def send(self, d: Delivery) -> None:
        body = orjson.dumps({"idempotency_key": d.key, "attempt": d.attempt,
                             "recipient": {"id": d.recipient.id, "name": d.recipient.name},
                             "notice": d.notice})
        ts = str(int(self.clock()))
        post(self.url, body, {"Idempotency-Key": d.key, "X-Cityops-Timestamp": ts,
                              "X-Cityops-Signature": sign_webhook(self.secret, ts, body)},
             self.timeout_s)


class WeCom:
    """企业微信 group robot: `{"msgtype": "markdown", "markdown": {"content": ...}}`."""

    name = "wecom"
    MAX_BYTES = 4096                # the robot refuses longer markdown content

    def __init__(self, robots: Robots, timeout_s: float) -> None:
        self.robots, self.timeout_s = robots, timeout_s

    def send(self, d: Delivery) -> None:
        text = markdown(d, WECOM_COLOUR.get(d.notice["severity"], "warning"))
        if len(text.encode()) > self.MAX_BYTES:
            text = d.notice["title"] + "\n" + (f"[{ack_label(d.notice)}]({d.notice['ack_url']})"
                                               if d.notice.get("ack_url") else "")
        body = orjson.dumps({"msgtype": "markdown", "markdown": {"content": text}})
        _robot_answer(post(self.robots.address(d.recipient), body, {"Idempotency-Key": d.key},
                           self.timeout_s))


class DingTalk:
    """钉钉 custom robot: markdown with title and text, the recipient @-mentioned by phone;
    with a secret, every request carries `timestamp` (ms) and `sign` in its query."""

    name = "dingtalk"

    def __init__(self, robots: Robots, secret: str | None, timeout_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.robots, self.secret, self.timeout_s, self.clock = robots, secret, timeout_s, clock

    def send(self, d: Delivery) -> None:
        text = markdown(d, HEX_COLOUR.get(d.notice["severity"], "#E60000"))
        msg: dict[str, Any] = {"msgtype": "markdown",
                               "markdown": {"title": d.notice["title"], "text": text}}
        if d.recipient.phone:       # DingTalk notifies only when the text names the @phone too
            msg["markdown"]["text"] += f"\n\n@{d.recipient.phone}"
            msg["at"] = {"atMobiles": [d.recipient.phone], "isAtAll": False}
        url = self.robots.address(d.recipient)
        if self.secret:
            ts = str(int(self.clock() * 1000))
            query = urllib.parse.urlencode({"timestamp": ts,
                                            "sign": dingtalk_sign(self.secret, ts)})
            url += ("&" if "?" in url else "?") + query
        _robot_answer(post(url, orjson.dumps(msg), {"Idempotency-Key": d.key}, self.timeout_s))


class Sms:
    """An SMS gateway over HTTP: POST `{"phone", "text", "idempotency_key"}` with a bearer
    token; the text is `template` (to a sensor's owner: `owner_template`) filled from
    `fields()` by `render(template, fields)` (the notices' own: pipeline/core/notices.py)."""

    name = "sms"

    def __init__(self, url: str, token: str | None, template: str, timeout_s: float,
                 owner_template: str | None = None, *,
                 render: Callable[[str, dict[str, Any]], str]) -> None:
        self.url, self.token, self.template, self.timeout_s = url, token, template, timeout_s
        self.owner_template = owner_template or template
        self.render = render

    def send(self, d: Delivery) -> None:
        if not d.recipient.phone:
            raise PermanentError(f"{d.recipient.id} has no phone number in the registry")
        owner = d.notice.get("tier") == "owner"
        text = self.render(self.owner_template if owner else self.template, fields(d))
        headers = {"Idempotency-Key": d.key}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        post(self.url, orjson.dumps({"phone": d.recipient.phone, "text": text,
                                     "idempotency_key": d.key}), headers, self.timeout_s)


# ---- MQTT ----------------------------------------------------------------------------------

class MqttPush:
    """Its own paho connection (clean session: it only publishes). `send` returns at the
    broker's PUBACK; a PUBACK that does not come in time is waited for again on the next
    attempt instead of publishing a second copy. `emit` publishes receipts and dead letters
    without waiting."""

    name = "mqtt"

    def __init__(self, host: str, port: int, *, client_id: str, prefix: str, protocol: int,
                 username: str | None, password: str | None, timeout_s: float) -> None:
        self.host, self.port, self.prefix, self.timeout_s = host, port, prefix, timeout_s
        version = MQTTProtocolVersion.MQTTv5 if protocol == 5 else MQTTProtocolVersion.MQTTv311
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=version)
        if username:
            self.client.username_pw_set(username, password)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.connected = threading.Event()
        self._cond = threading.Condition()
        self._acked: dict[int, int] = {}          # mid -> PUBACK reason code
        self._unwaited: set[int] = set()          # emit()s: nobody waits for their PUBACK
        self._inflight: dict[str, int] = {}       # delivery key -> mid still without PUBACK
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_publish = self._on_publish

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("push: the broker refused the connection: %s", reason_code)
            return
        self.connected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            if mid in self._unwaited:
                self._unwaited.discard(mid)
                self._cond.notify_all()
            else:
                self._acked[mid] = reason_code.value
                self._cond.notify_all()

    def send(self, d: Delivery) -> None:
        with self._cond:
            mid = self._inflight.get(d.key)
        if mid is None:
            if not self.connected.wait(self.timeout_s):
                raise TransientError("not connected to the MQTT broker")
            mid = self.client.publish(f"{self.prefix}/push/{d.recipient.id}",
                                      orjson.dumps(d.notice), qos=1).mid
            with self._cond:
                self._inflight[d.key] = mid
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acked, self.timeout_s):
                raise TransientError(f"no PUBACK within {self.timeout_s:g} s")
            code = self._acked.pop(mid)
            del self._inflight[d.key]
        if code >= 0x80:
            raise PermanentError(f"the broker refused the push (reason code {code})")

    def emit(self, topic: str, payload: bytes) -> None:
        mid = self.client.publish(topic, payload, qos=1).mid
        with self._cond:
            if self._acked.pop(mid, None) is None:
                self._unwaited.add(mid)

    def close(self, timeout_s: float = 2.0) -> None:
        """Disconnect once the broker has the receipts and dead letters (or after timeout_s)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._unwaited or not self.connected.is_set(),
                                timeout_s)
        self.client.disconnect()
        self.client.loop_stop()
