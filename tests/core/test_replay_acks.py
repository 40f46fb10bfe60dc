"""`cityops replay --ack-after D`: replayed incidents acknowledged D after they fire, at the
event time, so no reminder or escalation past D goes out."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

CITYOPS = str(Path(sys.executable).parent / "cityops")
T0 = datetime(2026, 7, 1, 14, 0, tzinfo=timezone(timedelta(hours=8)))
GAS = "gas-510104-000001"       # lives alone: a leak is orange at 28 %LEL


def _readings(path: Path) -> Path:
    """A leak that stays for two hours: one reading a minute."""
    with path.open("w") as f:
        for minute in range(121):
            ts = (T0 + timedelta(minutes=minute)).isoformat()
            f.write(json.dumps({"sensor_id": GAS, "ts": ts, "value": 28.0}) + "\n")
    return path


def _replay(tmp_path: Path, *flags: str) -> list[dict]:
    r = subprocess.run([CITYOPS, "replay", str(_readings(tmp_path / "leak.jsonl")), "--rules",
                        "gas.leak", *flags], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


@pytest.fixture(scope="module")
def unacknowledged(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _replay(tmp_path_factory.mktemp("plain"))


def test_without_acks_the_leak_escalates_and_reminds(unacknowledged: list[dict]) -> None:
    states = {n["state"] for n in unacknowledged}
    assert {"escalated", "reminder"} <= states and "acknowledged" not in states


def test_ack_after_acknowledges_at_the_event_time(tmp_path: Path, unacknowledged: list[dict]) -> None:
    notices = _replay(tmp_path, "--ack-after", "3m")
    acked = [n for n in notices if n["state"] == "acknowledged"]
    assert acked and {n["acked_by"] for n in acked} == {"replay"}
    assert {datetime.fromisoformat(n["ts"]) for n in acked} == {T0 + timedelta(minutes=3)}
    # what was due before the ack still happened; nothing after it
    for n in notices:
        if n["state"] in ("escalated", "reminder"):
            assert datetime.fromisoformat(n["ts"]) < T0 + timedelta(minutes=3), n
    before = [n for n in unacknowledged if datetime.fromisoformat(n["ts"]) < T0 + timedelta(minutes=3)]
    assert [n for n in notices if n["state"] != "acknowledged"] == before
