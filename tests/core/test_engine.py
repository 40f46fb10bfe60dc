"""The engine (pipeline.core.engine.Engine) at its edges: bad input becomes dead letters and counters,
never an exception; the output does not depend on batching; a snapshot restores exactly."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import msgspec
import pytest

from pipeline.core import registry
from pipeline.core.engine import Engine, EngineSettings, Output
from pipeline.core.models import Ack, AlertNotice, DeadLetter
from pipeline.core.wire import WireReading
from rules.compiler import load_rules

T0 = 1_782_000_000_000          # 2026-06-21 08:00:00 +08:00, a Sunday morning in Chengdu
MIN = 60_000
GAS = "gas-510104-000002"       # household gas alarm (value), gateway gw-510104-0001
GAS_ALONE = "gas-510104-000001"  # same building, a resident living alone
DOOR = "door-510104-000001"     # door magnet (event)
CAMERA = "cam-510104-000001"    # construction-site AI camera (event)


@pytest.fixture
def engine(chengdu, rules) -> Engine:
    return Engine(chengdu, rules)


def reading_at(sensor_id: str, at_ms: int, **fields) -> dict:
    return {"sensor_id": sensor_id, "ts": at_ms, **fields}


def payload(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def raw(d: DeadLetter) -> bytes:
    """The original bytes a dead letter carries."""
    return base64.b64decode(d.payload) if d.payload_encoding == "base64" else d.payload.encode()


def notice_keys(notices: list[dict]) -> set[tuple]:
    return {(n["alert_id"], n["state"], n["seq"], n["tier"]) for n in notices}


def assert_valid_notices(notices: list[dict]) -> None:
    for n in notices:
        AlertNotice.model_validate(n)


# ---- bad input: dead letters, not exceptions ---------------------------------------------------

def test_unknown_sensor(engine):
    p = payload(reading_at("gas-999999-000001", T0, value=1.0))
    out = engine.ingest([p], source="cityops/readings/gw-x")
    assert out.notices == []
    [d] = out.dead_letters
    assert (d.reason, d.index, d.source) == ("unknown_sensor", None, "cityops/readings/gw-x")
    assert "gas-999999-000001" in d.detail
    assert raw(d) == p
    assert engine.counters["dead.unknown_sensor"] == 1 and engine.counters["dead_letters"] == 1


@pytest.mark.parametrize("odd_id", ["gas-510104-000001\n", "gas/510104/1", "燃气-1", "a b"])
def test_an_id_the_registry_cannot_hold_is_an_unknown_sensor(engine, odd_id):
    """The registry is the authority on sensor ids (letters, digits, '_.:-'); the decoder does
    not re-check the pattern, so such an id is dead-lettered as unknown, never accepted."""
    p = payload([reading_at(GAS, T0, value=1.0), reading_at(odd_id, T0, value=99.0)])
    out = engine.ingest([p])
    assert [(d.reason, d.index) for d in out.dead_letters] == [("unknown_sensor", 1)]
    assert out.notices == []


def test_unknown_sensor_in_a_gateway_array_names_its_index(engine):
    p = payload([reading_at(GAS, T0, value=1.0), reading_at("nope-1", T0, value=1.0),
                 reading_at(GAS_ALONE, T0, value=1.0)])
    out = engine.ingest([p])
    assert [(d.reason, d.index) for d in out.dead_letters] == [("unknown_sensor", 1)]
    assert raw(out.dead_letters[0]) == payload(reading_at("nope-1", T0, value=1.0))   # its element
    assert out.dead_letters[0].payload_digest == hashlib.blake2b(p, digest_size=16).hexdigest()
    assert engine.last_seen[engine.registry.index[GAS]] == T0          # the good ones were used
    assert engine.last_seen[engine.registry.index[GAS_ALONE]] == T0


def test_engine_dead_letter_index_counts_every_array_element(engine):
    """The index is the position in the gateway's array, also when an element before it was
    already refused by the decoder."""
    items = [reading_at(GAS, T0, value="1.0"),                 # invalid: refused by decode
             reading_at(GAS_ALONE, T0, value=1.0),
             reading_at("nope-1", T0, value=1.0),              # unknown sensor
             reading_at(GAS, T0, value=1.0, event="x"),        # invalid: both value and event
             reading_at(DOOR, T0, value=1.0)]                  # wrong kind
    p = payload(items)
    out = engine.ingest([p])
    got = sorted((d.index, d.reason) for d in out.dead_letters)
    assert got == [(0, "invalid"), (2, "unknown_sensor"), (3, "invalid"), (4, "wrong_kind")]
    assert all(raw(d) == payload(items[d.index]) for d in out.dead_letters)


def test_index_is_within_its_own_payload(engine):
    first = payload([reading_at(GAS, T0, value=1.0), reading_at(GAS_ALONE, T0, value=1.0)])
    second = payload([reading_at("gas-510104-000003", T0, value=1.0), reading_at("nope-2", T0, value=1.0)])
    single = payload(reading_at("nope-3", T0, value=1.0))
    out = engine.ingest([first, second, single])
    got = {(d.reason, d.index, raw(d), d.payload_digest) for d in out.dead_letters}
    assert got == {("unknown_sensor", 1, payload(reading_at("nope-2", T0, value=1.0)),
                    hashlib.blake2b(second, digest_size=16).hexdigest()),
                   ("unknown_sensor", None, single, None)}


@pytest.mark.parametrize("sensor, fields, detail", [
    (DOOR, {"value": 1.0}, "reports `event` readings"),
    (CAMERA, {"value": 0.0}, "reports `event` readings"),
    (GAS, {"event": "opened"}, "reports `value` readings"),
])
def test_wrong_kind(engine, sensor, fields, detail):
    p = payload(reading_at(sensor, T0, **fields))
    out = engine.ingest([p])
    [d] = out.dead_letters
    assert (d.reason, d.index) == ("wrong_kind", None) and detail in d.detail
    assert raw(d) == p
    assert engine.counters["dead.wrong_kind"] == 1
    assert engine.last_seen[engine.registry.index[sensor]] == 0     # it did not count as heard from


@pytest.mark.parametrize("value", [1e300, -1e300, 1e15, -1e15, 1.7976931348623157e308])
def test_implausible_value_is_not_finite(engine, value):
    p = payload(reading_at(GAS, T0, value=value))
    out = engine.ingest([p])
    assert [(d.reason, d.index) for d in out.dead_letters] == [("not_finite", None)]
    assert raw(out.dead_letters[0]) == p
    assert out.notices == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_value_is_refused_on_the_decoded_path(engine, value):
    """Readings that skip JSON (Engine.process) can carry NaN/inf; the engine refuses them."""
    out = engine.process([WireReading(sensor_id=GAS, ts=T0, value=value)])
    assert [d.reason for d in out.dead_letters] == ["not_finite"]
    assert out.notices == []
    assert engine.counters["dead.not_finite"] == 1


@pytest.mark.parametrize("literal, reason", [(b"NaN", "malformed"), (b"Infinity", "malformed"),
                                             (b"1e999", "invalid"), (b"-1e999", "invalid")])
def test_non_finite_value_is_refused_on_the_wire_path(engine, literal, reason):
    p = b'{"sensor_id": "%s", "ts": %d, "value": %s}' % (GAS.encode(), T0, literal)
    out = engine.ingest([p])
    assert [(d.reason, raw(d)) for d in out.dead_letters] == [(reason, p)]
    assert engine.last_seen[engine.registry.index[GAS]] == 0


def test_large_but_plausible_value_is_used(engine):
    out = engine.ingest([payload(reading_at(GAS, T0, value=99_999.0))])
    assert out.dead_letters == []
    assert {n["rule_id"] for n in out.notices} == {"gas.leak"}


def test_future_reading_needs_a_clock(engine):
    now = T0
    late_enough = payload(reading_at(GAS, now + 300_000, value=1.0))        # exactly max_future ahead
    too_far = payload(reading_at(GAS_ALONE, now + 300_001, value=1.0))
    out = engine.ingest([late_enough, too_far], now_ms=now)
    [d] = out.dead_letters
    assert (d.reason, raw(d)) == ("future", too_far)
    assert "NTP" in d.detail
    assert engine.counters["dead.future"] == 1


def test_too_old_is_judged_against_the_watermark(engine):
    engine.ingest([payload(reading_at(GAS, T0, value=1.0))])
    assert engine.watermark == T0 - 60_000
    floor = engine.watermark - 7 * 86_400_000
    at_floor = payload(reading_at(GAS_ALONE, floor, value=1.0))
    below = payload(reading_at("gas-510104-000003", floor - 1, value=1.0))
    out = engine.ingest([at_floor, below])
    assert [(d.reason, raw(d)) for d in out.dead_letters] == [("too_old", below)]
    assert str(floor - 1) in out.dead_letters[0].detail


def test_too_old_hints_at_epoch_seconds(engine):
    engine.ingest([payload(reading_at(GAS, T0, value=1.0))])
    out = engine.ingest([payload(reading_at(GAS_ALONE, T0 // 1000, value=1.0))])
    [d] = out.dead_letters
    assert d.reason == "too_old" and "epoch seconds? send milliseconds" in d.detail


def test_stale_reading_is_dead_lettered(engine):
    """Older than the sensor's newest by more than allowed_lateness (60 s): stale."""
    engine.ingest([payload(reading_at(GAS, T0 + 70_000, value=1.0))])
    p = payload(reading_at(GAS, T0 + 5_000, value=1.0))
    out = engine.ingest([p])
    [d] = out.dead_letters
    assert (d.reason, raw(d)) == ("stale", p)
    assert str(T0 + 70_000) in d.detail
    assert engine.counters["dead.stale"] == 1


def test_out_of_order_within_one_gateway_array_is_not_stale(engine):
    out = engine.ingest([payload([reading_at(GAS, T0 + 10_000, value=1.0),
                                  reading_at(GAS, T0 + 5_000, value=1.0)])])
    assert out.dead_letters == []
    assert engine.last_seen[engine.registry.index[GAS]] == T0 + 10_000


def test_out_of_order_across_payloads_of_one_batch_is_stale_as_one_by_one(engine):
    """A batch is its payloads one after another: the answer is the one of a call each."""
    late = payload(reading_at(GAS, T0 + 5_000, value=1.0))
    out = engine.ingest([payload(reading_at(GAS, T0 + 70_000, value=1.0)), late])
    [d] = out.dead_letters
    assert (d.reason, raw(d)) == ("stale", late)
    assert str(T0 + 70_000) in d.detail


# ---- late readings: older than the sensor's newest, within allowed_lateness (60 s) -------------

def street(out: Output) -> list[tuple]:
    return [(n["state"], n.get("previous_state"), n["severity"], n["value"]) for n in out.notices
            if n["tier"] == "street"]


def test_a_late_alarm_behind_a_newer_normal_reading_fires_at_its_own_time(engine):
    """A broker restart: the normal reading of t+20 s got through, the alarm of t is resent."""
    engine.ingest([payload(reading_at(GAS, T0 + 20_000, value=1.0))])
    out = engine.ingest([payload(reading_at(GAS, T0, value=30.0))])
    assert out.dead_letters == []
    assert street(out) == [("firing", None, "yellow", 30.0)]
    [n] = [n for n in out.notices if n["tier"] == "street"]
    assert n["started_at"] == n["ts"] and engine.counters["late"] == 1
    assert engine.last_seen[engine.registry.index[GAS]] == T0 + 20_000   # not a last-seen time
    # it stays open until the sensor's next readings clear it (2 min under 10 %LEL)
    assert street(engine.ingest([payload(reading_at(GAS, T0 + 30_000, value=1.0))])) == []
    assert street(engine.advance(T0 + 30_000 + 2 * MIN)) == [("resolved", "firing", "yellow", 1.0)]


def test_a_late_redelivery_of_an_alarm_whose_incident_ended_opens_none(engine):
    """gas.leak resolves 2 min after the dip; a resent copy of the alarm (now behind the
    sensor's newest reading, within 60 s of it) fell inside that incident: no second one."""
    alarm = payload(reading_at(GAS, T0 + 2 * MIN, value=30.0))
    engine.ingest([payload(reading_at(GAS, T0, value=30.0)), alarm,
                   payload(reading_at(GAS, T0 + 2 * MIN + 1000, value=1.0))])
    assert street(engine.advance(T0 + 4 * MIN + 1000))[0][0] == "resolved"
    engine.ingest([payload(reading_at(GAS, T0 + 2 * MIN + 30_000, value=1.0))])
    again = engine.ingest([alarm])
    assert again.notices == [] and again.dead_letters == []
    assert engine.counters["late"] == 1


def test_a_late_alarm_steps_an_open_incident_up_and_stops_its_clearing(engine):
    engine.ingest([payload(reading_at(GAS, T0, value=30.0))])                  # yellow
    engine.ingest([payload(reading_at(GAS, T0 + 20_000, value=1.0))])          # clearing from +20 s
    engine.ingest([payload(reading_at(GAS, T0 + 40_000, value=1.0))])
    out = engine.ingest([payload(reading_at(GAS, T0 + 30_000, value=55.0))])   # late, red
    assert street(out) == [("firing", "firing", "red", 55.0)]
    # clearing starts again at the next clear reading: not resolved at +20 s + 2 min
    assert street(engine.advance(T0 + 20_000 + 2 * MIN)) == []
    engine.ingest([payload(reading_at(GAS, T0 + 3 * MIN, value=1.0))])
    assert street(engine.advance(T0 + 5 * MIN - 1)) == []
    assert street(engine.advance(T0 + 5 * MIN))[0][0] == "resolved"


def test_a_late_alarm_from_before_the_clearing_began_changes_only_the_severity(engine):
    """In order it came before the dip: the clearing that began after it goes on."""
    engine.ingest([payload(reading_at(GAS, T0, value=30.0))])
    engine.ingest([payload(reading_at(GAS, T0 + 20_000, value=1.0))])          # clearing from +20 s
    assert street(engine.ingest([payload(reading_at(GAS, T0 + 10_000, value=55.0))])) == [
        ("firing", "firing", "red", 55.0)]
    assert street(engine.advance(T0 + 20_000 + 2 * MIN))[0][0] == "resolved"


def test_a_late_reading_lowers_nothing_and_a_late_clear_event_ends_nothing(engine):
    engine.ingest([payload(reading_at(GAS, T0, value=55.0))])                  # red
    engine.ingest([payload(reading_at(GAS, T0 + 20_000, value=56.0))])
    out = engine.ingest([payload(reading_at(GAS, T0 + 10_000, value=1.0))])    # late, clear
    assert out.notices == []
    assert street(engine.advance(T0 + 10_000 + 2 * MIN)) == []              # still firing
    engine.ingest([payload(reading_at(CAMERA, T0 + 20_000, event="no_helmet"))])
    late = engine.ingest([payload(reading_at(CAMERA, T0 + 10_000, event="cleared"))])
    assert late.notices == [] and late.dead_letters == []
    assert {(i.subject, i.state.value) for i in engine.book.open.values()} == {
        (engine.registry.index[GAS], "firing"), (engine.registry.index[CAMERA], "firing")}


def test_a_late_camera_event_opens_an_incident_when_none_is_open(engine):
    engine.ingest([payload(reading_at(CAMERA, T0 + 30_000, event="heartbeat"))])
    out = engine.ingest([payload(reading_at(CAMERA, T0, event="no_helmet"))])
    assert [(n["state"], n["event"]) for n in out.notices if n["tier"] == "street"] == [
        ("firing", "no_helmet")]


def test_older_than_allowed_lateness_is_stale_and_changes_nothing(engine):
    engine.ingest([payload(reading_at(GAS, T0 + 61_000, value=1.0))])
    out = engine.ingest([payload(reading_at(GAS, T0, value=55.0))])
    assert out.notices == [] and [d.reason for d in out.dead_letters] == ["stale"]


def test_a_snapshot_keeps_when_incidents_ended_so_a_restart_opens_no_second(chengdu, rules):
    """After gas.leak's 30 min flapping window nothing of the incident is left in its rule but
    when it ended: a redelivered alarm from inside it (the sensor sent nothing since, so the
    alarm is within 60 s of its newest reading) must not open another, before or after a
    restart."""
    alarm = payload(reading_at(GAS, T0 + 2 * MIN, value=30.0))
    before = Engine(chengdu, rules)
    before.ingest([payload(reading_at(GAS, T0, value=30.0)), alarm,
                   payload(reading_at(GAS, T0 + 2 * MIN + 1000, value=1.0))])
    assert street(before.advance(T0 + 4 * MIN + 1000))[0][0] == "resolved"
    before.advance(T0 + 40 * MIN)                      # the flapping window is over
    assert before.by_id["gas.leak"].tracks == {}
    after = Engine(chengdu, rules)
    after.restore(before.snapshot())
    assert after.ingest([alarm]).notices == [] and after.counters["late"] == 1
    assert before.ingest([alarm]).notices == []
    fresh = Engine(chengdu, rules)       # without the end kept, the same input would fire again
    fresh.restore(before.snapshot())
    fresh.by_id["gas.leak"].ended.clear()
    assert street(fresh.ingest([alarm]))[0] == ("firing", None, "yellow", 30.0)


def test_duplicates_are_counted_not_dead_lettered(engine):
    p = payload(reading_at(GAS, T0, value=30.0))
    first = engine.ingest([p, p])
    again = engine.ingest([p])
    assert first.dead_letters == [] and again.dead_letters == []
    assert engine.counters["duplicates"] == 2
    assert engine.counters["readings"] == 3
    assert engine.counters["dead_letters"] == 0
    # one incident, told once per tier: the redelivery added nothing
    assert again.notices == []
    assert len({n["alert_id"] for n in first.notices}) == 1


def test_decoder_dead_letters_are_counted_too(engine):
    out = engine.ingest([b"not json", payload(reading_at(GAS, "yesterday", value=1.0))])
    assert sorted(d.reason for d in out.dead_letters) == ["invalid", "malformed"]
    assert engine.counters["dead_letters"] == 2
    assert engine.counters["dead.malformed"] == 1 and engine.counters["dead.invalid"] == 1


def test_counters_move_for_a_mixed_batch(engine):
    good = payload(reading_at(GAS, T0, value=1.0))
    out = engine.ingest([
        good, good,                                             # 1 reading, 1 duplicate
        payload(reading_at("nope", T0, value=1.0)),                # unknown_sensor
        payload(reading_at(DOOR, T0, value=1.0)),                  # wrong_kind
        payload(reading_at(GAS_ALONE, T0, value=1e20)),            # not_finite
        b"{",                                                   # malformed
    ])
    assert len(out.dead_letters) == 4
    c = engine.counters
    assert (c["readings"], c["duplicates"], c["dead_letters"]) == (5, 1, 4)
    assert (c["dead.unknown_sensor"], c["dead.wrong_kind"], c["dead.not_finite"],
            c["dead.malformed"]) == (1, 1, 1, 1)


def test_ingest_decodes_each_payload_on_its_own(engine):
    """Batching payloads into one call must not change how each one is read: two objects
    separated by a comma are not JSON, whatever else is in the batch."""
    good = payload(reading_at(GAS, T0, value=1.0))
    glued = payload(reading_at(GAS_ALONE, T0, value=1.0)) + b"," + payload(reading_at(DOOR, T0, event="opened"))
    other = payload(reading_at("gas-510104-000003", T0, value=1.0))
    out = engine.ingest([good, glued, other])
    assert [(d.reason, raw(d)) for d in out.dead_letters] == [("malformed", glued)]
    index = engine.registry.index
    assert engine.last_seen[index[GAS]] == T0 and engine.last_seen[index["gas-510104-000003"]] == T0
    assert engine.last_seen[index[GAS_ALONE]] == 0 and engine.last_seen[index[DOOR]] == 0


HOSTILE = {
    "empty": [b""],
    "whitespace": [b" \n\t"],
    "binary": [bytes(range(256))],
    "non-utf8-in-sensor-id": [b'{"sensor_id": "gas-\xff\xfe", "ts": 1782000000000, "value": 1}'],
    "non-utf8-in-array": [b'[{"sensor_id": "' + GAS.encode() + b'", "ts": 1782000000000, '
                          b'"value": 1}, {"sensor_id": "\xc3", "ts": 1782000000000, "value": 1}]'],
    "overflowing-number-in-array": [b'[{"sensor_id": "' + GAS.encode() + b'", "ts": 1782000000000, '
                                    b'"value": 1e999}, {"sensor_id": "' + GAS_ALONE.encode()
                                    + b'", "ts": 1782000000000, "value": 1}]'],
    "ts-beyond-int64": [payload(reading_at(GAS, 2**63, value=1.0))],
    "ts-far-beyond-int64": [payload(reading_at(GAS, 10**30, value=1.0))],
    "deeply-nested": [b"[" * 10_000 + b"]" * 10_000],
    "array-of-arrays": [b"[[1, 2], [3]]"],
    "null": [b"null"],
    "huge-string": [payload(reading_at("x" * 100_000, T0, value=1.0))],
    "oversize": [b"[" + b"1," * 200_000 + b"1]"],
    "empty-array": [b"[]"],
}


@pytest.mark.parametrize("payloads", HOSTILE.values(), ids=HOSTILE.keys())
def test_nothing_raises(engine, payloads):
    out = engine.ingest(payloads, source="fuzz", now_ms=None)
    assert isinstance(out, Output)
    for d in out.dead_letters:
        assert raw(d) in b"".join(payloads)
    # and the engine still works afterwards
    after = engine.ingest([payload(reading_at(GAS_ALONE, T0 + 1, value=1.0))])
    assert after.dead_letters == []


# ---- a mixed scenario ----------------------------------------------------------------------------

def scenario() -> list[bytes]:
    """About an hour of gas, waterlogging and camera readings in 锦江区, in event-time order:
    leaks (one at a resident living alone, three in one building), a flooded road that clears,
    a camera that reports violations of rising severity."""
    out: list[tuple[int, dict]] = []
    gas = {GAS_ALONE: [5, 30, 35, 8, 4, 3, 2, 2, 1, 1, 1, 1],
           GAS: [5, 25, 26, 22, 5, 2, 1, 1, 1, 1, 1, 1],
           "gas-510104-000003": [5, 55, 60, 30, 9, 1, 1, 1, 1, 1, 1, 1],
           "gas-510104-000010": [0, 21, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]}
    for n, (sid, values) in enumerate(gas.items()):
        for i, v in enumerate(values):
            out.append((T0 + i * 5 * MIN + n * 7_000, reading_at(sid, 0, value=float(v), battery=60.0 - i)))
    for i, v in enumerate([0, 18, 30, 45, 41, 20, 8, 5, 3, 2, 1, 0, 0, 0, 0]):
        out.append((T0 + i * 4 * MIN, reading_at("wl-510104-000001", 0, value=float(v))))
        out.append((T0 + i * 4 * MIN + 3_000, reading_at("wl-510104-000002", 0, value=v / 2)))
    for i, event in enumerate(["no_helmet", "no_helmet", "fence_missing", "smoke_fire"]):
        out.append((T0 + 100_000 + i * 400_000, reading_at(CAMERA, 0, event=event)))
    out.sort(key=lambda item: item[0])
    return [payload({**r, "ts": ts}) for ts, r in out]


def rich_scenario() -> list[bytes]:
    """The mixed scenario plus windows (dust, rain), rates (river), door and crane events and
    batteries: state of every kind for a snapshot to carry."""
    extra: list[tuple[int, dict]] = []
    for i in range(20):
        extra.append((T0 + i * 5 * MIN + 11_000, reading_at("dust-510104-000001", 0, value=140.0 + 10 * i)))
        extra.append((T0 + i * 5 * MIN + 13_000, reading_at("rain-510104-000001", 0, value=4.0)))
        extra.append((T0 + i * 5 * MIN + 17_000, reading_at("river-510104-000001", 0, value=3.5 + 0.08 * i)))
    extra += [(T0 + 500_000, reading_at(DOOR, 0, event="opened")),
              (T0 + 1_500_000, reading_at(DOOR, 0, event="closed")),
              (T0 + 700_000, reading_at("crane-510104-000001", 0, event="wind_speed_alarm"))]
    items = [(json.loads(p)["ts"], p) for p in scenario()]
    items += [(ts, payload({**r, "ts": ts})) for ts, r in extra]
    items.sort(key=lambda item: item[0])
    return [p for _, p in items]


def run(engine: Engine, batches: list[list[bytes]], until: int | None = None) -> list[dict]:
    notices: list[dict] = []
    for batch in batches:
        out = engine.ingest(batch)
        assert out.dead_letters == [], out.dead_letters[0]
        notices += out.notices
    if until is not None:
        notices += engine.advance(until).notices
    return notices


def batchings(payloads: list[bytes], seed: int = 7) -> dict[str, list[list[bytes]]]:
    """The same arrivals split into batches in different ways (a batch is its payloads one
    after another, so this must not change the answer; arrivals in another order are other
    input: a reading older than its sensor's newest one is stale whatever the batching)."""
    rnd = random.Random(seed)
    chunks = []
    i = 0
    while i < len(payloads):
        size = rnd.randint(1, 12)
        chunks.append(payloads[i:i + size])
        i += size
    return {"one per call": [[p] for p in payloads], "all in one call": [payloads],
            "random chunks": chunks}


END = T0 + 80 * MIN     # watermark the runs are taken to (before the 2h household-gas silence)


def test_scenario_raises_the_expected_incidents(chengdu, rules):
    notices = run(Engine(chengdu, rules), [scenario()], until=END)
    assert_valid_notices(notices)
    fired = {(n["rule_id"], n["sensor_id"]) for n in notices if n["state"] == "firing"}
    assert {("gas.leak", GAS_ALONE), ("gas.leak", GAS), ("gas.leak", "gas-510104-000003"),
            ("gas.leak", "gas-510104-000010"), ("gas.building_cluster", GAS_ALONE),
            ("waterlogging.depth", "wl-510104-000001"), ("waterlogging.depth", "wl-510104-000002"),
            ("construction.site_violation", CAMERA)} <= fired
    resolved = {(n["rule_id"], n["sensor_id"]) for n in notices if n["state"] == "resolved"}
    assert ("waterlogging.depth", "wl-510104-000001") in resolved
    # (alert_id, state, seq, tier, target) is unique: at-least-once consumers deduplicate on it
    keys = [(n["alert_id"], n["state"], n["seq"], n["tier"], n["target"]) for n in notices]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("name", ["all in one call", "random chunks"])
def test_output_does_not_depend_on_batching(chengdu, rules, name):
    payloads = scenario()
    ways = batchings(payloads)
    reference = run(Engine(chengdu, rules), ways["one per call"], until=END)
    other = run(Engine(chengdu, rules), ways[name], until=END)
    assert_valid_notices(other)
    missing = sorted(notice_keys(reference) - notice_keys(other))
    extra = sorted(notice_keys(other) - notice_keys(reference))
    assert (missing, extra) == ([], []), f"{len(missing)} missing, {len(extra)} extra"


def test_rule_decisions_do_not_depend_on_batching(chengdu, tmp_path):
    """The same without reminders and escalation: what the rules decide alone."""
    routing = tmp_path / "routing.yaml"
    routing.write_text("tiers:\n  blue: [street, grid]\n  yellow: [street, grid, district]\n"
                       "  orange: [street, grid, district, dept]\n"
                       "  red: [street, grid, district, dept, city]\n", encoding="utf-8")
    quiet = load_rules(routing=routing)
    ways = batchings(scenario())
    runs = {name: notice_keys(run(Engine(chengdu, quiet), batches, until=END))
            for name, batches in ways.items()}
    reference = runs.pop("one per call")
    assert len(reference) > 50
    for name, keys in runs.items():
        assert keys == reference, name


def test_reminder_due_between_two_readings_does_not_depend_on_batching(chengdu, rules):
    """gas.leak at a household: yellow at 0, back under the clear level at 11m, which holds
    for clear_for (2m) so it resolves at 13m. The root route reminds every 10m, so a reminder is
    due at 10m, before the incident resolved: in event time it is sent whatever the batching."""
    payloads = [payload(reading_at(GAS, T0, value=25.0)),
                payload(reading_at(GAS, T0 + 11 * MIN, value=5.0)),
                payload(reading_at(GAS, T0 + 14 * MIN, value=5.0))]
    expected = [("firing", 1, "2026-06-21T08:00:00+08:00"),
                ("reminder", 2, "2026-06-21T08:10:00+08:00"),
                ("resolved", 3, "2026-06-21T08:13:00+08:00")]
    for name, batches in batchings(payloads).items():
        notices = run(Engine(chengdu, rules), batches, until=T0 + 20 * MIN)
        got = sorted({(n["state"], n["seq"], n["ts"]) for n in notices}, key=lambda x: x[1])
        assert got == expected, name


# ---- snapshot and restore ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["one per call", "all in one call"])
@pytest.mark.parametrize("cut", [0.25, 0.5, 0.8])
def test_restart_loses_nothing_and_duplicates_nothing(chengdu, rules, mode, cut):
    payloads = rich_scenario()
    n = int(len(payloads) * cut)
    first, second = payloads[:n], payloads[n:]

    def batches(ps: list[bytes]) -> list[list[bytes]]:
        return [[p] for p in ps] if mode == "one per call" else [ps]

    straight = Engine(chengdu, rules)
    expected = run(straight, batches(first)) + run(straight, batches(second), until=END)

    before = Engine(chengdu, rules)
    got = run(before, batches(first))
    blob = before.snapshot()
    after = Engine(chengdu, rules)
    assert after.restore(blob) == {}
    got += run(after, batches(second), until=END)

    assert got == expected
    assert after.counters == straight.counters
    assert (after.watermark, after.max_ts) == (straight.watermark, straight.max_ts)
    assert after.snapshot() == straight.snapshot()
    assert_valid_notices(got)


def test_redelivery_after_restore_tells_nobody_again(chengdu, rules):
    payloads = rich_scenario()
    half = len(payloads) // 2
    before = Engine(chengdu, rules)
    run(before, [payloads[:half]])
    after = Engine(chengdu, rules)
    after.restore(before.snapshot())
    # at-least-once delivery: the broker redelivers what was in flight when the process died
    out = after.ingest(payloads[half - 10:half])
    assert out.notices == []
    assert after.counters["duplicates"] > 0
    assert {d.reason for d in out.dead_letters} <= {"stale"}


def test_restored_engine_takes_acknowledgements_for_open_incidents(chengdu, rules):
    before = Engine(chengdu, rules)
    fired = before.ingest([payload(reading_at(GAS, T0, value=30.0))]).notices
    aid = fired[0]["alert_id"]
    after = Engine(chengdu, rules)
    after.restore(before.snapshot())
    out = after.ack([Ack(alert_id=aid, by="w-510104020001-01", tier="grid", ts=T0 + MIN)])
    assert out.dead_letters == []
    assert {n["state"] for n in out.notices} == {"acknowledged"}
    assert {n["seq"] for n in out.notices} == {2}
    assert_valid_notices(out.notices)


def test_restore_into_a_changed_registry_counts_what_is_lost(chengdu, rules, tmp_path):
    before = Engine(chengdu, rules)
    before.ingest([payload(reading_at(GAS, T0, value=30.0)), payload(reading_at(GAS_ALONE, T0, value=1.0))])
    src = registry.FIXTURE.parent
    (tmp_path / "registry.yaml").write_text((src / "registry.yaml").read_text(encoding="utf-8"),
                                            encoding="utf-8")
    rows = (src / "sensors.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "sensors.csv").write_text("".join(r for r in rows if not r.startswith(GAS + ",")),
                                          encoding="utf-8")
    smaller = registry.load(tmp_path, rules.kinds)
    after = Engine(smaller, rules)
    lost = after.restore(before.snapshot())
    assert lost["sensors"] == 1
    assert lost["incidents"] == 1 and lost["tracks"] >= 1
    assert after.last_seen[smaller.index[GAS_ALONE]] == T0


def test_snapshot_version_is_checked(engine):
    blob = msgspec.msgpack.encode({"version": 99})
    with pytest.raises(ValueError, match="snapshot version 99"):
        engine.restore(blob)


# ---- absence --------------------------------------------------------------------------------------

def test_silent_gateway_raises_one_gateway_incident(chengdu, rules):
    """device.silent: when every watched sensor behind a gateway is silent, one gateway
    incident stands for all of them (rules/evaluators.py, Absence)."""
    engine = Engine(chengdu, rules)
    engine.ingest([payload(reading_at("wl-510104-000001", T0, value=0.0))])
    out = engine.advance(T0 + 3 * 60 * MIN)
    gateway = [n for n in out.notices if n["rule_id"] == "device.silent" and n["kind"] == "gateway"]
    assert gateway
    first = next(n for n in gateway if n["group"] == "gw-510104-0001")
    watched = set(next(r.spec for r in rules.rules if r.spec.id == "device.silent").absent_for)
    members = [sid for i, sid in enumerate(chengdu.sensor_ids)
               if chengdu.gateway_of[i] >= 0 and chengdu.gateways[chengdu.gateway_of[i]] == "gw-510104-0001"
               and chengdu.kinds[chengdu.kind_of[i]] in watched]
    assert len(members) >= 2
    assert sorted(first["members"]) == sorted(members)
    assert len({n["alert_id"] for n in gateway if n["group"] == "gw-510104-0001"}) == 1
    assert_valid_notices(out.notices)


def test_settings_are_validated():
    assert EngineSettings(max_age="1d").max_age == 86_400_000
    with pytest.raises(ValueError):
        EngineSettings(max_age="a week")
    with pytest.raises(ValueError):
        EngineSettings(max_agee="1d")


def test_dead_letters_are_the_documented_model(engine):
    out = engine.ingest([b"nope", payload(reading_at("nope", T0, value=1.0))])
    for d in out.dead_letters:
        assert DeadLetter.model_validate(d.model_dump()) == d


# ---- the sender vouches only for its own sensors ------------------------------------------------

def test_a_gateway_may_only_report_the_sensors_behind_it(engine):
    """Topic cityops/gateways/gw-510104-0001 (the broker's ACL ties it to that gateway's login):
    its own sensor counts; another gateway's sensor is refused, so nobody can clear or fake
    another building's gas alarm."""
    mine = reading_at("gas-510104-000002", T0, value=30.0)
    theirs = reading_at("wl-510104-000001", T0, value=50.0)      # no gateway: not this one's
    p = payload([mine, theirs])
    out = engine.ingest([p], source="cityops/gateways/gw-510104-0001",
                        senders=[("gateway", "gw-510104-0001")])
    assert [(d.reason, d.index) for d in out.dead_letters] == [("wrong_sender", 1)]
    assert {n["sensor_id"] for n in out.notices} == {"gas-510104-000002"}


def test_a_per_sensor_topic_vouches_for_that_sensor_only(engine):
    out = engine.ingest([payload(reading_at("gas-510104-000002", T0, value=30.0))] * 1
                        + [payload(reading_at("gas-510104-000003", T0, value=30.0))],
                        senders=[("sensor", "gas-510104-000002"), ("sensor", "gas-510104-000002")])
    assert [d.reason for d in out.dead_letters] == ["wrong_sender"]
    assert {n["sensor_id"] for n in out.notices} == {"gas-510104-000002"}


def test_an_unknown_sender_vouches_for_nothing(engine):
    out = engine.ingest([payload(reading_at("gas-510104-000002", T0, value=30.0))],
                        senders=[("gateway", "gw-nobody")])
    assert [d.reason for d in out.dead_letters] == ["wrong_sender"] and out.notices == []


def test_runtime_settings_defaults_are_the_documented_durations():
    """Durations read bare numbers as seconds: defaults must be written as durations."""
    from pipeline.shared.config import Settings
    s = Settings()
    assert (s.tick, s.max_wait, s.state.snapshot_every, s.engine.allowed_lateness,
            s.mqtt.session_expiry) == (1_000, 20, 30_000, 10_000, 7 * 86_400_000)
