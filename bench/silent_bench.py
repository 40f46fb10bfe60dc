"""A city where most sensors are silent: replay throughput at small and large batches.

    .venv/bin/python bench/silent_bench.py                  # 1,000,000 sensors, 1 % ever heard
    .venv/bin/python bench/silent_bench.py --sensors 100000 --readings 500000   # a quick look
    .venv/bin/python bench/silent_bench.py --paired --rounds 3   # the two side by side, turn by turn

A real registry always holds many sensors that say nothing (new, broken, decommissioned but
registered). The absence rule (`device.silent`) finds them silent once; after that, what a batch
costs must depend on the batch, not on how many sensors are silent. This replays the same
readings of the heard sensors (gateway payloads, every built-in pack, absence notices included)
through ``pipeline.core.replay.replay`` once per ``--batch`` size, each with a fresh engine on the same
registry, and prints readings/s (wall clock and CPU time: the process's own, which other load
on a shared machine slows less), the ratio of the smallest batch to the largest (the silent work
per batch shows as a ratio far under 1), and a digest of the notices: batching never changes them.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine_bench import make_payloads  # noqa: E402  the engine bench's reading mix
from pipeline.core.engine import Engine  # noqa: E402
from pipeline.core.registry import load as load_registry  # noqa: E402
from pipeline.core.replay import replay  # noqa: E402
from pipeline.tools.registry_gen import generate  # noqa: E402
from rules.compiler import load_rules  # noqa: E402


class Digest:
    """A file-like sink that keeps only the notices' digest and size."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def write(self, b: bytes) -> int:
        self.h.update(b)
        return len(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sensors", type=int, default=1_000_000, help="registry size")
    ap.add_argument("--heard", type=float, default=0.01, help="share of sensors that ever report")
    ap.add_argument("--readings", type=int, default=2_000_000)
    ap.add_argument("--span", type=int, default=240, help="minutes of event time (default 4 h: "
                    "past every kind's absent_for, so the never-heard fall silent)")
    ap.add_argument("--batch", type=int, nargs="+", default=[20, 1000],
                    help="replay --batch sizes to compare (default 20 1000)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of every --batch, one after "
                    "another (interleaved: a load that comes and goes slows both alike)")
    ap.add_argument("--paired", action="store_true", help="the smallest and the largest --batch "
                    "side by side in one process, two engines taking the same lines in turns of "
                    "the largest batch, each timed on its own: a load that comes and goes (a "
                    "shared machine) slows both alike, which two replays one after the other "
                    "cannot promise")
    ap.add_argument("--registry-dir", type=Path, default=Path(tempfile.gettempdir()) / "cityops-bench")
    args = ap.parse_args()

    folder = args.registry_dir / f"registry-{args.sensors}"
    if not (folder / "registry.yaml").exists():
        print(f"generating a {args.sensors:,}-sensor registry in {folder} …", flush=True)
        generate(folder, args.sensors, seed=1)
    rules = load_rules()
    reg = load_registry(folder, rules.kinds)
    heard = sorted(random.Random(3).sample(range(len(reg)), int(len(reg) * args.heard)))
    payloads = make_payloads(reg.subset(heard), args.readings, args.span * 60_000)
    n = sum(p.count(b'"sensor_id"') for p in payloads)
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as f:
        f.write(b"\n".join(payloads) + b"\n")
        path = Path(f.name)
    print(f"registry: {len(reg):,} sensors, {len(heard):,} ever heard ({args.heard:.0%}); "
          f"{len(payloads):,} gateway payloads, {n:,} readings over {args.span} min")
    lo, hi = min(args.batch), max(args.batch)
    try:
        for r in range(1, args.rounds + 1 if args.paired else 0):
            paired(reg, rules, path, n, lo, hi, r)
        for r in range(1, 0 if args.paired else args.rounds + 1):
            rates, cpu_rates = {}, {}     # wall clock, and the process's CPU time (a shared machine)
            for b in args.batch:
                run(reg, rules, path, n, b, rates, cpu_rates)
            print(f"round {r}: --batch {lo} / --batch {hi}: {rates[lo] / rates[hi]:.2f} "
                  f"(wall clock), {cpu_rates[lo] / cpu_rates[hi]:.2f} (CPU time)", flush=True)
    finally:
        path.unlink()


def paired(reg, rules, path: Path, n: int, lo: int, hi: int, r: int) -> None:
    """Two fresh engines on the same lines, as `cityops replay` feeds them (``Engine.ingest``
    of ``lo`` or ``hi`` lines, every notice written as a JSON line); turn by turn, ``hi``
    lines to one, then the same lines ``lo`` at a time to the other, each timed in CPU time."""
    lines = [raw.strip() for raw in path.read_bytes().splitlines() if raw.strip()]
    source, clock = str(path), int(time.time() * 1000)
    opt = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
    engines, sinks = {lo: Engine(reg, rules), hi: Engine(reg, rules)}, {lo: Digest(), hi: Digest()}
    cpu = dict.fromkeys((lo, hi), 0.0)
    gc.collect()

    def emit(b: int, out) -> None:
        for notice in out.notices:
            sinks[b].write(orjson.dumps(notice, option=opt))
    for i in range(0, len(lines), hi):
        turn = lines[i:i + hi]
        for b in (hi, lo):
            t = time.process_time()
            for k in range(0, len(turn), b):
                emit(b, engines[b].ingest(turn[k:k + b], source=source, now_ms=clock))
            cpu[b] += time.process_time() - t
    for b in (lo, hi):                  # history is over: the timers the data reached run out
        t = time.process_time()
        emit(b, engines[b].advance(engines[b].max_ts + 1))
        cpu[b] += time.process_time() - t
    digests = {b: sinks[b].h.hexdigest()[:16] for b in (lo, hi)}
    if digests[lo] != digests[hi]:
        sys.exit(f"--batch {lo} and --batch {hi} made different notices: {digests}")
    print(f"round {r}, paired: --batch {lo} {cpu[lo]:.1f} CPU-s ({n / cpu[lo]:,.0f} readings/CPU-s), "
          f"--batch {hi} {cpu[hi]:.1f} CPU-s ({n / cpu[hi]:,.0f} readings/CPU-s): "
          f"{lo} / {hi} = {cpu[hi] / cpu[lo]:.2f}; notices identical, sha256 {digests[lo]}", flush=True)


def run(reg, rules, path: Path, n: int, b: int, rates: dict, cpu_rates: dict) -> None:
    """One replay at ``--batch b`` with a fresh engine; its rates go into the dicts."""
    gc.collect()
    engine = Engine(reg, rules)
    sink = Digest()
    t, cpu = time.perf_counter(), time.process_time()
    stats = replay(engine, path, sink, batch=b)
    took, cpu = time.perf_counter() - t, time.process_time() - cpu
    rates[b] = n / took
    cpu_rates[b] = n / cpu
    print(f"replay --batch {b:>5}: {took:7.1f} s, {rates[b]:>10,.0f} readings/s; "
          f"CPU {cpu:7.1f} s, {cpu_rates[b]:>10,.0f} readings/CPU-s; "
          f"{stats.notices:,} notices ({len(engine.silent):,} sensors silent at the end), "
          f"sha256 {sink.h.hexdigest()[:16]}", flush=True)


if __name__ == "__main__":
    main()
