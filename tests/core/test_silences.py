"""Silences and maintenance windows in the engine (pipeline/core/silences.py, pipeline/core/lifecycle.py):
what a silence holds back, what still goes out, and when the held notices are told."""

from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import msgspec
import pytest

from pipeline.core.engine import Engine
from pipeline.core.models import AlertNotice
from pipeline.core.silences import Schedule, Silence
from tests.engine_fixtures import as_version_1

SH = ZoneInfo("Asia/Shanghai")
MIN = 60_000
GAS = "gas-510104-000002"       # 锦江区 春熙路街道 510104020, a household gas alarm
GAS_QY = "gas-510105-000001"    # 青羊区 510105020, another street
STREET = "510104020"


def at(text: str) -> int:
    """Local time in Chengdu, e.g. '2026-06-20 23:30' (a Saturday), as epoch ms."""
    return int(datetime.fromisoformat(text).replace(tzinfo=SH).timestamp() * 1000)


T0 = at("2026-06-17 10:00")     # a Wednesday morning


def leaks(notices: list[dict]) -> list[dict]:
    """The gas notices (the fixture's other sensors fall silent meanwhile: device.silent)."""
    for n in notices:
        AlertNotice.model_validate(n)
    return [n for n in notices if n["category"] == "gas"]


def gas(engine: Engine, sensor: str, ts: int, value: float) -> list[dict]:
    out = engine.ingest([json.dumps({"sensor_id": sensor, "ts": ts, "value": value}).encode()])
    assert out.dead_letters == []
    return leaks(out.notices)


def later(engine: Engine, ts: int) -> list[dict]:
    return leaks(engine.advance(ts).notices)


def add(engine: Engine, sid: str = "s-street", **fields) -> list[dict]:
    body = {"op": "add", "id": sid, "matchers": {"street": STREET}, "by": "duty-510104",
            "reason": "燃气管网夜间检修", **fields}
    out = engine.silence([json.dumps(body).encode()])
    assert out.dead_letters == [], out.dead_letters
    return out.notices


def told(notices: list[dict]) -> set[tuple[str, str]]:
    return {(n["state"], n["tier"]) for n in notices}


@pytest.fixture
def engine(chengdu, rules) -> Engine:
    e = Engine(chengdu, rules)
    e.advance(T0 - MIN)
    return e


def test_street_silence_holds_its_notices_but_not_the_resolve_to_a_tier_already_told(engine):
    fired = gas(engine, GAS, T0, 27.5)                   # yellow: street, grid, district
    assert told(fired) == {("firing", "street"), ("firing", "grid"), ("firing", "district")}
    add(engine, starts_at=T0, ends_at=T0 + 120 * MIN)
    # a rise to red would reach the department and the city: held, nobody new is told
    assert gas(engine, GAS, T0 + 2 * MIN, 60.0) == []
    # a second leak on the street fires in silence; one on another street is told
    assert gas(engine, "gas-510104-000003", T0 + 3 * MIN, 30.0) == []
    assert told(gas(engine, GAS_QY, T0 + 3 * MIN, 30.0)) >= {("firing", "street")}
    aid = fired[0]["alert_id"]
    assert engine.book.open[aid].muted == "s-street"
    # no escalation to the city (30 min after the district was told) nor reminders meanwhile
    gas(engine, GAS, T0 + 50 * MIN, 60.0)
    # it clears: every tier that was told it fired hears the resolve, marked with the silence
    gas(engine, GAS, T0 + 51 * MIN, 1.0)
    resolved = gas(engine, GAS, T0 + 54 * MIN, 1.0)
    mine = [n for n in resolved if n["alert_id"] == aid]
    assert told(mine) == {("resolved", "street"), ("resolved", "grid"), ("resolved", "district")}
    assert {n["silenced"] for n in mine} == {"s-street"}
    assert all(n["severity"] == "red" for n in mine)     # it says what it rose to
    assert [n for n in resolved if n["alert_id"] != aid] == []


def test_incidents_still_firing_when_a_silence_ends_are_told_then(engine, chengdu):
    add(engine, starts_at=T0 - MIN, ends_at=T0 + 60 * MIN)
    assert gas(engine, GAS, T0, 27.5) == []               # detected and kept, nobody told
    inc = next(iter(engine.book.open.values()))
    assert inc.muted == "s-street" and inc.sent == []
    assert later(engine, T0 + 59 * MIN) == []
    out = later(engine, T0 + 60 * MIN)          # the silence is over
    assert told(out) == {("firing", "street"), ("firing", "grid"), ("firing", "district")}
    assert {n["ts"] for n in out} == {"2026-06-17T11:00:00+08:00"}
    assert all("静默结束" in n["summary"] for n in out)
    assert "silenced" not in out[0]
    # escalation was paused: the city hears 30 min after the district was told, i.e. now + 30
    assert {n["state"] for n in later(engine, T0 + 89 * MIN)} <= {"reminder"}
    esc = [n for n in later(engine, T0 + 90 * MIN) if n["state"] == "escalated"]
    assert {n["tier"] for n in esc} >= {"city"}


def test_escalation_pauses_and_resumes_with_the_time_left(engine):
    fired = gas(engine, GAS, T0, 27.5)                   # district told at once: city at +30 min
    aid = fired[0]["alert_id"]
    add(engine, starts_at=T0 + 10 * MIN, ends_at=T0 + 40 * MIN)
    engine.advance(T0 + 10 * MIN)
    assert not [n for n in later(engine, T0 + 39 * MIN) if n["state"] == "escalated"]
    back = later(engine, T0 + 40 * MIN)
    assert back == []                                     # nothing was held: nothing to tell again
    # 10 of the city's 30 minutes had run: it is told 20 minutes after the silence ended
    assert not [n for n in later(engine, T0 + 59 * MIN) if n["state"] == "escalated"]
    esc = [n for n in later(engine, T0 + 60 * MIN) if n["state"] == "escalated"]
    assert {(n["alert_id"], n["tier"]) for n in esc} >= {(aid, "city")}


def test_ending_a_silence_tells_what_it_held(engine):
    add(engine, starts_at=T0 - MIN, ends_at=T0 + 600 * MIN)
    assert gas(engine, GAS, T0, 27.5) == []
    engine.advance(T0 + 5 * MIN)
    out = leaks(engine.silence([{"op": "end", "id": "s-street", "by": "duty-510104"}]).notices)
    assert told(out) == {("firing", "street"), ("firing", "grid"), ("firing", "district")}
    assert engine.book.silences.items == {}


def test_a_weekly_window_crossing_midnight_in_asia_shanghai(engine, chengdu):
    window = {"days": ["sat"], "from": "23:00", "to": "02:00", "tz": "Asia/Shanghai"}
    sat, sun = at("2026-06-20 23:30"), at("2026-06-21 01:30")
    engine.advance(at("2026-06-20 22:00"))
    add(engine, "w-pipes", schedule=window)
    assert gas(engine, GAS, at("2026-06-20 22:59"), 1.0) == []          # quiet reading
    assert gas(engine, GAS, sat, 27.5) == []                           # Saturday night: muted
    assert later(engine, at("2026-06-21 01:59")) == []        # still muted after midnight
    out = later(engine, at("2026-06-21 02:00"))               # the window closes
    assert told(out) >= {("firing", "street"), ("firing", "district")}
    assert {n["ts"] for n in out} == {"2026-06-21T02:00:00+08:00"}
    # Sunday night is not in the window (only the night that begins on Saturday)
    assert gas(engine, GAS_QY, at("2026-06-21 23:30"), 30.0) != []
    s = engine.book.silences.items["w-pipes"]
    assert s.active(sun) and s.active(sat) and not s.active(at("2026-06-21 23:30"))
    assert not s.active(at("2026-06-20 22:59")) and not s.active(at("2026-06-21 02:00"))


def test_window_arithmetic_across_midnight_and_dst():
    sh = Schedule.model_validate({"days": ["tue"], "from": "23:00", "to": "05:00",
                                  "tz": "Asia/Shanghai"})
    # Tuesday 2026-06-23 23:00 +08:00 = 15:00 UTC, until Wednesday 05:00 +08:00
    [(a, b)] = sh.occurrences(at("2026-06-22 00:00"), at("2026-06-29 00:00"))
    assert (a, b) == (at("2026-06-23 23:00"), at("2026-06-24 05:00"))
    # a zone with DST: the window follows local time (Berlin, the night of 29 March 2026)
    be = ZoneInfo("Europe/Berlin")
    berlin = Schedule.model_validate({"days": ["sat"], "from": "22:00", "to": "04:00",
                                      "tz": "Europe/Berlin"})

    def local(text: str) -> int:
        return int(datetime.fromisoformat(text).replace(tzinfo=be).timestamp() * 1000)
    [(a, b)] = berlin.occurrences(local("2026-03-28 12:00"), local("2026-03-29 12:00"))
    assert (a, b) == (local("2026-03-28 22:00"), local("2026-03-29 04:00"))
    assert b - a == 5 * 3_600_000              # the clocks went forward at 02:00
    s = Silence.model_validate({"id": "w", "matchers": {"district": "510104"}, "by": "x",
                                "reason": "y", "schedule": berlin.model_dump(by_alias=True)})
    assert s.next_edge(local("2026-03-28 12:00")) == a and s.next_edge(a) == b


def test_a_snapshot_keeps_silences_and_what_they_hold(engine, chengdu, rules):
    add(engine, starts_at=T0 - MIN, ends_at=T0 + 60 * MIN)
    gas(engine, GAS, T0, 27.5)
    restored = Engine(chengdu, rules)
    assert restored.restore(engine.snapshot()) == {}
    assert set(restored.book.silences.items) == {"s-street"}
    a = later(engine, T0 + 60 * MIN)
    b = later(restored, T0 + 60 * MIN)
    assert a == b and told(a) >= {("firing", "street")}


def test_a_snapshot_written_before_silences_restores(engine, chengdu, rules):
    """Snapshots from before silences (version 1: positional rows) have shorter incident rows
    and no silences: they restore, unmuted."""
    fired = gas(engine, GAS, T0, 27.5)
    state = msgspec.msgpack.decode(engine.snapshot())
    book = state["book"]
    as_version_1(state, incident_fields=22)
    del book["silences"], book["silence_plan"]
    restored = Engine(chengdu, rules)
    assert restored.restore(msgspec.msgpack.encode(state)) == {}
    [inc] = [i for i in restored.book.open.values() if i.aid == fired[0]["alert_id"]]
    assert inc.muted is None and inc.paused == 0 and not inc.held
    add(restored, starts_at=T0, ends_at=T0 + 60 * MIN)       # and silences work on it
    assert gas(restored, GAS, T0 + MIN, 60.0) == []


@pytest.mark.parametrize("body, why", [
    ({"op": "add", "id": "s1", "matchers": {"street": STREET}, "by": "x", "reason": "y"},
     "starts_at"),
    ({"op": "add", "id": "s1", "matchers": {"planet": "mars"}, "by": "x", "reason": "y",
      "starts_at": T0, "ends_at": T0 + MIN}, "unknown label 'planet'"),
    ({"op": "add", "id": "s1", "matchers": {"street": STREET}, "by": "x", "reason": "y",
      "schedule": {"days": ["tue"], "from": "25:00", "to": "05:00", "tz": "Asia/Shanghai"}},
     "not a time of day"),
    ({"op": "add", "id": "s1", "matchers": {"street": STREET}, "by": "x", "reason": "y",
      "schedule": {"days": ["tue"], "from": "01:00", "to": "05:00", "tz": "Asia/Chengdu"}},
     "not an IANA time zone"),
    ({"op": "add", "id": "s1", "matchers": {"street": STREET}, "by": "x", "reason": "y",
      "starts_at": T0 - 90 * MIN, "ends_at": T0 - 80 * MIN}, "before the pipeline's time"),
    ({"op": "end", "id": "s-none", "by": "x"}, "no silence s-none"),
])
def test_bad_silences_are_dead_letters_with_the_reason(engine, body, why):
    out = engine.silence([json.dumps(body).encode()])
    [d] = out.dead_letters
    assert d.reason == "bad_silence" and why in d.detail, d.detail
    assert engine.counters["dead.bad_silence"] == 1 and out.notices == []
