"""How long a hot reload takes, and what it holds the runtime's loop for (pipeline/core/reload.py).

    .venv/bin/python bench/reload_bench.py                     # the fixture, then 100,000 sensors
    .venv/bin/python bench/reload_bench.py --sensors 1000000   # a Chengdu-sized city

For each registry (the Chengdu fixture, and one `cityops registry generate` writes with
--sensors): an engine with every built-in pack, a gas reading over the level-1 alarm from up to
--incidents gas sensors (open incidents to carry), then a reload to a params file that moves the
gas level-1 threshold, timed in its parts, --repeat times (the best is printed):

    check   load_set: packs, params, routing, registry read and checked, the rules bound to every
            sensor (what a refused reload costs too)
    carry   carry(): the old engine's snapshot restored into the new one
    diff    diff(): what changed (`cityops rules diff`)

`cityops run` does check + carry + a snapshot on its loop; Kafka workers check off the loop and
carry per partition at the switch. JSON in bench/out/reload_bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.engine import EngineSettings  # noqa: E402
from pipeline.core.reload import carry, diff, load_set  # noqa: E402
from pipeline.shared.config import load_settings  # noqa: E402
from pipeline.tools.registry_gen import generate  # noqa: E402


def best(fn, repeat: int):
    times, got = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        got = fn()
        times.append(time.perf_counter() - t)
    return min(times), got


def measure(registry: Path | None, incidents: int, repeat: int, tmp: Path) -> dict:
    params = tmp / "params.yaml"
    params.write_text("gas:\n  params: {level1_lel: 22}\n", encoding="utf-8")
    reg = {} if registry is None else {"registry": registry}
    old_s, new_s = load_settings(**reg), load_settings(params=params, **reg)
    old = load_set(old_s)
    engine = old.engine(EngineSettings())
    r = old.registry
    gas = [r.sensor_ids[i] for i in range(len(r)) if r.kinds[r.kind_of[i]].startswith("gas_")]
    ts = 1_782_885_780_000
    engine.ingest([orjson.dumps({"sensor_id": s, "ts": ts, "value": 30.0}) for s in gas[:incidents]])
    check_s, new = best(lambda: load_set(new_s), repeat)
    carry_s, _ = best(lambda: carry(engine, new.engine(EngineSettings()), ts + 1000), repeat)
    build_s, _ = best(lambda: new.engine(EngineSettings()), repeat)
    diff_s, d = best(lambda: diff(old, new), repeat)
    return {"registry": str(registry or "fixture"), "sensors": len(r),
            "open_incidents": len(engine.book.open), "check_s": round(check_s, 3),
            "carry_s": round(max(carry_s - build_s, 0.0), 3), "engine_build_s": round(build_s, 3),
            "diff_s": round(diff_s, 3), "changes": {k: v for k, v in d.counts().items() if v}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sensors", type=int, default=100_000)
    ap.add_argument("--incidents", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cityops-reload-bench-") as d:
        tmp = Path(d)
        reg = generate(tmp / "city", args.sensors)
        for registry in (None, reg):
            row = measure(registry, args.incidents, args.repeat, tmp)
            rows.append(row)
            print(f"{row['sensors']:>9,} sensors, {row['open_incidents']:>5,} open: check "
                  f"{row['check_s']:.3f} s, engine {row['engine_build_s']:.3f} s, carry "
                  f"{row['carry_s']:.3f} s, diff {row['diff_s']:.3f} s; {row['changes']}")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "reload_bench.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
