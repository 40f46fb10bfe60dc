"""The backtest benchmark still runs (small sizes) and reports its ratios. No timing is
asserted: the figures come from `make bench-backtest` (README, Backtest)."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_backtest_bench_runs_and_reports_the_ratio_to_replay():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "backtest_bench.py"),
                          "--sensors", "2000", "--readings", "20000", "--rounds", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    ratios = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(ratios) == {"chengdu, rainstorm 30 mm", "city, gas level 1 at 15",
                           "city, every rule differs"}
    assert all(len(r) == 3 and min(r) > 0 for r in ratios.values())   # one, two processes; two replays
    # one rule differs on the Chengdu data, every rule in the last row
    assert re.search(r"chengdu, rainstorm 30 mm +78,529 .* 1$", run.stdout, re.M)
    assert re.search(r"city, every rule differs .* (\d+)$", run.stdout, re.M)
