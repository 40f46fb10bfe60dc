"""Poison isolation (pipeline/shared/quarantine.py) in the live runtime, in process: a payload the
engine fails on is dead-lettered `poison`, the rest of its batch is evaluated (a gas alarm
next to it still fires), and the journal replay after a restart passes it over.

The failure comes from tests/poison_seam.py (no real input makes today's engine raise).
End to end through Mosquitto: tests/runtimes/test_hardening_mqtt.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.runtimes.live import LiveRuntime
from pipeline.shared.config import Settings, StateSettings
from pipeline.shared.store import ACKS, READINGS
from tests import poison_seam

GAS_ALONE = "gas-510104-000001"
NEIGHBOUR = "gas-510104-000002"


@pytest.fixture
def seam(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.core.engine.Engine._evaluate", poison_seam._evaluate_with_a_bug)


def live_runtime(state: Path) -> LiveRuntime:
    return LiveRuntime(Settings(state=StateSettings(path=state, snapshot_every="1h")))


def item(sensor: str, value: float, ts: int) -> list:
    return [f"cityops/readings/{sensor}",
            json.dumps({"sensor_id": sensor, "ts": ts, "value": value}).encode()]


@pytest.mark.parametrize("poison_first", [False, True], ids=["alarm-first", "poison-first"])
def test_a_poison_payload_costs_only_itself_and_is_not_replayed(tmp_path: Path, seam,
                                                                poison_first: bool) -> None:
    now = int(time.time() * 1000)
    alarm = item(GAS_ALONE, 55.0, now - 1000 if not poison_first else now)
    poison = item(NEIGHBOUR, poison_seam.POISON_VALUE, now - 500)
    quiet = [item(f"gas-510104-00000{i}", 1.0, now) for i in range(3, 6)]
    items = [alarm, *quiet, poison]
    rt = live_runtime(tmp_path / "state.sqlite")
    [seq] = rt.store.append_many([(READINGS, now, items)])
    out = rt._apply(READINGS, now, items, seq)

    fired = {(n["sensor_id"], n["state"], n["tier"]) for n in out.notices}
    assert {(GAS_ALONE, "firing", t) for t in ("street", "district", "dept", "city", "grid")} \
        == fired, out.notices
    [d] = out.dead_letters
    assert (d.reason, d.source, d.payload.encode()) == ("poison", poison[0], poison[1])
    assert "ZeroDivisionError" in d.detail and "quarantined" in d.detail
    assert rt.metrics["engine_errors"] == 1 and rt.engine.counters["dead.poison"] == 1
    for i in range(3, 6):          # the quiet ones were heard from: taken, not skipped
        assert rt.engine.last_seen[rt.engine.registry.index[f"gas-510104-00000{i}"]] == now
    rt.store.close()

    rt.lock.release()                              # kill -9 (the lock dies with the process)
    again = live_runtime(tmp_path / "state.sqlite")     # and start: the journal is replayed
    [(notices, dead)] = again._restore()
    assert again.metrics["engine_errors"] == 0, "the replay ran into the same failure"
    assert {(n["sensor_id"], n["state"], n["tier"]) for n in notices} == fired
    assert [(d.reason, d.payload.encode()) for d in dead] == [("poison", poison[1])]
    again.store.close()


def test_a_poison_ack_costs_only_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Acks go through the same isolation: one the engine fails on does not take the
    acknowledgement of another incident down with it."""
    now = int(time.time() * 1000)
    rt = live_runtime(tmp_path / "state.sqlite")
    out = rt._apply(READINGS, now, [item(GAS_ALONE, 55.0, now)])
    alert = out.notices[0]["alert_id"]
    book_ack = rt.engine.book.ack

    def failing(ack, notices, *rest):      # a bug that only this worker's acks find
        if ack.by == "w-bug":
            raise KeyError("w-bug")
        return book_ack(ack, notices, *rest)
    monkeypatch.setattr(rt.engine.book, "ack", failing)
    acks = [json.dumps({"alert_id": alert, "by": by, "tier": "grid", "ts": now}).encode()
            for by in ("w-bug", "w-510104020001-01")]
    [seq] = rt.store.append_many([(ACKS, now, acks)])
    out = rt._apply(ACKS, now, acks, seq)
    assert {n["state"] for n in out.notices} == {"acknowledged"}
    assert {n["acked_by"] for n in out.notices} == {"w-510104020001-01"}
    assert [(d.reason, d.payload.encode()) for d in out.dead_letters] == [("poison", acks[0])]
    rt.store.close()
