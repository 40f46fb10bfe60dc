"""The handling states in the engine (pipeline/core/handling.py) where a rule test cannot reach: a
snapshot between the resolve and the closing, a snapshot written before the handling states
existed, the time-to-close figures and the push reply's forms."""

from __future__ import annotations

import json

import msgspec
import pytest

from pipeline.core.ack_tokens import BadToken, read_reply
from pipeline.core.close_figures import CloseFigures, steps
from pipeline.core.engine import Engine, EngineSettings
from pipeline.core.models import Ack
from pipeline.core.registry import load as load_registry
from pipeline.shared.metrics import text
from rules.compiler import load_rules
from tests.engine_fixtures import as_version_1
from tests.support import ROOT

T0 = 1_782_885_600_000          # 2026-07-01T14:00:00+08:00
MIN = 60_000
SILENT = "gas-510104-000001"
NEIGHBOURS = ["gas-510104-000002", "gas-510104-000003", "gas-510104-000004", "gas-510104-000005"]


def engine() -> Engine:
    rs = load_rules([ROOT / "tests" / "rules" / "packs" / "abstest.yaml"]).select(["abstest.*"])
    return Engine(load_registry(None, rs.kinds), rs, EngineSettings(absence_scan_every="1m"))


def readings(at: int, sensors: list[str]) -> list[bytes]:
    return [json.dumps([{"sensor_id": s, "ts": at, "value": 0} for s in sensors]).encode()]


def silent_then_back(e: Engine) -> str:
    """gas-510104-000001 never heard: silent at 5m, acknowledged, heard at 7m (resolved)."""
    e.advance(T0)
    for at in (2 * MIN, 4 * MIN):
        e.ingest(readings(T0 + at, NEIGHBOURS))
    out = e.advance(T0 + 6 * MIN)
    [aid] = {n["alert_id"] for n in out.notices}
    e.ack([Ack(alert_id=aid, by="chunxi", tier="street", ts=T0 + 6 * MIN)])
    assert [n["state"] for n in e.ingest(readings(T0 + 7 * MIN, [SILENT])).notices][:1] == ["resolved"]
    return aid


def test_a_resolved_incident_awaiting_its_closing_survives_a_snapshot_unchanged() -> None:
    """Found by the fuzzer: restored, the resolved incident's text was written again from its
    sensor's track — that of the sensor's next silence (最后上报 the reading that resolved the
    first, not 从未上报)."""
    kept, restored = engine(), engine()
    aid = silent_then_back(kept)
    silent_then_back(restored)
    for e in (kept, restored):                  # silent again from 7m: a new incident at 12m
        for at in (8, 10, 12):
            e.ingest(readings(T0 + at * MIN, NEIGHBOURS))
        again = [n for n in e.advance(T0 + 13 * MIN).notices if n["sensor_id"] == SILENT]
        assert again and again[0]["alert_id"] != aid and "最后上报：2026-07-01T14:07" in again[0]["summary"]
    blob = restored.snapshot()
    restored = engine()
    assert restored.restore(blob) == {}
    on_site = Ack(alert_id=aid, by="chunxi", tier="street", ts=T0 + 14 * MIN, state="on_site")
    want = kept.ack([on_site]).notices
    got = restored.ack([on_site]).notices
    assert want and got == want
    assert "自接入以来从未上报" in got[0]["summary"]


def test_a_snapshot_from_before_the_handling_states_restores() -> None:
    """Rows of older snapshots (version 1, positional) end at `fired` (22 fields) and have no
    `closable` bucket."""
    e = engine()
    e.advance(T0)
    e.ingest(readings(T0 + 2 * MIN, NEIGHBOURS))
    out = e.advance(T0 + 6 * MIN)
    [aid] = {n["alert_id"] for n in out.notices}
    state = msgspec.msgpack.decode(e.snapshot())
    as_version_1(state, incident_fields=22)
    old = engine()
    assert old.restore(msgspec.msgpack.encode(state)) == {}
    closed = old.ack([Ack(alert_id=aid, by="chunxi", tier="street", ts=T0 + 7 * MIN,
                          state="closed", note="传感器故障")]).notices
    assert {n["state"] for n in closed} == {"closed"}
    assert set(closed[0]["timeline"]) == {"fired", "acknowledged", "closed"}


def test_time_to_close_per_incident_and_aggregated() -> None:
    e = engine()
    aid = silent_then_back(e)
    e.ack([Ack(alert_id=aid, by="w-510104020001-01", tier="grid", ts=T0 + 8 * MIN,
               state="handled", note="已更换电池")])
    out = e.ack([Ack(alert_id=aid, by="chunxi", tier="street", ts=T0 + 20 * MIN, state="closed")])
    closed = out.notices
    assert len(closed) == 2                         # street and dept: counted once
    started = T0 + 5 * MIN
    assert steps(closed[0]) == {"acknowledged": (6 * MIN - 5 * MIN) / 1000,
                                "handled": 3 * MIN / 1000, "closed": (20 * MIN) / 1000 - 300}
    assert closed[0]["started_at"].startswith("2026-07-01T14:05") and started
    figures = CloseFigures()
    figures.observe(closed)
    lines = text(figures).splitlines()          # prometheus-client: labels sorted by name
    assert ('cityops_time_to_close_seconds_count{category="device",district="510104",step="closed",'
            'street="510104020",tier="street"} 1.0') in lines
    assert ('cityops_time_to_close_seconds_sum{category="device",district="510104",step="closed",'
            'street="510104020",tier="street"} 900.0') in lines
    summary = "\n".join(figures.summary())
    assert "day      2026-07-01       1 closed" in summary and "closed 15.0/15.0" in summary


def test_a_push_reply_is_the_token_or_an_object_with_a_state() -> None:
    assert read_reply(b" tok.sig \n").token == "tok.sig"
    r = read_reply('{"token": "tok.sig", "state": "handled", "note": "已关阀"}'.encode())
    assert (r.token, r.state, r.note) == ("tok.sig", "handled", "已关阀")
    for bad in (b'{"token": "t", "state": "arrived"}', b'{"state": "on_site"}', b'{"token": '):
        with pytest.raises(BadToken) as exc:
            read_reply(bad)
        assert exc.value.reason == "malformed"
