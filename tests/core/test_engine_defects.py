"""The six defects a city's own data found (issue 9), each pinned by a test that failed before
its fix. The differential fuzzer (tests/core/test_engine_model.py) guards the classes they belong to."""

from __future__ import annotations

import json

import pytest

from pipeline.core import registry
from pipeline.core.engine import Engine
from rules.compiler import load_rules

T0 = 1_782_000_000_000          # 2026-06-21 08:00:00 +08:00
MIN = 60_000
GAS = "gas-510104-000002"
RIVER = "river-510105-000001"


def payload(sensor_id: str, ts: int, **fields) -> bytes:
    return json.dumps({"sensor_id": sensor_id, "ts": ts, **fields}).encode()


# ---- 1. --params must not stretch durations -----------------------------------------------------

def test_params_override_keeps_every_duration(tmp_path):
    plain = load_rules()
    p = tmp_path / "params.yaml"
    p.write_text("gas: {params: {level1_lel: 25}}\nriver: {params: {rise_per_hour_m: 0.5}}\n",
                 encoding="utf-8")
    city = load_rules(params=p)

    def specs(rs):
        return {r.spec.id: r.spec for r in rs.rules}

    before, after = specs(plain), specs(city)
    assert after["gas.leak"].clear_for == before["gas.leak"].clear_for == 2 * MIN
    assert after["gas.leak"].flapping.window == before["gas.leak"].flapping.window == 30 * MIN
    assert after["river.rapid_rise"].over == before["river.rapid_rise"].over == 60 * MIN
    # the whole pack is the same but for the parameter the city set
    assert after["gas.leak"].model_dump() == before["gas.leak"].model_dump()
    gas = next(pk for pk in city.packs if pk.pack == "gas")
    assert gas.params["level1_lel"] == 25


def test_params_override_still_resolves_after_clear_for(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("gas: {params: {level1_lel: 25}}\n", encoding="utf-8")
    rs = load_rules(params=p).select(["gas.leak"])
    eng = Engine(registry.load(None, rs.kinds), rs)
    fired = eng.ingest([payload(GAS, T0, value=30.0)]).notices
    assert {n["state"] for n in fired} == {"firing"}
    eng.ingest([payload(GAS, T0 + MIN, value=1.0)])
    out = eng.advance(T0 + 4 * MIN).notices
    assert {(n["state"], n["ts"]) for n in out} == {("resolved", "2026-06-21T08:03:00+08:00")}


# ---- 2. absence: once, whatever the batching ------------------------------------------------------

def _silent_story() -> list[bytes]:
    """Two river gauges report every 10 minutes; one falls silent for 50 minutes (absent_for 30m),
    then reports again."""
    out = []
    other = "river-510104-000001"
    for m in range(0, 120, 10):
        out.append(payload(other, T0 + m * MIN, value=1.0))
        if not 20 < m < 70:
            out.append(payload(RIVER, T0 + m * MIN + 1000, value=1.0))
    return out


def _run(eng: Engine, payloads: list[bytes], size: int, until: int) -> list[dict]:
    notices = []
    for i in range(0, len(payloads), size):
        notices += eng.ingest(payloads[i:i + size]).notices
    return notices + eng.advance(until).notices


def _absence(notices: list[dict], sensor: str) -> list[tuple]:
    return [(n["state"], n["seq"], n["ts"], n["tier"]) for n in notices
            if n["rule_id"] == "device.silent" and n["sensor_id"] == sensor]


@pytest.mark.parametrize("size", [1, 3, 10, 1000])
def test_absence_is_reported_once_whatever_the_batch(rules, chengdu, size):
    rs = rules.select(["device.silent"])
    reference = _absence(_run(Engine(chengdu, rs), _silent_story(), 1, T0 + 130 * MIN), RIVER)
    got_notices = _run(Engine(chengdu, rs), _silent_story(), size, T0 + 130 * MIN)
    got = _absence(got_notices, RIVER)
    assert got == reference
    states = [s for s, *_ in got]
    assert states.count("firing") == len({t for s, _, _, t in got if s == "firing"})  # once per tier
    assert "resolved" in states
    for n in got_notices:
        if n["rule_id"] == "device.silent" and n["sensor_id"] == RIVER:
            assert "从未上报" not in n["summary"]           # it had reported


# ---- 3. the absence scan never switches itself off ----------------------------------------------

SILENT_PACK = """
pack: probe
title: test probes
kinds:
  probe: {name: 探头, unit: m, category: device}
rules:
  - id: probe.silent
    name: 探头失联
    type: absence
    sensors: [probe]
    absent_for: 10m
    group_by_gateway: false
"""

ROUTING = ("tiers:\n  blue: [street]\n  yellow: [street, district]\n"
           "  orange: [street, district, dept]\n  red: [street, district, dept, city]\n")


def own_rules(tmp_path, pack: str):
    packs = tmp_path / "packs"
    packs.mkdir(exist_ok=True)
    (packs / "own.yaml").write_text(pack, encoding="utf-8")
    routing = tmp_path / "routing.yaml"
    routing.write_text(ROUTING, encoding="utf-8")
    return load_rules([packs], builtin=False, routing=routing)


def test_absence_scan_goes_on_after_every_sensor_was_silent(tmp_path):
    from tests.engine_fixtures import small_registry
    rs = own_rules(tmp_path, SILENT_PACK)
    reg = small_registry(tmp_path / "reg", rs, {"probe": 3})
    eng = Engine(reg, rs)
    sids = reg.sensor_ids

    def fired(notices):
        return sorted({n["sensor_id"] for n in notices if n["state"] == "firing"})

    eng.ingest([payload(s, T0, value=1.0) for s in sids])
    assert fired(eng.advance(T0 + 15 * MIN).notices) == sorted(sids)   # a network outage
    back = eng.ingest([payload(s, T0 + 20 * MIN, value=1.0) for s in sids]).notices
    assert sorted(n["sensor_id"] for n in back if n["state"] == "resolved") == sorted(sids)
    # one of them falls silent again, later: told again, 10 minutes after its last reading
    eng.ingest([payload(s, T0 + 25 * MIN, value=1.0) for s in sids[1:]])
    again = eng.advance(T0 + 34 * MIN).notices
    assert fired(again) == [sids[0]]
    assert {n["started_at"] for n in again} == {"2026-06-21T08:30:00+08:00"}


def test_a_sensor_back_is_watched_again_before_the_next_planned_scan(tmp_path):
    """The next scan is planned for when the next sensor could fall silent; a sensor that comes
    back after that plan was made must move it earlier, or its next silence is reported late."""
    from tests.engine_fixtures import small_registry
    rs = own_rules(tmp_path, SILENT_PACK.replace("absent_for: 10m",
                                                 "absent_for: {probe: 10m}"))
    reg = small_registry(tmp_path / "reg", rs, {"probe": 2})
    eng = Engine(reg, rs)
    a, b = reg.sensor_ids
    eng.ingest([payload(a, T0, value=1.0), payload(b, T0, value=1.0)])
    eng.advance(T0 + 11 * MIN)                       # both silent
    eng.ingest([payload(b, T0 + 12 * MIN, value=1.0)])   # b back
    eng.ingest([payload(b, T0 + 13 * MIN, value=1.0)])
    out = eng.advance(T0 + 24 * MIN).notices         # b silent again from 23m
    assert [(n["sensor_id"], n["started_at"]) for n in out if n["state"] == "firing"][:1] == \
        [(b, "2026-06-21T08:23:00+08:00")]


# ---- 4. rate over 1h means the closed hour ---------------------------------------------------------

def test_rate_over_one_hour_counts_the_reading_an_hour_before(rules, chengdu):
    """15-minute river data: 2.0 at 0m, then 2.1, 2.2, 2.3, 2.45 at 60m: a rise of 0.45 m in the
    closed hour [0m, 60m] (>= 0.4: yellow). Buckets that leave out the 0m reading see 0.35."""
    rs = rules.select(["river.rapid_rise"])
    eng = Engine(chengdu, rs)
    values = [2.0, 2.1, 2.2, 2.3, 2.45]
    notices = []
    for i, v in enumerate(values):
        notices += eng.ingest([payload(RIVER, T0 + i * 15 * MIN, value=v)]).notices
    fired = [n for n in notices if n["state"] == "firing"]
    assert fired, "a rise of 0.45 m within one hour was missed"
    assert {n["value"] for n in fired} == {0.45}
    assert fired[0]["ts"] == "2026-06-21T09:00:00+08:00"


def test_rate_window_leaves_out_what_is_older_than_over(rules, chengdu):
    rs = rules.select(["river.rapid_rise"])
    eng = Engine(chengdu, rs)
    notices = eng.ingest([payload(RIVER, T0, value=2.0)]).notices
    notices += eng.ingest([payload(RIVER, T0 + 60 * MIN + 1, value=2.5)]).notices
    assert notices == []        # 2.0 is 1 ms older than the hour: rise 0


# ---- 5. per-level clears -----------------------------------------------------------------------------

GAUGE_PACK = """
pack: gauge
title: test gauge
kinds:
  gauge: {name: 水位计, unit: m, category: flood}
rules:
  - id: gauge.level
    name: 水位
    type: threshold
    sensors: [gauge]
    levels:
      - {severity: yellow, when: "value >= 2.0", clear: "value < 1.8"}
      - {severity: orange, when: "value >= 3.0", clear: "value < 2.8"}
"""

def test_per_level_clear_steps_down_then_resolves(tmp_path):
    from tests.engine_fixtures import small_registry
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "gauge.yaml").write_text(GAUGE_PACK, encoding="utf-8")
    routing = tmp_path / "routing.yaml"
    routing.write_text("tiers:\n  blue: [street]\n  yellow: [street, district]\n"
                       "  orange: [street, district, dept]\n  red: [street, district, dept, city]\n",
                       encoding="utf-8")
    rs = load_rules([packs], builtin=False, routing=routing)
    reg = small_registry(tmp_path / "reg", rs, {"gauge": 1})
    eng = Engine(reg, rs)
    sid = reg.sensor_ids[0]
    seen = []
    for m, v in [(0, 2.1), (10, 3.1), (20, 2.9), (30, 2.7), (40, 2.5), (50, 3.05), (60, 1.9),
                 (70, 1.7)]:
        for n in eng.ingest([payload(sid, T0 + m * MIN, value=v)]).notices:
            seen.append((m, n["state"], n["severity"], n["threshold"], n["tier"]))
    changes = sorted({(m, s, sev, thr) for m, s, sev, thr, _ in seen})
    assert changes == [
        (0, "firing", "yellow", 2.0),
        (10, "firing", "orange", 3.0),
        (30, "firing", "yellow", 2.8),       # 2.7 < 2.8: orange's clear holds, yellow's does not
        (50, "firing", "orange", 3.0),       # back over 3.0
        (60, "firing", "yellow", 2.8),       # 1.9 < 2.8; yellow's clear (< 1.8) does not hold
        (70, "resolved", "yellow", 1.8),     # 1.7 < 1.8: what resolved it
    ]
    # every tier that was told orange (dept too) is told of the step-down and the resolve
    assert {t for m, s, sev, thr, t in seen if m == 30} == {"street", "district", "dept"}
    assert {t for m, s, sev, thr, t in seen if m == 70} == {"street", "district", "dept"}


def test_per_level_and_rule_clear_together_is_an_error(tmp_path):
    from rules.yamlfile import ConfigError
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "gauge.yaml").write_text(GAUGE_PACK + '    clear: "value < 1.5"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_rules([packs], builtin=False)
    assert "gauge.yaml" in str(e.value) and "clear" in str(e.value)


def test_resolve_threshold_is_the_clear_level(rules, chengdu):
    eng = Engine(chengdu, rules.select(["gas.leak"]))
    eng.ingest([payload(GAS, T0, value=30.0)])
    eng.ingest([payload(GAS, T0 + MIN, value=1.0)])
    out = eng.advance(T0 + 10 * MIN).notices
    assert {(n["state"], n["threshold"]) for n in out} == {("resolved", 10.0)}


# ---- 6. epoch seconds are never accepted ------------------------------------------------------------

@pytest.mark.parametrize("order", ["seconds first", "seconds second"])
@pytest.mark.parametrize("size", [1, 2])
def test_epoch_seconds_refused_even_in_a_first_batch(rules, chengdu, order, size):
    good = payload(GAS, T0, value=1.0)
    bad = payload("gas-510104-000003", T0 // 1000, value=1.0)
    batch = [bad, good] if order == "seconds first" else [good, bad]
    eng = Engine(chengdu, rules)
    notices, dead = [], []
    for i in range(0, 2, size):
        out = eng.ingest(batch[i:i + size])
        notices += out.notices
        dead += out.dead_letters
    notices += eng.advance(T0 + 10 * MIN).notices
    assert [d.reason for d in dead] == ["too_old"]
    assert "epoch seconds" in dead[0].detail
    assert notices == []
    assert eng.watermark > T0 - 2 * MIN


def test_too_old_judged_against_readings_earlier_in_the_batch(rules, chengdu):
    """max_age is 7 days: a reading 8 days behind one that arrived before it in the same batch is
    refused, as it is when the two come one per batch."""
    new = payload(GAS, T0, value=1.0)
    old = payload("gas-510104-000003", T0 - 8 * 86_400_000, value=1.0)
    for batches in ([[new, old]], [[new], [old]]):
        eng = Engine(chengdu, rules)
        reasons = [d.reason for b in batches for d in eng.ingest(b).dead_letters]
        assert reasons == ["too_old"]


# ---- found by the differential fuzzer (tests/core/test_engine_model.py) ------------------------------

@pytest.mark.parametrize("second", [b"not json", b'{"sensor_id": "gas-510104-000003"}'])
def test_a_payload_without_readings_does_not_shift_the_others(rules, chengdu, second):
    """Two payloads, two readings: a gateway array of two and a payload that gives none. Its
    readings are taken in event-time order (08:04 after 08:00): nothing is stale, as when each
    payload comes in its own batch. Before, two payloads with two readings were taken for one
    reading a payload, the 08:00 reading as a payload after the 08:04 one: `stale`."""
    array = json.dumps([{"sensor_id": GAS, "ts": T0 + 4 * MIN, "value": 1.0},
                        {"sensor_id": GAS, "ts": T0, "value": 1.0}]).encode()
    together = Engine(chengdu, rules).ingest([array, second]).dead_letters
    eng = Engine(chengdu, rules)
    apart = eng.ingest([array]).dead_letters + eng.ingest([second]).dead_letters
    assert [d.reason for d in together] == [d.reason for d in apart] != []
    assert "stale" not in [d.reason for d in together]
