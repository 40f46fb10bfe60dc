"""Hot reload on Kafka (pipeline/reload_kafka.py), end to end on a real Kafka-protocol broker
(tansu) with two `cityops worker` processes splitting the partitions: one is asked, every
partition switches at the announced event time — readings stamped before it judged by the old
threshold, after it by the new one, in both workers — and a worker whose files differ refuses
and says so."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.bridge import sensor_partitions
from pipeline.registry import load as load_registry
from rules.compiler import load_rules
from tests.kafka_broker import CityopsProcess, TopicReader, produce
from tests.test_reload_mqtt import CITY_DUTY, CITY_TOKEN, params
from tests.test_runtime_mqtt import rt_users, sha256
from tests.test_worker_kafka import OUT_TOPICS, PARTITIONS, T, worker

pytestmark = pytest.mark.broker


def post_reload(w: CityopsProcess, token: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{w.http_port}/reload", data=b"", method="POST",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def gas_by_partition() -> dict[int, list[str]]:
    rules = load_rules()
    reg = load_registry(None, rules.kinds)
    part = sensor_partitions(reg, PARTITIONS)
    out: dict[int, list[str]] = {}
    for i, sid in enumerate(reg.sensor_ids):
        if reg.kinds[reg.kind_of[i]] == "gas_household":
            out.setdefault(int(part[i]), []).append(sid)
    return out


def record(sid: str, ts: int, value: float) -> tuple[bytes, bytes]:
    return sid.encode(), json.dumps({"sensor_id": sid, "ts": ts, "value": value}).encode()


def leaks(reader: TopicReader) -> dict[str, dict]:
    """The gas.leak firings on the street topic, read so far."""
    return {n["sensor_id"]: n for n in reader.values(T["alerts.street"])
            if n["rule_id"] == "gas.leak" and n["state"] == "firing"}


def until(predicate, timeout: float, what: str, *workers: CityopsProcess):
    deadline = time.monotonic() + timeout
    while not (got := predicate()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}\n" + \
            "\n".join(w.log() for w in workers)
        time.sleep(0.2)
    return got


def test_two_workers_switch_every_partition_at_the_announced_event_time(kafka, tmp_path) -> None:
    p = params(tmp_path / "params.yaml", 20)
    users = rt_users(tmp_path, {CITY_DUTY: {"scope": "city", "token_sha256": sha256(CITY_TOKEN)}})
    env = {"CITYOPS_PARAMS": str(p), "CITYOPS_ACKS__USERS": str(users),
           "CITYOPS_RELOAD__SWITCH_AFTER": "60s"}
    a = worker(kafka, tmp_path, "worker-a", **env)
    b = worker(kafka, tmp_path, "worker-b", **env)
    reader = None
    try:
        until(lambda: sorted((a.health() or {}).get("partitions", []) +
                             (b.health() or {}).get("partitions", [])) == list(range(PARTITIONS)),
              60, "the two workers split the partitions", a, b)
        reader = TopicReader(kafka.bootstrap, OUT_TOPICS)       # the topics exist now
        params(p, 30)
        code, body = post_reload(a, CITY_TOKEN)
        assert code == 202 and body["result"] == "announced", body
        at, digest = body["at"], body["digest"]

        def switching() -> dict:
            return {int(k): v for w in (a, b) for k, v in (w.health() or {}).get("switching", {}).items()}
        until(lambda: switching() == {q: at for q in range(PARTITIONS)}, 60,
              "every partition waits for the switch", a, b)

        gas = gas_by_partition()
        assert sorted(gas) == list(range(PARTITIONS)) and all(len(s) >= 3 for s in gas.values())
        before = [record(gas[q][0], at - 2000, 25.0) for q in range(PARTITIONS)]
        produce(kafka.bootstrap, T["readings"], before)            # old rules: 25 ≥ 20 fires
        reader.until(lambda recs: {gas[q][0] for q in range(PARTITIONS)} <= leaks(reader).keys(),
                     timeout=60)                                  # the readings before it fire
        after = [record(gas[q][1], at + 1000, 25.0) for q in range(PARTITIONS)] + \
                [record(gas[q][2], at + 2000, 35.0) for q in range(PARTITIONS)]
        produce(kafka.bootstrap, T["readings"], after)             # new rules: only 35 ≥ 30
        reader.until(lambda recs: {gas[q][2] for q in range(PARTITIONS)} <= leaks(reader).keys(),
                     timeout=60)
        assert not {gas[q][1] for q in range(PARTITIONS)} & leaks(reader).keys()

        sets = {int(k): v for w in (a, b) for k, v in w.health()["sets"].items()}
        assert sets == {q: digest for q in range(PARTITIONS)}
        for w in (a, b):                 # each switched its own partitions, none refused
            switched = w.metric('cityops_reloads_total{result="ok"}')
            assert sum(switched.values()) == len(w.health()["partitions"]), w.log()
            assert not sum(w.metric('cityops_reloads_total{result="mismatch"}').values())
    finally:
        if reader is not None:
            reader.close()
        a.stop()
        b.stop()


def test_a_worker_whose_files_differ_refuses_the_announced_set_and_says_so(kafka, tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pa, pb = params(tmp_path / "a" / "params.yaml", 20), params(tmp_path / "b" / "params.yaml", 20)
    users = rt_users(tmp_path, {CITY_DUTY: {"scope": "city", "token_sha256": sha256(CITY_TOKEN)}})
    common = {"CITYOPS_ACKS__USERS": str(users), "CITYOPS_RELOAD__SWITCH_AFTER": "60s"}
    a = worker(kafka, tmp_path, "worker-a", CITYOPS_PARAMS=str(pa), **common)
    b = worker(kafka, tmp_path, "worker-b", CITYOPS_PARAMS=str(pb), **common)
    try:
        until(lambda: len((a.health() or {}).get("partitions", [])) and
              len((b.health() or {}).get("partitions", [])), 60, "both hold partitions", a, b)
        params(pa, 30)                                  # only worker a's copy changes
        code, body = post_reload(a, CITY_TOKEN)
        assert code == 202, body
        until(lambda: sum(b.metric('cityops_reloads_total{result="mismatch"}').values())
              == len(b.health()["partitions"]), 60, "worker b refuses, per partition", a, b)
        assert f"reload to {body['digest']}" in b.log() and "refused: its files have digest" in b.log()
        assert "make the files the same on every worker" in b.log()
        assert not b.health()["switching"]
        assert set(a.health()["switching"].values()) == {body["at"]}
    finally:
        a.stop()
        b.stop()
