"""The hot-path reading decoder (pipeline.core.wire.decode) against the documented contract
(pipeline.core.models.Reading): "an equivalent msgspec decoder ... a property test keeps the two in
agreement" (pipeline/core/models.py)."""

from __future__ import annotations

import base64
import json
import string
from datetime import datetime

import pytest
import msgspec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.core.models import DeadLetter, Reading
from pipeline.core.wire import MAX_PAYLOAD_BYTES, decode, decode_batch, digest

FIELDS = ("sensor_id", "ts", "value", "event", "unit", "seq", "battery", "gateway_id")
ID_CHARS = string.ascii_letters + string.digits + "_.:-"


def reading_contract(d: dict) -> Reading | None:
    try:
        return Reading.model_validate(d)
    except ValidationError:
        return None


def encode(d) -> bytes:
    return json.dumps(d, ensure_ascii=False).encode("utf-8")


def d_payload_bytes(d: DeadLetter) -> bytes:
    """The original bytes a dead letter carries."""
    return base64.b64decode(d.payload) if d.payload_encoding == "base64" else d.payload.encode("utf-8")


# ---- strategies -------------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False), text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)), max_leaves=6)
wrong_type = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text,
                       st.lists(st.integers(), max_size=2),
                       st.dictionaries(text, st.integers(), max_size=2))

OFFSETS = ["Z", "z", "+00:00", "-00:00", "+08:00", "-05:30", "+05:45", "+14:00", "-12:00", "+0800"]


@st.composite
def rfc3339(draw, offset: bool = True) -> str:
    """RFC 3339 text: 'T', 't' or ' ' between date and time, 0-9 fraction digits, an offset
    (or, with offset=False, none: a naive local time the contract refuses)."""
    dt = draw(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)))
    out = dt.strftime("%Y-%m-%d") + draw(st.sampled_from("Tt ")) + dt.strftime("%H:%M:%S")
    digits = draw(st.integers(0, 9))
    if digits:
        fraction = f"{dt.microsecond:06d}" + draw(st.text("0123456789", min_size=3, max_size=3))
        out += "." + fraction[:digits]
    if offset:
        out += draw(st.sampled_from(OFFSETS))
    return out


valid_ids = st.text(ID_CHARS, min_size=1, max_size=128)
valid_ts = st.one_of(st.integers(0, 4_102_444_800_000), rfc3339())
valid_value = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10**9, 10**9))
valid_event = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=64)


@st.composite
def valid_readings(draw) -> dict:
    d = {"sensor_id": draw(valid_ids), "ts": draw(valid_ts)}
    if draw(st.booleans()):
        d["value"] = draw(valid_value)
    else:
        d["event"] = draw(valid_event)
    for name, strategy in (("unit", st.none() | text), ("seq", st.none() | st.integers(-2**63, 2**63 - 1)),
                           ("battery", st.none() | st.floats(0, 100) | st.integers(0, 100)),
                           ("gateway_id", st.none() | text)):
        if draw(st.booleans()):
            d[name] = draw(strategy)
    extra = draw(st.dictionaries(text.filter(lambda k: k not in FIELDS), json_values, max_size=2))
    return {**extra, **d}


# what a careless or broken gateway puts in each field
bad_field = {
    "sensor_id": st.one_of(st.just(""), st.text(ID_CHARS, min_size=129, max_size=140),
                           text.filter(lambda s: s and not set(s) <= set(ID_CHARS)),
                           valid_ids.map(lambda s: s + "\n"), wrong_type),
    "ts": st.one_of(st.integers(max_value=-1), rfc3339(offset=False), st.floats(), st.booleans(),
                    st.integers(0, 10**12).map(str), text, st.none(), st.lists(st.integers(), max_size=2)),
    "value": st.one_of(st.floats(), st.booleans(), st.floats(allow_nan=False).map(repr),
                       text, st.lists(st.floats(allow_nan=False), max_size=2)),
    "event": st.one_of(st.just(""),
                       st.text(st.characters(blacklist_categories=("Cs",)), min_size=65, max_size=70),
                       st.integers(), st.booleans(), st.lists(text, max_size=2)),
    "unit": st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(text, max_size=2)),
    "seq": st.one_of(st.floats(allow_nan=False), st.integers(0, 99).map(str), st.booleans(), text),
    "battery": st.one_of(st.floats(max_value=-0.001), st.floats(min_value=100.001), st.booleans(),
                         st.integers(0, 100).map(str), text, st.floats()),
    "gateway_id": st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                            st.lists(text, max_size=2)),
}


@st.composite
def near_miss_readings(draw) -> dict:
    """A valid reading with one field broken, dropped, or value and event both/neither set."""
    d = draw(valid_readings())
    how = draw(st.sampled_from(["break", "drop", "both", "neither"]))
    if how == "break":
        name = draw(st.sampled_from(FIELDS))
        d[name] = draw(bad_field[name])
    elif how == "drop":
        d.pop(draw(st.sampled_from(["sensor_id", "ts", "value" if "value" in d else "event"])))
    elif how == "both":
        d["value"], d["event"] = draw(valid_value), draw(valid_event)
    else:
        d.pop("value", None)
        d.pop("event", None)
        if draw(st.booleans()):
            d["value"] = d["event"] = None
    return d


any_object = st.dictionaries(st.sampled_from(FIELDS) | text, json_values, max_size=9)
readings = st.one_of(valid_readings(), near_miss_readings(), near_miss_readings(), any_object)


# ---- the decoder and the contract agree --------------------------------------------------------

@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(readings)
def test_decode_accepts_exactly_what_the_contract_accepts(d):
    payload = encode(d)
    got, dead = decode(payload)
    contract = reading_contract(d)
    assert len(got) + len(dead) == 1
    assert bool(got) == (contract is not None), (
        f"decode {'accepts' if got else 'refuses'} {payload!r} "
        f"({dead[0].detail if dead else ''}), Reading {'accepts' if contract else 'refuses'} it")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_readings())
def test_decode_and_contract_read_the_same_fields(d):
    contract = reading_contract(d)
    assume(contract is not None)
    got, dead = decode(encode(d))
    assert not dead, dead[0].detail
    r = got[0]
    assert (r.sensor_id, r.value, r.event, r.battery) == (
        contract.sensor_id, contract.value, contract.event, contract.battery)
    assert (r.unit, r.seq, r.gateway_id) == (contract.unit, contract.seq, contract.gateway_id)
    assert r.ts == contract.ts_ms, f"ts {d['ts']!r}: decode {r.ts} ms, Reading.ts_ms {contract.ts_ms}"
    assert type(r.ts) is int


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(readings, max_size=6))
def test_gateway_array_is_decoded_element_by_element(items):
    """An array gives what its elements give one by one: the good ones, and a dead letter with
    the index, its own element's bytes and the whole payload's digest for each bad one."""
    try:
        payload = json.dumps(items, ensure_ascii=False, allow_nan=False).encode()
    except ValueError:
        assume(False)              # NaN/Infinity are not JSON: the whole array is malformed
    got, dead = decode(payload, source="cityops/gw-1")
    expected_good, expected_bad = [], []
    for i, item in enumerate(items):
        one, _ = decode(encode(item))
        if one:
            expected_good.append(one[0])
        else:
            expected_bad.append(i)
    assert [(r.sensor_id, r.ts, r.value, r.event) for r in got] == [
        (r.sensor_id, r.ts, r.value, r.event) for r in expected_good]
    assert sorted(d.index for d in dead) == expected_bad
    for d in dead:
        assert d.reason == "invalid"
        assert d.payload.encode() == encode(items[d.index]) and d.payload_encoding == "utf-8"
        assert d.payload_digest == digest(payload)
        assert d.source == "cityops/gw-1"


# Boundary cases, one line each, so that a disagreement shows up by name.
AGREEMENT = {
    "int-ts": {"sensor_id": "gas-1", "ts": 1_782_000_000_000, "value": 12.5},
    "zero-ts": {"sensor_id": "gas-1", "ts": 0, "value": 1},
    "rfc3339-offset": {"sensor_id": "gas-1", "ts": "2026-07-01T14:00:00+08:00", "value": 1},
    "rfc3339-zulu-fraction": {"sensor_id": "gas-1", "ts": "2026-07-01T06:00:00.123Z", "value": 1},
    "rfc3339-space": {"sensor_id": "gas-1", "ts": "2026-07-01 14:00:00+08:00", "value": 1},
    "naive-datetime": {"sensor_id": "gas-1", "ts": "2026-07-01T14:00:00", "value": 1},
    "date-only": {"sensor_id": "gas-1", "ts": "2026-07-01", "value": 1},
    "negative-int-ts": {"sensor_id": "gas-1", "ts": -1, "value": 1},
    "float-ts": {"sensor_id": "gas-1", "ts": 1_782_000_000_000.0, "value": 1},
    "bool-ts": {"sensor_id": "gas-1", "ts": True, "value": 1},
    "numeric-string-ts": {"sensor_id": "gas-1", "ts": "1782000000000", "value": 1},
    "minutes-only-time": {"sensor_id": "gas-1", "ts": "2026-07-01T14:00+08:00", "value": 1},
    "string-value": {"sensor_id": "gas-1", "ts": 1, "value": "12.5"},
    "bool-value": {"sensor_id": "gas-1", "ts": 1, "value": True},
    "float-seq": {"sensor_id": "gas-1", "ts": 1, "value": 1, "seq": 3.0},
    "string-battery": {"sensor_id": "gas-1", "ts": 1, "value": 1, "battery": "50"},
    "battery-100": {"sensor_id": "gas-1", "ts": 1, "value": 1, "battery": 100},
    "battery-over-100": {"sensor_id": "gas-1", "ts": 1, "value": 1, "battery": 100.5},
    "battery-negative": {"sensor_id": "gas-1", "ts": 1, "value": 1, "battery": -0.1},
    "value-and-event": {"sensor_id": "gas-1", "ts": 1, "value": 1, "event": "opened"},
    "neither-value-nor-event": {"sensor_id": "gas-1", "ts": 1},
    "null-value-and-event": {"sensor_id": "gas-1", "ts": 1, "value": None, "event": None},
    "empty-event": {"sensor_id": "cam-1", "ts": 1, "event": ""},
    "event-64": {"sensor_id": "cam-1", "ts": 1, "event": "x" * 64},
    "event-65": {"sensor_id": "cam-1", "ts": 1, "event": "x" * 65},
    "sensor-id-128": {"sensor_id": "s" * 128, "ts": 1, "value": 1},
    "sensor-id-129": {"sensor_id": "s" * 129, "ts": 1, "value": 1},
    "sensor-id-space": {"sensor_id": "gas 1", "ts": 1, "value": 1},
    "sensor-id-chinese": {"sensor_id": "燃气-1", "ts": 1, "value": 1},
    "sensor-id-trailing-newline": {"sensor_id": "gas-1\n", "ts": 1, "value": 1},
    "missing-sensor-id": {"ts": 1, "value": 1},
    "missing-ts": {"sensor_id": "gas-1", "value": 1},
    "extra-fields": {"sensor_id": "gas-1", "ts": 1, "value": 1, "rssi": -70, "fw": {"v": "1.2"}},
    "int-unit": {"sensor_id": "gas-1", "ts": 1, "value": 1, "unit": 5},
}


@pytest.mark.parametrize("d", AGREEMENT.values(), ids=AGREEMENT.keys())
def test_decode_agrees_with_the_contract_on(d):
    got, dead = decode(encode(d))
    contract = reading_contract(d)
    assert bool(got) == (contract is not None), (
        f"decode: {'accepted' if got else dead[0].detail}; "
        f"Reading: {f'accepted, ts_ms={contract.ts_ms}' if contract else 'refused'}")
    if got:
        assert got[0].ts == contract.ts_ms


@pytest.mark.parametrize("ts", [
    "2026-07-01T14:00:00.9999996+08:00",      # more digits than microseconds
    "2026-07-01T14:00:00.0009999+08:00",
    "1969-12-31T23:59:59.9995+00:00",         # before the epoch
])
def test_sub_millisecond_digits_give_the_same_ms(ts):
    d = {"sensor_id": "gas-1", "ts": ts, "value": 1}
    got, _ = decode(encode(d))
    assert got and got[0].ts == Reading.model_validate(d).ts_ms


# ---- examples: arrays, bad bytes, limits -----------------------------------------------------------

def test_gateway_array_keeps_the_good_and_dead_letters_the_bad_with_its_index():
    payload = encode([
        {"sensor_id": "gas-510104-000001", "ts": 1_782_000_000_000, "value": 3.5},
        {"sensor_id": "gas-510104-000002", "ts": "yesterday", "value": 1.0},
        {"sensor_id": "cam-510104-000001", "ts": 1_782_000_000_000, "event": "no_helmet"},
    ])
    got, dead = decode(payload, source="cityops/readings/gw-510104-0001")
    assert [(r.sensor_id, r.value, r.event) for r in got] == [
        ("gas-510104-000001", 3.5, None), ("cam-510104-000001", None, "no_helmet")]
    assert len(dead) == 1
    d = dead[0]
    assert isinstance(d, DeadLetter)
    assert (d.reason, d.index, d.source) == ("invalid", 1, "cityops/readings/gw-510104-0001")
    assert "$.ts" in d.detail
    assert json.loads(d.payload) == {"sensor_id": "gas-510104-000002", "ts": "yesterday",
                                     "value": 1.0}
    assert d.payload_encoding == "utf-8" and d.payload_digest == digest(payload)


def test_gateway_array_value_and_event_both_set_is_dead_lettered_with_its_index():
    payload = encode([
        {"sensor_id": "a", "ts": 1, "value": 1.0},
        {"sensor_id": "b", "ts": 1, "value": 1.0, "event": "opened"},
    ])
    got, dead = decode(payload)
    assert [r.sensor_id for r in got] == ["a"]
    assert [(d.reason, d.index) for d in dead] == [("invalid", 1)]
    assert "exactly one of `value` or `event`" in dead[0].detail


def test_gateway_array_with_leading_whitespace_still_counts_indexes():
    payload = b"\n  " + encode([{"sensor_id": "a", "ts": 1, "value": 1}, {"sensor_id": "b"}])
    got, dead = decode(payload)
    assert [r.sensor_id for r in got] == ["a"]
    assert [(d.reason, d.index) for d in dead] == [("invalid", 1)]
    assert d_payload_bytes(dead[0]) == b'{"sensor_id": "b"}'
    assert dead[0].payload_digest == digest(payload)


def test_an_array_of_bad_elements_costs_its_elements_not_their_square():
    """Issue 12: every bad element of a 32 KB array of `1`s used to carry the whole array
    (515 MB of dead letters). Each now carries its own element: the dead letters weigh about
    what the array weighs, in decode and in decode_batch (the runtime's path) alike."""
    payload = b"[" + b",".join([b"1"] * 16_384) + b"]"
    for dead in (decode(payload)[1], decode_batch([payload, payload])[1]):
        assert {(d.reason, d.payload, d.payload_digest) for d in dead} == {
            ("invalid", "1", digest(payload))}
        assert max(len(d.model_dump_json()) for d in dead) < 300


def test_gateway_array_of_non_objects():
    got, dead = decode(b"[1, \"x\"]")
    assert got == []
    assert [(d.reason, d.index) for d in dead] == [("invalid", 0), ("invalid", 1)]


def test_empty_array_is_nothing():
    assert decode(b"[]") == ([], [])


def test_single_object_dead_letter_has_no_index():
    got, dead = decode(encode({"sensor_id": "a", "ts": -5, "value": 1}))
    assert got == [] and [(d.reason, d.index) for d in dead] == [("invalid", None)]


@pytest.mark.parametrize("payload", [
    b'{"sensor_id": "a", "ts": 1, "value": 1',
    b'{"sensor_id": "a", "ts": 1, "value": 1} trailing',
    b'[{"sensor_id": "a", "ts": 1, "value": 1},',
    b"",
    b"   ",
    b"sensor_id=a;ts=1;value=1",
    b"\xef\xbb\xbf" + b'{"sensor_id": "a", "ts": 1, "value": 1}',      # a UTF-8 byte order mark
    b"{'sensor_id': 'a', 'ts': 1, 'value': 1}",
])
def test_malformed_json(payload):
    got, dead = decode(payload, source="file.jsonl")
    assert got == []
    assert [(d.reason, d.index, d.source) for d in dead] == [("malformed", None, "file.jsonl")]
    assert dead[0].detail.startswith("not JSON")
    assert d_payload_bytes(dead[0]) == payload


@pytest.mark.parametrize("literal", [b"NaN", b"-NaN", b"Infinity", b"-Infinity"])
def test_non_finite_literals_are_not_json(literal):
    """msgspec parses strict JSON: NaN and Infinity are not numbers but malformed input."""
    payload = b'{"sensor_id": "a", "ts": 1, "value": ' + literal + b"}"
    got, dead = decode(payload)
    assert got == [] and [d.reason for d in dead] == ["malformed"]


@pytest.mark.parametrize("number", [b"1e999", b"-1e999", b"1E400"])
def test_numbers_beyond_float_range_are_refused(number):
    """msgspec refuses a number that overflows a float instead of making it infinite."""
    payload = b'{"sensor_id": "a", "ts": 1, "value": ' + number + b"}"
    got, dead = decode(payload)
    assert got == []
    assert [d.reason for d in dead] == ["invalid"] and "out of range" in dead[0].detail


def test_number_beyond_float_range_in_an_array_costs_only_its_element():
    payload = b'[{"sensor_id": "a", "ts": 1, "value": 1e999}, {"sensor_id": "b", "ts": 1, "value": 2}]'
    got, dead = decode(payload)
    assert [r.sensor_id for r in got] == ["b"]
    assert [(d.reason, d.index) for d in dead] == [("invalid", 0)]


def test_huge_but_finite_values_pass_the_decoder():
    # the decoder takes any finite float; the engine refuses implausible ones (test_engine.py)
    got, dead = decode(b'{"sensor_id": "a", "ts": 1, "value": 1e300}')
    assert not dead and got[0].value == 1e300


@pytest.mark.parametrize("payload", [
    b'\xff\xfe{"sensor_id": "a"}',
    b'{"sensor_id": "a", "ts": 1, "value": 1}\xff',
    b'{"sensor_id": "gas-\xff", "ts": 1, "value": 1}',
    b'{"sensor_id": "a", "ts": 1, "event": "\xc3"}',
    b'[{"sensor_id": "a", "ts": 1, "value": 1}, {"sensor_id": "\xe4\xb8", "ts": 1, "value": 1}]',
])
def test_non_utf8_payload_is_dead_lettered_as_base64(payload):
    got, dead = decode(payload, source="cityops/readings/gw-9")
    assert dead, "a payload that is not UTF-8 is dead-lettered"
    d = dead[-1]
    assert d.reason in ("malformed", "invalid")
    assert d.payload_encoding == "base64"
    if d.index is None:
        assert base64.b64decode(d.payload) == payload
    else:                           # an array's element: its own bytes, the array's digest
        assert base64.b64decode(d.payload) == b'{"sensor_id": "\xe4\xb8", "ts": 1, "value": 1}'
        assert d.payload_digest == digest(payload)
    assert d.source == "cityops/readings/gw-9"


def test_oversize_payload():
    item = {"sensor_id": "gas-510104-000001", "ts": 1_782_000_000_000, "value": 1.0}
    payload = encode([item] * (MAX_PAYLOAD_BYTES // len(encode(item)) + 10))
    assert len(payload) > MAX_PAYLOAD_BYTES
    got, dead = decode(payload, source="cityops/readings/gw-1")
    assert got == []
    assert [(d.reason, d.index, d.source) for d in dead] == [("oversize", None, "cityops/readings/gw-1")]
    assert str(len(payload)) in dead[0].detail and "split the gateway batch" in dead[0].detail
    assert d_payload_bytes(dead[0]) == payload[:4096]     # the head is kept, not 256 KiB


def test_payload_at_the_limit_is_decoded():
    head, tail = b'{"sensor_id": "a", "ts": 1, "value": 1, "pad": "', b'"}'
    payload = head + b"x" * (MAX_PAYLOAD_BYTES - len(head) - len(tail)) + tail
    assert len(payload) == MAX_PAYLOAD_BYTES
    got, dead = decode(payload)
    assert not dead and len(got) == 1


def test_ts_is_normalised_to_epoch_milliseconds():
    got, _ = decode(encode([
        {"sensor_id": "a", "ts": "2026-07-01T14:00:00+08:00", "value": 1},
        {"sensor_id": "b", "ts": "2026-07-01T06:00:00.250Z", "value": 1},
        {"sensor_id": "c", "ts": 1_782_885_600_000, "value": 1},
    ]))
    assert [r.ts for r in got] == [1_782_885_600_000, 1_782_885_600_250, 1_782_885_600_000]
    assert all(type(r.ts) is int for r in got)


def test_decode_appends_into_given_lists():
    readings, dead = [], []
    decode(encode({"sensor_id": "a", "ts": 1, "value": 1}), None, readings, dead)
    r2, d2 = decode(b"nope", None, readings, dead)
    assert r2 is readings and d2 is dead
    assert len(readings) == 1 and len(dead) == 1


# ---- decode_batch is decode, payload by payload -------------------------------------------
GOOD = b'{"sensor_id": "gas-1", "ts": 1782000000000, "value": 3.5}'
PIECES = [GOOD, b'[' + GOOD + b',' + GOOD + b']', b'[]', b' ' + GOOD + b'\n', b'\t[' + GOOD + b'] ',
          b'{"sensor_id": "gas-1"', b'[' + GOOD,
          GOOD + b']', GOOD + b',' + GOOD, b'],[', b'5', b'"x"', b'null', b'', b' ', b'{}', b'[5]',
          b'[' + GOOD + b', 7]', b'\xff\xfe', GOOD[:-1] + b' ' * MAX_PAYLOAD_BYTES + b'}',
          GOOD + b'],[' + GOOD + b']', b'[' + GOOD,
          # framed, and malformed alone, but a neighbour's missing half: a string left open (its
          # last brace is in it), one closed by the next payload, a bracket left open in an
          # unknown field, one closed; and a payload that is two, to keep the count
          GOOD[:-1] + b', "unit": "}', b'{", "value": 99}', GOOD[:-1] + b', "x": [{}',
          b'{"y": 1}]}', b'{"x": 1}",' + GOOD[1:]]
# (what a reading holds is checked by the engine's screen on the fast path, by decode on the
# slow one: tests/core/test_engine.py compares those outputs across batchings; here, the framing)


def one_by_one(payloads: list[bytes]) -> tuple[list, list, list]:
    readings, dead, spans = [], [], []
    for p in payloads:
        r, d, s = decode_batch([p], "t")
        spans += [(end + len(readings), *rest) for end, *rest in s]
        assert s.one_each == (len(r) == 1)
        readings += r
        dead += d
    return readings, dead, spans


# Runs that are malformed payload by payload and joined make as many valid readings as
# payloads (the first's value from the second's bytes; a bracket left open in an unknown field).
CRAFTED = [[GOOD[:-1] + b', "unit": "}', b'{", "value": 99}', GOOD + b',' + GOOD],
           [GOOD[:-1] + b', "x": [{}', b'{"y": 1}]}', GOOD + b',' + GOOD]]


def test_malformed_payloads_are_not_rescued_by_crafted_neighbours():
    for crafted in CRAFTED:
        readings, dead, _ = decode_batch(crafted, "t")
        alone = [d.reason for p in crafted for d in decode_batch([p], "t")[1]]
        assert readings == [] and [d.reason for d in dead] == alone and len(alone) == 3


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(PIECES).map(lambda p: [p]), st.sampled_from(CRAFTED)),
                min_size=0, max_size=60).map(lambda runs: [p for run in runs for p in run]))
def test_a_batch_decodes_as_its_payloads_one_by_one(payloads):
    """The one-call fast path and the halving that isolates a bad payload give what decoding
    each payload alone gives: a malformed payload is never rescued by its neighbours (`[{..}` +
    `{..}]` joins into valid JSON; so do a string or a bracket one leaves open and the next
    closes), a good one never lost."""
    got = decode_batch(payloads, "t")
    want = one_by_one(payloads)
    assert [msgspec.structs.asdict(r) for r in got[0]] == [msgspec.structs.asdict(r) for r in want[0]]
    assert [(d.reason, d.detail, d.payload, d.index) for d in got[1]] == \
        [(d.reason, d.detail, d.payload, d.index) for d in want[1]]
    assert list(got[2]) == want[2]
    # the screen's shortcut: every payload gave exactly one reading
    assert got[2].one_each == all(end - start == 1 for (start, *_), (end, *_) in
                                  zip([(0,)] + want[2], want[2], strict=False))
