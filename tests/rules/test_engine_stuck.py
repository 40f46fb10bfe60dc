"""The stuck rule type (rules/types/stuck.py) through the engine's API: a sensor reporting the
same value (within ``tolerance``) for ``for`` or longer is frozen; the reading that shows it
fires, the next one that moves resolves. No timer, late readings act on nothing, the run
survives a snapshot, and the answer does not depend on batching."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from pipeline.core.engine import Engine, Output
from rules.compiler import load_rules
from rules.yamlfile import ConfigError

T0 = 1_782_000_000_000
MIN = 60_000
GAUGE = "river-510104-000001"        # river_gauge, in metres
OTHER = "river-510105-000001"
PACK = Path(__file__).parents[1] / "rules" / "packs" / "stucktest.yaml"    # for: 2h, tolerance: 0.005
RULE = "stucktest.frozen_gauge"


@pytest.fixture(scope="module")
def stuck_rules():
    return load_rules([PACK]).select([RULE])


def payload(sensor_id: str, at_ms: int, value: float) -> bytes:
    return json.dumps({"sensor_id": sensor_id, "ts": at_ms, "value": value}).encode()


def street(out: Output) -> list[tuple]:
    """What the street is told fired and resolved (the routing's reminders and escalation of
    an incident nobody acknowledges are not the rule's business)."""
    return [(n["state"], n["sensor_id"], n["severity"], n["value"], n["started_at"])
            for n in out.notices if n["tier"] == "street" and n["state"] in ("firing", "resolved")]


def test_the_reading_at_run_start_plus_for_fires_and_the_next_that_moves_resolves(chengdu, stuck_rules):
    e = Engine(chengdu, stuck_rules)
    taken = [e.ingest([payload(GAUGE, T0 + m * MIN, v)])
             for m, v in [(0, 3.21), (30, 3.214), (60, 3.206), (119, 3.21)]]
    assert all(out.notices == [] for out in taken)
    fired = e.ingest([payload(GAUGE, T0 + 120 * MIN, 3.21)])
    [(state, sensor, severity, value, started)] = street(fired)
    assert (state, sensor, severity, value) == ("firing", GAUGE, "blue", 3.21)
    assert started.startswith("2026-06-21T10:00:00")         # T0 + 2h, Asia/Shanghai
    n = next(n for n in fired.notices if n["tier"] == "street")
    assert "读数停在3.21m超过2h" in n["summary"]
    assert street(e.ingest([payload(GAUGE, T0 + 150 * MIN, 3.21)])) == []    # one incident
    moved = e.ingest([payload(GAUGE, T0 + 160 * MIN, 3.3)])
    assert [s[0] for s in street(moved)] == ["resolved"]
    # a new run from 160m: frozen again 2h later, a new incident
    assert street(e.ingest([payload(GAUGE, T0 + 279 * MIN, 3.3)])) == []
    assert [s[0] for s in street(e.ingest([payload(GAUGE, T0 + 280 * MIN, 3.3)]))] == ["firing"]


def test_tolerance_is_measured_from_the_runs_first_value_not_the_last(chengdu, stuck_rules):
    """A slow drift of 4 mm a step stays within 5 mm of the last reading, but not of the run's
    first: the gauge moves, it is not frozen."""
    e = Engine(chengdu, stuck_rules)
    out = Output()
    for step in range(10):                                  # 3.200, 3.204, ... every 20 min
        e.ingest([payload(GAUGE, T0 + step * 20 * MIN, round(3.2 + 0.004 * step, 3))], out=out)
    assert out.notices == []


def test_without_tolerance_only_the_identical_value_is_the_same(chengdu, stuck_rules, tmp_path):
    pack = PACK.read_text(encoding="utf-8").replace("tolerance: 0.005", "for: 1h\n    tolerance: 0")
    pack = pack.replace("    for: 2h\n", "", 1)
    (tmp_path / "stucktest.yaml").write_text(pack, encoding="utf-8")
    rs = load_rules([tmp_path / "stucktest.yaml"]).select([RULE])
    e = Engine(chengdu, rs)
    out = Output()
    for m, v in [(0, 1.5), (30, 1.5), (59, 1.5001), (90, 1.5001), (118, 1.5001), (119, 1.5001)]:
        e.ingest([payload(GAUGE, T0 + m * MIN, v)], out=out)
    assert [(s[0], s[3]) for s in street(out)] == [("firing", 1.5001)]       # 59m + 1h


def test_silence_fires_nothing_and_late_readings_act_on_nothing(chengdu, stuck_rules):
    """No timer: a gauge that stops reporting is the absence rule's. A late reading neither
    starts a run nor ends one (the runs were judged on the readings in order)."""
    e = Engine(chengdu, stuck_rules)
    e.ingest([payload(GAUGE, T0, 3.21), payload(GAUGE, T0 + 60 * MIN, 3.21)])
    assert e.advance(T0 + 10 * 60 * MIN).notices == []
    e.ingest([payload(OTHER, T0 + 10 * 60 * MIN, 2.0)])
    late = e.ingest([payload(OTHER, T0 + 10 * 60 * MIN - 30_000, 9.9)])       # 30 s late
    assert late.notices == [] and e.counters["late"] == 1
    fired = e.ingest([payload(OTHER, T0 + 12 * 60 * MIN, 2.0)])
    assert [s[:2] for s in street(fired)] == [("firing", OTHER)]


def test_a_snapshot_keeps_the_run_by_name(chengdu, stuck_rules):
    before = Engine(chengdu, stuck_rules)
    before.ingest([payload(GAUGE, T0, 3.21), payload(GAUGE, T0 + 60 * MIN, 3.212)])
    blob = before.snapshot()
    runs = msgspec.msgpack.decode(blob)["rules"][RULE]["runs"]
    assert runs == [[["s", GAUGE], {"start": T0, "value": 3.21}]]
    after = Engine(chengdu, stuck_rules)
    assert after.restore(blob) == {}
    last = payload(GAUGE, T0 + 120 * MIN, 3.21)
    assert after.ingest([last]).notices == before.ingest([last]).notices != []


def test_batching_does_not_change_the_answer(chengdu, stuck_rules):
    readings = [payload(s, T0 + m * MIN, v) for m, s, v in [
        (0, GAUGE, 3.21), (0, OTHER, 2.0), (50, OTHER, 2.0), (60, GAUGE, 3.21), (100, OTHER, 2.5),
        (120, GAUGE, 3.21), (121, GAUGE, 3.3), (220, OTHER, 2.5), (240, OTHER, 2.5)]]
    one = Engine(chengdu, stuck_rules).ingest(readings)
    each, out = Engine(chengdu, stuck_rules), Output()
    for p in readings:
        each.ingest([p], out=out)
    assert one.notices == out.notices
    assert [s[:2] for s in street(one)] == [("firing", GAUGE), ("resolved", GAUGE),
                                            ("firing", OTHER)]


@pytest.mark.parametrize("change, error", [
    ("sensors: [river_gauge]", "needs `value`"),
    ("for: 2h", "greater than 0"),
])
def test_a_stuck_rule_on_events_or_without_a_duration_is_refused(tmp_path, change, error):
    bad = {"sensors: [river_gauge]": "sensors: [site_camera]", "for: 2h": "for: 0s"}[change]
    (tmp_path / "stucktest.yaml").write_text(PACK.read_text(encoding="utf-8").replace(change, bad),
                                             encoding="utf-8")
    with pytest.raises(ConfigError, match=error):
        load_rules([tmp_path / "stucktest.yaml"])
