"""`cityops route` and `cityops replay` with the community tier and the handling states."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

ROUTING = ROOT / "tests" / "rules" / "routing" / "community.yaml"
T0 = 1_782_885_600_000          # 2026-07-01T14:00:00+08:00
MIN = 60_000


def cityops(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_route_shows_the_community_and_its_chain() -> None:
    done = cityops("route", "--rule", "waterlogging.depth", "--sensor", "wl-510104-000001",
                   "--severity", "blue", "--routing", str(ROUTING), "--at", "2026-07-01T10:00")
    assert done.returncode == 0, done.stderr
    assert "route: waterlogging-community-first" in done.stdout
    assert "社区   community/510104020001 和平社区" in done.stdout
    assert "street/" not in done.stdout
    done = cityops("route", "--rule", "gas.leak", "--sensor", "gas-510104-000001",
                   "--routing", str(ROUTING), "--at", "2026-07-01T10:00")
    assert done.returncode == 0, done.stderr
    assert ("nobody on site: to the community (社区) after 3m, then to the street after 3m "
            "(the community chain)") in done.stdout
    assert "reminders every 2m until someone is on site, 3 at most" in done.stdout


def test_replay_takes_a_handling_log_and_sums_up_the_time_to_close(tmp_path: Path) -> None:
    """The leak at a resident living alone fires at 14:00 (route gas-alone-to-the-door); nobody
    is on site, so it climbs to the community at 14:03 and the street at 14:06; the worker is on
    site at 14:07 and has handled it at 14:09; it resolves at 14:12 (clear_for 2m); the street
    closes it at 14:20. The same bytes each run."""
    readings = tmp_path / "readings.jsonl"
    rows = [(0, 27.5), (10, 2.0), (12, 2.0)]
    readings.write_text("".join(json.dumps({"sensor_id": "gas-510104-000001", "ts": T0 + m * MIN,
                                            "value": v}) + "\n" for m, v in rows))
    log = tmp_path / "handling.jsonl"
    incident = {"rule_id": "gas.leak", "sensor_id": "gas-510104-000001"}
    worker = {"by": "w-510104020001-01", "tier": "grid"}
    log.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"ts": "2026-07-01T14:07:00+08:00", "state": "on_site", **worker, **incident},
        {"ts": T0 + 9 * MIN, "state": "handled", "note": "已关阀", **worker, **incident},
        {"ts": T0 + 20 * MIN, "state": "closed", "by": "chunxi", "tier": "street", **incident}]))
    outs = []
    for run in (1, 2):
        out = tmp_path / f"notices-{run}.jsonl"
        done = cityops("replay", str(readings), "--handling", str(log), "--rules", "gas.*",
                       "--routing", str(ROUTING), "--time-quorum", "1", "--out", str(out))
        assert done.returncode == 0, done.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    notices = [json.loads(line) for line in outs[0].decode().splitlines()]
    assert [n["state"] for n in notices if n["tier"] == "grid"] == [
        "firing", "reminder", "escalated", "reminder", "escalated", "reminder", "on_site",
        "handled", "resolved", "closed"]
    climbs = [(n["ts"][11:16], n["tier"]) for n in notices if n["state"] == "escalated"
              and n["tier"] in ("community", "street")]
    assert climbs == [("14:03", "community"), ("14:06", "community"), ("14:06", "street")]
    assert "time to close (minutes from firing: mean / longest):" in done.stderr
    assert ("street   510104020        1 closed  acknowledged 7.0/7.0  on_site 7.0/7.0  "
            "handled 9.0/9.0  closed 20.0/20.0") in done.stderr


def test_replay_names_a_bad_handling_line(tmp_path: Path) -> None:
    readings = tmp_path / "r.jsonl"
    readings.write_text(json.dumps({"sensor_id": "gas-510104-000001", "ts": T0, "value": 1}) + "\n")
    log = tmp_path / "h.jsonl"
    log.write_text('{"ts": 1, "state": "on_site", "by": "w", "tier": "grid", "alert_id": "x"}\n'
                   '{"ts": 2, "state": "arrived", "by": "w", "tier": "grid", "alert_id": "x"}\n')
    done = cityops("replay", str(readings), "--handling", str(log))
    assert done.returncode != 0
    assert f"{log}:2:" in done.stderr and "state" in done.stderr
    done = cityops("replay", str(readings), "--handling", str(tmp_path / "none.jsonl"))
    assert done.returncode != 0 and "no such file" in done.stderr
