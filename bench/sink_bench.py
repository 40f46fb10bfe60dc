"""The InfluxDB history sink: how fast it writes, and what it costs the pipeline.

    .venv/bin/python bench/sink_bench.py                       # 20,000 sensors, 400,000 readings
    .venv/bin/python bench/sink_bench.py --sensors 3000 --readings 20000 --points 20000  # a look

Against a VictoriaMetrics it starts itself (InfluxDB's write path, bench/harness/tsdb.py), through the
real influxdb-client:

  (1) points/s written: readings columns handed to the sink as fast as it takes them, timed
      until the last point is acknowledged by the database;
  (2) the pipeline's readings/s with the sink off and on, in the same run: ``Engine.ingest``
      over gateway payloads (the engine bench's reading mix), and with the sink on,
      ``sink.add(output)`` after every call while the writer thread formats and writes
      concurrently, as in production. Two figures: readings/s by the wall clock while the
      engine runs, and readings per CPU-second of this whole process (every thread, user and
      system time, until the sink has written the last point). The second is the cost: it is
      what the pipeline's core does with the sink on, and other load on a shared machine does
      not move it. Best of ``--rounds`` each way (target: the sink costs < 20 %). Also with
      down-sampling (``--every``).

The database gets a CPU of its own (``--db-cpu``, the last one; GOMAXPROCS=1) and this process
the others: in production InfluxDB is another machine, and on a 2-core box a database sharing
the pipeline's cores would be measured instead of the sink. Everything the sink does (writer
thread, HTTP, and on loopback the kernel's TCP work of both ends) is charged to the pipeline's
CPU: a strict bound. ``--share`` instead lets this process use every CPU and runs the database
at the lowest priority, as a pipeline on a 2-core host with a remote database would run: the
writer's numpy work and socket I/O release the GIL and can use the second core; its cost is
then read from the wall clock.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectors.influx import InfluxSink  # noqa: E402
from engine_bench import make_payloads  # noqa: E402  the engine bench's reading mix
from bench.harness.tsdb import VictoriaMetrics  # noqa: E402
from pipeline.core.close_figures import closed_fields  # noqa: E402
from pipeline.core.engine import Engine  # noqa: E402
from pipeline.core.registry import load as load_registry  # noqa: E402
from pipeline.shared.config import InfluxSettings  # noqa: E402
from pipeline.tools.registry_gen import generate  # noqa: E402
from rules.compiler import load_rules  # noqa: E402


def settings(url: str, every: str = "0s") -> InfluxSettings:
    return InfluxSettings(url=url, token="bench", readings_every=every, buffer_max=5_000_000)


def write_rate(url: str, reg, points: int, every: str) -> tuple[float, dict]:
    """(1): columns of 2,000 readings as fast as add() takes them; until close() returns."""
    rng = np.random.default_rng(3)
    step = 2_000
    cols = []
    for i in range(0, points, step):
        n = min(step, points - i)
        cols.append((rng.integers(0, len(reg), n).astype(np.int64),
                     1_782_885_600_000 + np.arange(i, i + n, dtype=np.int64) * 10,
                     np.round(rng.uniform(0, 100, n), 2)))
    sink = InfluxSink(settings(url, every), reg, closed_fields)
    t = time.perf_counter()
    for c in cols:
        sink.add_readings([c])
    sink.close(600.0)
    took = time.perf_counter() - t
    return sink.stats()["written"] / took, sink.stats()


class Run:
    """One pass of the readings through the engine, with the sink or without."""

    def __init__(self, reg, rules, payloads: list[bytes], n: int, chunk: int,
                 url: str | None, every: str) -> None:
        engine = Engine(reg, rules)
        sink = None
        if url:
            engine.keep_accepted = True
            sink = InfluxSink(settings(url, every), reg, closed_fields)
        gc.collect()
        cpu = time.process_time()
        t = time.perf_counter()
        for i in range(0, len(payloads), chunk):
            out = engine.ingest(payloads[i:i + chunk])
            if sink is not None:
                sink.add(out)
        self.wall = n / (time.perf_counter() - t)
        self.drain = 0.0
        self.stats: dict = {}
        if sink is not None:
            d = time.perf_counter()
            sink.close(600.0)
            self.drain = time.perf_counter() - d
            self.stats = sink.stats()
        self.cpu = n / (time.process_time() - cpu)          # readings per CPU-second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sensors", type=int, default=20_000)
    ap.add_argument("--readings", type=int, default=400_000, help="(2) readings per run")
    ap.add_argument("--points", type=int, default=400_000, help="(1) points written")
    ap.add_argument("--span", type=int, default=20, help="minutes of event time the readings cover")
    ap.add_argument("--chunk", type=int, default=500, help="gateway payloads per engine call")
    ap.add_argument("--rounds", type=int, default=3, help="(2) runs each way; the best counts")
    ap.add_argument("--every", default="5m", help="(2) also with this down-sampling")
    ap.add_argument("--db-cpu", type=int, default=(os.cpu_count() or 1) - 1,
                    help="the database's CPU (this process runs on the others); -1: no pinning")
    ap.add_argument("--share", action="store_true", help="this process may use every CPU; the "
                    "database runs at the lowest priority (see above)")
    args = ap.parse_args()
    mine = set(range(os.cpu_count() or 1)) - {args.db_cpu}
    db_cpus = {args.db_cpu} if args.db_cpu >= 0 and mine else None
    if db_cpus and not args.share:
        os.sched_setaffinity(0, mine)       # before the writer threads exist: they inherit it

    folder = ROOT / "bench" / "out" / f"registry-{args.sensors}"
    if not (folder / "registry.yaml").exists():
        print(f"generating a {args.sensors:,}-sensor registry in {folder} …", flush=True)
        generate(folder, args.sensors, seed=1)
    rules = load_rules()
    reg = load_registry(folder, rules.kinds)
    payloads = make_payloads(reg, args.readings, args.span * 60_000)
    n = sum(p.count(b'"sensor_id"') for p in payloads)
    print(f"registry: {len(reg):,} sensors; input: {len(payloads):,} gateway payloads, "
          f"{n:,} readings over {args.span} min of event time")

    with tempfile.TemporaryDirectory(prefix="sink-bench-") as tmp, \
            VictoriaMetrics(Path(tmp) / "vm", cpus=db_cpus, nice=19 if args.share else 0) as vm:
        where = "unpinned"
        if db_cpus:
            where = f"CPU {args.db_cpu}, this process on " + (
                "any CPU, the database at nice 19" if args.share
                else f"CPU {','.join(map(str, sorted(mine)))}")
        print(f"database: victoria-metrics at {vm.url} (InfluxDB line protocol, /api/v2/write); "
              f"{where}")
        rate1, st1 = write_rate(vm.url, reg, args.points, "0s")
        runs: dict[str, list[Run]] = {"off": [], "on": [], "every": []}
        for _ in range(args.rounds):          # interleaved, so a noisy moment hits all three
            runs["off"].append(Run(reg, rules, payloads, n, args.chunk, None, "0s"))
            runs["on"].append(Run(reg, rules, payloads, n, args.chunk, vm.url, "0s"))
            runs["every"].append(Run(reg, rules, payloads, n, args.chunk, vm.url, args.every))

    best = {k: max(v, key=lambda r: r.cpu) for k, v in runs.items()}
    wall = {k: max(r.wall for r in v) for k, v in runs.items()}
    off = best["off"]
    print()
    print(f"(1) sink write rate: {rate1:>12,.0f} points/s  ({st1['written']:,} points, "
          f"{st1['writes']:,} writes, {st1['write_failures']} failed, "
          f"dropped {sum(st1['dropped'].values())})")
    print(f"(2) pipeline, best of {args.rounds}:  readings/CPU-s  vs off   readings/s (wall)  "
          "points written  drain after")
    print(f"    sink off:              {off.cpu:>12,.0f}    1.00x  {wall['off']:>12,.0f}")
    for key, label in (("on", "sink on, every reading"), ("every", f"sink on, every {args.every}")):
        r = best[key]
        print(f"    {label:23}{r.cpu:>12,.0f}    {r.cpu / off.cpu:.2f}x  {wall[key]:>12,.0f}  "
              f"{r.stats['written']:>14,}  {r.drain:8.2f} s   "
              f"dropped {sum(r.stats['dropped'].values())}")
    for key, label in (("on", "every reading"), ("every", f"every {args.every}")):
        if args.share:
            print(f"sink cost, {label}: {1 - wall[key] / wall['off']:.0%} of the pipeline's "
                  "readings/s, wall clock (target < 20 %)")
        else:
            print(f"sink cost, {label}: {1 - best[key].cpu / off.cpu:.0%} of the pipeline's "
                  "readings per CPU-second (target < 20 %)")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
