"""Acknowledging from the push, end to end: the live runtime with push on, a real Mosquitto.

A gas alarm reaches the on-call worker as an MQTT push carrying an acknowledge link. Opening
the link (GET) only shows a confirmation page — a chat app's link preview acknowledges
nothing; its button (POST /ack) acknowledges as that worker, and every tier told is told
`acknowledged`. The worker's app may instead publish the token on
`cityops/push/{worker_id}/ack`. Forged, tampered, expired or malformed tokens are refused (HTTP
403; on MQTT a `bad_ack` dead letter), and so is a token sent on another worker's topic. Last:
`cityops run` killed (-9) after a push and started again replays its journal and republishes
the tier notices, but the worker is not pushed twice.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.harness.brokers import Mosquitto, Subscriber, free_port, publish
from pipeline.core.ack_tokens import AckTokens
from pipeline.core.models import AlertNotice, DeadLetter
from tests.support import PUSH_SECRET, Running, dumps, http, now_ms, of, reading, settle, start_run, stop_run

pytestmark = pytest.mark.broker

GATEWAY = "cityops/gateways/gw-510104-0001"     # gas-510104-000001..5, grid 510104020001001
ANOTHER_WORKER = "w-510104020002-01"


@pytest.fixture
def running(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Running]:
    r = Running(mosquitto, tmp_path)
    yield r
    r.close()


def fire(mosquitto: Mosquitto, sub: Subscriber, sensor: str) -> dict:
    """A 55 %LEL alarm at ``sensor``; returns the push its on-call worker got."""
    publish(mosquitto.url, GATEWAY, dumps([reading(sensor, 55.0, ts=now_ms())]))
    got = sub.wait_for(lambda m: any(n["sensor_id"] == sensor for n in of(m, "cityops/push/")))
    [push] = [n for n in of(got, "cityops/push/") if n["sensor_id"] == sensor]
    AlertNotice.model_validate(push)
    return push


def acknowledged(sub: Subscriber, aid: str) -> Callable[[list], bool]:
    return lambda m: any(n["alert_id"] == aid and n["state"] == "acknowledged" and
                         n["tier"] == "street" for n in of(m, "cityops/alerts/"))


def test_the_link_shows_a_page_and_its_button_acknowledges(mosquitto: Mosquitto,
                                                           running: Running,
                                                           sub: Subscriber) -> None:
    push = fire(mosquitto, sub, "gas-510104-000001")
    worker, aid = push["worker_id"], push["alert_id"]
    assert push["state"] == "firing" and push["target"] == worker
    token = push["ack_token"]
    assert push["ack_url"] == running.url(f"/ack?t={token}")
    [receipt] = of(sub.wait_for(lambda m: of(m, "receipts")), "receipts")
    assert receipt == {**receipt, "alert_id": aid, "channel": "mqtt", "recipient": worker,
                       "outcome": "delivered", "attempts": 1}

    # opening the link: a page with a button, nothing acknowledged
    code, headers, page = http(push["ack_url"])
    assert code == 200 and push["title"] in page
    assert '<form method="post" action="ack">' in page and f'value="{token}"' in page
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert not any(n["state"] == "acknowledged" for n in of(settle(sub), "cityops/alerts/"))

    # refused: another key, changed claims, expired, garbage — on the page and on the button
    sig = token.split(".")[1]
    other = AckTokens(b"x" * 40, 3_600_000).issue(aid, "grid", worker, 1, now_ms())
    tampered = AckTokens(PUSH_SECRET.encode(), 3_600_000).issue(aid, "grid", ANOTHER_WORKER,
                                                          1, now_ms()).split(".")[0] + "." + sig
    expired = AckTokens(PUSH_SECRET.encode(), 1000).issue(aid, "grid", worker, 1, now_ms() - 60_000)
    for bad in (other, tampered, expired, "garbage"):
        code, _, page = http(running.url(f"/ack?t={bad}"))
        assert code == 403, bad
        code, _, page = http(running.url("/ack"), f"t={bad}".encode())
        assert code == 403 and "无法确认" in page, bad
        assert ("已过期" in page) == (bad == expired)
    assert not any(n["state"] == "acknowledged" for n in of(settle(sub), "cityops/alerts/"))

    # the button
    code, _, page = http(running.url("/ack"), f"t={token}".encode())
    assert code == 200 and "已确认" in page

    def told(state: str) -> Callable[[list], list[dict]]:
        return lambda m: [n for n in of(m, "cityops/alerts/") + of(m, "cityops/push/")
                          if n["alert_id"] == aid and n["state"] == state]

    tiers = {n["tier"] for n in told("firing")(sub.messages)}
    assert tiers == {"grid", "street", "district", "dept", "city"}       # red: every tier
    got = sub.wait_for(lambda m: {n["tier"] for n in told("acknowledged")(m)} == tiers)
    assert all(n["acked_by"] == worker and n["acked_tier"] == "grid"
               for n in told("acknowledged")(got))
    [pushed] = [n for n in of(got, "cityops/push/") if n["state"] == "acknowledged"]
    assert "ack_url" not in pushed and "ack_token" not in pushed      # nothing left to confirm

    # the alert's timeline: what each tier was told, and the pushes' receipts
    code, _, text = http(running.url(f"/alerts/{aid}/timeline"))
    assert code == 200
    events = json.loads(text)["events"]
    told = {(e["state"], e["tier"]) for e in events if e["event"] == "notice"}
    assert {("firing", "grid"), ("firing", "street"), ("acknowledged", "street")} <= told
    sub.wait_for(lambda m: len(of(m, "receipts")) >= 2)
    code, _, text = http(running.url(f"/alerts/{aid}/timeline"))
    receipts = [(e["channel"], e["outcome"]) for e in json.loads(text)["events"]
                if e["event"] == "receipt"]
    assert receipts == [("mqtt", "delivered"), ("mqtt", "delivered")]
    assert http(running.url("/alerts/no-such-alert/timeline"))[0] == 404

    metrics = running.metrics()
    assert 'cityops_push_ack_tokens_total{outcome="accepted"} 1' in metrics
    assert 'cityops_push_ack_tokens_total{outcome="forged"} 4' in metrics
    assert 'cityops_push_ack_tokens_total{outcome="expired"}' in metrics
    assert 'cityops_push_deliveries_total{channel="mqtt",outcome="delivered"} 2' in metrics
    assert "cityops_acks_total 1" in metrics


def test_a_reply_on_mqtt_acknowledges_only_on_the_workers_own_topic(
        mosquitto: Mosquitto, running: Running, sub: Subscriber) -> None:
    push = fire(mosquitto, sub, "gas-510104-000002")
    worker, aid, token = push["worker_id"], push["alert_id"], push["ack_token"]
    forged = AckTokens(b"x" * 40, 3_600_000).issue(aid, "grid", worker, 1, now_ms())

    publish(mosquitto.url, f"cityops/push/{ANOTHER_WORKER}/ack", token)   # not theirs
    publish(mosquitto.url, f"cityops/push/{worker}/ack", forged)
    got = sub.wait_for(lambda m: len(of(m, "deadletter")) >= 2)
    dead = [DeadLetter.model_validate(d) for d in of(got, "deadletter")]
    assert [d.reason for d in dead] == ["bad_ack", "bad_ack"]
    assert "(wrong_worker)" in dead[0].detail and dead[0].source == f"cityops/push/{ANOTHER_WORKER}/ack"
    assert "(forged)" in dead[1].detail and dead[1].payload == forged
    assert not any(n["state"] == "acknowledged" for n in of(settle(sub), "cityops/alerts/"))

    publish(mosquitto.url, f"cityops/push/{worker}/ack", token)
    got = sub.wait_for(acknowledged(sub, aid))
    [street] = [n for n in of(got, "cityops/alerts/street/")
                if n["alert_id"] == aid and n["state"] == "acknowledged"]
    assert (street["acked_by"], street["acked_tier"]) == (worker, "grid")
    metrics = running.metrics()
    assert 'cityops_push_ack_tokens_total{outcome="wrong_worker"} 1' in metrics
    assert 'cityops_push_ack_tokens_total{outcome="accepted"} 1' in metrics


def test_a_link_from_an_earlier_firing_does_not_acknowledge_the_alert_firing_again(
        mosquitto: Mosquitto, running: Running, sub: Subscriber) -> None:
    """gas.leak is flapping-aware: firing again within 30 min of resolving reopens the same
    alert_id. A link from the first firing must not acknowledge the second. (Readings 10 min
    in the past: the 2 min clear_for is already over by the wall clock, so the test is quick.)"""
    sensor, t0 = "gas-510104-000004", now_ms() - 10 * 60_000

    def send(at: int, value: float) -> None:
        publish(mosquitto.url, GATEWAY, json.dumps([{"sensor_id": sensor, "ts": at,
                                                     "value": value}]).encode())

    def pushes(m: list) -> list[dict]:
        return [n for n in of(m, "cityops/push/") if n["sensor_id"] == sensor]

    send(t0, 55.0)
    first = pushes(sub.wait_for(lambda m: pushes(m)))[0]
    aid, worker = first["alert_id"], first["worker_id"]
    send(t0 + 60_000, 2.0)                    # clears; resolved 2 min later
    sub.wait_for(lambda m: any(n["state"] == "resolved" for n in pushes(m)))
    send(t0 + 4 * 60_000, 55.0)               # fires again: the same incident, reopened
    got = sub.wait_for(lambda m: any(n["state"] == "firing" and n["previous_state"] == "resolved"
                                     for n in pushes(m)))
    [again] = [n for n in pushes(got) if n["previous_state"] == "resolved"]
    assert again["alert_id"] == aid and again["seq"] > first["seq"]

    # the old link: a page saying its alert is over, on opening and on the button
    code, _, page = http(first["ack_url"])
    assert code == 410 and "预警已结束" in page and "已经解除" in page
    code, _, page = http(running.url("/ack"), f"t={first['ack_token']}".encode())
    assert code == 410 and "预警已结束" in page
    # the old token as an MQTT reply: the engine refuses it (it knows the firing)
    publish(mosquitto.url, f"cityops/push/{worker}/ack", first["ack_token"])
    dead = sub.wait_for(lambda m: of(m, "deadletter"))
    [refusal] = [DeadLetter.model_validate(d) for d in of(dead, "deadletter")]
    assert refusal.reason == "bad_ack" and "the alert this link was for is over" in refusal.detail
    assert not any(n["state"] == "acknowledged" for n in of(settle(sub), "cityops/alerts/"))

    # the new link acknowledges the firing it came with
    code, _, page = http(running.url("/ack"), f"t={again['ack_token']}".encode())
    assert code == 200 and "已确认" in page
    sub.wait_for(acknowledged(sub, aid))


# ---- cityops run, kill -9, start again ---------------------------------------------------------

def test_a_restart_replays_the_journal_but_does_not_push_again(mosquitto: Mosquitto,
                                                               tmp_path: Path,
                                                               sub: Subscriber) -> None:
    client_id = f"cityops-push-kill-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {"CITYOPS_PUSH__ENABLED": "true", "CITYOPS_PUSH__SECRET": PUSH_SECRET,
           "CITYOPS_HTTP__PORT": str(port), "CITYOPS_MQTT__CLIENT_ID": client_id,
           "CITYOPS_STATE__SNAPSHOT_EVERY": "1h"}      # the journal, not a snapshot, holds it
    proc = start_run(tmp_path, mosquitto, env, 1)
    try:
        push = fire(mosquitto, sub, "gas-510104-000003")
        sub.wait_for(lambda m: of(m, "receipts"))
        aid = push["alert_id"]
        streets = lambda: [n for n in of(sub.messages, "cityops/alerts/street/")
                           if n["alert_id"] == aid]
        sub.wait_for(lambda m: len(streets()) == 1)
        stop_run(proc, signal.SIGKILL)

        proc = start_run(tmp_path, mosquitto, env, 2)
        sub.wait_for(lambda m: len(streets()) == 2)      # the replay published it again ...
        pushes = [n for n in of(settle(sub), "cityops/push/") if n["alert_id"] == aid]
        assert len(pushes) == 1, pushes                   # ... the push went out once
        metrics = http(f"http://127.0.0.1:{port}/metrics")[2]
        assert "cityops_push_duplicates_total 1" in metrics
    finally:
        stop_run(proc, signal.SIGTERM)
        assert proc.returncode in (0, -signal.SIGKILL)
        Subscriber(mosquitto.url, "cityops/test/purge", client_id=client_id).start(3).close()
