"""Soak: `cityops run` at a steady 2,000 readings/s against a real Mosquitto for N minutes;
are its memory and its state files flat?

    .venv/bin/python bench/soak.py --minutes 20        # make soak (the README's figures)
    .venv/bin/python bench/soak.py --minutes 1         # a smoke run

One broker (deploy/mosquitto's tuning, anonymous, a free port of 127.0.0.1) and one
`python -m pipeline.cli run` with its defaults (snapshot every 30 s). A paced publisher sends
what the fixture registry's gateways send (bench/runtime_bench.py's mix: mostly quiet values,
a rare gas leak, camera violation or low battery, one malformed payload in 5,000) with current
timestamps, 10 rounds a second. Every 10 s it samples the runtime's RSS (/proc), the state
file and its WAL, and the runtime's own counters. The slopes are least-squares fits per hour
over the samples after the first quarter (the warm-up: caches, the first incidents, SQLite's
pages). Everything it starts is stopped at the end; JSON in bench/out/soak.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_bench import (  # noqa: E402  (the same broker, runtime and reading mix)
    BAD,
    ROOT,
    Runtime,
    _client,
    bench_config,
    reading,
    topics_of,
)

from bench.harness.brokers import Mosquitto  # noqa: E402
from pipeline.core.registry import load as load_registry  # noqa: E402
from rules.compiler import load_rules  # noqa: E402

TICKS_PER_S = 10
# An incident's life in the built-in packs ends after up to an hour of quiet (resolve_after,
# clear_for; a flapping incident waits out its 30 min window), and the mix's gas sensors, which
# report every second or so, leak often enough to keep flapping: in 20 minutes the population of
# open incidents only rises, and memory with it. The soak asks whether anything *else*
# accumulates, so by default it cuts those durations to LIFETIME: the open incidents reach their
# plateau inside the warm-up (--real-lifetimes keeps the packs as they are).
LIFETIME = "1m"
_QUIET = re.compile(r"^(\s*(?:resolve_after|clear_for):\s*)\S+", re.M)
_FLAPPING = re.compile(r"(flapping:\s*\{\s*window:\s*)[^},\s]+")


def short_lived_packs(into: Path) -> Path:
    """The built-in packs with every ``resolve_after``, ``clear_for`` and flapping window cut
    to LIFETIME."""
    into.mkdir()
    for pack in sorted((ROOT / "rules" / "packs").glob("*.yaml")):
        text = _QUIET.sub(rf"\g<1>{LIFETIME}", pack.read_text())
        (into / pack.name).write_text(_FLAPPING.sub(rf"\g<1>{LIFETIME}", text))
    return into


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def size_mb(path: Path) -> float:
    return path.stat().st_size / 2**20 if path.exists() else 0.0


def slope_per_hour(samples: list[dict], key: str) -> float:
    """Least-squares slope of ``key`` against time, per hour."""
    xs = [s["t"] for s in samples]
    ys = [s[key] for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 3600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--rate", type=int, default=2000, help="readings per second")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--real-lifetimes", action="store_true",
                    help="keep the packs' resolve_after/clear_for (open incidents rise for an hour)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "soak.json")
    args = ap.parse_args()

    packs = None
    rnd = random.Random(11)
    samples: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cityops-soak-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker", config=bench_config()).start()
        if not args.real_lifetimes:
            packs = short_lived_packs(work / "packs")
        rules = load_rules([packs] if packs else None)
        reg = load_registry(None, rules.kinds)
        groups = topics_of(reg)
        rt = Runtime(broker.url, work, "soak",
                     {"CITYOPS_PACKS": json.dumps([str(packs)])} if packs else {})
        pub = _client("soak")
        try:
            rt.start()
            assert rt.proc is not None
            host, port = broker.url.removeprefix("mqtt://").split(":")
            pub.connect(host, int(port))
            pub.loop_start()
            state = work / "soak-state.sqlite"
            wal = Path(f"{state}-wal")
            per_tick = args.rate / TICKS_PER_S
            cycle = itertools.cycle(range(len(groups)))
            start = time.monotonic()
            end = start + args.minutes * 60
            next_sample = start
            sent = payloads = 0
            tick = 0
            while (now := time.monotonic()) < end:
                if rt.proc.poll() is not None:
                    raise RuntimeError(f"cityops run exited with {rt.proc.returncode}\n{rt.tail()}")
                ts = int(time.time() * 1000)
                due = per_tick * (tick + 1)
                while sent < due:      # a group at most once a tick: its readings' ts only grow
                    topic, members = groups[next(cycle)]
                    payloads += 1
                    if payloads % 5000 == 0:
                        pub.publish(topic, BAD, qos=1)
                        continue
                    batch = [reading(reg, rnd, i, ts, incidents=True) for i in members]
                    pub.publish(topic, orjson.dumps(batch if len(batch) > 1 else batch[0]), qos=1)
                    sent += len(batch)
                tick += 1
                if now >= next_sample:
                    m = rt.metrics()
                    samples.append({
                        "t": round(now - start, 2), "rss_mb": rss_mb(rt.proc.pid),
                        "state_mb": size_mb(state), "wal_mb": size_mb(wal),
                        "broker_rss_mb": rss_mb(broker.pid) if broker.pid else float("nan"),
                        "sent": sent, "taken": m.get("cityops_readings_total", 0.0),
                        "inbox": m.get("cityops_inbox_depth", 0.0),
                        "open": m.get("cityops_open_incidents", 0.0),
                        "journal_entries": m.get("cityops_journal_entries", 0.0)})
                    s = samples[-1]
                    print(f"{s['t']:7.0f} s  RSS {s['rss_mb']:6.1f} MB  state {s['state_mb']:6.2f} MB"
                          f"  WAL {s['wal_mb']:6.2f} MB  sent {sent:>9,}  taken {s['taken']:>11,.0f}"
                          f"  inbox {s['inbox']:5.0f}  open {s['open']:3.0f}", flush=True)
                    next_sample += args.every
                time.sleep(max(0.0, start + tick / TICKS_PER_S - time.monotonic()))
            crashed = rt.proc.poll() is not None
        finally:
            pub.loop_stop()
            rt.stop()
            broker.stop()
    steady = samples[len(samples) // 4:] if len(samples) >= 8 else samples
    minutes = samples[-1]["t"] / 60 if samples else 0
    result = {
        "minutes": round(minutes, 1), "rate": args.rate, "samples": samples,
        "readings_sent": sent, "crashed": crashed,
        "slopes_per_hour": {k: round(slope_per_hour(steady, k), 2)
                            for k in ("rss_mb", "state_mb", "wal_mb", "broker_rss_mb", "open")},
        "lifetimes": "as in the packs" if args.real_lifetimes else LIFETIME,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    first, last = samples[0], samples[-1]
    print(f"\nsoak: {minutes:.1f} min at {args.rate:,} readings/s, {sent:,} readings sent, "
          f"{last['taken']:,.0f} taken; crashed: {crashed}")
    print(f"{'':14}{'first':>9}{'last':>9}{'max':>9}{'slope/h (after warm-up)':>26}")
    for key, name in (("rss_mb", "RSS MB"), ("state_mb", "state MB"), ("wal_mb", "WAL MB"),
                      ("broker_rss_mb", "broker RSS MB"), ("open", "open incidents")):
        print(f"{name:14}{first[key]:9.2f}{last[key]:9.2f}{max(s[key] for s in samples):9.2f}"
              f"{result['slopes_per_hour'][key]:+26.2f}")
    print(f"(JSON: {args.out})")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
