"""The engine against its reference model (pipeline/core/reference.py), on generated cities.

Hypothesis draws a registry (streets, grids, gateways, buildings, sensors with attributes), a
rule pack of every rule type with its parameters, durations and clears, a routing tree, engine
settings, and a timeline: readings around every threshold, gaps shorter and longer than every
duration, gateway arrays, out-of-order, stale, duplicate and too-old readings, epoch seconds,
malformed and invalid payloads, acknowledgements (good and bad), watermark moves, and
snapshot/restore in the middle. The model takes the timeline one payload at a time; the engine
takes it in random batches. Their notices, dead letters and counters must be equal.

CI runs a few hundred examples (FUZZ_EXAMPLES); `make fuzz` (tests/fuzz_engine.py) runs fresh
examples for as long as it is given. A mismatch shrinks to a minimal scenario; keep each one
found as a rule test in tests/rules/.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import orjson
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pytest

from pipeline.core.engine import SMALL_BATCH, Engine, EngineSettings
from pipeline.core.reference import ReferenceEngine
from pipeline.core.silences import DAYS
from rules.compiler import load_rules
from tests.engine_fixtures import small_registry

T0 = 1_782_000_000_000
SEC, MIN = 1000, 60_000
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
COUNTED = ("readings", "duplicates", "dead_letters", "acks", "silences")

DURATIONS = ["0s", "30s", "1m", "2m", "5m", "10m"]
STEPS = [0, 1, 500, SEC, 30 * SEC, 59 * SEC, MIN, 61 * SEC, 2 * MIN, 5 * MIN, 11 * MIN, 31 * MIN]
VALUES = [0.0, 5.0, 8.0, 9.5, 10.0, 15.0, 18.0, 19.9, 20.0, 25.0, 28.0, 30.0, 35.0, 60.0]


@st.composite
def packs(draw) -> dict:
    """A pack with one rule of every type over kinds `lv` (a value), `cam` (events)."""
    l1, l2, l3 = sorted(draw(st.lists(st.sampled_from([10, 20, 30]), min_size=3, max_size=3,
                                      unique=True)))
    levels = [{"severity": "blue", "when": "value >= params.l1"},
              {"severity": "yellow", "when": "value >= params.l2"},
              {"severity": "red", "when": "value >= params.l3"}][:draw(st.integers(1, 3))]
    clears = draw(st.sampled_from(["none", "rule", "levels"]))
    threshold: dict = {"id": "fz.level", "name": "液位", "type": "threshold", "sensors": ["lv"],
                       "levels": levels,
                       # `for: 0` twice as often: late readings act only there (README)
                       "for": draw(st.sampled_from(["0s", *DURATIONS])),
                       "clear_for": draw(st.sampled_from(DURATIONS))}
    if clears == "rule":
        threshold["clear"] = "value < params.l1 - 2"
    elif clears == "levels":
        for lv in levels:
            if draw(st.booleans()):
                lv["clear"] = lv["when"].replace(">=", "<") + " - 2"
    if draw(st.booleans()):
        threshold["flapping"] = {"window": draw(st.sampled_from(["1m", "5m", "30m"]))}
    if draw(st.booleans()):
        threshold["modifiers"] = [{"if": "sensor.alone", "raise": 1, "note": "独居"}]
    if draw(st.booleans()):
        threshold["where"] = "sensor.zone != 2"
    rules = [threshold]
    if draw(st.booleans()):
        rules.append({"id": "fz.battery", "name": "电量", "type": "threshold", "sensors": ["lv"],
                      "levels": [{"severity": "blue", "when": "battery <= 20"}],
                      "clear": "battery > 25"})
    if draw(st.booleans()):
        rules.append({"id": "fz.rate", "name": "上涨", "type": "rate", "sensors": ["lv"],
                      "over": draw(st.sampled_from(["1m", "5m", "10m"])),
                      "levels": [{"severity": "yellow", "when": "rise >= 10"},
                                 {"severity": "orange", "when": "rise >= 20"}],
                      "clear_for": draw(st.sampled_from(DURATIONS))})
    if draw(st.booleans()):
        every = draw(st.sampled_from(["1m", "5m"]))
        sliding = draw(st.booleans())
        window = {"fn": draw(st.sampled_from(["sum", "avg", "max", "count", "min"])),
                  "size": "10m" if sliding else every}
        if sliding:
            window["every"] = every
        rules.append({"id": "fz.window", "name": "累计", "type": "window", "sensors": ["lv"],
                      "windows": {"w": window},
                      "levels": [{"severity": "yellow", "when": "w >= 30"},
                                 {"severity": "red", "when": "w >= 60"}]})
    if draw(st.booleans()):
        rules.append({"id": "fz.silent", "name": "失联", "type": "absence",
                      "sensors": ["lv", "cam"] if draw(st.booleans()) else ["lv"],
                      "absent_for": draw(st.sampled_from(["2m", "5m", "10m"])),
                      "group_by_gateway": draw(st.booleans())})
    rules.append({"id": "fz.cam", "name": "违规", "type": "event", "sensors": ["cam"],
                  "events": {"no_helmet": "yellow", "smoke_fire": "red"},
                  "clear_events": ["cleared"],
                  "resolve_after": draw(st.sampled_from(["1m", "5m", "30m"]))})
    if draw(st.booleans()):
        rules.append({"id": "fz.group", "name": "多户", "type": "correlation", "sensors": ["lv"],
                      "of": ["fz.level"], "group_by": draw(st.sampled_from(["building", "grid"])),
                      "min_sensors": 2, "within": draw(st.sampled_from(["1m", "10m"])),
                      "severity": "red"})
    if draw(st.booleans()):
        stuck: dict = {"id": "fz.stuck", "name": "读数不变", "type": "stuck", "sensors": ["lv"],
                       "for": draw(st.sampled_from(["30s", "1m", "5m"])),
                       "tolerance": draw(st.sampled_from([0, 0.5, 5]))}
        if draw(st.booleans()):
            stuck["where"] = "sensor.zone != 2"
        rules.append(stuck)
    pack = {"pack": "fz", "title": "fuzz",
            "kinds": {"lv": {"name": "液位计", "unit": "cm", "category": "gas"},
                      "cam": {"name": "摄像头", "category": "construction", "reading": "event",
                              "events": {"no_helmet": "未戴安全帽", "smoke_fire": "烟火",
                                         "cleared": "已整改", "heartbeat": "心跳"}}},
            "params": {"l1": l1, "l2": l2, "l3": l3}, "rules": rules}
    if draw(st.booleans()):
        pack["districts"] = {"510104": {"l1": l1 + 1}}
    return pack


@st.composite
def routings(draw) -> dict:
    r: dict = {"tiers": {"blue": ["street", "grid"], "yellow": ["street", "grid", "district"],
                         "orange": ["street", "grid", "district", "dept"],
                         "red": ["street", "grid", "district", "dept", "city"]}}
    esc = {}
    if draw(st.booleans()):
        esc["street"] = draw(st.sampled_from(["1m", "5m", "15m"]))
    if draw(st.booleans()):
        esc["district"] = draw(st.sampled_from(["2m", "10m"]))
    r["escalate_after"] = esc
    if draw(st.booleans()):
        r["remind_every"] = draw(st.sampled_from(["1m", "2m", "10m"]))
        r["max_reminders"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        r["notify"] = ["owner"]
    if draw(st.booleans()):
        r["routes"] = [{"name": "cams", "match": {"rule_id": "fz.cam"},
                        "tiers": {"yellow": ["street", "dept"]}, "remind_every": "1m",
                        "notify": draw(st.sampled_from([[], ["owner"]]))}]
    if draw(st.booleans()):          # the community tier and chain (pipeline/core/handling.py)
        chain: dict = {"name": "community", "match": {"sensor.alone": True},
                       "tiers": {"blue": draw(st.sampled_from([["community", "grid"], ["grid"]])),
                                 "yellow": draw(st.sampled_from([["grid", "dept"],
                                                                 ["community", "street"]]))},
                       "escalate_until": draw(st.sampled_from(["acknowledged", "on_site"])),
                       "remind_every": "1m", "max_reminders": draw(st.integers(1, 5))}
        low = {k: draw(st.sampled_from(["1m", "3m"])) for k in ("grid", "community", "street")
               if draw(st.booleans())}
        chain["escalate_after"] = low
        r.setdefault("routes", []).insert(0, chain)
    return r


@st.composite
def cities(draw) -> dict:
    n_lv, n_cam = draw(st.integers(1, 5)), draw(st.integers(0, 3))
    attrs = {}
    for i in range(n_lv):
        parts = []
        if draw(st.booleans()):
            parts.append("alone=true")
        parts.append(f"zone={draw(st.integers(1, 2))}")
        attrs[f"lv-510104-{i + 1:06d}"] = ";".join(parts)
    return {"kinds": {"lv": n_lv, "cam": n_cam}, "attrs": attrs,
            "gateways": draw(st.integers(0, 2)), "buildings": draw(st.integers(1, 2))}


@st.composite
def timelines(draw, city: dict) -> list:
    lv = [f"lv-510104-{i + 1:06d}" for i in range(city["kinds"]["lv"])]
    cam = [f"cam-510104-{i + 1:06d}" for i in range(city["kinds"]["cam"])]
    clock = T0
    sent: list[dict] = []
    ops: list = []

    def reading() -> dict:
        sid = draw(st.sampled_from(lv + cam))
        # ... and now and then a sensor whose gateway's clock runs ahead (time_quorum)
        at = clock - draw(st.sampled_from([0, 0, 0, SEC, 20 * SEC, 45 * SEC, 2 * MIN,
                                           -4 * MIN, -30 * MIN]))
        if sid.startswith("lv"):
            r = {"sensor_id": sid, "ts": at, "value": draw(st.sampled_from(VALUES))}
            if draw(st.integers(0, 5)) == 0:
                r["battery"] = draw(st.sampled_from([5, 20, 22, 30, 90]))
            return r
        return {"sensor_id": sid, "ts": at,
                "event": draw(st.sampled_from(["no_helmet", "smoke_fire", "cleared", "heartbeat"]))}

    for _ in range(draw(st.integers(1, 40))):
        clock += draw(st.sampled_from(STEPS))
        what = draw(st.sampled_from(["one"] * 8 + ["array"] * 2 + ["again", "late", "bad", "ack",
                                                                   "advance", "snapshot",
                                                                   "silence", "unsilence"]))
        if what == "one":
            r = reading()
            sent.append(r)
            ops.append(("payload", json.dumps(r).encode()))
        elif what == "array":
            rs = [reading() for _ in range(draw(st.integers(1, 4)))]
            sent += rs
            ops.append(("payload", json.dumps(rs).encode()))
        elif what == "again" and sent:           # redelivered, or a stale older one
            ops.append(("payload", json.dumps(draw(st.sampled_from(sent))).encode()))
        elif what == "late" and sent:            # a resent reading behind its sensor's newest
            newest = draw(st.sampled_from(sent))
            r = {k: v for k, v in reading().items() if k not in ("sensor_id", "ts")}
            if ("value" in r) != ("value" in newest):
                continue
            r = {"sensor_id": newest["sensor_id"], **r,
                 "ts": max(r_["ts"] for r_ in sent if r_["sensor_id"] == newest["sensor_id"])
                 - draw(st.sampled_from([1, 500, 20 * SEC, 45 * SEC, 70 * SEC]))}
            sent.append(r)
            ops.append(("payload", json.dumps(r).encode()))
        elif what == "bad":
            ops.append(("payload", draw(st.sampled_from([
                b"not json", b'{"sensor_id": "lv-510104-000001"}',
                json.dumps({"sensor_id": "nobody", "ts": clock, "value": 1}).encode(),
                json.dumps({"sensor_id": lv[0], "ts": clock // 1000, "value": 30}).encode(),
                json.dumps({"sensor_id": lv[0], "ts": clock - 8 * 86_400_000, "value": 30}).encode(),
                json.dumps({"sensor_id": lv[0], "ts": clock, "event": "no_helmet"}).encode(),
                json.dumps({"sensor_id": lv[0], "ts": clock, "value": 1e300}).encode(),
                json.dumps([{"sensor_id": lv[0], "ts": clock, "value": 30}, {"bad": 1}]).encode(),
            ]))))
        elif what == "ack":
            ops.append(("ack", draw(st.integers(0, 5)),
                        draw(st.sampled_from(["street", "grid", "owner", "community", "district"])),
                        clock,
                        draw(st.sampled_from([None, None, "dispatched", "on_site", "on_site",
                                              "handled", "closed"])),
                        draw(st.sampled_from([None, "传感器故障"]))))
        elif what == "silence":
            ops.append(("silence", json.dumps(draw(silences(clock, lv + cam))).encode()))
        elif what == "unsilence":
            ops.append(("silence", json.dumps({"op": "end", "id": f"s{draw(st.integers(0, 2))}",
                                               "by": "duty"}).encode()))
        elif what == "advance":
            ops.append(("advance", clock))
        else:
            ops.append(("snapshot",))
    ops.append(("advance", clock + draw(st.sampled_from([MIN, 20 * MIN, 2 * 60 * MIN]))))
    return ops


@st.composite
def silences(draw, clock: int, sensors: list[str]) -> dict:
    """A silence or a weekly window near ``clock`` over some of the city's labels (or a bad one)."""
    matchers = draw(st.sampled_from([
        {"street": "510104020"}, {"street": ["510104021", "510104099"]}, {"grid": "510104020*"},
        {"rule_id": "fz.lv"}, {"severity": ["yellow", "orange"]}, {"category": "construction"},
        {"kind": "lv"}, {"sensor_id": sensors[:2]}, {"sensor.alone": True},
        {"district": "510104", "rule_id": "fz.*"}, {"planet": "mars"}]))
    body: dict = {"op": "add", "id": f"s{draw(st.integers(0, 2))}", "matchers": matchers,
                  "by": "duty", "reason": "检修"}
    start = clock + draw(st.sampled_from([-60 * MIN, -MIN, 0, 30 * SEC, 2 * MIN, 10 * MIN]))
    if draw(st.integers(0, 2)) == 0:
        # a window a few minutes long in local time (Asia/Shanghai: +08:00), maybe across midnight
        local = (start // MIN + 8 * 60) % (24 * 60)
        length = draw(st.sampled_from([1, 3, 20, 60]))
        end = (local + length) % (24 * 60)
        body["schedule"] = {"days": draw(st.sampled_from([list(DAYS), ["mon"], ["sat", "sun"]])),
                            "from": f"{local // 60:02d}:{local % 60:02d}",
                            "to": f"{end // 60:02d}:{end % 60:02d}", "tz": "Asia/Shanghai"}
        if draw(st.booleans()):
            body["ends_at"] = start + draw(st.sampled_from([2 * MIN, 2 * 86_400_000]))
    else:
        body["starts_at"] = start
        body["ends_at"] = start + draw(st.sampled_from([MIN, 90 * SEC, 5 * MIN, 30 * MIN, 3 * 60 * MIN]))
    return body


def build(tmp: Path, pack: dict, routing: dict, city: dict):
    (tmp / "packs").mkdir()
    (tmp / "packs" / "fz.yaml").write_text(yaml.safe_dump(pack, allow_unicode=True),
                                            encoding="utf-8")
    (tmp / "routing.yaml").write_text(yaml.safe_dump(routing), encoding="utf-8")
    rs = load_rules([tmp / "packs"], builtin=False, routing=tmp / "routing.yaml")
    reg = small_registry(tmp / "reg", rs, city["kinds"], gateways=city["gateways"],
                         attrs=city["attrs"], buildings=city["buildings"])
    return rs, reg


def canon(notices: list[dict], dead: list) -> tuple[list[bytes], list[str]]:
    return (sorted(orjson.dumps(n, option=orjson.OPT_SORT_KEYS) for n in notices),
            sorted(d.model_dump_json() for d in dead))


def compare(rs, reg, eng_settings: EngineSettings, ops: list, splits: list[int],
            small_batch: int = SMALL_BATCH) -> None:
    model = ReferenceEngine(reg, rs, eng_settings)

    def new_engine() -> Engine:
        engine = Engine(reg, rs, eng_settings)
        engine.small_batch = small_batch
        return engine

    engine = new_engine()
    notices: list[dict] = []
    dead: list = []
    batch: list[bytes] = []
    alerts: list[str] = []

    def flush() -> None:
        nonlocal batch
        if batch:
            out = engine.ingest(batch)
            notices.extend(out.notices)
            dead.extend(out.dead_letters)
            batch = []

    sizes = iter(splits)
    want = next(sizes, 1)
    for op in ops:
        if op[0] == "payload":
            model.payload(op[1])
            batch.append(op[1])
            if len(batch) >= want:
                flush()
                want = next(sizes, 1)
            continue
        flush()
        if op[0] == "ack":
            for n in model.notices:
                if n["alert_id"] not in alerts:
                    alerts.append(n["alert_id"])
            _, k, tier, at, state, note = op
            aid = alerts[k] if k < len(alerts) else "0000000000000000"
            ack = {"alert_id": aid, "by": f"w-{k}", "tier": tier, "ts": at}
            if state:                        # a handling state (pipeline/core/handling.py)
                ack.update(state=state, note=note)
            raw = json.dumps(ack).encode()
            model.ack(raw)
            out = engine.ack([raw])
            notices.extend(out.notices)
            dead.extend(out.dead_letters)
        elif op[0] == "silence":
            model.silence(op[1])
            out = engine.silence([op[1]])
            notices.extend(out.notices)
            dead.extend(out.dead_letters)
        elif op[0] == "advance":
            model.advance(op[1])
            notices.extend(engine.advance(op[1]).notices)
        else:
            blob = engine.snapshot()
            engine = new_engine()
            assert engine.restore(blob) == {}
    flush()
    got, want_ = canon(notices, dead), canon(model.notices, model.dead)
    if got != want_:
        missing = sorted(set(want_[0]) - set(got[0]))[:3]
        extra = sorted(set(got[0]) - set(want_[0]))[:3]
        raise AssertionError(
            f"engine and model differ: {len(got[0])} vs {len(want_[0])} notices, "
            f"{len(got[1])} vs {len(want_[1])} dead letters\nonly the model has: "
            + "\n".join(m.decode() for m in missing) + "\nonly the engine has: "
            + "\n".join(e.decode() for e in extra)
            + "\ndead letters, model: " + "\n".join(want_[1][:5])
            + "\ndead letters, engine: " + "\n".join(got[1][:5]))
    for key in COUNTED:
        assert engine.counters[key] == model.counters[key], key
    assert {k: v for k, v in engine.counters.items() if k.startswith("dead.")} == \
        {k: v for k, v in model.counters.items() if k.startswith("dead.")}


@st.composite
def scenarios(draw):
    city = draw(cities())
    return (city, draw(packs()), draw(routings()),
            EngineSettings(allowed_lateness=draw(st.sampled_from(["0s", "1s", "1m", "1m"])),
                           absence_scan_every=draw(st.sampled_from(["30s", "1m"])),
                           time_quorum=draw(st.sampled_from([1, 1, 2, 3])),
                           quorum_window=draw(st.sampled_from([1, 2, 3, 100]))),
            draw(timelines(city)),
            draw(st.lists(st.sampled_from([1, 2, 3, 5, 1000]), min_size=1, max_size=20)),
            # the batch screen below which a batch is screened in plain Python: every batch
            # numpy's (0), every batch Python's, or the engine's own, which splits the batches
            # above on both sides (a gateway array of many readings is one payload)
            draw(st.sampled_from([0, 1 << 30, SMALL_BATCH, 4])))


def check(scenario) -> None:
    city, pack, routing, eng_settings, ops, splits, small_batch = scenario
    with tempfile.TemporaryDirectory() as d:
        rs, reg = build(Path(d), pack, routing, city)
        compare(rs, reg, eng_settings, ops, splits, small_batch)


@settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_engine_equals_the_reference_model(scenario):
    check(scenario)



# ---- mismatches the fuzzer found, kept ------------------------------------------------------------

# A late reading (1 s older than the sensor's newest, within allowed_lateness) opens an incident;
# a later reading of the same batch, under every floor, must end it: the screens counted only the
# taken readings as making a sensor busy, so that reading was passed over (make fuzz, 2026-12-06).
LATE_OPENS_THEN_ENDS = ({'kinds': {'lv': 1, 'cam': 1},
          'attrs': {'lv-510104-000001': 'zone=1'},
          'gateways': 0,
          'buildings': 1},
         {'pack': 'fz',
          'title': 'fuzz',
          'kinds': {'lv': {'name': '液位计', 'unit': 'cm', 'category': 'gas'},
           'cam': {'name': '摄像头',
            'category': 'construction',
            'reading': 'event',
            'events': {'no_helmet': '未戴安全帽',
             'smoke_fire': '烟火',
             'cleared': '已整改',
             'heartbeat': '心跳'}}},
          'params': {'l1': 10, 'l2': 20, 'l3': 30},
          'rules': [{'id': 'fz.level',
            'name': '液位',
            'type': 'threshold',
            'sensors': ['lv'],
            'levels': [{'severity': 'blue', 'when': 'value >= params.l1'}],
            'for': '0s',
            'clear_for': '0s'},
           {'id': 'fz.cam',
            'name': '违规',
            'type': 'event',
            'sensors': ['cam'],
            'events': {'no_helmet': 'yellow', 'smoke_fire': 'red'},
            'clear_events': ['cleared'],
            'resolve_after': '1m'}]},
         {'tiers': {'blue': ['street', 'grid'],
           'yellow': ['street', 'grid', 'district'],
           'orange': ['street', 'grid', 'district', 'dept'],
           'red': ['street', 'grid', 'district', 'dept', 'city']},
          'escalate_after': {}},
         EngineSettings(allowed_lateness=1000, max_future=300000, max_age=604800000,
                    absence_scan_every=30000, time_quorum=1, quorum_window=1),
         [('payload',
           b'{"sensor_id": "lv-510104-000001", "ts": 1782000000000, "value": 0.0, "battery": 5}'),
          ('payload',
           b'{"sensor_id": "lv-510104-000001", "ts": 1781999999000, "value": 10.0}'),
          ('payload',
           b'{"sensor_id": "lv-510104-000001", "ts": 1782000000000, "value": 0.0, "battery": 5}'),
          ('payload',
           b'{"sensor_id": "lv-510104-000001", "ts": 1782000000000, "value": 0.0, "battery": 5}'),
          ('payload',
           b'{"sensor_id": "lv-510104-000001", "ts": 1782000000001, "value": 0.0, "battery": 5}'),
          ('payload',
           b'{"sensor_id": "lv-510104-000001", "ts": 1782000000001, "value": 0.0, "battery": 5}'),
          ('advance', 1_782_000_060_001)],
         [5],
         0)


@pytest.mark.parametrize("small_batch", [0, 4, 1 << 30])
def test_a_late_reading_opens_and_a_later_one_of_its_batch_ends(small_batch) -> None:
    check((*LATE_OPENS_THEN_ENDS[:-1], small_batch))
