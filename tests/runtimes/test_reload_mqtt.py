"""Hot reload of `cityops run` end to end: a real Mosquitto, the runtime as a subprocess, its
files changed under it. SIGHUP, POST /reload and the file watch; a bad set is refused with
file:line and the running rules keep firing; a changed threshold keeps the open incident's id;
a removed rule resolves its incident, with the reason, to every tier told."""

from __future__ import annotations

import signal
import threading
import uuid
from pathlib import Path

import pytest

from bench.harness.brokers import Mosquitto, Subscriber, publish
from tests.support import (CITY_DUTY, CITY_TOKEN, GAS_ALONE, HOT, NEIGHBOURS, dumps, firing_of, notices,
                           now_ms, params, post_reload, reading, reloads, rt_users, send, sha256, wait_until)

pytestmark = pytest.mark.broker

STREET_DESK, STREET_TOKEN = "desk-510104020", "street-desk-token-for-the-reload-tests"


def test_sighup_refuses_a_bad_set_keeps_the_old_rules_then_takes_a_good_one(
        mosquitto: Mosquitto, runtime, tmp_path: Path) -> None:
    p = params(tmp_path / "params.yaml", 20)
    rt = runtime(mosquitto.url, "hup", args=["--params", str(p)],
                 env={"CITYOPS_RELOAD__WATCH_EVERY": "0s"})
    sub = Subscriber(mosquitto.url, "cityops/alerts/#", "cityops/push/#").start()
    try:
        send(mosquitto.url, GAS_ALONE, 27.5)
        aid = firing_of(sub, GAS_ALONE)[0]["alert_id"]

        params(p, 30, key="level_one_lel")                  # a mistake: no such parameter
        rt.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(rt, "refused") == 1, 30, "the bad set refused", rt)
        assert f"{p}:2: pack gas has no parameter level_one_lel" in rt.stderr()
        assert "the running rules go on" in rt.stderr()
        send(mosquitto.url, NEIGHBOURS[0], 22.0)            # over the old 20: still fires
        neighbour = firing_of(sub, NEIGHBOURS[0])[0]["alert_id"]

        params(p, 30)                                       # now right: 30
        rt.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(rt, "ok") == 1, 30, "the good set taken", rt)
        assert rt.metrics()['cityops_reload_changes_total{what="thresholds"}'] == 1
        send(mosquitto.url, NEIGHBOURS[1], 25.0)            # under the new 30: nothing
        send(mosquitto.url, NEIGHBOURS[2], 35.0)            # over it: fires
        firing_of(sub, NEIGHBOURS[2])
        assert not [x for x in notices(sub.messages) if x["sensor_id"] == NEIGHBOURS[1]]
        send(mosquitto.url, GAS_ALONE, 60.0)                # the open incident goes on: it
        up = firing_of(sub, GAS_ALONE, 2)                   # steps up under its own id
        assert up[-1]["alert_id"] == aid and up[-1]["previous_state"] == "firing"
        assert up[-1]["severity"] == "red"

        # kill -9 after the reload: the restart starts from the state the reload saved, not
        # from the journal of readings the old rules judged (under the new ones, 22 %LEL
        # would open nothing and the neighbour's incident would be lost)
        rt.kill()
        rt.start()
        send(mosquitto.url, NEIGHBOURS[0], 60.0)
        again = firing_of(sub, NEIGHBOURS[0], 2)[-1]
        assert again["alert_id"] == neighbour and again["previous_state"] == "firing"
    finally:
        sub.close()


def test_post_reload_needs_a_city_user_and_says_what_changed_or_where_it_is_wrong(
        mosquitto: Mosquitto, runtime, tmp_path: Path) -> None:
    p = params(tmp_path / "params.yaml", 20)
    users = rt_users(tmp_path, {
        CITY_DUTY: {"scope": "city", "token_sha256": sha256(CITY_TOKEN)},
        STREET_DESK: {"scope": "street", "code": "510104020", "token_sha256": sha256(STREET_TOKEN)}})
    rt = runtime(mosquitto.url, "post", args=["--params", str(p)],
                 env={"CITYOPS_RELOAD__WATCH_EVERY": "0s", "CITYOPS_ACKS__USERS": str(users)})
    assert post_reload(rt, None)[0] == 401
    code, body = post_reload(rt, STREET_TOKEN)
    assert code == 403 and "city-scope" in body["error"]
    code, body = post_reload(rt, CITY_TOKEN)
    assert code == 200 and body["result"] == "unchanged"

    params(p, "twenty")
    code, body = post_reload(rt, CITY_TOKEN)
    assert code == 422 and body["result"] == "refused" and f"{p}:3" in body["error"]

    params(p, 25)
    code, body = post_reload(rt, CITY_TOKEN)
    assert code == 200 and body["result"] == "ok", body
    assert body["changes"] == {"thresholds": 1}
    assert "gas.leak  yellow  default: value >= 20 → 25" in body["diff"]
    assert f"reload asked over HTTP by {CITY_DUTY}" in rt.stderr()


def test_the_watch_reloads_a_removed_rule_and_its_incident_ends_for_every_tier_told(
        mosquitto: Mosquitto, runtime, tmp_path: Path) -> None:
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "hot.yaml").write_text(HOT, encoding="utf-8")
    rt = runtime(mosquitto.url, "watch", args=["--packs", str(packs)],
                 env={"CITYOPS_RELOAD__WATCH_EVERY": "200ms"})
    sub = Subscriber(mosquitto.url, "cityops/alerts/#", "cityops/push/#").start()
    try:
        send(mosquitto.url, NEIGHBOURS[0], 8.0)
        wait_until(lambda: [x for x in notices(sub.messages) if x["rule_id"] == "hot.gas"],
                   15, "hot.gas fires", rt)
        (packs / "hot.yaml").unlink()
        wait_until(lambda: reloads(rt, "ok") == 1, 30, "the watch's reload", rt)
        mine = [x for x in notices(sub.messages) if x["rule_id"] == "hot.gas"]

        def ended() -> list[dict]:
            return [x for x in notices(sub.messages)
                    if x["rule_id"] == "hot.gas" and x["state"] == "resolved"]
        told = {(x["tier"], x["target"]) for x in mine if x["state"] == "firing"}
        wait_until(lambda: {(x["tier"], x["target"]) for x in ended()} == told, 15,
                   "the resolve to every tier told", rt)
        assert len(told) >= 3 and all("规则已删除" in x["summary"] for x in ended())
        assert rt.metrics()["cityops_reload_resolved_total"] == 1
    finally:
        sub.close()


def test_history_names_sensors_by_the_new_registry_after_a_reload(
        mosquitto: Mosquitto, victoria_metrics, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """The history sink numbers sensors as its registry does: a sensor retired before another
    renumbers it, and a sink kept from before the reload would write its readings under the
    retired sensor's name."""
    from pipeline.shared.config import HttpSettings, MqttSettings, StateSettings, load_settings
    from pipeline.core.registry import load as load_registry
    from pipeline.runtimes.live import LiveRuntime
    from rules.compiler import load_rules
    from tests.support import reading_point, retire

    other = "gas-510104-000002"
    later = "gas-510104-000003"                       # after other in sensors.csv
    folder = retire(tmp_path, "no-such-sensor")       # a copy of the fixture registry
    for k, v in {"URL": victoria_metrics.url, "TOKEN": "test-token",
                 "FLUSH_INTERVAL": "100ms"}.items():
        monkeypatch.setenv(f"CITYOPS_INFLUX__{k}", v)
    monkeypatch.setenv("CITYOPS_RELOAD__WATCH_EVERY", "0s")
    settings = load_settings(
        mqtt=MqttSettings(url=mosquitto.url, client_id=f"cityops-reload-{uuid.uuid4().hex[:8]}"),
        state=StateSettings(path=tmp_path / "state.sqlite"), http=HttpSettings(port=0),
        registry=folder)
    rt = LiveRuntime(settings)
    rt.start()
    loop = threading.Thread(target=rt.run, name="runtime", daemon=True)
    loop.start()
    try:
        first = reading(later, 1.0, ts=now_ms())
        publish(mosquitto.url, f"cityops/readings/{later}", dumps(first))
        victoria_metrics.wait_points(lambda pts: any(p[2] == first["ts"] for p in pts))

        retire(tmp_path / "again", other)             # other goes from the running registry:
        (folder / "sensors.csv").write_bytes(
            (tmp_path / "again" / "registry" / "sensors.csv").read_bytes())
        reply = rt.reloads.ask("test").result(60)
        assert reply["result"] == "ok" and reply["changes"] == {"sensors_retired": 1}, reply

        second = reading(later, 2.0, ts=now_ms())
        publish(mosquitto.url, f"cityops/readings/{later}", dumps(second))
        new_registry = load_registry(folder, load_rules().kinds)
        want = reading_point(new_registry, later, second["ts"], 2.0)
        got = victoria_metrics.wait_points(lambda pts: any(p[2] == second["ts"] for p in pts))
        assert [p for p in got if p[2] == second["ts"]] == [want]
    finally:
        rt.stop()
        loop.join(30)
    assert not loop.is_alive()
