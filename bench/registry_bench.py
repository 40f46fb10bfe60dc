"""Registry load time and resident memory at city scale, and what a worker owning one partition holds.

    .venv/bin/python bench/registry_bench.py                       # 1,000,000 sensors
    .venv/bin/python bench/registry_bench.py --sensors 5000000 --partitions 8

Each figure is taken in a fresh process (resident memory is the process's RSS after the step
minus before it, imports done):
  - cold: parse registry.yaml + sensors.csv and write the compiled form (pipeline/core/registry_cache.py);
  - warm: the compiled form present: digest the files, map the columns;
  - partition: what `cityops worker` does at start for one of ``--partitions`` partitions: digest
    the registry's files (the set's digest two workers compare), warm load, route streets to
    partitions, its acknowledging users, take that partition's sensors (``Registry.subset``) and
    build its engine with every built-in pack, then give back the mapped pages the subset
    touched (``registry_cache.release_pages``, as the worker does). Resident is reported after
    each step, so what grows with the city (the partition map, 2 B a sensor) and what grows
    with the share (columns, index, engine) show apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(mode: str, folder: Path, partitions: int) -> dict:
    import numpy as np  # noqa: F401  imports before the first RSS reading

    from pipeline.shared.reading_router import ReadingRouter
    from pipeline.core.engine import Engine
    from pipeline.core.identity import AckUsers
    from pipeline.core.registry import load
    from pipeline.core.registry_cache import release_pages
    from rules.compiler import load_rules
    from pipeline.core.reload import files_digest
    rules = load_rules()
    before = rss()
    t = time.perf_counter()
    if mode == "partition":             # CityWorker digests the set's files before loading
        files_digest([folder / "registry.yaml", folder / "sensors.csv"])
    reg = load(folder, rules.kinds)
    loaded = time.perf_counter() - t
    out = {"sensors": len(reg), "load_s": loaded, "load_rss": rss() - before}
    if mode == "partition":
        router = ReadingRouter(reg, partitions)
        users = AckUsers(reg)
        release_pages(reg)              # (for the figure: the map read every sensor's grid)
        out["router_rss"] = rss() - before
        members = np.flatnonzero(router.partition_of == 0)
        sub = reg.subset(members)
        Engine(sub, rules)
        release_pages(reg)              # as the worker does once its partition is taken
        out.update(share=len(sub), start_s=time.perf_counter() - t, start_rss=rss() - before,
                   grids_held=len(getattr(reg.grid_places, "_made", reg.grid_places)),
                   grids=len(reg.grid_places), scopes_held=len(dict.keys(users.scopes)))
    return out


def run(mode: str, folder: Path, partitions: int, cache: Path) -> dict:
    env = {**os.environ, "CITYOPS_CACHE": str(cache)}
    res = subprocess.run([sys.executable, __file__, "--child", mode, "--folder", str(folder),
                          "--partitions", str(partitions)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sensors", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--registry-dir", type=Path, default=Path(tempfile.gettempdir()) / "cityops-bench")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.partitions)))
        return
    folder = args.registry_dir / f"registry-{args.sensors}"
    if not (folder / "registry.yaml").exists():
        from pipeline.tools.registry_gen import generate
        print(f"generating a {args.sensors:,}-sensor registry in {folder} …", flush=True)
        generate(folder, args.sensors, seed=1)
    with tempfile.TemporaryDirectory(prefix="cityops-cache-") as cache:
        cold = run("load", folder, args.partitions, Path(cache))
        warm = run("load", folder, args.partitions, Path(cache))
        part = run("partition", folder, args.partitions, Path(cache))
    n = cold["sensors"]
    print(f"registry: {n:,} sensors ({folder})")
    for name, r in (("cold (parse + compile)", cold), ("warm (compiled, mapped)", warm)):
        print(f"  {name:<24} {r['load_s']:6.2f} s, {r['load_rss'] / n:6.1f} B/sensor resident "
              f"({r['load_rss'] / 2**20:,.0f} MiB)")
    share, mib = part["share"], 2**20
    eighth = cold["load_rss"] / args.partitions
    print(f"  worker, partition 0 of {args.partitions}: {share:,} sensors ({share / n:.1%}), started "
          f"in {part['start_s']:.2f} s, {part['start_rss'] / mib:,.0f} MiB resident = "
          f"{part['start_rss'] / cold['load_rss']:.3f} of the parsed registry's "
          f"(1/{args.partitions} of it: {eighth / mib:,.0f} MiB)")
    print(f"    after digest + load {part['load_rss'] / mib:,.0f} MiB, + partition map and ack users "
          f"{(part['router_rss'] - part['load_rss']) / mib:,.0f} MiB "
          f"({(part['router_rss'] - part['load_rss']) / n:.1f} B per sensor of the city), "
          f"+ its share {(part['start_rss'] - part['router_rss']) / mib:,.0f} MiB "
          f"({(part['start_rss'] - part['router_rss']) / share:.0f} B per sensor it owns); "
          f"grids built {part['grids_held']:,} of {part['grids']:,}, roster scopes {part['scopes_held']}")
    print(f"    within 1/{args.partitions} of the parsed registry: "
          f"{'yes' if part['start_rss'] <= eighth else 'no'} "
          f"({(eighth - part['start_rss']) / mib:+,.0f} MiB to spare)")


if __name__ == "__main__":
    main()
