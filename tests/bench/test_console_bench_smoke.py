"""The console benchmark still runs end to end (--quick: its own Mosquitto, `cityops console`,
Chromium) and reports every figure. No timing is asserted: figures come from a full run
(bench/console_bench.py, `make bench-console`)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.broker


def test_console_bench_quick_runs_and_reports_every_figure():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "console_bench.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"^\(1\) 1,000 open incidents in the console in [\d.]+ s", out, re.M), out
    assert re.search(r"^\(2\) street page first render: median [\d.]+ ms, p99 [\d.]+ ms", out, re.M)
    m = re.search(r"^\(3\) notice -> street page: .*\((\d+) of (\d+) new rows seen\)", out, re.M)
    assert m and int(m[1]) == int(m[2]) > 0, out            # every new row reached the screen
    assert len(re.findall(r"^\(4\) console CPU, .+: [\d.]+ s/s at \d+ notices/s", out, re.M)) == 3, out
