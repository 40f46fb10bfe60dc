"""Hot reload on Kafka (pipeline/runtimes/reload_kafka.py), end to end on a real Kafka-protocol broker
(tansu) with two `cityops worker` processes splitting the partitions: one is asked, every
partition switches at the announced event time — readings stamped before it judged by the old
threshold, after it by the new one, in both workers — and a worker whose files differ refuses
and says so."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from bench.harness.kafka_broker import CityopsProcess, TopicReader, produce
from pipeline.core.registry import load as load_registry
from pipeline.shared.reading_router import sensor_partitions
from rules.compiler import load_rules
from tests.support import (CITY_DUTY, CITY_TOKEN, OUT_TOPICS, PARTITIONS, T, params, post_reload, rt_users, sha256,
                           wait_until, worker)

pytestmark = pytest.mark.broker


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
    """wait_until, with the workers' logs if it fails."""
    return wait_until(predicate, timeout, what, interval=0.2,
                      detail=lambda: "\n".join(w.log() for w in workers))


def two_workers(kafka, tmp_path: Path, switch_after: str, b_module: str = "pipeline.cli",
                ) -> tuple[Path, CityopsProcess, CityopsProcess]:
    """Two workers on one params file (gas level 1 at 20 %LEL) that have split the partitions;
    a city-scope user may POST /reload. ``b_module``: worker b run through a test seam."""
    p = params(tmp_path / "params.yaml", 20)
    users = rt_users(tmp_path, {CITY_DUTY: {"scope": "city", "token_sha256": sha256(CITY_TOKEN)}})
    env = {"CITYOPS_PARAMS": str(p), "CITYOPS_ACKS__USERS": str(users),
           "CITYOPS_RELOAD__SWITCH_AFTER": switch_after, "CITYOPS_WORKER__CHECKPOINT_EVERY": "1s"}
    a = worker(kafka, tmp_path, "worker-a", **env)
    b = worker(kafka, tmp_path, "worker-b", b_module, **env)
    until(lambda: sorted((a.health() or {}).get("partitions", []) +
                         (b.health() or {}).get("partitions", [])) == list(range(PARTITIONS)),
          60, "the two workers split the partitions", a, b)
    return p, a, b


def announce(p: Path, a: CityopsProcess, *workers: CityopsProcess) -> tuple[int, str]:
    """Gas level 1 to 30 %LEL, POST /reload to ``a``; waits until every partition of
    ``workers`` waits for the switch. Returns the switch's event time and the new digest."""
    params(p, 30)
    code, body = post_reload(a, CITY_TOKEN)
    assert code == 202 and body["result"] == "announced", body
    at = body["at"]

    def switching() -> dict:
        return {int(k): v for w in workers for k, v in (w.health() or {}).get("switching", {}).items()}
    until(lambda: switching() == {q: at for q in range(PARTITIONS)}, 60,
          "every partition waits for the switch", *workers)
    return at, body["digest"]


def judged_on_both_sides(kafka, at: int) -> None:
    """In every partition: 25 %LEL stamped before the switch fires (old level 20), stamped
    after it does not (new level 30), 35 after it does."""
    reader = TopicReader(kafka.bootstrap, OUT_TOPICS)
    try:
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
    finally:
        reader.close()


def test_two_workers_switch_every_partition_at_the_announced_event_time(kafka, tmp_path) -> None:
    p, a, b = two_workers(kafka, tmp_path, "60s")
    try:
        at, digest = announce(p, a, a, b)
        judged_on_both_sides(kafka, at)
        sets = {int(k): v for w in (a, b) for k, v in w.health()["sets"].items()}
        assert sets == {q: digest for q in range(PARTITIONS)}
        for w in (a, b):                 # each switched its own partitions, none refused
            switched = w.metric('cityops_reloads_total{result="ok"}')
            assert sum(switched.values()) == len(w.health()["partitions"]), w.log()
            assert not sum(w.metric('cityops_reloads_total{result="mismatch"}').values())
    finally:
        a.stop()
        b.stop()


def test_a_switch_not_reached_moves_with_its_partition_when_a_worker_dies(kafka, tmp_path) -> None:
    """The announcement's record is acknowledged with the partition's checkpoint, so the switch
    waiting in it is kept there: kill -9 of worker b, and a, taking b's partitions, switches
    them at the same event time as its own. Worker b takes 3 s to read the changed files
    (tests/slow_read_seam.py): the checkpoints it makes meanwhile must not acknowledge the
    announcement it has not taken yet (they did, and the switch was lost with b)."""
    p, a, b = two_workers(kafka, tmp_path, "120s", b_module="tests.slow_read_seam")
    try:
        at, digest = announce(p, a, a, b)
        # b's checkpoint may come before or after this line: its health says which it holds
        until(lambda: b.health()["switching_checkpointed"] == b.health()["switching"], 30,
              "worker b checkpoints its partitions with the switch in them", b)
        b.kill()
        until(lambda: len((a.health() or {}).get("partitions", [])) == PARTITIONS, 90,
              "worker a takes every partition", a)
        until(lambda: (a.health() or {}).get("switching") == {str(q): at for q in range(PARTITIONS)},
              30, "every partition still waits for the same switch", a)
        judged_on_both_sides(kafka, at)
        assert set(a.health()["sets"].values()) == {digest}
    finally:
        a.stop()
        b.stop()


def test_a_worker_restarted_under_changed_files_ends_what_they_end_for_every_tier_told(
        kafka, tmp_path) -> None:
    """The files change while no worker runs: a worker restoring the checkpoints judges them by
    the set they were made under (kept in its data_dir) and carries them into its files, as a
    switch would: a removed rule's incidents resolve, with the reason, to every tier told."""
    from tests.support import HOT
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "hot.yaml").write_text(HOT, encoding="utf-8")
    env = {"CITYOPS_PACKS": json.dumps([str(packs)]), "CITYOPS_WORKER__CHECKPOINT_EVERY": "1s"}
    a = worker(kafka, tmp_path, "worker-a", **env)
    b = reader = None
    try:
        a.wait_partitions(PARTITIONS)                   # the topics exist: read them
        reader = TopicReader(kafka.bootstrap, OUT_TOPICS)
        gas = gas_by_partition()
        sids = {gas[q][0] for q in range(PARTITIONS)}
        now = int(time.time() * 1000)
        produce(kafka.bootstrap, T["readings"], [record(sid, now, 8.0) for sid in sorted(sids)])

        def hot(state: str) -> dict[str, set]:
            out: dict[str, set] = {}
            for n in reader.values():
                if n["rule_id"] == "hot.gas" and n["state"] == state:
                    out.setdefault(n["sensor_id"], set()).add((n["tier"], n["target"]))
            return out
        reader.until(lambda recs: hot("firing").keys() == sids, timeout=60)

        def checkpointed() -> bool:
            done, read = ({k.partition("{")[2]: v for k, v in a.metric(f"cityops_partition_{m}{{").items()}
                          for m in ("checkpoint_offset", "offset"))
            return len(read) == PARTITIONS and done == read and all(read.values())
        until(checkpointed, 30, "every partition checkpointed with its incident", a)
        a.stop()
        firing = hot("firing")

        (packs / "hot.yaml").unlink()                   # the rule is removed while stopped
        b = worker(kafka, tmp_path, "worker-b", **env)
        reader.until(lambda recs: hot("resolved") == firing, timeout=90)
        assert all("规则已删除" in n["summary"] for n in reader.values()
                   if n["rule_id"] == "hot.gas" and n["state"] == "resolved")
        assert "carried into them, 1 incidents resolved" in b.log()
    finally:
        if reader is not None:
            reader.close()
        for w in (a, b):
            if w is not None:
                w.stop()


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
        a.proc.send_signal(signal.SIGHUP)               # a worker reloads on SIGHUP too
        until(lambda: sum(b.metric('cityops_reloads_total{result="mismatch"}').values())
              == len(b.health()["partitions"]), 60, "worker b refuses, per partition", a, b)
        log_a, log_b = (w.log_path.read_text(errors="replace") for w in (a, b))
        announced = re.search(r"reload \(SIGHUP\) announced: digest \w+ → (\w+)", log_a)
        assert announced, a.log()
        assert f"reload to {announced[1]} (by SIGHUP) refused: its files have digest" in log_b
        assert "make the files the same on every worker" in log_b
        assert not b.health()["switching"]
        assert len(set(a.health()["switching"].values())) == 1
    finally:
        a.stop()
        b.stop()
