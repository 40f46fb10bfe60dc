"""The live-runtime benchmark still runs end to end (--quick: its own Mosquitto, two `cityops run`
processes, publishers, a baseline subscriber) and reports every figure. No timing is asserted:
figures come from a full run on a quiet machine (bench/runtime_bench.py)."""

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"[\d,]+"

pytestmark = pytest.mark.broker


def test_runtime_bench_quick_runs_and_reports_throughput_and_latency():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "runtime_bench.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    table = out[out.index("(a) bare paho subscriber"):]
    rows = re.findall(rf"^ +(live|drain): .+? +({NUMBER}) +({NUMBER})(?: +([\d.]+)x)?$", table,
                      re.MULTILINE)
    assert [r[0] for r in rows] == ["live", "drain", "live", "drain"], table
    assert all(r[3] for r in rows[2:]), "(b) rows carry their ratio to (a)"
    assert re.search(rf"^\(b\) live: publishers {NUMBER} payloads/s", out, re.MULTILINE)
    assert re.search(r"^\(b\) drain: engine [\d.]+ s of [\d.]+ s", out, re.MULTILINE)
    m = re.search(r"\(c\) publish -> street-tier notice, (\d+) samples", out)
    assert m and int(m[1]) > 0
    assert re.search(r"p50 [\d.]+ ms +p95 [\d.]+ ms +p99 [\d.]+ ms +max [\d.]+ ms", out)
    assert re.search(r"^targets: ", out, re.MULTILINE)
    assert re.search(r"^command: .*runtime_bench\.py --quick$", out, re.MULTILINE)
    # nothing left running: the broker's port is closed and no `cityops run --broker` for it
    port = int(re.search(r"^broker: mosquitto \S+ at mqtt://127\.0\.0\.1:(\d+)", out,
                         re.MULTILINE)[1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert not [p for p in Path("/proc").glob("[0-9]*") if f"127.0.0.1:{port}" in _cmdline(p)]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
