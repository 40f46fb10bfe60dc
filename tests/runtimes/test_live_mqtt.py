"""`cityops run` end to end: the runtime as a subprocess, a real Mosquitto, real clients.

Each test starts `python -m pipeline.cli run --broker mqtt://… --state tmp/state.sqlite` with its
own HTTP port and MQTT client id, waits for GET /healthz to answer 200 and always stops it
(SIGTERM, then SIGKILL) when the test ends. Readings carry real event times (epoch ms of now):
the runtime judges time by the wall clock and refuses readings more than 5 min ahead of it.

What is checked: readings reach the right tier topics and the on-shift grid worker (paho and the
mosquitto_* command-line clients); bad input lands on the dead-letter topic and the runtime goes
on; escalation runs on the clock and an acknowledgement (MQTT or HTTP) stops it; kill -9 in the
middle of a stream loses nothing and opens no second incident; a broker restart and a runtime
restart are survived; SIGTERM exits cleanly with a snapshot. Last: settings given in the
environment survive the `--broker`/`--state` flags, refused acks are counted, and notices made
while the broker is away go out when it is back.

Every test uses its own runtime, state file and client id; the module's Mosquitto is shared
(tests that restart a broker make their own with ``mosquitto_factory``), and each runtime's
persistent session is removed from it when the test ends.
"""

from __future__ import annotations

import base64
import csv
import json
import sqlite3
import time
import uuid
from collections import Counter
from hashlib import blake2b
from collections.abc import Callable

import pytest
import yaml

from pipeline.core.engine import Engine
from pipeline.core.models import AlertNotice
from pipeline.core.registry import load as load_registry
from rules.compiler import load_rules
from bench.harness.brokers import (
    CliSubscriber,
    Mosquitto,
    Subscriber,
    mosquitto_pub,
    publish,
    publish_many,
)
from tests.support import (
    ACK_TOPIC,
    DEAD_TOPIC,
    FIXTURE,
    GAS_ALONE,
    NOTICE_FILTERS,
    ROOT,
    dead_letters,
    dumps,
    iso_ms,
    notices,
    now_ms,
    on_shift,
    reading,
    rt_users,
    settle,
    sha256,
    topic_for,
    wait_until,
)

pytestmark = pytest.mark.broker

STREET_DESK, STREET_TOKEN = "desk-510104022", "street-desk-token-for-the-tests"
GRID_WORKER, GRID_TOKEN = "w-510104020001-01", "grid-worker-token-for-the-tests"
GAS_GRID = "510104020001001"        # 和平社区第1微网格 (grid of gas-510104-000001..5)
PLACE = "锦江区春熙路街道和平社区"


def key(n: dict) -> tuple:
    """What makes a notice itself (README: idempotent by alert_id/state/seq), per recipient."""
    return n["alert_id"], n["state"], n["seq"], n["tier"], n["target"]


def keys_of(msgs: list[tuple[str, bytes]]) -> set[tuple]:
    return {key(n) for n in notices(msgs)}


def fresh_engine() -> Engine:
    rules = load_rules()
    return Engine(load_registry(None, rules.kinds), rules)


# ---- 1. readings in, notices out on the tier topics --------------------------------------------

def test_readings_reach_every_tier_and_the_on_shift_worker(mosquitto: Mosquitto, runtime) -> None:
    rt = runtime(mosquitto.url, "tiers")
    url = mosquitto.url
    ts = now_ms()
    batch = [reading(GAS_ALONE, 55.0, ts=ts), reading("gas-510104-000002", 1.5, ts=ts),
             reading("gas-510104-000003", 0.0, ts=ts)]
    with Subscriber(url, *NOTICE_FILTERS) as sub, \
            CliSubscriber(url, ["cityops/alerts/city", "cityops/push/#"], count=2,
                          timeout=20) as cli:
        mosquitto_pub(url, "cityops/gateways/gw-510104-0001", dumps(batch))   # the real client
        sub.wait_count(5, timeout=15)
        got = notices(settle(sub))
        cli_lines = cli.lines()

        # red (55 %LEL >= 50; living alone raises it, red stays red): every tier, one push
        want_workers = on_shift(GAS_GRID, ts)
        assert want_workers and want_workers <= {"w-510104020001-01", "w-510104020001-02"}
        topics = Counter(topic_for(n) for n in got)
        pushes = [n for n in got if n["tier"] == "grid"]
        assert len(pushes) == 1, f"exactly one push per state change, got {pushes}"
        worker = pushes[0]["target"]
        assert worker in want_workers, f"push to {worker}, on shift now: {want_workers}"
        assert topics == Counter({"cityops/alerts/street/510104020": 1,
                                  "cityops/alerts/district/510104": 1,
                                  "cityops/alerts/dept/gas": 1, "cityops/alerts/city": 1,
                                  f"cityops/push/{worker}": 1}), topics
        assert len({n["alert_id"] for n in got}) == 1
        for n in got:
            assert (n["rule_id"], n["sensor_id"], n["state"], n["seq"], n["severity"]) == \
                ("gas.leak", GAS_ALONE, "firing", 1, "red")
            assert n["level"] == "I" and n["previous_state"] is None
            assert n["value"] == 55.0 and n["threshold"] == 50.0 and n["unit"] == "%LEL"
            assert (n["district"], n["street"], n["grid"]) == ("510104", "510104020", GAS_GRID)
            assert n["title"] == f"【红色预警】{PLACE}燃气泄漏报警", n["title"]
            assert "独居老人" in n["summary"] and "55" in n["summary"]
            assert iso_ms(n["started_at"]) == ts and iso_ms(n["ts"]) == ts
        assert pushes[0]["worker_name"] in ("张敏", "罗川")

        # the same two notices through mosquitto_sub (-v: topic, then the JSON payload)
        assert len(cli_lines) == 2, cli_lines
        by_topic = {topic_for(n): n for n in got}
        for line in cli_lines:
            topic, payload = line.split(" ", 1)
            assert topic in ("cityops/alerts/city", f"cityops/push/{worker}")
            AlertNotice.model_validate_json(payload)
            assert json.loads(payload) == by_topic[topic]

        # one reading on cityops/readings/{sensor_id} (paho): 30 %LEL, not living alone = yellow:
        # street, district and the grid worker; no department, no city
        sub.clear()
        ts2 = now_ms()
        assert publish(url, "cityops/readings/gas-510104-000003",
                       dumps(reading("gas-510104-000003", 30.0, ts=ts2))) == 0
        sub.wait_count(3, timeout=15)
        got2 = notices(settle(sub))
    assert sorted(n["tier"] for n in got2) == ["district", "grid", "street"], got2
    for n in got2:
        assert (n["sensor_id"], n["severity"], n["state"], n["seq"]) == \
            ("gas-510104-000003", "yellow", "firing", 1)
        assert n["title"] == f"【黄色预警】{PLACE}燃气泄漏报警"
        assert n["target"] in ("510104", "510104020") or n["target"] in on_shift(GAS_GRID, ts2)
    code, health = rt.health()
    assert code == 200 and health["broker_connected"] and health["open_incidents"] == 2


# ---- 2. bad input: dead letters, and the runtime goes on ---------------------------------------

def test_garbage_goes_to_the_dead_letter_topic_and_the_runtime_goes_on(
        mosquitto: Mosquitto, runtime) -> None:
    rt = runtime(mosquitto.url, "garbage")
    url = mosquitto.url
    ts = now_ms()
    not_json = b'{"sensor_id": "gas-510104-000002", "ts": '
    not_utf8 = b"\xff\xfe\x00\x81 gateway firmware dump \xc3\x28"
    unknown = dumps(reading("gas-999999-000001", 30.0, ts=ts))
    good_elem = reading("gas-510104-000005", 30.0, ts=ts)        # yellow: street, district, grid
    mixed = dumps([good_elem, {"sensor_id": "gas-510104-000004", "ts": ts, "value": "high"}])
    oversize = dumps([reading("gas-510104-000002", 1.0, ts=ts + i) for i in range(6000)])
    assert len(oversize) > 256 * 1024
    # a sender vouches only for its own sensors: gas-510104-000006 is behind gw-510104-0002
    foreign = dumps([reading("gas-510104-000006", 60.0, ts=ts)])
    impostor = dumps(reading("gas-510104-000003", 60.0, ts=ts))
    sent = [("cityops/readings/gas-510104-000002", not_json),
            ("cityops/gateways/gw-510104-0001", not_utf8),
            ("cityops/readings/gas-999999-000001", unknown),
            ("cityops/gateways/gw-510104-0001", mixed),
            ("cityops/gateways/gw-510104-0001", oversize),
            ("cityops/gateways/gw-510104-0001", foreign),
            ("cityops/readings/gas-510104-000002", impostor)]
    with Subscriber(url, DEAD_TOPIC, *NOTICE_FILTERS) as sub:
        mosquitto_pub(url, sent[0][0], sent[0][1])
        publish_many(url, sent[1:])
        sub.wait_for(lambda m: len(dead_letters(m)) >= 7, timeout=15)
        msgs = settle(sub)
        dead = dead_letters(msgs)
        assert rt.running, rt.logs()
        by_reason = {d.reason: d for d in dead}
        assert Counter(d.reason for d in dead) == Counter(
            ["malformed", "malformed", "unknown_sensor", "invalid", "oversize", "wrong_sender",
             "wrong_sender"]), dead

        malformed = {d.payload_encoding: d for d in dead if d.reason == "malformed"}
        assert malformed["utf-8"].payload.encode() == not_json
        assert malformed["utf-8"].source == "cityops/readings/gas-510104-000002"
        assert base64.b64decode(malformed["base64"].payload) == not_utf8
        assert malformed["base64"].source == "cityops/gateways/gw-510104-0001"
        d = by_reason["unknown_sensor"]
        assert d.payload.encode() == unknown and "gas-999999-000001" in d.detail
        assert d.source == "cityops/readings/gas-999999-000001"
        d = by_reason["invalid"]      # an array's bad element: that element, where it sat
        assert d.payload.encode() == dumps(json.loads(mixed)[1]) and d.index == 1
        assert d.payload_digest == blake2b(mixed, digest_size=16).hexdigest()
        d = by_reason["oversize"]
        assert d.payload_encoding == "utf-8" and oversize.startswith(d.payload.encode())
        assert str(len(oversize)) in d.detail
        assert {(d.source, d.payload.encode(), d.index) for d in dead
                if d.reason == "wrong_sender"} == {
            ("cityops/gateways/gw-510104-0001", dumps(json.loads(foreign)[0]), 0),
            ("cityops/readings/gas-510104-000002", impostor, None)}

        # the good element of the mixed gateway array was not lost with the bad one
        firing = notices(msgs)
        assert sorted((n["sensor_id"], n["tier"]) for n in firing) == [
            ("gas-510104-000005", "district"), ("gas-510104-000005", "grid"),
            ("gas-510104-000005", "street")], firing

        # and a good reading afterwards still makes notices
        sub.clear()
        assert publish(url, "cityops/gateways/gw-510104-0002",
                       dumps([reading("gas-510104-000006", 40.0, ts=now_ms())])) == 0
        sub.wait_count(3, timeout=15)
        after = settle(sub)
    assert not dead_letters(after)
    assert {(n["sensor_id"], n["severity"], n["tier"]) for n in notices(after)} == {
        ("gas-510104-000006", "yellow", "street"), ("gas-510104-000006", "yellow", "district"),
        ("gas-510104-000006", "yellow", "grid")}
    assert rt.health()[0] == 200
    m = rt.metrics()
    got = {k: v for k, v in m.items() if k.startswith("cityops_dead_letters_total")}
    assert got == {'cityops_dead_letters_total{reason="malformed"}': 2,
                   'cityops_dead_letters_total{reason="unknown_sensor"}': 1,
                   'cityops_dead_letters_total{reason="invalid"}': 1,
                   'cityops_dead_letters_total{reason="oversize"}': 1,
                   'cityops_dead_letters_total{reason="wrong_sender"}': 2}, got
    assert m["cityops_payloads_total"] == 8


# ---- 3. escalation on the clock; an acknowledgement stops it -----------------------------------

LATENESS_S = 1.0       # engine.allowed_lateness for this test (see the comment in the test)
ESCALATE_S = 3.0       # escalate_after street and district in the test routing
REMIND_S = 2.0


def test_escalation_on_time_and_ack_stops_it(mosquitto: Mosquitto, runtime, tmp_path) -> None:
    routing = yaml.safe_load((ROOT / "rules" / "routing.yaml").read_text())
    routing.update(escalate_after={"street": "3s", "district": "3s"}, remind_every="2s",
                   max_reminders=2)
    routing_file = tmp_path / "routing.yaml"
    routing_file.write_text(yaml.safe_dump(routing, allow_unicode=True, sort_keys=False))
    # The live runtime moves the watermark to (wall clock - allowed_lateness): timers, these
    # deadlines included, fall due that long after their time (60 s by default). A short
    # lateness keeps the test short; the check below allows for it and no more.
    config = tmp_path / "cityops.yaml"
    users = rt_users(tmp_path, {STREET_DESK: {           # the street's desk acknowledges over HTTP
        "scope": "street", "code": "510104022", "token_sha256": sha256(STREET_TOKEN)}})
    config.write_text(f"engine:\n  allowed_lateness: {int(LATENESS_S * 1000)}ms\n"
                      f"acks:\n  users: {users}\n")
    rt = runtime(mosquitto.url, "escalate", args=["--routing", str(routing_file),
                                                  "--config", str(config)],
                 env={"CITYOPS_TICK": "200ms"})
    url = mosquitto.url
    # manhole cover `opened`: a blue event incident at once (street + grid worker), resolving
    # only after 1 h of quiet. A: nobody acks; B: acked over MQTT; C: acked over HTTP.
    a, b, c = "mh-510104-000001", "mh-510104-000002", "mh-510104-000003"
    with Subscriber(url, DEAD_TOPIC, *NOTICE_FILTERS) as sub:
        start = now_ms()
        assert publish(url, "cityops/gateways/gw-510104-0012", dumps(
            [reading(s, ts=start, event="opened") for s in (a, b, c)])) == 0
        got = sub.wait_for(lambda m: len(notices(m)) >= 6, timeout=10)
        fired = {n["sensor_id"]: n for n in notices(got)}
        assert {(n["sensor_id"], n["tier"]) for n in notices(got)} == {
            (s, t) for s in (a, b, c) for t in ("street", "grid")}
        for n in notices(got):
            assert (n["rule_id"], n["severity"], n["state"]) == ("facility.manhole", "blue", "firing")
            assert iso_ms(n["started_at"]) == start
            assert n["title"].startswith("【蓝色预警】锦江区") and n["title"].endswith("井盖开启")
        aid = {s: fired[s]["alert_id"] for s in (a, b, c)}
        assert len(set(aid.values())) == 3

        # acknowledgements, long before the first deadline (2 s: reminder; 3 s: escalation):
        # B by its grid worker over MQTT (the topic names them), C by the street's desk over HTTP
        grid_worker = "w-510104022001-01"
        ack_b = {"alert_id": aid[b], "ts": now_ms()}
        assert publish(url, f"{ACK_TOPIC}/{grid_worker}", dumps(ack_b)) == 0
        ack_c = {"alert_id": aid[c], "ts": now_ms()}
        assert rt.post_ack(dumps(ack_c), STREET_TOKEN) == (202, {"status": "queued"})
        # garbage: not JSON; an unknown tier naming A (must not stop A's escalation); forged id
        garbage = [b"ack!", dumps({"alert_id": aid[a], "tier": "mayor", "ts": now_ms()}),
                   dumps({"alert_id": "0123456789abcdef", "ts": now_ms()})]
        publish_many(url, [(f"{ACK_TOPIC}/{grid_worker}", g) for g in garbage])
        code, body = rt.post_ack(b'{"alert_id": 42}', STREET_TOKEN)
        assert code == 400 and "error" in body
        sub.wait_for(lambda m: len([n for n in notices(m) if n["state"] == "acknowledged"]) >= 4,
                     timeout=5)
        assert now_ms() - start < REMIND_S * 1000, "acks were too slow for this test's timing"
        assert rt.metrics()["cityops_acks_total"] == 2
        # a second ack for B changes nothing
        assert rt.post_ack(dumps(ack_b), STREET_TOKEN)[0] == 202

        # A climbs: district at start + 3 s, city 3 s after the district was told
        def escalated(level: int) -> Callable[[list], bool]:
            return lambda m: any(n["alert_id"] == aid[a] and n["state"] == "escalated"
                                 and n["escalation"] == level for n in notices(m))
        sub.wait_for(escalated(1), timeout=ESCALATE_S + LATENESS_S + 10)
        arrived_district = time.time()
        sub.wait_for(escalated(2), timeout=ESCALATE_S + LATENESS_S + 10)
        arrived_city = time.time()
        # B's and C's deadlines (start + 3 s, + 6 s) have passed by now: nothing may come for them
        wait_until(lambda: now_ms() >= start + (2 * ESCALATE_S + LATENESS_S + 1) * 1000, 10,
                   "past both deadlines")
        msgs = settle(sub, quiet=0.8)
    every = notices(msgs)

    # on time: not before the deadline, at most the lateness (and a little) after it
    for arrived, deadline_s in ((arrived_district, ESCALATE_S), (arrived_city, 2 * ESCALATE_S)):
        late = arrived - (start / 1000 + deadline_s)
        print(f"escalation due at start + {deadline_s:.0f} s arrived {late:+.2f} s from it "
              f"(allowed lateness {LATENESS_S} s, tick 200 ms)")
        assert -0.05 <= late <= LATENESS_S + 1.5, f"escalation {late:+.2f} s from its deadline"

    mine = [n for n in every if n["alert_id"] == aid[a]]
    esc = sorted((n for n in mine if n["state"] == "escalated"), key=lambda n: n["seq"])
    steps = {}
    for n in esc:
        steps.setdefault(n["escalation"], []).append(n)
    assert sorted(steps) == [1, 2], esc
    assert {(n["tier"], n["target"]) for n in steps[1]} == {
        ("street", "510104022"), ("grid", fired[a]["target"]), ("district", "510104")}
    assert {(n["tier"], n["target"]) for n in steps[2]} == {
        ("street", "510104022"), ("grid", fired[a]["target"]), ("district", "510104"),
        ("city", "city")}
    for level, notes in steps.items():
        for n in notes:           # stamped with the deadline itself (event time)
            assert iso_ms(n["ts"]) == start + int(level * ESCALATE_S * 1000), n["ts"]
            assert n["title"].startswith("【蓝色预警·升级】") and "无人确认" in n["summary"]
    reminders = [n for n in mine if n["state"] == "reminder"]
    assert Counter(n["tier"] for n in reminders) == Counter({"street": 2, "grid": 2}), reminders
    assert not [n for n in mine if n["state"] == "acknowledged"], "a garbage ack acknowledged A"

    for s, by, tier in ((b, grid_worker, "grid"), (c, STREET_DESK, "street")):
        theirs = [n for n in every if n["alert_id"] == aid[s]]
        acked = [n for n in theirs if n["state"] == "acknowledged"]
        assert sorted(n["tier"] for n in acked) == ["grid", "street"], acked   # every tier told
        assert {(n["acked_by"], n["acked_tier"], n["seq"]) for n in acked} == {(by, tier, 2)}
        assert all(n["title"].startswith("【蓝色预警·已确认】") for n in acked)
        later = [n for n in theirs if n["state"] not in ("firing", "acknowledged")]
        assert not later, f"{s} was acknowledged, yet: {later}"

    dead = dead_letters(msgs)
    assert [d.reason for d in dead] == ["bad_ack"] * 3, dead
    # refused where it arrived: its bytes; refused by the engine: the Ack it was made into
    forged = {"alert_id": "0123456789abcdef", "by": grid_worker, "tier": "grid",
              "ts": json.loads(garbage[2])["ts"]}
    assert sorted(d.payload for d in dead) == sorted([garbage[0].decode(), garbage[1].decode(),
                                                      json.dumps(forged, separators=(",", ":"))])
    assert all(d.source is None or d.source == f"{ACK_TOPIC}/{grid_worker}" for d in dead)


# ---- 4. kill -9 in the middle of a stream ------------------------------------------------------

GATEWAYS = {
    "gw-510104-0001": [f"gas-510104-{i:06d}" for i in range(1, 6)],       # building b01
    "gw-510104-0002": ["gas-510104-000006", "gas-510104-000007", "gas-510104-000008",
                       "gas-510104-000009", "gas-510104-000011"],
    "gw-510104-0003": [f"gas-510104-{i:06d}" for i in range(12, 20)],
    "gw-510104-0004": [f"gas-510104-{i:06d}" for i in range(20, 25)],
}
# per sensor, (from step, %LEL): yellow fires, red upgrades, a building cluster (3 in b01)
LEVELS = {
    "gas-510104-000002": [(40, 25.0), (120, 60.0)],
    "gas-510104-000003": [(70, 30.0)],
    "gas-510104-000004": [(95, 22.0)],
    "gas-510104-000021": [(30, 35.0)],
    "gas-510104-000023": [(160, 52.0)],                 # lives alone: red
    "gas-510104-000001": [(200, 21.0), (255, 55.0)],   # lives alone: orange, then red
}
BATTERY = {"gas-510104-000007": [(60, 15.0), (150, 90.0), (230, 12.0)]}   # low, fine, low
EVENTS = {66: ("door-510104-000002", "opened"), 171: ("door-510104-000002", "closed"),
          240: ("door-510104-000002", "opened"), 140: ("mh-510104-000001", "opened"),
          190: ("door-510104-000001", "opened")}
STEP_MS = 20


def _at(table: dict, sid: str, step: int, default: float | None) -> float | None:
    v = default
    for since, val in table.get(sid, ()):
        if step >= since:
            v = val
    return v


def stream(t0: int, n: int = 300) -> list[tuple[str, bytes]]:
    """``n`` payloads (gateway batches, and single events) at ``t0 + i * STEP_MS``. Incidents
    here fire, rise and resolve on readings alone: their timers (clear_for 2 min, reminders
    2 min, resolve_after 1 h) lie far beyond the stream."""
    out = []
    gateways = list(GATEWAYS)
    for i in range(n):
        ts = t0 + i * STEP_MS
        if i in EVENTS:
            sid, event = EVENTS[i]
            out.append((f"cityops/readings/{sid}", dumps(reading(sid, ts=ts, event=event))))
            continue
        gw = gateways[i % len(gateways)]
        batch = [reading(sid, _at(LEVELS, sid, i, round(1.0 + (i % 7) * 0.5, 1)), ts=ts,
                         battery=_at(BATTERY, sid, i, 88.0)) for sid in GATEWAYS[gw]]
        out.append((f"cityops/gateways/{gw}", dumps(batch)))
    return out


def expected_notices(payloads: list[tuple[str, bytes]], clock: int) -> list[dict]:
    """The same payloads, one engine call each, through a fresh in-process engine."""
    engine = fresh_engine()
    out: list[dict] = []
    for topic, p in payloads:
        o = engine.ingest([p], source=[topic], now_ms=clock)
        assert not o.dead_letters, o.dead_letters
        out += o.notices
    return out


def test_kill_9_mid_stream_loses_nothing_and_opens_no_second_incident(
        mosquitto: Mosquitto, runtime) -> None:
    url = mosquitto.url
    rt = runtime(url, "crash", env={"CITYOPS_STATE__SNAPSHOT_EVERY": "1s"})
    t0 = now_ms()
    payloads = stream(t0)
    want = expected_notices(payloads, t0 + 60_000)
    want_keys = {key(n) for n in want}
    states = Counter(n["state"] for n in want)
    assert states["resolved"] and states["firing"] and len({n["alert_id"] for n in want}) >= 10
    chunks = [payloads[i:i + 10] for i in range(0, len(payloads), 10)]

    def paced(first: int, last: int) -> None:
        for k in range(first, last):
            wait_until(lambda: now_ms() >= t0 + k * 10 * STEP_MS, 5, "pace")
            publish_many(url, chunks[k])

    with Subscriber(url, DEAD_TOPIC, *NOTICE_FILTERS) as sub:
        paced(0, 15)                                  # payloads 0-149
        before = len(sub.messages)
        rt.kill()                                     # mid-stream, messages in flight
        db = sqlite3.connect(rt.state)
        try:
            at_kill = (db.execute("SELECT count(*) FROM snapshot").fetchone()[0],
                       db.execute("SELECT count(*) FROM journal").fetchone()[0])
        finally:
            db.close()
        publish_many(url, [m for ch in chunks[15:18] for m in ch])    # 150-179 while it is down
        down_since = time.monotonic()
        rt.start()                                    # same state file, same client id
        restarted_in = time.monotonic() - down_since
        paced(18, len(chunks))                        # 180-299
        wait_until(lambda: keys_of(sub.messages) >= want_keys, 30,
                   f"{len(want_keys)} distinct notices", rt)
        wait_until(lambda: (lambda m: m["cityops_inbox_depth"] == 0
                            and m["cityops_unpublished_notices"] == 0)(rt.metrics()), 10,
                   "inbox drained, notices delivered", rt)
        msgs = settle(sub, quiet=1.0)
    got = notices(msgs)
    got_keys = {key(n) for n in got}
    dups = len(got) - len(got_keys)
    print(f"kill -9 after {before} messages out (state file: {at_kill[0]} snapshot, "
          f"{at_kill[1]} journal entries); restarted in {restarted_in:.1f} s; "
          f"{len(want)} notices expected, {len(got)} received ({dups} duplicates: at-least-once)")
    assert before > 0, "the runtime had sent nothing before it was killed"
    assert "state restored" in rt.stderr(), rt.logs()
    assert not dead_letters(msgs), dead_letters(msgs)
    missing, extra = want_keys - got_keys, got_keys - want_keys
    assert not missing and not extra, f"missing {sorted(missing)}\nextra {sorted(extra)}"
    assert {n["alert_id"] for n in got} == {n["alert_id"] for n in want}, "a second incident"
    # a duplicate is the same notice again, not merely the same key
    by_key: dict[tuple, dict] = {}
    for n in got:
        assert by_key.setdefault(key(n), n) == n, f"two different notices for {key(n)}"
    assert rt.metrics()["cityops_open_incidents"] == len(
        {n["alert_id"] for n in want} - {n["alert_id"] for n in want if n["state"] == "resolved"})


# ---- 5. a broker restart and a runtime restart ------------------------------------------------

def test_broker_restart_and_runtime_restart_are_survived(mosquitto_factory, runtime) -> None:
    broker = mosquitto_factory()
    url = broker.url
    rt = runtime(url, "restarts")
    assert rt.metrics()["cityops_broker_connected"] == 1

    # broker.restart(), in two steps to look at the runtime while the broker is away
    broker.stop()                        # SIGTERM: Mosquitto writes its DB (sessions, queues)
    wait_until(lambda: rt.health()[0] == 503, 10, "/healthz 503 while the broker is away", rt)
    assert rt.health()[1]["broker_connected"] is False
    assert rt.metrics()["cityops_broker_connected"] == 0
    broker.start()                       # same port, same persistence
    rt.wait_healthy(20)                  # reconnected by itself
    assert rt.metrics()["cityops_broker_connected"] == 1
    log = rt.stderr()
    assert log.count('"msg": "connected to') == 2 and "lost the broker" in log, log
    assert rt.running

    with Subscriber(url, DEAD_TOPIC, *NOTICE_FILTERS) as sub:
        # readings published after the restart make notices
        assert publish(url, "cityops/gateways/gw-510104-0002",
                       dumps([reading("gas-510104-000006", 40.0, ts=now_ms())])) == 0
        sub.wait_count(3, timeout=15)
        got = notices(settle(sub))
        assert {(n["sensor_id"], n["tier"], n["state"]) for n in got} == {
            ("gas-510104-000006", t, "firing") for t in ("street", "district", "grid")}, got

        # the runtime away (SIGTERM): its persistent session keeps QoS 1 readings for it
        assert rt.stop() == 0
        sub.clear()
        ts = now_ms()
        publish_many(url, [
            ("cityops/readings/gas-510104-000007",
             dumps(reading("gas-510104-000007", 45.0, ts=ts))),
            ("cityops/gateways/gw-510104-0004", dumps([reading("gas-510104-000023", 60.0, ts=ts)]))],
            qos=1)
        assert not settle(sub, quiet=0.3)          # nobody to make notices yet
        rt.start()
        sub.wait_for(lambda m: len(notices(m)) >= 8, timeout=15)
        got = notices(settle(sub))
    assert Counter((n["sensor_id"], n["severity"], n["state"]) for n in got) == Counter(
        {("gas-510104-000007", "yellow", "firing"): 3,
         ("gas-510104-000023", "red", "firing"): 5}), got   # and nothing again from before


# ---- 6. SIGTERM: clean exit with a snapshot, nothing lost --------------------------------------

def test_sigterm_with_notices_in_flight_exits_cleanly_with_a_snapshot(
        mosquitto: Mosquitto, runtime) -> None:
    url = mosquitto.url
    rt = runtime(url, "shutdown")
    with open(FIXTURE / "sensors.csv", newline="") as f:
        gas = [r["sensor_id"] for r in csv.DictReader(f) if r["kind"] == "gas_household"][:150]
    t = now_ms()
    payloads = [(f"cityops/readings/{s}", dumps(reading(s, 30.0, ts=t + i)))
                for i, s in enumerate(gas)]
    want_keys = {key(n) for n in expected_notices(payloads, t + 60_000)}
    assert len(want_keys) > 450
    with Subscriber(url, DEAD_TOPIC, *NOTICE_FILTERS) as sub:
        publish_many(url, payloads)
        sub.wait_for(lambda m: len(m) >= 1, timeout=10)
        t_term = time.monotonic()
        in_flight = len(want_keys) - len(keys_of(sub.messages))
        code = rt.stop()
        took = time.monotonic() - t_term
        assert code == 0, rt.logs()
        assert took < 15
        db = sqlite3.connect(rt.state)
        try:
            assert db.execute("SELECT count(*) FROM snapshot").fetchone()[0] == 1
            assert db.execute("SELECT count(*) FROM journal").fetchone()[0] == 0
        finally:
            db.close()
        assert "stopped; state saved" in rt.stderr()
        # what it had not taken yet, the broker kept: a start finishes the job, once
        rt.start()
        wait_until(lambda: keys_of(sub.messages) >= want_keys, 20, "every notice", rt)
        msgs = settle(sub)
    got = notices(msgs)
    print(f"SIGTERM with {in_flight} of {len(want_keys)} notices not yet received; "
          f"exit 0 in {took:.2f} s; {len(got)} received after restart")
    assert {key(n) for n in got} == want_keys
    assert len(got) == len(want_keys), "a clean shutdown leaves nothing to send twice"
    assert not dead_letters(msgs)


# ---- settings as configured, counters as documented --------------------------------------------
# (Last in the file: each of these failed against the first runtime; see the report.)

def test_broker_flag_keeps_the_configured_session_expiry(mosquitto: Mosquitto, runtime) -> None:
    """mqtt.session_expiry: "how long the broker keeps readings for this pipeline while it is
    away" (pipeline/shared/config.py). Given as CITYOPS_MQTT__SESSION_EXPIRY, with the broker given
    as `--broker URL`: 2 s after the runtime left, its session must be gone."""
    rt = runtime(mosquitto.url, "expiry", env={"CITYOPS_MQTT__SESSION_EXPIRY": "2s"})
    assert rt.stop() == 0
    left = time.monotonic()
    wait_until(lambda: time.monotonic() - left >= 2 + 1.5, 5, "the session expiry, and a margin")
    probe = Subscriber(mosquitto.url, "cityops/test/probe", client_id=rt.client_id,
                       clean_start=False).start()        # resumes the session if it is there
    probe.close()
    assert probe.session_present is False, (
        "the broker still kept the runtime's session 3.5 s after it left, with "
        "session_expiry 2s: the expiry it was given is not the one configured")


def test_state_flag_keeps_the_configured_snapshot_cadence(mosquitto: Mosquitto, runtime) -> None:
    """state.snapshot_every given as CITYOPS_STATE__SNAPSHOT_EVERY=1s, the state file as
    `--state PATH`: a snapshot is taken within a few seconds (the journal does not grow until
    the next restart)."""
    rt = runtime(mosquitto.url, "cadence", env={"CITYOPS_STATE__SNAPSHOT_EVERY": "1s"})
    assert publish(mosquitto.url, "cityops/readings/gas-510104-000002",
                   dumps(reading("gas-510104-000002", 1.0, ts=now_ms()))) == 0

    def snapshots() -> int:
        db = sqlite3.connect(rt.state)
        try:
            return db.execute("SELECT count(*) FROM snapshot").fetchone()[0]
        finally:
            db.close()
    wait_until(lambda: snapshots() == 1, 5, "a snapshot with snapshot_every 1s", rt)
    assert rt.running


def test_refused_acks_are_counted_in_the_metrics(mosquitto: Mosquitto, runtime) -> None:
    """README: every dead letter moves a counter by reason, bad_ack included; /metrics shows
    cityops_dead_letters_total by reason."""
    url = mosquitto.url
    rt = runtime(url, "badack")
    with Subscriber(url, DEAD_TOPIC) as sub:
        assert publish(url, f"{ACK_TOPIC}/w-510104020001-01", b"ack!") == 0
        assert publish(url, f"{ACK_TOPIC}/w-510104020001-01", dumps(
            {"alert_id": "0123456789abcdef", "ts": now_ms()})) == 0
        sub.wait_for(lambda m: len(dead_letters(m)) >= 2, timeout=10)
        dead = dead_letters(settle(sub))
    assert [d.reason for d in dead] == ["bad_ack", "bad_ack"], dead
    m = rt.metrics()
    shown = {k: v for k, v in m.items() if k.startswith("cityops_dead_letters_total")}
    assert shown.get('cityops_dead_letters_total{reason="bad_ack"}') == 2, shown


def test_notices_made_while_the_broker_is_away_go_out_when_it_is_back(
        mosquitto_factory, runtime, tmp_path) -> None:
    """README (live runtime, "Broker gone"): notices published meanwhile wait in paho and go out
    on reconnect. Here an acknowledgement arrives over HTTP while the broker is away."""
    broker = mosquitto_factory()
    url = broker.url
    users = rt_users(tmp_path, {GRID_WORKER: {"token_sha256": sha256(GRID_TOKEN)}})
    rt = runtime(url, "outage", env={"CITYOPS_ACKS__USERS": str(users)})
    # a dashboard with a persistent session of its own: it misses nothing across the restart
    sub = Subscriber(url, *NOTICE_FILTERS, client_id=f"dash-{uuid.uuid4().hex[:8]}",
                     clean_start=False, session_expiry=120).start()
    try:
        assert publish(url, "cityops/gateways/gw-510104-0002",
                       dumps([reading("gas-510104-000006", 40.0, ts=now_ms())])) == 0
        sub.wait_count(3, timeout=15)
        aid = notices(sub.messages)[0]["alert_id"]
        broker.stop()
        wait_until(lambda: rt.health()[0] == 503, 10, "/healthz 503 while the broker is away", rt)
        assert rt.post_ack(dumps({"alert_id": aid, "ts": now_ms()}), GRID_TOKEN)[0] == 202
        broker.start()
        rt.wait_healthy(20)
        sub.wait_for(lambda m: len([n for n in notices(m) if n["state"] == "acknowledged"]) >= 3,
                     timeout=15)
        acked = [n for n in notices(sub.messages) if n["state"] == "acknowledged"]
        assert sorted(n["tier"] for n in acked) == ["district", "grid", "street"], acked
        wait_until(lambda: rt.metrics()["cityops_unpublished_notices"] == 0, 5,
                   "/metrics: every notice delivered", rt)
    finally:
        sub.close()
        Subscriber(url, "cityops/test/purge", client_id=sub.client_id).start().close()
    assert rt.running, "the runtime died after the outage\n" + rt.logs(60)
    assert rt.stop() == 0, rt.logs(60)
    db = sqlite3.connect(rt.state)
    try:
        assert db.execute("SELECT count(*) FROM snapshot").fetchone()[0] == 1
    finally:
        db.close()


def test_a_shared_subscription_splits_the_readings_between_processes(
        mosquitto: Mosquitto, runtime) -> None:
    """mqtt.shared_group (MQTT 5 `$share/...`): two `cityops run` processes in one group take
    the readings between them — each gets some, together they get every one exactly once."""
    group = f"g{uuid.uuid4().hex[:6]}"
    first = runtime(mosquitto.url, "share-a", env={"CITYOPS_MQTT__SHARED_GROUP": group})
    second = runtime(mosquitto.url, "share-b", env={"CITYOPS_MQTT__SHARED_GROUP": group})
    start = now_ms()
    sent = publish_many(mosquitto.url, [
        ("cityops/readings/wl-510104-000001",
         dumps(reading("wl-510104-000001", 1.0, ts=start + i)))
        for i in range(200)])
    assert sent == [0] * 200

    def taken() -> tuple[float, float]:
        return (first.metrics()["cityops_readings_total"], second.metrics()["cityops_readings_total"])
    wait_until(lambda: sum(taken()) >= 200, 15, "both processes together took the 200 readings",
               first)
    a, b = taken()
    assert a + b == 200 and a > 0 and b > 0, (a, b)
