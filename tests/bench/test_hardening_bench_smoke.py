"""The soak and the attack suite still run end to end, briefly (their own Mosquitto and
`cityops run`), and report what the README quotes. No figure is asserted but the ones that
must hold on any machine: no crash, no notice differing from replay, every bad input a dead
letter (bench/soak.py, bench/attack.py)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.broker


def test_soak_runs_and_reports_slopes(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.25",
                          "--every", "3", "--out", str(out)],
                         capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["crashed"] and len(result["samples"]) >= 4
    assert set(result["slopes_per_hour"]) == {"rss_mb", "state_mb", "wal_mb", "broker_rss_mb",
                                              "open"}
    assert result["lifetimes"] == "1m"          # the packs' quiet periods cut (bench/soak.py)
    assert re.search(r"^WAL MB +[\d.]+ +[\d.]+ +[\d.]+ +[+-][\d.]+$", run.stdout, re.MULTILINE)


def test_attack_quick_runs_every_scenario_without_a_crash(tmp_path: Path) -> None:
    out = tmp_path / "attack.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "attack.py"), "--quick",
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["scenario"] for r in rows] == ["fuzz", "poison-array", "kill-9-outage",
                                             "broker-kill", "forged-acks", "idle-http"]
    for r in rows:
        assert (r["crashes"], r["missing"], r["extra"]) == (0, 0, 0), r
        assert r["dead"] == r["dead_replay"], r
        assert not r["note"].startswith("bench error"), r
