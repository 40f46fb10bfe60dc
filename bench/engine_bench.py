"""Engine-only throughput and state size on a Chengdu-scale registry (issue: the core).

    .venv/bin/python bench/engine_bench.py                 # 1,000,000 sensors, 2,000,000 readings
    .venv/bin/python bench/engine_bench.py --sensors 20000 --readings 200000   # a quick look

What it measures, in one process (one core):
  - readings/s through ``Engine.ingest`` (msgspec decode + every built-in rule pack), on gateway
    payloads of a realistic mix: mostly quiet readings, ~0.05 % over a gas threshold, camera
    violations, batteries, waterlogging and river levels, a few bad payloads;
  - baselines in the same run: orjson parse + one threshold compare (INFRA.md's ~400,000/s line),
    so the ratio survives a noisy machine;
  - engine state bytes per sensor (tracemalloc of everything the engine allocates, registry
    excluded) and snapshot bytes per sensor.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core.engine import Engine  # noqa: E402
from pipeline.core.registry import load as load_registry  # noqa: E402
from pipeline.tools.registry_gen import generate  # noqa: E402
from rules.compiler import load_rules  # noqa: E402

T0 = 1_782_885_600_000          # 2026-07-01T14:00:00+08:00
EVENTS = {"site_camera": ["no_helmet", "no_reflective_vest", "fence_missing"],
          "tower_crane": ["wind_speed_alarm"], "manhole_cover": ["opened"],
          "door_magnet": ["opened", "closed"]}
NORMAL = {"gas_household": (0, 4), "gas_commercial": (0, 6), "waterlogging": (0, 5),
          "river_gauge": (2.0, 3.5), "rain_gauge": (0, 2), "air_quality": (20, 60),
          "dust_monitor": (40, 120), "billboard_tilt": (0, 1)}


def make_payloads(reg, n_readings: int, span_ms: int, seed: int = 7) -> list[bytes]:
    """What gateways publish: each payload is one gateway's batch, a reading from each sensor
    behind it (sensors without a gateway publish alone); event time spread over ``span_ms``."""
    rnd = random.Random(seed)
    kinds = reg.kinds
    behind: dict[int, list[int]] = {}
    alone: list[int] = []
    for idx, g in enumerate(reg.gateway_of):
        if g >= 0:
            behind.setdefault(g, []).append(idx)
        else:
            alone.append(idx)
    groups = list(behind.values()) + [[i] for i in alone]
    payloads: list[bytes] = []
    made = 0
    while made < n_readings:
        group = groups[rnd.randrange(len(groups))]
        ts = T0 + made * span_ms // n_readings
        batch = []
        for idx in group:
            kind = kinds[reg.kind_of[idx]]
            r: dict = {"sensor_id": reg.sensor_ids[idx], "ts": ts}
            if kind in EVENTS:
                # a violation or alarm now and then; otherwise the device's status heartbeat
                r["event"] = rnd.choice(EVENTS[kind]) if rnd.random() < 0.002 else "heartbeat"
            else:
                lo, hi = NORMAL[kind]
                v = rnd.uniform(lo, hi)
                if kind.startswith("gas") and rnd.random() < 0.0005:
                    v = rnd.uniform(20, 60)                  # a leak
                r["value"] = round(v, 2)
            if rnd.random() < 0.05:                          # some devices report battery
                r["battery"] = round(rnd.uniform(5, 25) if rnd.random() < 0.002
                                     else rnd.uniform(40, 100), 1)
            batch.append(r)
        made += len(batch)
        payloads.append(orjson.dumps(batch if len(batch) > 1 else batch[0]))
    for j in range(0, len(payloads), 5000):                # a few bad payloads, as in life
        payloads[j] = b'{"sensor_id": "gas-000", "ts": "yesterday"'
    return payloads


def baseline(payloads: list[bytes]) -> float:
    """orjson parse + one threshold compare per reading: the floor a Python engine can reach."""
    n = 0
    hits = 0
    t = time.perf_counter()
    for p in payloads:
        try:
            rows = orjson.loads(p)
        except orjson.JSONDecodeError:
            continue
        for r in rows if isinstance(rows, list) else [rows]:
            n += 1
            v = r.get("value")
            if v is not None and v >= 20:
                hits += 1
    return n / (time.perf_counter() - t)


def run_engine(engine: Engine, payloads: list[bytes], chunk: int) -> tuple[float, int, int]:
    notices = dead = 0
    t = time.perf_counter()
    for i in range(0, len(payloads), chunk):
        out = engine.ingest(payloads[i:i + chunk])
        notices += len(out.notices)
        dead += len(out.dead_letters)
    took = time.perf_counter() - t
    return took, notices, dead


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sensors", type=int, default=1_000_000)
    ap.add_argument("--readings", type=int, default=2_000_000)
    ap.add_argument("--span", type=int, default=20, help="minutes of event time the readings cover")
    ap.add_argument("--chunk", type=int, default=500, help="gateway payloads per engine call (~2,000 readings)")
    args = ap.parse_args()

    folder = ROOT / "bench" / "out" / f"registry-{args.sensors}"
    if not (folder / "registry.yaml").exists():
        print(f"generating a {args.sensors:,}-sensor registry in {folder} …", flush=True)
        generate(folder, args.sensors, seed=1)
    rules = load_rules()
    t = time.perf_counter()
    reg = load_registry(folder, rules.kinds)
    print(f"registry: {len(reg):,} sensors, {len(reg.grid_places):,} grids, "
          f"{len(reg.gateways):,} gateways, loaded in {time.perf_counter() - t:.1f}s")
    payloads = make_payloads(reg, args.readings, args.span * 60_000)
    n = sum(p.count(b'"sensor_id"') for p in payloads)
    print(f"  ({n / len(payloads):.1f} readings per gateway payload)")
    print(f"input: {len(payloads):,} gateway payloads, {n:,} readings over {args.span} min of event time")

    gc.collect()
    base = baseline(payloads)
    t = time.perf_counter()
    engine = Engine(reg, rules)
    build = time.perf_counter() - t
    gc.collect()
    took, notices, dead = run_engine(engine, payloads, args.chunk)
    rate = n / took
    print(f"engine built in {build:.1f}s ({len(rules.rules)} rules)")
    print(f"baseline orjson parse + threshold:   {base:>10,.0f} readings/s")
    print(f"engine (decode + all built-in packs): {rate:>10,.0f} readings/s per core "
          f"({rate / base:.2f} x baseline); {notices:,} notices, {dead:,} dead letters")

    # State size: a second engine, built and fed under tracemalloc (the registry is outside it).
    del engine
    gc.collect()
    tracemalloc.start()
    engine = Engine(reg, rules)
    run_engine(engine, payloads, args.chunk)
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    blob = engine.snapshot()
    open_incidents = len(engine.book.open)
    print(f"engine state: {held / len(reg):.0f} bytes per sensor ({held / 2**20:.1f} MiB, "
          f"{open_incidents:,} open incidents); snapshot {len(blob) / len(reg):.0f} bytes per sensor")


if __name__ == "__main__":
    main()
