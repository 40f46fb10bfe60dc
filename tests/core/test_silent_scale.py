"""A city's silent sensors cost a batch nothing (issue 15).

Once the absence rule has found the never-heard sensors silent, what a batch of readings costs
must depend on the batch, not on how many sensors are silent. Counted, not timed: the Python
lines a batch executes (sys.settrace, numpy's own Python included) and the bytes it allocates at
its peak (tracemalloc: a numpy pass over the silent sensors allocates with their number), for the
same readings on the same heard sensors, in a city with few silent sensors and in one with many.
"""

from __future__ import annotations

import json
import sys
import tracemalloc

import pytest

from pipeline.core import registry
from pipeline.core.engine import SMALL_BATCH, Engine
from pipeline.tools.registry_gen import generate

T0 = 1_782_885_600_000          # 2026-07-01T14:00:00+08:00
MIN = 60_000
HEARD = 40                      # gas sensors that report every 10 minutes; the rest never do


@pytest.fixture(scope="module")
def city(tmp_path_factory, rules) -> registry.Registry:
    folder = tmp_path_factory.mktemp("silent-city")
    generate(folder, 6000, seed=1)
    return registry.load(folder, rules.kinds)


def heard_of(reg: registry.Registry) -> list[str]:
    gas = reg.kinds.index("gas_household")
    return [sid for i, sid in enumerate(reg.sensor_ids) if reg.kind_of[i] == gas][:HEARD]


def batch(ids: list[str], at: int) -> list[bytes]:
    return [json.dumps({"sensor_id": sid, "ts": at + k, "value": 1.5}).encode()
            for k, sid in enumerate(ids)]


def settled(reg: registry.Registry, rules, ids: list[str]) -> Engine:
    """Four hours of the heard sensors' readings: past every kind's absent_for, so every
    never-heard sensor has been found silent."""
    engine = Engine(reg, rules)
    for m in range(0, 241, 10):
        engine.ingest(batch(ids, T0 + m * MIN))
    return engine


def work(engine: Engine, payloads: list[bytes]) -> tuple[int, int]:
    """(Python lines executed, peak bytes allocated) by one ingest."""
    lines = 0

    def trace(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
        return trace

    tracemalloc.start()
    sys.settrace(trace)
    try:
        out = engine.ingest(payloads)
    finally:
        sys.settrace(None)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert not out.notices and not out.dead_letters     # a quiet batch: nothing else to do
    return lines, peak


@pytest.mark.parametrize("screen", ["numpy", "small"])
def test_a_batch_costs_the_same_however_many_sensors_are_silent(city, rules, screen):
    """Both batch screens: numpy's, and the plain-Python one of a batch under SMALL_BATCH
    readings (the batches here are 20)."""
    ids = heard_of(city)
    heard = [city.index[sid] for sid in ids]
    few = city.subset(sorted(set(heard) | set(range(300))))
    engines = {name: settled(reg, rules, ids) for name, reg in (("few", few), ("many", city))}
    silent = {name: len(e.silent) for name, e in engines.items()}
    assert silent["few"] < 300 and silent["many"] > 10 * silent["few"], silent

    at = T0 + 245 * MIN
    for e in engines.values():      # the scan due by then runs here: the batches below have none
        e.ingest(batch(ids, at))
        e.small_batch = 0 if screen == "numpy" else SMALL_BATCH
    assert SMALL_BATCH > 20
    took: list[bool] = []           # what the small screen said of each batch it was given
    for e in engines.values():
        e._screen_small = lambda *a, _screen=e._screen_small: took.append(_screen(*a)) or took[-1]
    costs = {name: [work(e, batch(ids[:20], at + j * 1000)) for j in range(1, 4)]
             for name, e in engines.items()}
    assert took == ([] if screen == "numpy" else [True] * 6)     # it took all six batches
    for (lines_few, peak_few), (lines_many, peak_many) in zip(costs["few"], costs["many"], strict=True):
        assert lines_many == lines_few, costs
        # a pass over the silent sensors would allocate at least 8 bytes each
        assert peak_many < peak_few + 4 * (silent["many"] - silent["few"]), costs
