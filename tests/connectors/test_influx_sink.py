"""The InfluxDB history sink against a real line-protocol server (VictoriaMetrics, bench/harness/tsdb.py).

Everything goes through the real influxdb-client over HTTP and is read back from the server's
export and compared point by point with what was sent: measurement (``{measurement}_{field}``
there), tags, value, event-time timestamp. The expected points are worked out here from the
registry and the notices themselves, not with the sink's code.

Outages are real: the server is stopped (SIGTERM: VictoriaMetrics keeps what it acknowledged),
frozen (SIGSTOP: a slow database, writes time out), or never started (a port nobody listens
on). After each, every point is asserted present; the full-buffer test asserts which points were
dropped and that the counter says so.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest

from bench.harness.brokers import Mosquitto, Subscriber, free_port, publish
from bench.harness.tsdb import Point, VictoriaMetrics
from connectors.influx import InfluxSink
from pipeline.core.close_figures import closed_fields
from pipeline.core.engine import Engine
from pipeline.core.registry import Registry
from pipeline.shared.config import HttpSettings, InfluxSettings, MqttSettings, StateSettings, load_settings
from pipeline.shared.metrics import text
from rules.yamlfile import ConfigError
from tests.support import iso_ms, reading_point, wait_until

T0 = 1_782_885_600_000             # 2026-07-01T14:00:00+08:00, on a minute
GAS_ALONE = "gas-510104-000001"    # lives alone: 55 %LEL is a red alert to every tier
EVENT_KINDS = {"site_camera", "tower_crane", "manhole_cover", "door_magnet"}


def quick(url: str | None, **kw: Any) -> InfluxSettings:
    """Test settings: small batches, short flush and backoff."""
    base = {"url": url, "token": "test-token", "org": "cityops", "bucket": "cityops",
            "batch_size": 200, "flush_interval": "100ms", "retry_initial": "100ms",
            "retry_max": "500ms", "timeout": "2s"}
    return InfluxSettings(**{**base, **kw})


def alert_points(n: dict) -> set[Point]:
    """What a notice must look like: measurement ``alerts``, its rule, severity, state, tier,
    target and place as labels; alert_id (a string: 0 in VictoriaMetrics), seq, value,
    threshold and, acknowledged, the seconds from its start."""
    tags = {"acked_tier": n["acked_tier"], "category": n["category"],
            "community": n["community"], "district": n["district"], "grid": n["grid"],
            "kind": n["kind"], "rule": n["rule_id"], "sensor": n["sensor_id"],
            "severity": n["severity"], "state": n["state"], "street": n["street"],
            "target": n["target"], "tier": n["tier"]}
    labels = tuple(sorted((k, v) for k, v in tags.items() if v))
    ts = iso_ms(n["ts"])
    out = {("alerts_alert_id", labels, ts, 0.0), ("alerts_seq", labels, ts, float(n["seq"]))}
    for field in ("value", "threshold"):
        if n[field] is not None:
            out.add((f"alerts_{field}", labels, ts, float(n[field])))
    if n["state"] == "acknowledged":
        out.add(("alerts_ack_seconds", labels, ts, (ts - iso_ms(n["started_at"])) / 1000))
    return out


def columns(reg: Registry, rows: list[tuple[str, int, float | None]]) -> tuple:
    """Readings as the engine hands them over (Output.accepted): sensor numbers, ts, values."""
    return (np.array([reg.index[s] for s, _, _ in rows], dtype=np.int64),
            np.array([t for _, t, _ in rows], dtype=np.int64),
            np.array([np.nan if v is None else v for _, _, v in rows], dtype=np.float64))


def stream(reg: Registry, start: int, n: int, t0: int = T0) -> list[tuple[str, int, float | None]]:
    """``n`` readings, one per millisecond from ``t0 + start``, across every sensor in turn."""
    out = []
    for i in range(start, start + n):
        idx = i % len(reg)
        kind = reg.kinds[reg.kind_of[idx]]
        out.append((reg.sensor_ids[idx], t0 + i, None if kind in EVENT_KINDS else (i % 997) / 4))
    return out


def metric(lines: list[str], name: str) -> float:
    return float(next(line for line in lines
                      if line.startswith((name + " ", name + "{"))).rsplit(" ", 1)[1])


# ---- 1. what is sent is what is stored --------------------------------------------------------

@pytest.mark.broker
def test_readings_and_notices_are_stored_exactly(victoria_metrics: VictoriaMetrics, rules,
                                                 chengdu: Registry) -> None:
    reg = chengdu
    engine = Engine(reg, rules)
    engine.keep_accepted = True
    sink = InfluxSink(quick(victoria_metrics.url), reg)
    # three sensors of every kind, quiet values (events: a heartbeat), through the real engine
    sent: list[tuple[str, int, float | None]] = []
    for k, kind in enumerate(reg.kinds):
        for j, idx in enumerate(reg.sensors_of_kinds([kind])[:3]):
            value = None if kind in EVENT_KINDS else [0.5, 1.25, 2.75][j]
            sent.append((reg.sensor_ids[idx], T0 + k * 10 + j, value))
    payloads = [json.dumps({"sensor_id": s, "ts": t, **({"event": "heartbeat"} if v is None
                                                        else {"value": v})}).encode()
                for s, t, v in sent]
    out = engine.ingest(payloads)
    assert not out.dead_letters, out.dead_letters
    sink.add(out)
    # a gas leak at an elderly resident's (red: every tier), acknowledged 95.5 s later
    alarm = engine.ingest([json.dumps({"sensor_id": GAS_ALONE, "ts": T0 + 60_000,
                                       "value": 55.0}).encode()])
    sink.add(alarm)
    fired = alarm.notices
    assert {n["tier"] for n in fired} == {"city", "district", "street", "dept", "grid"}
    acked = engine.ack([{"alert_id": fired[0]["alert_id"], "by": "w-510104020001-01",
                         "tier": "grid", "ts": T0 + 155_500}])
    assert {n["state"] for n in acked.notices} == {"acknowledged"}
    sink.add(acked)
    assert sink.close(10.0)

    want = {reading_point(reg, s, t, v) for s, t, v in sent}
    want.add(reading_point(reg, GAS_ALONE, T0 + 60_000, 55.0))
    for n in out.notices + fired + acked.notices:
        want |= alert_points(n)
    got = victoria_metrics.wait_points(lambda pts: len(pts) >= len(want))
    assert sorted(got) == sorted(want)          # nothing missing, nothing extra, no repeats
    assert ("alerts_ack_seconds" in {p[0] for p in got}
            and {p[3] for p in got if p[0] == "alerts_ack_seconds"} == {95.5})
    stats = sink.stats()
    assert stats["written"] == (len(sent) + 1 + len(out.notices) + len(fired)
                                + len(acked.notices))
    assert stats["dropped"] == {} and stats["write_failures"] == 0 and stats["buffered"] == 0


def odd_notice() -> dict:
    """A notice with a target that needs escaping and no grid (as a group incident has)."""
    return {"alert_id": 'a"b\\c', "seq": 2, "rule_id": "gas.leak", "sensor_id": GAS_ALONE,
            "kind": "gas_household", "category": "gas", "severity": "red", "state": "firing",
            "tier": "dept", "target": "gas dept, east=1", "district": "510104",
            "street": "510104020", "community": None, "grid": None, "value": 55,
            "threshold": None, "ts": "2026-07-01T14:01:00+08:00",
            "started_at": "2026-07-01T14:01:00+08:00", "acked_tier": None}


@pytest.mark.broker
def test_tag_values_with_spaces_commas_and_equals_signs_survive(
        victoria_metrics: VictoriaMetrics, chengdu: Registry) -> None:
    sink = InfluxSink(quick(victoria_metrics.url), chengdu)
    n = odd_notice()
    sink.add_notices([n])
    assert sink.close(10.0)
    got = victoria_metrics.wait_points(lambda pts: len(pts) >= 3)
    assert sorted(got) == sorted(alert_points(n))
    assert dict(got[0][1])["target"] == "gas dept, east=1"


# ---- 2. down-sampling -------------------------------------------------------------------------

@pytest.mark.broker
def test_down_sampling_writes_latest_and_max_per_sensor_and_interval(
        victoria_metrics: VictoriaMetrics, chengdu: Registry) -> None:
    reg = chengdu
    gauge = reg.sensor_ids[reg.sensors_of_kinds(["waterlogging"])[0]]
    camera = reg.sensor_ids[reg.sensors_of_kinds(["site_camera"])[0]]
    sink = InfluxSink(quick(victoria_metrics.url, readings_every="1m"), reg)
    s = 1000
    sink.add_readings([columns(reg, [(gauge, T0, 1.0), (camera, T0 + 5 * s, None),
                                     (gauge, T0 + 20 * s, 5.0), (camera, T0 + 10 * s, None)])])
    wait_until(lambda: sink.stats()["buffered"] == 0, 10.0,      # the same answer either way
               "the writer has taken the first part alone")
    sink.add_readings([columns(reg, [(gauge, T0 + 40 * s, 2.0), (camera, T0 + 50 * s, None),
                                     (gauge, T0 + 70 * s, 3.0), (camera, T0 + 61 * s, None),
                                     (gauge, T0 + 130 * s, 4.0)])])
    assert sink.close(10.0)
    place = {(k, v) for k, v in reading_point(reg, gauge, 0, 0.0)[1]}
    cam = reading_point(reg, camera, 0, None)[1]
    g = tuple(sorted(place))
    want = [  # minute 0: latest 2.0, max 5.0; minute 1: 3.0; minute 2: open until close
        ("waterlogging_value", g, T0, 2.0), ("waterlogging_max", g, T0, 5.0),
        ("waterlogging_value", g, T0 + 60 * s, 3.0), ("waterlogging_max", g, T0 + 60 * s, 3.0),
        ("waterlogging_value", g, T0 + 120 * s, 4.0), ("waterlogging_max", g, T0 + 120 * s, 4.0),
        ("site_camera_event", cam, T0, 3.0), ("site_camera_event", cam, T0 + 60 * s, 1.0)]
    got = victoria_metrics.wait_points(lambda pts: len(pts) >= len(want))
    assert sorted(got) == sorted(want)
    assert sink.stats()["written"] == 5             # points: 3 for the gauge, 2 for the camera


# ---- 3. the database goes away, and comes back -------------------------------------------------

@pytest.mark.broker
def test_an_outage_mid_run_loses_no_point(victoria_metrics: VictoriaMetrics,
                                          chengdu: Registry) -> None:
    vm, reg = victoria_metrics, chengdu
    sink = InfluxSink(quick(vm.url), reg)
    sent: list[tuple[str, int, float | None]] = []

    def feed(batches: int) -> None:
        for _ in range(batches):
            rows = stream(reg, len(sent), 150)
            sent.extend(rows)
            sink.add_readings([columns(reg, rows)])
            time.sleep(0.01)        # paces the feed, as readings come: batches, not one lump

    feed(20)
    wait_until(lambda: sink.stats()["written"] == len(sent), 20.0, "the first 3,000 points written")
    vm.stop()
    feed(20)                          # add() keeps returning while nothing can be written
    wait_until(lambda: sink.stats()["write_failures"] >= 2 and sink.stats()["buffered"] > 0,
               20.0, "failed writes counted, points buffered")
    down = sink.stats()
    assert not down["up"] and down["last_error"] and down["dropped"] == {}
    lines = text(sink).splitlines()
    assert metric(lines, "cityops_influx_up") == 0
    assert metric(lines, "cityops_influx_write_failures_total") >= 2
    assert metric(lines, "cityops_influx_points_buffered") > 0
    vm.start()                        # same port, same data folder
    feed(20)
    assert sink.close(20.0)
    stats = sink.stats()
    assert stats["written"] == len(sent) == 9000 and stats["dropped"] == {}
    want = {reading_point(reg, s, t, v) for s, t, v in sent}
    got = vm.wait_points(lambda pts: want <= set(pts))
    assert want == set(got)           # every point, nothing else (a retried write may repeat)


@pytest.mark.broker
def test_a_frozen_database_times_out_and_everything_arrives_after(
        victoria_metrics: VictoriaMetrics, chengdu: Registry) -> None:
    vm, reg = victoria_metrics, chengdu
    sink = InfluxSink(quick(vm.url, timeout="500ms"), reg)
    sent = stream(reg, 0, 500)
    sink.add_readings([columns(reg, sent[:250])])
    wait_until(lambda: sink.stats()["written"] == 250, 20.0, "written")
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGSTOP)   # slow as can be: accepts connections, answers nothing
    try:
        sink.add_readings([columns(reg, sent[250:])])
        wait_until(lambda: sink.stats()["write_failures"] >= 1, 20.0, "a write timed out")
        assert "imeout" in sink.stats()["last_error"], sink.stats()["last_error"]
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    assert sink.close(20.0)
    want = {reading_point(reg, s, t, v) for s, t, v in sent}
    assert want == set(vm.wait_points(lambda pts: want <= set(pts)))


@pytest.mark.broker
def test_a_full_buffer_drops_the_oldest_and_counts_them(victoria_metrics_factory,
                                                        chengdu: Registry) -> None:
    reg = chengdu
    vm = victoria_metrics_factory(start=False)          # nothing listens on its port yet
    sink = InfluxSink(quick(vm.url, batch_size=100, buffer_max=1000, retry_initial="10s"), reg)
    sent = stream(reg, 0, 2500)
    for i in range(0, 2500, 100):
        sink.add_readings([columns(reg, sent[i:i + 100])])
    # the first batch failed (connection refused) and went back to the head: the oldest
    wait_until(lambda: sink.stats()["write_failures"] == 1 and sink.stats()["buffered"] == 1000,
               20.0, "one failed write, 1,000 points held")
    assert sink.stats()["dropped"] == {"buffer_full": 1500}
    assert metric(text(sink).splitlines(),
                  'cityops_influx_points_dropped_total{reason="buffer_full"}') == 1500
    vm.start()
    assert sink.close(20.0)           # close cuts the 10 s backoff short
    assert sink.stats()["written"] == 1000
    want = {reading_point(reg, s, t, v) for s, t, v in sent[1500:]}     # the newest 1,000
    assert want == set(vm.wait_points(lambda pts: len(pts) >= 1000))


def test_close_with_the_database_away_counts_what_was_not_written(chengdu: Registry) -> None:
    sink = InfluxSink(quick(f"http://127.0.0.1:{free_port()}"), chengdu)
    sink.add_readings([columns(chengdu, stream(chengdu, 0, 300))])
    assert not sink.close(1.0)
    assert sink.stats()["dropped"] == {"shutdown": 300}
    sink.add_readings([columns(chengdu, stream(chengdu, 300, 10))])
    assert sink.stats()["dropped"] == {"shutdown": 300, "closed": 10}


# ---- 4. configuration and secrets -------------------------------------------------------------

def test_settings_from_the_environment_and_the_token_is_never_shown(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        chengdu: Registry) -> None:
    secret = f"tok-{uuid.uuid4().hex}"
    dead = f"http://127.0.0.1:{free_port()}"
    for k, v in {"URL": dead, "TOKEN": secret, "ORG": "chengdu", "BUCKET": "history",
                 "READINGS_EVERY": "5m", "BUFFER_MAX": "5000", "FLUSH_INTERVAL": "100ms",
                 "RETRY_INITIAL": "100ms"}.items():
        monkeypatch.setenv(f"CITYOPS_INFLUX__{k}", v)
    s = load_settings().influx
    assert (s.url, s.org, s.bucket, s.readings_every, s.buffer_max, s.flush_interval) == \
        (dead, "chengdu", "history", 300_000, 5000, 100)
    assert s.token is not None and s.token.get_secret_value() == secret
    assert secret not in repr(s) and secret not in str(load_settings())
    caplog.set_level(logging.DEBUG)
    sink = InfluxSink(s, chengdu)
    sink.add_notices([odd_notice()])
    wait_until(lambda: sink.stats()["write_failures"] >= 1, 20.0, "a failed write")
    sink.close(0.5)
    assert sink.stats()["last_error"]
    assert secret not in caplog.text and secret not in text(sink)
    assert secret not in json.dumps(sink.stats())


@pytest.mark.parametrize("url", ["influx://h:8086", "http://u:pw@h:8086", "http://h:8086/?token=x"])
def test_bad_influx_urls_are_refused_at_start(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("CITYOPS_INFLUX__URL", url)
    with pytest.raises(ConfigError):
        load_settings()


def test_history_is_off_without_a_url() -> None:
    assert load_settings().influx.url is None


# ---- 5. `cityops run` with history on ---------------------------------------------------------

@pytest.mark.broker
def test_live_runtime_writes_readings_and_alerts_and_keeps_alerting_through_an_outage(
        mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, chengdu: Registry,
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from pipeline.runtimes.live import LiveRuntime

    vm = victoria_metrics
    for k, v in {"URL": vm.url, "TOKEN": "test-token", "FLUSH_INTERVAL": "100ms",
                 "RETRY_INITIAL": "100ms", "RETRY_MAX": "500ms"}.items():
        monkeypatch.setenv(f"CITYOPS_INFLUX__{k}", v)
    settings = load_settings(
        mqtt=MqttSettings(url=mosquitto.url, client_id=f"cityops-influx-{uuid.uuid4().hex[:8]}"),
        state=StateSettings(path=tmp_path / "state.sqlite"), http=HttpSettings(port=0))
    rt = LiveRuntime(settings)
    rt.start()
    loop = threading.Thread(target=rt.run, name="runtime", daemon=True)
    loop.start()
    try:
        with Subscriber(mosquitto.url, "cityops/alerts/#", "cityops/push/#") as sub:
            ts = int(time.time() * 1000)
            batch = [{"sensor_id": GAS_ALONE, "ts": ts, "value": 55.0},
                     {"sensor_id": "gas-510104-000002", "ts": ts, "value": 1.5}]
            publish(mosquitto.url, "cityops/gateways/gw-510104-0001", json.dumps(batch).encode())
            sub.wait_count(5, timeout=15)
            fired = [json.loads(p) for _, p in sub.messages]
            publish(mosquitto.url, "cityops/acks/w-510104020001-01", json.dumps(
                {"alert_id": fired[0]["alert_id"], "ts": ts + 42_000}).encode())
            sub.wait_count(10, timeout=15)
            sent = [reading_point(chengdu, r["sensor_id"], r["ts"], r["value"]) for r in batch]
            want = set(sent)
            for n in (json.loads(p) for _, p in sub.messages):
                want |= alert_points(n)
            assert {p[3] for p in want if p[0] == "alerts_ack_seconds"} == {42.0}
            got = vm.wait_points(lambda pts: want <= set(pts))
            assert want == set(got)

            # the database goes away: alerts still reach every tier; history waits
            vm.stop()
            sub.clear()
            ts2 = int(time.time() * 1000)
            later = {"sensor_id": "gas-510104-000003", "ts": ts2, "value": 30.0}
            publish(mosquitto.url, "cityops/readings/gas-510104-000003",
                    json.dumps(later).encode())
            sub.wait_count(3, timeout=15)           # yellow: street, district, grid worker
            wait_until(lambda: rt.history.stats()["write_failures"] >= 1,
                       20.0, "the runtime counts failed writes")
            shown = text(rt)
            assert "cityops_influx_up 0" in shown and "cityops_influx_points_buffered" in shown
            vm.start()
            want.add(reading_point(chengdu, "gas-510104-000003", ts2, 30.0))
            for n in (json.loads(p) for _, p in sub.messages):
                want |= alert_points(n)
            got = vm.wait_points(lambda pts: want <= set(pts))
            assert want == set(got)
            assert rt.history.stats()["dropped"] == {}
    finally:
        rt.stop()
        loop.join(30)
    assert not loop.is_alive()


@pytest.mark.broker
def test_a_closed_incident_is_stored_with_its_time_to_close(victoria_metrics: VictoriaMetrics,
                                                            rules, chengdu: Registry) -> None:
    """快速处置: the closed notice's points carry the seconds from firing to on site, handled
    and closed (pipeline/core/close_figures.py), tagged with the tier that closed it."""
    engine = Engine(chengdu, rules)
    sink = InfluxSink(quick(victoria_metrics.url), chengdu, closed_fields)
    fired = engine.ingest([json.dumps({"sensor_id": GAS_ALONE, "ts": T0, "value": 55.0}).encode()])
    aid = fired.notices[0]["alert_id"]
    steps = [("on_site", "w-510104020001-01", "grid", 90_000), ("handled", "w-510104020001-01",
                                                                  "grid", 300_000),
             ("closed", "city-duty", "city", 1_200_000)]       # red: the city owns it
    for state, by, tier, after in steps:
        out = engine.ack([{"alert_id": aid, "by": by, "tier": tier, "ts": T0 + after,
                           "state": state, "note": "已关阀" if state == "handled" else "已修复"}])
        assert {n["state"] for n in out.notices} == {state}, out.dead_letters
    closed = out.notices
    sink.add(fired)
    sink.add(out)
    assert sink.close(10.0)
    got = victoria_metrics.wait_points(lambda pts: any(p[0] == "alerts_close_seconds" for p in pts))
    mine = {(p[0], p[3]) for p in got if ("state_tier", "city") in p[1]}
    assert mine >= {("alerts_on_site_seconds", 90.0), ("alerts_handled_seconds", 300.0),
                    ("alerts_close_seconds", 1200.0)}
    assert len([p for p in got if p[0] == "alerts_close_seconds"]) == len(closed)   # a copy per tier
