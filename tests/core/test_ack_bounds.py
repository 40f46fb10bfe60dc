"""Acks are held to a reading's bounds (issue 12, item 3), and an incident changes state only
once its notices are built. Through a real broker: tests/runtimes/test_hardening_mqtt.py."""

from __future__ import annotations

import json

import pytest

from pipeline.core.engine import Engine
from pipeline.core.models import Ack, Tier
from pipeline.core.registry import load as load_registry
from rules.compiler import load_rules

GAS_ALONE = "gas-510104-000001"
NOW = 1_782_885_780_000


@pytest.fixture
def fired() -> tuple[Engine, str]:
    rules = load_rules()
    engine = Engine(load_registry(None, rules.kinds), rules)
    out = engine.ingest([json.dumps({"sensor_id": GAS_ALONE, "ts": NOW, "value": 30.0}).encode()],
                        now_ms=NOW)
    return engine, out.notices[0]["alert_id"]


def ack(alert_id: str, ts: object) -> bytes:
    return f'{{"alert_id": "{alert_id}", "by": "w-510104020001-01", "tier": "grid", ' \
           f'"ts": {ts}}}'.encode()


@pytest.mark.parametrize("ts, why", [
    ("1e17", "is not a time: RFC 3339 with an offset, or epoch milliseconds"),   # year 3 million
    ("1e20", "is not a time"),                               # does not fit 64 bits
    ("1.5e300", "is not a time"),
    ('"10000-01-01T00:00:00Z"', "is not a time"),
    (NOW + 600_000, "more than 300s ahead of the clock"),
    (NOW - 8 * 86_400_000 - 3_600_000, "days behind the watermark"),
])
def test_an_ack_out_of_bounds_is_a_bad_ack_and_escalation_goes_on(fired, ts, why) -> None:
    engine, alert = fired
    engine.advance(NOW)        # watermark at the reading (the max_age bound counts from it)
    out = engine.ack([ack(alert, ts)], now_ms=NOW)
    [d] = out.dead_letters
    assert d.reason == "bad_ack" and why in d.detail, d.detail
    assert out.notices == [] and engine.book.open[alert].acked_by is None
    later = engine.advance(NOW + 3 * 3_600_000)                 # hours, nobody acknowledged
    assert "escalated" in {n["state"] for n in later.notices}
    engine.snapshot()                                           # and state still saves


def test_a_non_json_ack_says_it_is_not_json(fired) -> None:
    engine, _ = fired
    [d] = engine.ack([b"ack it please"]).dead_letters
    assert d.reason == "bad_ack" and d.detail.startswith("not JSON: "), d.detail


def test_a_field_error_names_the_field(fired) -> None:
    engine, alert = fired
    [d] = engine.ack([ack(alert, NOW).replace(b'"grid"', b'"galaxy"')]).dead_letters
    assert d.detail.startswith("tier: "), d.detail


def test_an_ack_whose_notice_cannot_be_built_leaves_the_incident_as_it_was(fired) -> None:
    """Before: the incident was marked acknowledged, then building its notice raised (year
    3170843 is out of range): no notice, escalation stopped, nobody told."""
    engine, alert = fired
    inc = engine.book.open[alert]
    before = inc.acked_by, inc.state, inc.seq, inc.last_ts
    bogus = Ack.model_construct(alert_id=alert, by="w-510104020001-01", tier=Tier.grid,
                                ts=10**17)
    out: list[dict] = []
    with pytest.raises(ValueError):
        engine.book.ack(bogus, out)
    assert out == [] and (inc.acked_by, inc.state, inc.seq, inc.last_ts) == before
