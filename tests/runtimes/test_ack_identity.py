"""Who may acknowledge what, end to end: a real Mosquitto with the deploy config (password file
made by mosquitto_passwd, the deploy ACL plus `cityops registry acl`'s block for a 青羊区
gateway), `cityops run`, and the same through `cityops bridge` + `cityops worker` on tansu.

A grid worker of 锦江区 (510104) cannot acknowledge a 青羊区 (510105) gas alarm, cannot
acknowledge as someone else (the broker refuses the other's topic; a payload naming another
`by` or `tier` is refused by the pipeline) and can acknowledge one in their own grid; a
district user can acknowledge their district's alarm; over HTTP a bearer token is required and
names the user; the bare acks topic and a login that may acknowledge nothing are refused.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness.brokers import Mosquitto, Subscriber, publish
from bench.harness.kafka_broker import CityopsProcess, TopicReader
from connectors.kafka import topic_names
from tests.support import DEPLOY, DUTY_TOKENS, NOT_AUTHORIZED, Runtime, deploy_broker, dumps, now_ms, wait_until

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
W1, W2 = "w-510104020001-01", "w-510104020001-02"     # 锦江区 grids 510104020001001..3
JINJIANG_GW, QINGYANG_GW = "gw-510104-0001", "gw-510105-0001"
PASSWORDS = {"cityops": "pipeline-secret", JINJIANG_GW: "gw1", QINGYANG_GW: "gw2", W1: "w1",
             W2: "w2", "duty-510104": "d1", "duty-510105": "d2", "dashboard-city": "dash",
             "cityops-monitor": "mon"}


def as_user(user: str) -> dict[str, str]:
    return {"username": user, "password": PASSWORDS[user]}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    tmp = tmp_path_factory.mktemp("ack-identity")
    generated = subprocess.run([sys.executable, "-m", "pipeline.cli", "registry", "acl"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    [block] = re.findall(rf"(?m)^user {QINGYANG_GW}\ntopic write \S+\n", generated)
    b = deploy_broker(tmp, PASSWORDS, (DEPLOY / "acl").read_text() + "\n" + block)
    yield b
    b.stop()


def alarm(broker: Mosquitto, gateway: str, sensor: str) -> None:
    body = json.dumps([{"sensor_id": sensor, "ts": now_ms(), "value": 30.0}])
    assert publish(broker.url, f"cityops/gateways/{gateway}", body, **as_user(gateway)) == 0


def ack(broker: Mosquitto, user: str, alert_id: str, topic_user: str | None = None,
        **extra: str) -> int:
    body = json.dumps({"alert_id": alert_id, "ts": now_ms(), **extra})
    return publish(broker.url, f"cityops/acks/{topic_user or user}", body, **as_user(user))


def notices(msgs: list[tuple[str, bytes]]) -> list[dict]:
    return [json.loads(p) for t, p in msgs if t.startswith("cityops/alerts/")]


def dead(msgs: list[tuple[str, bytes]]) -> list[dict]:
    return [json.loads(p) for t, p in msgs if t == "cityops/deadletter"]


def street_firing(msgs: list, sensor: str) -> dict | None:
    return next((n for n in notices(msgs) if n["sensor_id"] == sensor and n["tier"] == "street"
                 and n["state"] == "firing"), None)


def acked(msgs: list, alert_id: str) -> list[dict]:
    return [n for n in notices(msgs) if n["alert_id"] == alert_id and n["state"] == "acknowledged"]


def test_live_runtime_takes_acks_only_within_the_senders_scope(broker: Mosquitto, runtime,
                                                                duty_users: Path) -> None:
    rt: Runtime = runtime(broker.url, "identity", env={
        "CITYOPS_MQTT__USERNAME": "cityops", "CITYOPS_MQTT__PASSWORD": PASSWORDS["cityops"],
        "CITYOPS_ACKS__USERS": str(duty_users)})
    with Subscriber(broker.url, "cityops/alerts/#", **as_user("dashboard-city")) as dash, \
            Subscriber(broker.url, "cityops/deadletter", **as_user("cityops-monitor")) as mon:
        alarm(broker, JINJIANG_GW, "gas-510104-000002")
        alarm(broker, JINJIANG_GW, "gas-510104-000003")
        alarm(broker, QINGYANG_GW, "gas-510105-000001")
        got = dash.wait_for(lambda m: all(street_firing(m, s) for s in (
            "gas-510104-000002", "gas-510104-000003", "gas-510105-000001")))
        jinjiang, mine, qingyang = (street_firing(got, s)["alert_id"] for s in (
            "gas-510104-000002", "gas-510104-000003", "gas-510105-000001"))

        # a 锦江区 grid worker: not a 青羊区 alarm, not as someone else, not for another tier
        assert ack(broker, W1, qingyang) == 0
        assert ack(broker, W1, jinjiang, topic_user=W2) == NOT_AUTHORIZED    # the broker's ACL
        assert ack(broker, W1, jinjiang, by=W2) == 0
        assert ack(broker, W1, jinjiang, tier="district") == 0
        # the bare topic names nobody (the ACL lets nobody write it); a gateway is no user
        assert publish(broker.url, "cityops/acks", json.dumps({"alert_id": jinjiang}),
                       **as_user("cityops")) == NOT_AUTHORIZED
        assert ack(broker, JINJIANG_GW, jinjiang) == 0
        refused = mon.wait_for(lambda m: len(dead(m)) >= 4)
        assert {d["reason"] for d in dead(refused)} == {"forbidden"}
        details = sorted(d["detail"] for d in dead(refused))
        assert details[0].startswith(f"'{JINJIANG_GW}' may not acknowledge"), details
        # out of scope: found where the incident is known (the engine), so no topic is named
        assert details[1].startswith(f"'{W1}' acknowledges for tier grid, not district")
        assert details[2].startswith(f"'{W1}' answers for grid") and qingyang in details[2]
        assert details[3].startswith(f"sent by '{W1}' but says by '{W2}'"), details

        # within scope: the worker's own grid, the district user's district
        assert ack(broker, W1, mine) == 0
        assert ack(broker, "duty-510104", jinjiang) == 0
        got = dash.wait_for(lambda m: acked(m, mine) and acked(m, jinjiang))
        assert {(n["acked_by"], n["acked_tier"]) for n in acked(got, mine)} == {(W1, "grid")}
        assert {(n["acked_by"], n["acked_tier"]) for n in acked(got, jinjiang)} == {
            ("duty-510104", "district")}
        assert not acked(got, qingyang)

        # HTTP: a bearer token names the user, and the same scope holds
        body = {"alert_id": qingyang, "ts": now_ms()}
        assert rt.post_ack(dumps(body), None)[0] == 401
        assert rt.post_ack(dumps(body), "guessed-token")[0] == 401
        assert rt.post_ack(dumps({**body, "by": "duty-510105"}), DUTY_TOKENS["duty-510104"])[0] == 403
        assert rt.post_ack(dumps(body), DUTY_TOKENS["duty-510104"]) == (202, {"status": "queued"})
        refused = mon.wait_for(lambda m: len(dead(m)) >= 5)
        assert dead(refused)[4]["reason"] == "forbidden" and "510104" in dead(refused)[4]["detail"]
        assert rt.post_ack(dumps(body), DUTY_TOKENS["duty-510105"])[0] == 202
        got = dash.wait_for(lambda m: acked(m, qingyang))
        assert {(n["acked_by"], n["acked_tier"]) for n in acked(got, qingyang)} == {
            ("duty-510105", "district")}
    m = rt.metrics()
    assert m['cityops_dead_letters_total{reason="forbidden"}'] == 5
    assert m["cityops_acks_total"] == 3


T = topic_names("cityops")


def test_bridge_and_worker_take_acks_only_within_the_senders_scope(broker: Mosquitto, kafka,
                                                                    tmp_path: Path,
                                                                    duty_users: Path) -> None:
    env = {"CITYOPS_MQTT__URL": broker.url, "CITYOPS_MQTT__USERNAME": "cityops",
           "CITYOPS_MQTT__PASSWORD": PASSWORDS["cityops"], "CITYOPS_ACKS__USERS": str(duty_users),
           "CITYOPS_KAFKA__BOOTSTRAP": kafka.bootstrap, "CITYOPS_KAFKA__PARTITIONS": "4",
           "CITYOPS_KAFKA__REPLICATION": "1", "CITYOPS_WORKER__APP_ID": "identity-worker",
           "CITYOPS_KAFKA__PREFIX": "cityops"}
    bridge = CityopsProcess("bridge", tmp_path, {**env, "CITYOPS_MQTT__CLIENT_ID": "id-bridge"},
                            "bridge").start()
    worker = CityopsProcess("worker", tmp_path, env, "worker").start()
    readers: list[TopicReader] = []
    try:
        worker.wait_partitions(4)            # the topics exist from here on
        street = TopicReader(kafka.bootstrap, [T["alerts.street"]])
        deadletters = TopicReader(kafka.bootstrap, [T["deadletter"]])
        readers += [street, deadletters]
        wait_until(lambda: (bridge.health() or {}).get("status") == "ok", 30, "the bridge healthy",
                   detail=bridge.log)
        alarm(broker, JINJIANG_GW, "gas-510104-000004")
        alarm(broker, QINGYANG_GW, "gas-510105-000002")

        def firing(recs: list) -> dict[str, str]:
            return {n["sensor_id"]: n["alert_id"] for n in (json.loads(r.value) for r in recs)
                    if n["state"] == "firing"}
        street.until(lambda recs: len(firing(recs)) == 2, timeout=60)
        ids = firing(street.records)
        jinjiang, qingyang = ids["gas-510104-000004"], ids["gas-510105-000002"]

        assert ack(broker, W1, qingyang) == 0                # out of scope: the worker refuses
        assert ack(broker, JINJIANG_GW, jinjiang) == 0       # no user: the bridge refuses
        assert ack(broker, W1, jinjiang, by="duty-510104") == 0     # someone else: the bridge
        deadletters.until(lambda recs: len(recs) >= 3, timeout=60)
        got = sorted((d["reason"], d["detail"].split(" ")[0]) for d in deadletters.values())
        assert got == [("forbidden", "'gw-510104-0001'"), ("forbidden", f"'{W1}'"),
                       ("forbidden", "sent")], deadletters.values()

        assert ack(broker, "duty-510104", jinjiang) == 0
        street.until(lambda recs: any(json.loads(r.value)["state"] == "acknowledged"
                                      for r in recs), timeout=60, quiet=2.0)
        done = [json.loads(r.value) for r in street.records]
        assert [(n["alert_id"], n["acked_by"], n["acked_tier"]) for n in done
                if n["state"] == "acknowledged"] == [(jinjiang, "duty-510104", "district")]

        # the handling states take the same road (README: Handling states): the worker on site,
        # a close the grid may not make, the district's close with the reason
        assert ack(broker, W1, jinjiang, state="on_site") == 0
        assert ack(broker, W1, jinjiang, state="closed", note="已修复") == 0
        deadletters.until(lambda recs: len(recs) >= 4, timeout=60)
        assert "the tier that owns the incident, district" in deadletters.values()[-1]["detail"]
        assert ack(broker, "duty-510104", jinjiang, state="closed", note="燃气公司已修复管道") == 0
        street.until(lambda recs: any(json.loads(r.value)["state"] == "closed" for r in recs),
                     timeout=60)
        done = [json.loads(r.value) for r in street.records if r.value]
        assert [(n["state"], n["state_by"]) for n in done if n["state"] in ("on_site", "closed")] \
            == [("on_site", W1), ("closed", "duty-510104")]
    finally:
        for r in readers:
            r.close()
        worker.stop()
        bridge.stop()
