"""The distributed-runtime benchmark still runs end to end (--quick: its own tansu, a raw
kafka-python consumer, a naive Faust app, `cityops worker`, a paced producer) and reports every
figure. No timing is asserted: figures come from a full run on a quiet machine
(bench/kafka_bench.py, `make bench-kafka`)."""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"[\d,]+"

pytestmark = pytest.mark.broker


def test_kafka_bench_quick_runs_and_reports_ratios_and_latency(tmp_path):
    out_json = tmp_path / "kafka_bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "kafka_bench.py"), "--quick",
                          "--json", str(out_json)],
                         capture_output=True, text=True, timeout=400, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    rows = re.findall(rf"^\(([abc])\) .+? +({NUMBER}) +([\d.]+) +({NUMBER}) +([\d.]+)x +([\d.]+)x"
                      rf" +(\d+)% +({NUMBER})$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["a", "b", "c"], out
    assert all(int(r[1].replace(",", "")) > 0 and float(r[2]) > 0 for r in rows)
    assert rows[0][4] == "1.00", "(a) is the unit of the 'vs (a)' column"
    assert re.search(r" 0 forwarded,", out), "(c)'s input was produced on the streets' partitions"
    m = re.search(r"^\(d\) reading -> street-tier notice, (\d+) samples", out, re.MULTILINE)
    assert m and int(m[1]) > 0
    assert re.search(r"p50 [\d.]+ ms +p95 [\d.]+ ms +p99 [\d.]+ ms +max [\d.]+ ms", out)
    assert re.search(r"\(CPU busy \d+%\); lag \(all partitions\) max [\d,]+ records", out)
    targets = re.search(r"^targets \(per worker process\): (.+)$", out, re.MULTILINE)
    assert targets and len(re.findall(r": (?:met|MISSED) \(", targets[1])) == 3
    assert re.search(r"^command: .*kafka_bench\.py --quick --json ", out, re.MULTILINE)

    report = json.loads(out_json.read_text())
    for part in ("raw", "naive", "worker"):
        assert report[part]["records"] > 0 and report[part]["per_s"] > 0
    assert report["latency"]["samples"] > 0 and "p99_ms" in report["latency"]
    assert len(report["targets"]) == 3 and report["quick"] is True

    # nothing left running: the broker's port is closed, no process of the run talks to it
    port = int(re.search(r"^broker: tansu \S+ at 127\.0\.0\.1:(\d+)", out, re.MULTILINE)[1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert not [p for p in Path("/proc").glob("[0-9]*") if f"127.0.0.1:{port}" in _environ(p)]


def _environ(proc: Path) -> str:
    """The worker and the naive app get the broker's address in their environment, not argv."""
    try:
        return ((proc / "cmdline").read_bytes() + b" " + (proc / "environ").read_bytes()
                ).replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
