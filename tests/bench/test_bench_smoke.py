"""The engine benchmark still runs (tiny size) and reports its figures. No timing is asserted:
figures come from `make bench` on a quiet machine (README, Performance)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_bench_runs_and_reports_throughput_and_state():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "engine_bench.py"),
                          "--sensors", "3000", "--readings", "30000", "--span", "5"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert re.search(r"engine \(decode \+ all built-in packs\): +[\d,]+ readings/s per core", out)
    assert re.search(r"engine state: \d+ bytes per sensor", out)
    m = re.search(r"([\d,]+) notices, ([\d,]+) dead letters", out)
    assert m and int(m[2].replace(",", "")) > 0        # the bad payloads were dead-lettered
