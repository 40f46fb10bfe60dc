"""The distributed runtime end to end: a real Kafka-protocol broker (tansu), `cityops worker`
processes, kafka-python clients in and out; the bridge from a real Mosquitto.

What must hold (issue 4): the same notices as `cityops replay` for the same input; two workers
split the partitions and together make the same notices as one; kill -9 of a worker mid-stream
and a restart lose no incident and create none twice; a poison message goes to the dead-letter
topic and its partition keeps moving.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from bench.harness.brokers import Subscriber, mosquitto_pub, publish_many
from bench.harness.kafka_broker import CityopsProcess, TopicReader, produce
from connectors.kafka import topic_names
from pipeline.core.registry import load as load_registry
from pipeline.shared.reading_router import sensor_partitions
from pipeline.shared.simulate import Simulator
from rules.compiler import load_rules
from tests.support import OUT_TOPICS, PARTITIONS, T, wait_until, worker

pytestmark = pytest.mark.broker


def scenario(seconds: int = 110, end_before_now_s: int = 20) -> list[bytes]:
    """The simulator's story (gas leak at a resident living alone, neighbours alarming, a
    rainstorm, a site violation, a silent sensor, a rising river) and every other sensor's
    background, as one reading per record: what a Kafka-native gateway would produce. Times end
    ``end_before_now_s`` before now, so no reading is from the future and the worker's wall
    clock has nothing left to fire during the test that replay would not fire too."""
    rules = load_rules()
    reg = load_registry(None, rules.kinds)
    t0 = time.time() - seconds - end_before_now_s
    clock = [t0]
    sent: list[tuple[str, bytes]] = []
    sim = Simulator(reg, lambda topic, payload: sent.append((topic, payload)), clock=lambda: clock[0])
    for s in range(seconds + 1):
        clock[0] = t0 + s
        sim.step()
    readings = []
    for _, payload in sent:
        got = json.loads(payload)
        for r in got if isinstance(got, list) else [got]:
            readings.append(json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode())
    return readings


def keyed(readings: list[bytes]) -> list[tuple[bytes, bytes]]:
    return [(json.loads(r)["sensor_id"].encode(), r) for r in readings]


def replay_notices(tmp_path: Path, readings: list[bytes]) -> list[dict]:
    src = tmp_path / "readings.jsonl"
    src.write_bytes(b"\n".join(readings) + b"\n")
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "replay", str(src)],
                         capture_output=True, check=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def identity(n: dict) -> tuple:
    return (n["alert_id"], n["rule_id"], n["state"], n["seq"], n["tier"], n["target"], n["severity"])


def within(readings: list[bytes]):
    """Notices stamped no later than the story's last reading. Replay stops its clock there;
    a worker's clock goes on with the wall clock, and the reminders and escalations it then
    makes on time (their ts is their deadline) are past what replay can be compared on."""
    end = max(json.loads(r)["ts"] for r in readings) + 1
    return lambda n: datetime.fromisoformat(n["ts"]).timestamp() * 1000 <= end


def split(a: CityopsProcess, b: CityopsProcess, timeout: float) -> None:
    """Until the group has split the partitions between ``a`` and ``b``."""
    def both() -> bool:
        pa, pb = (a.health() or {}).get("partitions"), (b.health() or {}).get("partitions")
        return bool(pa and pb and sorted(pa + pb) == list(range(PARTITIONS)))
    wait_until(both, timeout, "the partitions split between two workers", interval=0.3,
               detail=lambda: f"{a.health()} {b.health()}\n{a.log()}\n{b.log()}")


def checkpointed(w: CityopsProcess, timeout: float = 30.0) -> None:
    """Until ``w`` has written a checkpoint (its state is in the changelog)."""
    wait_until(lambda: sum(w.metric("cityops_checkpoints_total").values()), timeout,
               f"a checkpoint by {w.name}", interval=0.2, detail=w.log)


def bridge_ok(bridge: CityopsProcess, timeout: float = 30.0) -> None:
    wait_until(lambda: (bridge.health() or {}).get("status") == "ok", timeout, "the bridge healthy",
               interval=0.1, detail=bridge.log)


def collect(kafka, expected: set, timeout: float = 90.0) -> TopicReader:
    """Read the tier topics until every expected notice is there, and 2 s more."""
    reader = TopicReader(kafka.bootstrap, OUT_TOPICS)
    reader.until(lambda recs: expected <= {identity(json.loads(r.value)) for r in recs},
                 timeout=timeout, quiet=2.0)
    return reader


@pytest.fixture
def story(tmp_path_factory) -> tuple[list[bytes], list[dict]]:
    # per test: the story must end just before *this* test's worker starts its clock
    readings = scenario()
    notices = replay_notices(tmp_path_factory.mktemp("replay"), readings)
    return readings, notices


def test_the_story_makes_incidents_at_every_tier(story) -> None:
    readings, notices = story
    tiers = {n["tier"] for n in notices}
    rules = {n["rule_id"] for n in notices}
    assert {"street", "district", "city", "dept", "grid"} <= tiers
    assert {"gas.leak", "gas.building_cluster"} <= rules
    assert len(readings) > 1000


def test_worker_makes_the_same_notices_as_replay(kafka, tmp_path, story) -> None:
    readings, expected_notices = story
    expected = {identity(n) for n in expected_notices}
    w = worker(kafka, tmp_path)
    try:
        w.wait_partitions(PARTITIONS)
        produce(kafka.bootstrap, T["readings"], keyed(readings))
        reader = collect(kafka, expected)
        got = [identity(n) for n in reader.values() if within(readings)(n)]
        assert set(got) == expected
        assert len(got) == len(expected_notices), "a clean run sends each notice once"
        # readings were produced with kafka-python's own partitioner: the worker moved each to
        # its street's partition rather than judging it without its neighbours
        assert sum(w.metric("cityops_forwarded_total").values()) > 0
        lag = w.metric("cityops_partition_lag")
        assert len(lag) == PARTITIONS and not any(lag.values())
    finally:
        w.stop()


def test_two_workers_split_the_partitions_and_make_the_same_notices(kafka, tmp_path, story) -> None:
    readings, expected_notices = story
    expected = {identity(n) for n in expected_notices}
    a = worker(kafka, tmp_path, "worker-a")
    b = worker(kafka, tmp_path, "worker-b")
    try:
        split(a, b, 60)
        produce(kafka.bootstrap, T["readings"], keyed(readings))
        reader = collect(kafka, expected)
        got = [identity(n) for n in reader.values() if within(readings)(n)]
        assert set(got) == expected
        assert len(got) == len(expected_notices)
        for w in (a, b):
            assert sum(w.metric("cityops_readings_total").values()) > 0, f"{w.name} did nothing"
    finally:
        a.stop()
        b.stop()


def test_kill_9_mid_stream_loses_no_incident_and_makes_none_twice(kafka, tmp_path, story) -> None:
    readings, expected_notices = story
    expected = {identity(n) for n in expected_notices}
    expected_incidents = {n["alert_id"] for n in expected_notices}
    # small checkpoint pieces: a partition's state is restored from many changelog records
    pieces = {"CITYOPS_WORKER__CHECKPOINT_PIECE": "1024"}
    first = worker(kafka, tmp_path, "worker-1", **pieces)
    first.wait_partitions(PARTITIONS)
    half, three_quarters = len(readings) // 2, len(readings) * 3 // 4
    produce(kafka.bootstrap, T["readings"], keyed(readings[:half]))
    reader = TopicReader(kafka.bootstrap, OUT_TOPICS)
    reader.until(lambda recs: len(recs) >= 3, timeout=60)
    checkpointed(first)                            # state in the changelog
    produce(kafka.bootstrap, T["readings"], keyed(readings[half:three_quarters]))
    first.kill()                                   # mid-stream: after a checkpoint, before the next
    produce(kafka.bootstrap, T["readings"], keyed(readings[three_quarters:]))
    second = worker(kafka, tmp_path, "worker-2", **pieces)
    try:
        second.wait_partitions(PARTITIONS, timeout=90)
        reader.until(lambda recs: expected <= {identity(json.loads(r.value)) for r in recs},
                     timeout=120, quiet=3.0)
        got = [n for n in (json.loads(r.value) for r in reader.records) if within(readings)(n)]
        assert {identity(n) for n in got} == expected, "a notice replay does not make is missing, or extra"
        assert {n["alert_id"] for n in got} == expected_incidents, "no second incident"
        later = {json.loads(r.value)["alert_id"] for r in reader.records} - expected_incidents
        assert not later, f"the clock went on past the story, but no incident can start from it: {later}"
        assert not any(second.metric("cityops_partition_gap_records").values())
        assert not any(second.metric("cityops_checkpoints_unreadable_total").values())
        assert "state restored at offsets" in second.log()
    finally:
        second.stop()


def test_a_worker_joining_mid_stream_takes_partitions_with_their_alert_state(kafka, tmp_path,
                                                                            story) -> None:
    """A rebalance, not a crash: the partitions that move carry their incidents over (the new
    owner restores the checkpoint), and together the two make exactly replay's incidents."""
    readings, expected_notices = story
    expected = {identity(n) for n in expected_notices}
    expected_incidents = {n["alert_id"] for n in expected_notices}
    a = worker(kafka, tmp_path, "worker-a")
    b = None
    try:
        a.wait_partitions(PARTITIONS)
        half = len(readings) // 2
        produce(kafka.bootstrap, T["readings"], keyed(readings[:half]))
        reader = TopicReader(kafka.bootstrap, OUT_TOPICS)
        reader.until(lambda recs: len(recs) >= 3, timeout=60)
        checkpointed(a)
        b = worker(kafka, tmp_path, "worker-b")
        split(a, b, 90)
        produce(kafka.bootstrap, T["readings"], keyed(readings[half:]))
        reader.until(lambda recs: expected <= {identity(json.loads(r.value)) for r in recs},
                     timeout=120, quiet=3.0)
        got = [n for n in (json.loads(r.value) for r in reader.records) if within(readings)(n)]
        assert {identity(n) for n in got} == expected
        assert {json.loads(r.value)["alert_id"] for r in reader.records} == expected_incidents
        assert "state restored at offsets" in b.log(), "the partitions came with their state"
        for w in (a, b):
            assert not any(w.metric("cityops_partition_gap_records").values())
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_poison_goes_to_the_dead_letter_topic_and_the_partition_keeps_moving(kafka, tmp_path) -> None:
    w = worker(kafka, tmp_path)
    try:
        w.wait_partitions(PARTITIONS)
        now = int(time.time() * 1000)
        sid = b"gas-510104-000002"

        def gas(v: float, dt: int) -> bytes:
            return json.dumps({"sensor_id": sid.decode(), "ts": now + dt, "value": v}).encode()

        produce(kafka.bootstrap, T["readings"], [
            (sid, gas(1.0, 0)),
            (sid, b"{not json"),
            (sid, b'{"sensor_id": "gas-510104-000002", "ts": "yesterday", "value": 1}'),
            (sid, b"\xff\xfe\x00garbage"),
            (sid, b"[" + b",".join([gas(1.0, 1)] * 4000) + b"]"),        # oversize
            (b"no-such-sensor", b'{"sensor_id": "no-such-sensor", "ts": 1, "value": 1}'),
            (None, b'{"sensor_id": "gas-510104-000002", "ts": 5, "event": "x", "value": 3}'),
            (sid, gas(35.0, 2000)),                                          # the leak, after all that
        ])
        dead = TopicReader(kafka.bootstrap, [T["deadletter"]])
        dead.until(lambda recs: len(recs) >= 6, timeout=60)
        reasons = sorted(d["reason"] for d in dead.values())
        assert reasons == sorted(["malformed", "invalid", "malformed", "oversize", "unknown_sensor",
                                  "invalid"]), reasons
        for d in dead.values():
            assert d["payload"] and d["detail"] and d["source"].startswith(T["readings"])
        alerts = TopicReader(kafka.bootstrap, [T["alerts.street"]])
        alerts.until(lambda recs: any(json.loads(r.value)["sensor_id"] == sid.decode()
                                      for r in recs), timeout=60)
        assert not any(w.metric("cityops_partition_lag").values())
        assert not any(w.metric("cityops_engine_errors_total").values())
    finally:
        w.stop()


def test_bridge_carries_mosquitto_readings_to_the_workers_and_back(kafka, mosquitto, tmp_path) -> None:
    """Gateways publish to Mosquitto; the bridge writes Kafka; the worker's notices arrive on
    Kafka and, mirrored, on the MQTT tier topics; an ack over MQTT reaches the engine."""
    env = {"CITYOPS_MQTT__URL": mosquitto.url, "CITYOPS_KAFKA__BOOTSTRAP": kafka.bootstrap,
           "CITYOPS_KAFKA__PARTITIONS": str(PARTITIONS), "CITYOPS_KAFKA__REPLICATION": "1"}
    bridge = CityopsProcess("bridge", tmp_path, {**env, "CITYOPS_MQTT__CLIENT_ID": "bridge-1"},
                            "bridge").start()
    w = worker(kafka, tmp_path, **{**env, "CITYOPS_WORKER__MIRROR_MQTT": "true",
                                   "CITYOPS_MQTT__CLIENT_ID": "worker-1"})
    dashboard = Subscriber(mosquitto.url, "cityops/alerts/#").start()
    try:
        w.wait_partitions(PARTITIONS)
        bridge_ok(bridge)
        now = int(time.time() * 1000)
        batch = [{"sensor_id": "gas-510104-000001", "ts": now, "value": 40.0},
                 {"sensor_id": "gas-510104-000002", "ts": now, "value": 1.0}]
        mosquitto_pub(mosquitto.url, "cityops/gateways/gw-510104-0001", json.dumps(batch))
        mosquitto_pub(mosquitto.url, "cityops/readings/gas-510104-000003", "{broken")
        mosquitto_pub(mosquitto.url, "cityops/gateways/gw-510104-0001",    # not behind that gateway
                      json.dumps([{"sensor_id": "gas-510107-000001", "ts": now, "value": 99}]))
        street = TopicReader(kafka.bootstrap, [T["alerts.street"]])
        street.until(lambda recs: any(json.loads(r.value)["state"] == "firing" for r in recs),
                     timeout=60)
        notice = street.values()[0]
        # yellow, raised to orange: 独居老人
        assert notice["sensor_id"] == "gas-510104-000001" and notice["severity"] == "orange"
        dead = TopicReader(kafka.bootstrap, [T["deadletter"]])
        dead.until(lambda recs: len(recs) >= 2, timeout=30)
        assert sorted(d["reason"] for d in dead.values()) == ["malformed", "wrong_sender"]
        mirrored = dashboard.wait_for(lambda msgs: any(t == "cityops/alerts/street/510104020"
                                                       for t, _ in msgs), timeout=30)
        assert any(json.loads(p)["alert_id"] == notice["alert_id"] for _, p in mirrored)
        # the grid worker of gas-510104-000001's grid, named by the topic (tests/runtimes/test_ack_identity.py
        # has who may acknowledge what)
        ack = {"alert_id": notice["alert_id"], "ts": now + 1000}
        mosquitto_pub(mosquitto.url, "cityops/acks/w-510104020001-01", json.dumps(ack))
        street.until(lambda recs: any(json.loads(r.value)["state"] == "acknowledged" for r in recs),
                     timeout=60)
    finally:
        dashboard.close()
        w.stop()
        bridge.stop()


def test_worker_writes_history_and_pushes_to_the_on_call_worker(kafka, mosquitto, victoria_metrics,
                                                                 tmp_path) -> None:
    """The worker's other outputs, as in `cityops run`: readings and alerts into the
    line-protocol database, the grid notice pushed (with its acknowledge link) over MQTT, and a
    site violation pushed to the site's owner."""
    push = {"CITYOPS_PUSH__ENABLED": "true", "CITYOPS_PUSH__SECRET": "s" * 40,
            "CITYOPS_MQTT__URL": mosquitto.url, "CITYOPS_KAFKA__BOOTSTRAP": kafka.bootstrap,
            "CITYOPS_KAFKA__PARTITIONS": str(PARTITIONS), "CITYOPS_KAFKA__REPLICATION": "1"}
    w = worker(kafka, tmp_path, CITYOPS_INFLUX__URL=victoria_metrics.url,
               CITYOPS_INFLUX__FLUSH_INTERVAL="200ms", CITYOPS_MQTT__CLIENT_ID="worker-sinks",
               **push)
    bridge = CityopsProcess("bridge", tmp_path, {**push, "CITYOPS_MQTT__CLIENT_ID": "bridge-1"},
                            "bridge").start()
    phone = Subscriber(mosquitto.url, "cityops/push/+").start()
    try:
        w.wait_partitions(PARTITIONS)
        now = int(time.time() * 1000)
        sid = "gas-510104-000001"
        produce(kafka.bootstrap, T["readings"], [
            (sid.encode(), json.dumps({"sensor_id": sid, "ts": now - 1000, "value": 2.0}).encode()),
            (sid.encode(), json.dumps({"sensor_id": sid, "ts": now, "value": 30.0}).encode())])
        pushed = phone.wait_for(lambda msgs: len(msgs) >= 1, timeout=60)
        topic, body = pushed[0]
        got = json.loads(body)
        assert topic == f"cityops/push/{got['worker_id']}" and got["sensor_id"] == sid
        assert got["ack_url"] and got["ack_token"]
        points = victoria_metrics.wait_points(
            lambda pts: any(p[0].startswith("alerts") for p in pts)
            and sum(1 for p in pts if p[0] == "gas_household_value") >= 2, timeout=30)
        readings = sorted((ts, v) for name, labels, ts, v in points
                          if name == "gas_household_value" and dict(labels)["sensor"] == sid)
        assert readings == [(now - 1000, 2.0), (now, 30.0)]
        assert any(name.startswith("alerts") and dict(labels).get("rule") == "gas.leak"
                   for name, labels, _, _ in points)
        # the grid worker replies with the push's token; the bridge checks it, the engine
        # acknowledges; a forged one is a dead letter
        mosquitto_pub(mosquitto.url, f"{topic}/ack", got["ack_token"][:-4] + "AAAA")
        mosquitto_pub(mosquitto.url, f"{topic}/ack", got["ack_token"])
        street = TopicReader(kafka.bootstrap, [T["alerts.street"]])
        street.until(lambda recs: any(json.loads(r.value)["state"] == "acknowledged"
                                      and json.loads(r.value)["acked_by"] == got["worker_id"]
                                      for r in recs), timeout=60)
        dead = TopicReader(kafka.bootstrap, [T["deadletter"]])
        dead.until(lambda recs: any(json.loads(r.value)["reason"] == "bad_ack" for r in recs),
                   timeout=30)
        # a site camera's violation: the project's owner is pushed too (push.tiers.owner: mqtt)
        cam = "cam-510108-000001"
        produce(kafka.bootstrap, T["readings"], [(cam.encode(), json.dumps(
            {"sensor_id": cam, "ts": int(time.time() * 1000), "event": "no_helmet"}).encode())])
        owner = "cityops/push/site-510108-wannianchang"
        [(_, body)] = [m for m in phone.wait_for(lambda msgs: any(t == owner for t, _ in msgs),
                                                 timeout=60) if m[0] == owner]
        told = json.loads(body)
        assert (told["tier"], told["sensor_id"], told["state"]) == ("owner", cam, "firing")
        assert told["ack_url"] and "整改完毕后点击链接确认整改" in told["summary"]
        TopicReader(kafka.bootstrap, [T["push"]]).until(
            lambda recs: any(r.key == b"site-510108-wannianchang" for r in recs), timeout=30)
    finally:
        phone.close()
        bridge.stop()
        w.stop()


def test_bridge_killed_mid_stream_loses_no_reading(kafka, mosquitto, tmp_path) -> None:
    """MQTT messages are acknowledged only after Kafka has them: a bridge killed with -9 in
    the middle of a stream and started again (same MQTT session) leaves no reading behind."""
    env = {"CITYOPS_MQTT__URL": mosquitto.url, "CITYOPS_KAFKA__BOOTSTRAP": kafka.bootstrap,
           "CITYOPS_KAFKA__PARTITIONS": str(PARTITIONS), "CITYOPS_KAFKA__REPLICATION": "1",
           "CITYOPS_MQTT__CLIENT_ID": "bridge-1"}

    def start() -> CityopsProcess:
        b = CityopsProcess("bridge", tmp_path, env, "bridge").start()
        bridge_ok(b)
        return b

    sensors = [f"gas-510104-{i:06d}" for i in range(1, 21)]
    now = int(time.time() * 1000)
    messages = [(f"cityops/readings/{sid}",
                 json.dumps({"sensor_id": sid, "ts": now - 600_000 + k * 1000, "value": 1.0}))
                for k in range(300) for sid in sensors]                      # 6,000 readings
    bridge = start()
    kafka_in = TopicReader(kafka.bootstrap, [T["readings"]])
    gateway = threading.Thread(target=publish_many, args=(mosquitto.url, messages))
    try:
        gateway.start()
        kafka_in.until(lambda recs: len(recs) >= 200, timeout=30)
        bridge.kill()                                 # while readings are still coming
        gateway.join(60)                              # the broker keeps the rest for its session
        kafka_in.poll(1.0)
        assert len(kafka_in.records) < len(messages), "the bridge was not killed mid-stream"
        bridge = start()
        want = {(json.loads(p)["sensor_id"], json.loads(p)["ts"]) for _, p in messages}
        kafka_in.until(lambda recs: want <= {(json.loads(r.value)["sensor_id"], json.loads(r.value)["ts"])
                                             for r in recs}, timeout=60)
        reg = load_registry(None, load_rules().kinds)
        street_partition = sensor_partitions(reg, PARTITIONS)
        for r in kafka_in.records:                    # on its street's partition, keyed by sensor
            assert r.partition == street_partition[reg.index[r.key.decode()]]
    finally:
        bridge.stop()


def test_an_ack_no_partition_holds_is_a_bad_ack_counted_and_the_log_has_no_escape_codes(
        kafka, tmp_path) -> None:
    """Issue 12, item 11: on Kafka an ack for an unknown alert_id vanished (no dead letter, no
    counter) where cityops run dead-letters it; a non-JSON ack's detail says it is not JSON;
    the worker's log, a file here, had a terminal escape code in it."""
    w = worker(kafka, tmp_path, "acks")
    try:
        w.wait_partitions(PARTITIONS)
        unknown = json.dumps({"alert_id": "no-such-alert", "by": "w-510104020001-01",
                              "tier": "grid", "ts": int(time.time() * 1000)}).encode()
        produce(kafka.bootstrap, T["acks"], [(b"no-such-alert", unknown), (b"x", b"ack it!")])
        dead = TopicReader(kafka.bootstrap, [T["deadletter"]])
        dead.until(lambda recs: len(recs) >= 2, timeout=60, quiet=2.0)
        got = sorted((d["reason"], d["detail"].split(":")[0], d["payload"]) for d in dead.values())
        assert got == [("bad_ack", "no open incident no-such-alert in any partition (resolved "
                        "already, or never existed)", unknown.decode()),
                       ("bad_ack", "not JSON", "ack it!")], got
        assert sum(w.metric("cityops_acks_total").values()) == 1
        assert sum(w.metric("cityops_acks_unmatched_total").values()) == 1
    finally:
        w.stop()
    assert "\x1b" not in w.log_path.read_text(errors="replace")


def test_an_alarm_resent_behind_a_newer_reading_fires_on_the_worker(kafka, tmp_path) -> None:
    """Issue 12, item 10, on Kafka: a gateway's alarm resent after its newer normal reading (a
    bridge or broker restart) is late, not stale: it fires at its own time. One older than
    allowed_lateness (10 s, the live default) is still a dead letter `stale`."""
    w = worker(kafka, tmp_path, CITYOPS_ENGINE__ALLOWED_LATENESS="10s")
    try:
        w.wait_partitions(PARTITIONS)
        now = int(time.time() * 1000)
        sid = "gas-510104-000001"          # a resident living alone

        def gas(v: float, at: int) -> tuple[bytes, bytes]:
            return sid.encode(), json.dumps({"sensor_id": sid, "ts": at, "value": v}).encode()

        produce(kafka.bootstrap, T["readings"], [gas(1.0, now + 2000), gas(27.5, now),
                                                 gas(60.0, now + 2000 - 11_000)])
        alerts = TopicReader(kafka.bootstrap, [T["alerts.street"]])
        alerts.until(lambda recs: any(json.loads(r.value)["sensor_id"] == sid for r in recs),
                     timeout=60, quiet=2.0)
        street = [n for n in alerts.values() if n["sensor_id"] == sid]
        assert [(n["state"], n["value"], n["severity"]) for n in street] == [
            ("firing", 27.5, "orange")]
        dead = TopicReader(kafka.bootstrap, [T["deadletter"]])
        dead.until(lambda recs: len(recs) >= 1, timeout=30)
        assert [d["reason"] for d in dead.values()] == ["stale"]
    finally:
        w.stop()


def test_workers_started_together_make_each_topic_once_and_none_fails(kafka) -> None:
    """Found by the two-worker test under load: both workers saw the topics missing, both asked
    to create them, and the second died of TopicAlreadyExistsError."""
    from connectors.kafka import ensure_topics
    from pipeline.shared.config import KafkaSettings
    settings = KafkaSettings(bootstrap=kafka.bootstrap, prefix="race", partitions=2, replication=1)
    go = threading.Barrier(4)
    made: list[list[str]] = []
    failed: list[BaseException] = []

    def start() -> None:
        go.wait()
        try:
            made.append(ensure_topics(settings))
        except BaseException as exc:       # noqa: BLE001  (any failure is what we look for)
            failed.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failed, failed
    created = [n for m in made for n in m]
    assert sorted(created) == sorted(topic_names("race").values())     # each once, by someone


def test_a_partition_taken_over_in_a_rebalance_pushes_to_its_own_grid_worker_and_owner(
        kafka, mosquitto, tmp_path) -> None:
    """A worker holds the registry's grids and people as it meets them, not the whole city
    (pipeline/core/registry_cache.py): one that takes over a partition from a worker that left must
    still find that partition's on-call grid worker and site owner, and push to them."""
    reg = load_registry(None, load_rules().kinds)
    of = sensor_partitions(reg, PARTITIONS)
    cam = "cam-510108-000001"
    moved = int(of[reg.index[cam]])
    now = int(time.time() * 1000)
    gas, on_call = next(
        (sid, w) for i, sid in enumerate(reg.sensor_ids)
        if of[i] == moved and reg.kinds[reg.kind_of[i]] == "gas_household"
        and (w := reg.on_call(reg.place_of(i).grid, reg.place_of(i).street, now)) is not None)
    owner = reg.owner_of(reg.index[cam])
    assert owner is not None
    push = {"CITYOPS_PUSH__ENABLED": "true", "CITYOPS_PUSH__SECRET": "s" * 40,
            "CITYOPS_MQTT__URL": mosquitto.url}
    a = worker(kafka, tmp_path, "worker-a", CITYOPS_MQTT__CLIENT_ID="worker-a", **push)
    b = worker(kafka, tmp_path, "worker-b", CITYOPS_MQTT__CLIENT_ID="worker-b", **push)
    phone = Subscriber(mosquitto.url, "cityops/push/+").start()
    try:
        wait_until(lambda: all((w.health() or {}).get("partitions") for w in (a, b)), 90,
                   "partitions for both workers", interval=0.3, detail=lambda: f"{a.log()}\n{b.log()}")
        leaving, staying = (a, b) if moved in a.health()["partitions"] else (b, a)
        assert moved not in staying.health()["partitions"]
        leaving.stop()
        staying.wait_partitions(PARTITIONS, timeout=90)
        produce(kafka.bootstrap, T["readings"], [
            (gas.encode(), json.dumps({"sensor_id": gas, "ts": now - 1000, "value": 2.0}).encode()),
            (gas.encode(), json.dumps({"sensor_id": gas, "ts": now, "value": 30.0}).encode()),
            (cam.encode(), json.dumps({"sensor_id": cam, "ts": now, "event": "no_helmet"}).encode())])
        want = {f"cityops/push/{on_call.id}": gas, f"cityops/push/{owner.id}": cam}
        pushed = phone.wait_for(lambda msgs: set(want) <= {t for t, _ in msgs}, timeout=60)
        for topic, body in pushed:
            if topic in want:
                assert json.loads(body)["sensor_id"] == want[topic], (topic, body)
        assert sum(staying.metric("cityops_readings_total").values()) >= 3
    finally:
        phone.close()
        a.stop()
        b.stop()


def test_a_checkpoint_commits_every_record_of_its_partitions(kafka, tmp_path, story) -> None:
    """A checkpoint acknowledges a partition's newest record, not each one: the group's
    committed offset must still come to the end of every readings partition (records the
    worker forwarded to their street's partition included), so a restart reads nothing twice
    and skips nothing."""
    from kafka import KafkaConsumer, TopicPartition
    readings, _ = story
    w = worker(kafka, tmp_path)
    # the worker's group, only asked for its committed offsets (it never joins the group)
    group = KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id="cityops-worker",
                          enable_auto_commit=False)
    try:
        w.wait_partitions(PARTITIONS)
        produce(kafka.bootstrap, T["readings"], keyed(readings))
        topic = TopicReader(kafka.bootstrap, [T["readings"]])
        seen: dict = {}

        def all_committed() -> bool:
            topic.poll(0.2)
            ends = {}
            for r in topic.records:
                ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
            committed = {p: group.committed(TopicPartition(T["readings"], p)) for p in ends}
            forwarded = sum(w.metric("cityops_forwarded_total").values())
            seen.update(ends=ends, committed=committed, forwarded=forwarded)
            return len(topic.records) == len(readings) + forwarded and committed == ends
        wait_until(all_committed, 90, "every record of the readings partitions committed", interval=0.5,
                   detail=lambda: f"committed {seen['committed']}, ends {seen['ends']}\n{w.log()}")
        assert seen["forwarded"] > 0 and len(seen["ends"]) == PARTITIONS
    finally:
        group.close()
        w.stop()
