"""The engine beside a bare loop on the same gas readings and the same rule (issue: Chengdu scale).

    .venv/bin/python bench/peer_bench.py                          # 10,000 sensors, 600,000 readings
    .venv/bin/python bench/peer_bench.py --sensors 100000 --readings 2000000 --rounds 3

The workload: household gas alarms reading %LEL once a minute each; 1 % of them leak for ten
minutes of every hour (30-60 %LEL), the rest read 0-4. The rule: fire at >= 25 %LEL held for
60 s, clear under 10. Two contenders take the same JSON lines, one round after another
(interleaved, so a noisy machine slows both alike):

  - bare loop: orjson + a dict of per-sensor state, the rule written inline. The in-process
    limit: no validation, no registry, no notice, no routing, no dead letter.
  - engine: ``Engine.ingest`` in batches of ``--batch`` lines (what `cityops replay` hands it),
    with a one-rule pack: every reading validated against the registry, incidents with their
    notices in Chinese to every tier the routing names.

Both must find the same incidents (firing and resolved per sensor, in order); the bench stops
if they do not. Printed: readings per CPU-second of each (the process's CPU time: other load on a
shared machine slows the wall clock, not this), and engine / bare per round. The engine here has
`clear_for: 0s` and no flapping window, as the bare loop has neither.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core.engine import Engine  # noqa: E402
from pipeline.core.registry import load as load_registry  # noqa: E402
from pipeline.tools.registry_gen import generate  # noqa: E402
from rules.compiler import load_rules  # noqa: E402

T0 = 1_782_000_000_000
FIRE, CLEAR, FOR_MS = 25.0, 10.0, 60_000


def workload(ids: list[str], n_readings: int, seed: int = 7) -> list[bytes]:
    """One reading a minute per sensor, in minute order; 1 % leak minutes 10-19 of each hour."""
    rng = random.Random(seed)
    leaky = set(rng.sample(range(len(ids)), max(1, len(ids) // 100)))
    lines = []
    for i in range(n_readings):
        s, minute = i % len(ids), i // len(ids)
        v = rng.uniform(0, 4)
        if s in leaky and 10 <= minute % 60 < 20:
            v = 30 + rng.uniform(0, 30)
        lines.append(orjson.dumps({"sensor_id": ids[s], "ts": T0 + minute * 60_000,
                                   "value": round(v, 2)}))
    return lines


def bare(lines: list[bytes]) -> list[tuple[str, str, int]]:
    state: dict[str, tuple[int, int]] = {}
    notices = []
    for line in lines:
        r = orjson.loads(line)
        k, v, ts = r["sensor_id"], r["value"], r["ts"]
        phase, since = state.get(k, (0, 0))
        if phase == 0:
            if v >= FIRE:
                state[k] = (1, ts)
        elif phase == 1:
            if v < FIRE:
                state[k] = (0, 0)
            elif ts - since >= FOR_MS:
                state[k] = (2, since)
                notices.append((k, "firing", ts))
        elif v < CLEAR:
            state[k] = (0, 0)
            notices.append((k, "resolved", ts))
    return notices


def engine_run(engine: Engine, lines: list[bytes], batch: int) -> list[tuple[str, str, int]]:
    found = []
    now = T0 + 10 * 365 * 86_400_000          # a wall clock after the whole workload
    for i in range(0, len(lines), batch):
        out = engine.ingest(lines[i:i + batch], "bench", now_ms=now)
        assert not out.dead_letters, out.dead_letters[:3]
        found += [(n["sensor_id"], n["state"], int(datetime.fromisoformat(n["ts"]).timestamp() * 1000))
                  for n in out.notices
                  if n["tier"] == "street" and n["state"] in ("firing", "resolved")]
    return found


def pack(folder: Path, kinds: dict) -> Path:
    """A pack with the peers' one rule; the built-in kinds (the registry has every kind)."""
    path = folder / "peer.yaml"
    doc = {"pack": "peer", "title": "对比基准：燃气阈值",
           "kinds": {k: {"name": v.name, "unit": v.unit, "category": v.category.value,
                         **({"reading": v.reading, "events": v.events} if v.reading == "event" else {})}
                     for k, v in kinds.items()},
           "rules": [{"id": "peer.gas", "name": "燃气浓度超限", "type": "threshold",
                      "sensors": ["gas_household"], "for": "60s", "clear": f"value < {CLEAR:g}",
                      "levels": [{"severity": "yellow", "when": f"value >= {FIRE:g}"}],
                      "title": "{place}燃气泄漏报警",
                      "summary": "{address}读数{value}{unit}，达到{threshold}{unit}报警值。"}]}
    path.write_bytes(orjson.dumps(doc))        # JSON is YAML
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sensors", type=int, default=10_000, help="gas sensors in the workload")
    ap.add_argument("--readings", type=int, default=600_000)
    ap.add_argument("--batch", type=int, default=1000, help="lines per Engine.ingest call")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--registry-dir", type=Path, default=Path(tempfile.gettempdir()) / "cityops-bench")
    args = ap.parse_args()

    size = args.sensors * 8                    # the generated mix is ~1/7 household gas
    folder = args.registry_dir / f"registry-{size}"
    if not (folder / "registry.yaml").exists():
        print(f"generating a {size:,}-sensor registry in {folder} …", flush=True)
        generate(folder, size, seed=1)
    builtin = load_rules()
    with tempfile.TemporaryDirectory() as tmp:
        rules = load_rules([pack(Path(tmp), builtin.kinds)], builtin=False)
    reg = load_registry(folder, rules.kinds)
    gas = [reg.sensor_ids[i] for i in reg.sensors_of_kinds(["gas_household"])]
    if len(gas) < args.sensors:
        sys.exit(f"the {size:,}-sensor registry has {len(gas):,} household gas sensors; "
                 f"fewer than --sensors {args.sensors:,}")
    lines = workload(gas[:args.sensors], args.readings)
    print(f"{args.readings:,} readings of {args.sensors:,} household gas sensors "
          f"({len(reg):,}-sensor registry), one rule, --batch {args.batch}", flush=True)
    for r in range(1, args.rounds + 1):
        gc.collect()
        t = time.process_time()
        want = bare(lines)
        t_bare = time.process_time() - t
        engine = Engine(reg, rules)
        gc.collect()
        t = time.process_time()
        got = engine_run(engine, lines, args.batch)
        t_engine = time.process_time() - t
        if got != want:
            sys.exit(f"the engine and the bare loop disagree: {len(got)} vs {len(want)} notices; "
                     f"first differences {[x for x in zip(got, want, strict=False) if x[0] != x[1]][:3]}")
        firing = sum(1 for n in want if n[1] == "firing")
        n = len(lines)
        print(f"round {r}: bare {n / t_bare:>12,.0f} readings/CPU-s   engine {n / t_engine:>12,.0f} "
              f"readings/CPU-s   engine/bare {t_bare / t_engine:.2f}   ({firing:,} incidents, "
              f"{len(want):,} firing+resolved, identical)", flush=True)


if __name__ == "__main__":
    main()
