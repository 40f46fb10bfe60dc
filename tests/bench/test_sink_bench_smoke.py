"""The history sink benchmark still runs end to end (tiny sizes: its own VictoriaMetrics, the
engine with the sink off and on) and reports every figure. No timing is asserted: figures come
from a full run on a quiet machine (`make bench-sink`, README)."""

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"[\d,]+"

pytestmark = pytest.mark.broker


def test_sink_bench_runs_and_reports_write_rate_and_cost() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "sink_bench.py"), "--sensors",
                          "3000", "--readings", "20000", "--points", "20000", "--rounds", "1",
                          "--span", "5"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    m = re.search(rf"^\(1\) sink write rate: +{NUMBER} points/s +\(({NUMBER}) points, "
                  r".*dropped 0\)", out, re.MULTILINE)
    assert m and m[1] == "20,000", out
    assert re.search(rf"^    sink off: +{NUMBER} +1\.00x +{NUMBER}$", out, re.MULTILINE), out
    rows = re.findall(rf"^    sink on, (every reading|every 5m) +{NUMBER} +[\d.]+x +{NUMBER} +"
                      rf"({NUMBER}) +[\d.]+ s +dropped 0$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["every reading", "every 5m"], out
    written = {k: int(v.replace(",", "")) for k, v in rows}
    assert 0 < written["every 5m"] < written["every reading"]      # down-sampling writes fewer
    assert re.search(r"^sink cost, every reading: -?\d+% ", out, re.MULTILINE)
    # its database is gone
    port = int(re.search(r"^database: victoria-metrics at http://127\.0\.0\.1:(\d+)", out,
                         re.MULTILINE)[1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
