"""Issue 12, item 5, in replay: one gateway's clock running ahead must not move everyone's time.

`cityops replay` of gateway payloads (JSONL) moves event time only as far as two of the sources
heard in the last 100 payloads have reached (`--time-quorum`, `--quorum-window`; README "Time
and order"). The history below is what the live test of the same item sends: a gas leak at a
resident living alone dips under its clear level at t0+1 s (clear_for 2 min), and one gateway
of the next street reports from a clock 4 minutes fast while the others keep reporting at the
real time. With the newest reading as the city's time (`--time-quorum 1`, what replay did) that
one reading resolved the leak 2 min early; with the quorum it stays firing. The CLI runs in a
subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_782_000_000_000
GAS_ALONE = "gas-510104-000001"            # gw-510104-0001
NEIGHBOURS = ["gas-510104-000006", "gas-510104-000012"]   # gw-510104-0002, gw-510104-0003
FAST = "gas-510104-000010"                 # no gateway: its own source, clock 4 min fast


def history(path: Path) -> Path:
    lines = [{"sensor_id": GAS_ALONE, "ts": T0, "value": 55.0},
             {"sensor_id": GAS_ALONE, "ts": T0 + 1000, "value": 1.0},
             {"sensor_id": FAST, "ts": T0 + 4 * 60_000, "value": 1.0}]
    for i in range(2, 30):                 # the others go on at the real time, a reading a second
        lines.append({"sensor_id": NEIGHBOURS[i % 2], "ts": T0 + i * 1000, "value": 1.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def replay(path: Path, *flags: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "replay", str(path), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def states(notices: list[dict]) -> list[tuple[str, str]]:
    return [(n["state"], n["ts"]) for n in notices
            if n["sensor_id"] == GAS_ALONE and n["tier"] == "street"]


def test_one_fast_clock_moves_no_one_elses_time(tmp_path: Path) -> None:
    path = history(tmp_path / "history.jsonl")
    assert [s for s, _ in states(replay(path))] == ["firing"]
    # the defect, for contrast: with the newest reading as the city's time, a reminder and the
    # resolve, though the history ends 29 s after the dip (clear_for is 2 min)
    assert [s for s, _ in states(replay(path, "--time-quorum", "1"))] == [
        "firing", "reminder", "resolved"]


def test_a_source_gone_quiet_leaves_the_window_and_time_moves_on(tmp_path: Path) -> None:
    """The other side of the choice: the quorum counts only sources heard in the last
    --quorum-window payloads, so when every gateway but one falls silent, time moves on that
    one's readings after the window and the silent ones are found silent (device.silent)."""
    path = tmp_path / "one-left.jsonl"
    lines = [{"sensor_id": s, "ts": T0, "value": 1.0} for s in [GAS_ALONE, *NEIGHBOURS]]
    lines += [{"sensor_id": GAS_ALONE, "ts": T0 + i * 60_000, "value": 1.0} for i in range(1, 200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))

    def silent(window: str) -> set[str]:
        return {n["sensor_id"] for n in replay(path, "--quorum-window", window)
                if n["rule_id"] == "device.silent" and n["state"] == "firing"}
    assert silent("5") >= set(NEIGHBOURS)
    # a quorum over every source ever heard would hold time at the silent ones' last reading
    assert not silent("100000") & set(NEIGHBOURS)
