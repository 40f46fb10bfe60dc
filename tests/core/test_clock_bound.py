"""One sensor's clock does not move time for the city (issue 12, item 5): in the live
runtimes (``Engine.clock_bound``) the watermark is held to the clock a batch is judged by.
Through a real broker: tests/runtimes/test_hardening_mqtt.py."""

from __future__ import annotations

import json

from pipeline.core.engine import Engine, EngineSettings
from pipeline.core.registry import load as load_registry
from rules.compiler import load_rules

GAS_ALONE, NEIGHBOUR = "gas-510104-000001", "gas-510104-000002"
T0 = 1_782_885_780_000
MIN = 60_000


def payload(sensor: str, value: float, ts: int) -> bytes:
    return json.dumps({"sensor_id": sensor, "ts": ts, "value": value}).encode()


def test_a_reading_4_minutes_ahead_resolves_nothing_early() -> None:
    """Before: the neighbour's reading moved the watermark to 3 min 50 s ahead of the clock
    and the leak was over 1 s after it cleared (clear_for 2 min)."""
    rules = load_rules()
    engine = Engine(load_registry(None, rules.kinds), rules,
                    EngineSettings(allowed_lateness="10s"))
    engine.clock_bound = True
    fired = engine.ingest([payload(GAS_ALONE, 55.0, T0)], now_ms=T0).notices
    assert {n["state"] for n in fired} == {"firing"}
    clear = engine.ingest([payload(GAS_ALONE, 1.0, T0 + 1000)], now_ms=T0 + 1000).notices
    assert clear == []                                  # clear_for 2 min: pending
    ahead = engine.ingest([payload(NEIGHBOUR, 1.0, T0 + 2000 + 4 * MIN)], now_ms=T0 + 2000)
    assert not ahead.dead_letters                       # within max_future: taken
    assert ahead.notices == []
    assert engine.watermark <= T0 + 2000 - 10_000
    later = engine.advance(T0 + 1000 + 2 * MIN)         # the clock gets there: now it is over
    assert "resolved" in {n["state"] for n in later.notices}
