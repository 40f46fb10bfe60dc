"""Backtest against plain replay on the same history, in the same run.

    .venv/bin/python bench/backtest_bench.py                 # make bench-backtest
    .venv/bin/python bench/backtest_bench.py --readings 100000 --rounds 1   # a quick look

For each history it times, alternating, best of ``--rounds``:

- decoding alone: what a plain replay spends reading and decoding the history (the CSV rows
  into readings; the JSONL lines through ``wire.decode_batch``), nothing evaluated;
- plain replay: ``pipeline.core.replay.replay`` of the CURRENT rules, and of the NEW ones (a fresh
  engine each; notices written, as JSON lines, to a sink that keeps their digest): the two
  replays a backtest answers for;
- backtest: ``pipeline.core.backtest.backtest`` of NEW against CURRENT (both engines built inside
  the timing) and its text report, in one process (``--jobs 1``: one decode for both engines)
  and in two (``--jobs 2``: the new rules' engine in a forked process on the other CPU);

and prints backtest / replay (of the current rules), both ways, backtest / the two replays
(the target: within 10 %, README "Backtest"), and decoding / replay
(how much of a replay a shared decode can save). The histories and changes:

- chengdu: the bundled UCI Chengdu CSV, 2010-2015, every built-in pack; NEW = the rainstorm
  signal at 30 mm instead of 50 mm (one rule differs);
- city: the engine bench's gateway payloads (JSONL) on a generated registry
  (``--sensors``, ``--readings``), every built-in pack; NEW = gas level 1 at 15 %LEL (the gas
  rules differ);
- city, every rule differs: the same history, NEW with its own routing tree (reminders every
  5 minutes): both engines run every rule — the worst case.

Rules and the registry are loaded before the timing (both commands load them the same way).
JSON: bench/out/backtest_bench.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine_bench import make_payloads  # noqa: E402  the engine bench's reading mix
from silent_bench import Digest  # noqa: E402  a notices sink that keeps their digest
from pipeline.core import history  # noqa: E402
from pipeline.core import wire
from pipeline.core.backtest import Side, backtest  # noqa: E402
from pipeline.core.engine import Engine, EngineSettings  # noqa: E402
from pipeline.core.registry import load as load_registry  # noqa: E402
from pipeline.core.replay import DEMO_CSV, DEMO_MAP, ReplayStats, csv_readings, load_mapping, replay  # noqa: E402
from pipeline.tools.backtest_report import text  # noqa: E402
from pipeline.tools.registry_gen import generate  # noqa: E402
from rules.compiler import load_rules  # noqa: E402


def decode_only(path: Path, mapping) -> int:
    """What a replay does with the history before any engine sees it."""
    n = 0
    if mapping is not None:
        for rows in csv_readings(path, mapping, ReplayStats()):
            n += len(rows)
        return n
    with path.open("rb") as f:
        chunk: list[bytes] = []
        for raw in f:
            raw = raw.strip()
            if raw:
                chunk.append(raw)
            if len(chunk) >= 1000:
                n += len(wire.decode_batch(chunk, str(path))[0])
                chunk = []
        if chunk:
            n += len(wire.decode_batch(chunk, str(path))[0])
    return n


def opener(path: Path, mapping):
    def open_history():
        seen = history.Progress()
        if mapping is not None:
            return history.csv_batches(path, mapping, 1000, seen), seen
        return history.jsonl_batches(path, 1000, seen), seen
    return open_history


def measure(name: str, path: Path, mapping, reg, current, new, quorum: int, rounds: int) -> dict:
    settings = EngineSettings(time_quorum=quorum)
    best = {"decode": float("inf"), "replay": float("inf"), "replay_new": float("inf"),
            "backtest": float("inf"),
            "backtest_jobs2": float("inf")}
    info: dict = {}
    for _ in range(rounds):
        gc.collect()
        t = time.perf_counter()
        decode_only(path, mapping)
        best["decode"] = min(best["decode"], time.perf_counter() - t)

        for rules, key in ((current, "replay"), (new, "replay_new")):
            gc.collect()
            t = time.perf_counter()
            engine = Engine(reg, rules, settings)
            sink = Digest()
            stats = replay(engine, path, sink, mapping=mapping)
            best[key] = min(best[key], time.perf_counter() - t)
            info[f"{key}_notices"] = stats.notices

        for jobs, key in ((1, "backtest"), (2, "backtest_jobs2")):
            gc.collect()
            t = time.perf_counter()
            result = backtest(reg, Side("current", current), Side("new", new),
                              opener(path, mapping), settings, jobs=jobs)
            text(result, str(path), str(reg.tz.key))
            best[key] = min(best[key], time.perf_counter() - t)
        info.update(readings=result.readings, differing=len(result.differing),
                    notices_current=result.current.tally.notices,
                    notices_new=result.new.tally.notices)
    assert info["notices_current"] == info["replay_notices"], "the backtest's count is not the replay's"
    assert info["notices_new"] == info["replay_new_notices"], "the backtest's count is not the replay's"
    both = best["replay"] + best["replay_new"]
    row = {"history": name, **info, **{f"{k}_s": round(v, 3) for k, v in best.items()},
           "backtest_over_replay": round(best["backtest"] / best["replay"], 3),
           "jobs2_over_replay": round(best["backtest_jobs2"] / best["replay"], 3),
           "decode_over_replay": round(best["decode"] / best["replay"], 3),
           "backtest_over_two_replays": round(best["backtest"] / both, 3)}
    print(f"{name:26} {info['readings']:>9,} {best['decode']:7.2f} {best['replay']:7.2f} "
          f"{best['backtest']:7.2f} {best['backtest_jobs2']:7.2f}   {row['decode_over_replay']:5.2f}"
          f"   {row['backtest_over_replay']:5.2f}   {row['jobs2_over_replay']:5.2f}   "
          f"{row['backtest_over_two_replays']:6.2f}   {info['differing']:>3}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sensors", type=int, default=20_000, help="generated registry size")
    ap.add_argument("--readings", type=int, default=400_000, help="readings of the generated history")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--registry-dir", type=Path, default=Path(tempfile.gettempdir()) / "cityops-bench")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cityops-backtest-bench-"))
    rain30 = tmp / "rain30.yaml"
    rain30.write_text("weather:\n  params: {rain_signal_mm: 30}\n")
    gas15 = tmp / "gas15.yaml"
    gas15.write_text("gas:\n  params: {level1_lel: 15}\n")
    routing = tmp / "routing.yaml"
    tree = (ROOT / "rules" / "routing.yaml").read_text(encoding="utf-8")
    routing.write_text(tree.replace("remind_every: 10m", "remind_every: 5m", 1), encoding="utf-8")

    current = load_rules()
    print(f"{'history':26} {'readings':>9} {'decode':>7} {'replay':>7} {'bt -j1':>7} {'bt -j2':>7}"
          f"   dec/rp   j1/rp   j2/rp   j1/(rp+rp new)   differing rules   (seconds; ratios to replay)")
    rows = []
    chengdu = load_registry(None, current.kinds)
    rows.append(measure("chengdu, rainstorm 30 mm", DEMO_CSV, load_mapping(DEMO_MAP), chengdu,
                        current, load_rules(params=rain30), 1, args.rounds))

    folder = args.registry_dir / f"registry-{args.sensors}"
    if not (folder / "registry.yaml").exists():
        print(f"generating a {args.sensors:,}-sensor registry in {folder} …", flush=True)
        generate(folder, args.sensors, seed=1)
    reg = load_registry(folder, current.kinds)
    city = tmp / "city.jsonl"
    city.write_bytes(b"\n".join(make_payloads(reg, args.readings, 2 * 3_600_000)) + b"\n")
    rows.append(measure("city, gas level 1 at 15", city, None, reg, current,
                        load_rules(params=gas15), 2, args.rounds))
    rows.append(measure("city, every rule differs", city, None, reg, current,
                        load_rules(routing=routing), 2, args.rounds))
    for p in (rain30, gas15, routing, city):
        p.unlink()
    tmp.rmdir()
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "backtest_bench.json").write_bytes(orjson.dumps(
        {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
         "sensors": args.sensors, "rounds": args.rounds, "rows": rows}, option=orjson.OPT_INDENT_2))
    print(json.dumps({r["history"]: [r["backtest_over_replay"], r["jobs2_over_replay"],
                                     r["backtest_over_two_replays"]] for r in rows}))


if __name__ == "__main__":
    main()
