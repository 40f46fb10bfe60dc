"""The gateway simulator (pipeline/shared/simulate.py) against the real engine and the fixture registry."""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime, timedelta, timezone

import pytest

from pipeline.core import wire
from pipeline.core.engine import Engine
from pipeline.shared.simulate import QUIET, Simulator

# 2026-07-01 14:00 Asia/Shanghai: the day-shift grid workers are on duty
T0 = datetime(2026, 7, 1, 14, 0, tzinfo=timezone(timedelta(hours=8))).timestamp()
GATEWAY_TOPIC = re.compile(r"^cityops/gateways/([^/+#]+)$")
READING_TOPIC = re.compile(r"^cityops/readings/([^/+#]+)$")
TIERS = {"street", "district", "dept", "city", "grid"}


def simulate(registry, seconds: int = 60, seed: int = 7, speed: float = 1.0):
    """Step once per simulated second on a list-driven clock; per step: (t, published, lines)."""
    ticks = iter([T0 + t for t in range(seconds + 1)])
    published: list[tuple[str, bytes]] = []
    sim = Simulator(registry, lambda topic, payload: published.append((topic, payload)),
                    clock=ticks.__next__, seed=seed, speed=speed)
    steps = []
    for t in range(seconds + 1):
        before = len(published)
        lines = sim.step()
        steps.append((t, published[before:], lines))
    with pytest.raises(StopIteration):      # the simulator read the clock exactly once a step
        sim.step()
    return steps


@pytest.fixture(scope="module")
def sixty(chengdu):
    return simulate(chengdu, 60)


@pytest.fixture(scope="module")
def engine_run(chengdu, rules, sixty):
    """Every payload through wire.decode and a real Engine with every built-in rule."""
    engine = Engine(chengdu, rules)
    notices: list[tuple[int, dict]] = []
    for t, published, _ in sixty:
        now_ms = int((T0 + t) * 1000)
        out = engine.ingest([p for _, p in published], now_ms=now_ms)
        # the story's one bad reading (坏数据), at 30 s
        assert [(t, d.reason) for d in out.dead_letters] == ([(30, "unknown_sensor")] if t == 30 else [])
        out = engine.advance(now_ms, out)
        notices += [(t, n) for n in out.notices]
    return engine, notices


def test_every_payload_decodes_without_dead_letters(sixty) -> None:
    count = 0
    for _, published, _ in sixty:
        for topic, payload in published:
            if topic == "cityops/readings/gas-510104-999999":    # the story's stranger
                continue
            readings, dead = wire.decode(payload, source=topic)
            assert dead == [], (topic, payload, dead)
            assert readings
            count += len(readings)
    assert count > 533                       # every sensor, some twice, plus the scenario


def test_topics_follow_the_contract(chengdu, sixty) -> None:
    gateway_of = {chengdu.sensor_ids[i]: (chengdu.gateways[g] if (g := chengdu.gateway_of[i]) >= 0
                                           else None) for i in range(len(chengdu))}
    for t, published, _ in sixty:
        for topic, payload in published:
            doc = json.loads(payload)
            if m := GATEWAY_TOPIC.match(topic):
                assert m[1] in chengdu.gateways
                assert isinstance(doc, list) and doc          # a gateway uploads an array
                assert {gateway_of[r["sensor_id"]] for r in doc} == {m[1]}
            elif m := READING_TOPIC.match(topic):
                assert isinstance(doc, dict)                  # a lone sensor: one object
                assert doc["sensor_id"] == m[1]
                assert m[1] == "gas-510104-999999" or gateway_of[m[1]] is None
            else:
                pytest.fail(f"topic {topic!r} is not in the contract")
            for r in doc if isinstance(doc, list) else [doc]:
                assert r["ts"] == int((T0 + t) * 1000) or 0 < r["ts"] - int((T0 + t) * 1000) < 10
                assert ("value" in r) != ("event" in r)


def test_background_is_quiet_plausible_and_spread(chengdu, sixty) -> None:
    scenario = {"gas-510104-000001", "gas-510104-000002", "gas-510104-000003",
                "rain-510104-000001", "wl-510104-000001", "wl-510104-000002", "wl-510104-000003",
                "cam-510108-000001", "crane-510108-000001", "river-510104-000001",
                "gas-510104-999999"}                           # the stranger: not in the registry
    seen: dict[str, list[dict]] = {}
    per_step = []
    for _, published, _ in sixty:
        n = 0
        for _, payload in published:
            doc = json.loads(payload)
            for r in doc if isinstance(doc, list) else [doc]:
                seen.setdefault(r["sensor_id"], []).append(r)
                n += 1
        per_step.append(n)
    silent = {"dust-510108-000001"}
    assert set(chengdu.sensor_ids) - silent <= set(seen)          # everyone reported in 60 s
    assert max(per_step) < len(chengdu) / 5                       # spread, not all at once
    for sid, rs in seen.items():
        if sid in scenario:
            continue
        assert len(rs) <= 2, sid                                   # every 30-60 s
        kind = chengdu.kinds[chengdu.kind_of[chengdu.index[sid]]]
        for r in rs:
            if kind in QUIET:
                q = QUIET[kind]
                if kind == "river_gauge":
                    assert 2.0 < r["value"] < 4.0, r               # ~1 m under 警戒水位
                else:
                    assert q.lo <= r["value"] <= q.hi, r
            else:
                assert r["event"] == "heartbeat", r


def test_notices_reach_every_tier_within_10_seconds(engine_run) -> None:
    _, notices = engine_run
    early = [n for t, n in notices if t <= 10]
    assert {n["tier"] for n in early} >= TIERS
    pushes = [n for n in early if n["tier"] == "grid"]
    assert pushes and all(n["worker_id"] and n["target"] == n["worker_id"] for n in pushes)
    assert any(n["worker_id"] == "w-510104020001-01" and n["sensor_id"] == "gas-510104-000001"
               for n in pushes)                                    # 张敏, on the day shift


def test_gas_leak_at_the_resident_living_alone_is_red(engine_run) -> None:
    _, notices = engine_run
    leak = [n for _, n in notices if n["rule_id"] == "gas.leak"
            and n["sensor_id"] == "gas-510104-000001"]
    assert leak[0]["severity"] == "orange"            # 28 %LEL: yellow, raised one level
    assert any(n["severity"] == "red" and n["tier"] == "city" for n in leak)
    cluster = [n for _, n in notices if n["rule_id"] == "gas.building_cluster"]
    assert cluster and {n["severity"] for n in cluster} == {"red"}
    assert set(cluster[0]["members"]) >= {"gas-510104-000001", "gas-510104-000002",
                                          "gas-510104-000003"}


def test_the_other_scenario_events_raise_their_alerts(engine_run) -> None:
    _, notices = engine_run
    fired = {(n["rule_id"], n["sensor_id"], n["severity"]) for _, n in notices}
    assert ("construction.site_violation", "cam-510108-000001", "orange") in fired
    assert ("construction.crane_alarm", "crane-510108-000001", "yellow") in fired
    assert any(r == "weather.rainstorm" and s == "rain-510104-000001" for r, s, _ in fired)
    dept = {n["target"] for _, n in notices if n["tier"] == "dept"}
    assert {"gas", "construction", "water"} <= dept


def test_scenario_lines_and_the_silent_sensor(sixty) -> None:
    lines = {t: ls for t, _, ls in sixty if ls}
    assert "gas leak at 独居老人 王秀英 (gas-510104-000001)" in lines[1][0]
    assert "rainstorm" in lines[7][0] and "rain-510104-000001" in lines[7][0]
    assert "construction" in lines[15][0] and "cam-510108-000001" in lines[15][0]
    assert "dust-510108-000001" in lines[22][0] and "30 min" in lines[22][0]
    assert "river-510104-000001" in lines[25][0]
    assert "gas-510104-999999" in lines[30][0] and "dead letter" in lines[30][0]
    assert sorted(lines) == [1, 7, 10, 15, 22, 25, 30]
    for t, published, _ in sixty:
        if t >= 22:
            assert all(b"dust-510108-000001" not in p for _, p in published)


def test_deterministic_for_a_seed_and_clock(chengdu, sixty) -> None:
    again = simulate(chengdu, 60)
    assert again == sixty                                          # same topics, same bytes
    other = simulate(chengdu, 60, seed=8)
    assert [p for _, ps, _ in other for p in ps] != [p for _, ps, _ in sixty for p in ps]


def test_speed_compresses_the_scenario(chengdu) -> None:
    steps = simulate(chengdu, 20, speed=2.0)
    first = next(t for t, _, lines in steps if lines)
    assert first == 1                                              # 1 s / 2, on the next step


def test_run_loops_until_stopped(chengdu) -> None:
    ticks = iter([T0 + t for t in range(10_000)])
    published: list[tuple[str, bytes]] = []
    sim = Simulator(chengdu, lambda topic, payload: published.append((topic, payload)),
                    clock=ticks.__next__)
    stop = threading.Event()
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)
        stop.set()                                                 # stop at the first story line

    sim.run(stop, interval=0.0, report=report)
    assert len(lines) == 1 and "gas-510104-000001" in lines[0]
    assert published


def test_story_of_names_the_latest_event_that_names_the_sensor(chengdu) -> None:
    ticks = iter([T0 + t for t in (0, 1, 10, 120)])
    sim = Simulator(chengdu, lambda topic, payload: None, clock=ticks.__next__)
    sim.step()
    assert sim.story_of("gas-510104-000001") is None               # nothing has started yet
    sim.step()
    assert sim.story_of("gas-510104-000001") == "燃气泄漏"
    sim.step()
    assert sim.story_of("gas-510104-000002") == "同楼栋多户报警"
    assert sim.story_of("rain-510104-000001") == "暴雨"
    sim.step()                                                     # the leak is shut off
    assert sim.story_of("gas-510104-000001") == "燃气处置"
    assert sim.story_of("gas-510104-000100") is None               # not in the story
