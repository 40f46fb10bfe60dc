"""A restart of `cityops run` under changed files is a reload (pipeline/shared/kept_sets.py): the state
is judged again by the set it was made under, kept beside it, and what the new files end is
resolved, with its reason, to every tier told — whether the files changed while it was stopped
or a kill -9 came between a reload and the snapshot after it. Real Mosquitto, the runtime as a
subprocess."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from bench.harness.brokers import Subscriber
from tests.support import GAS_ALONE, HOT, NEIGHBOURS, firing_of, notices, reloads, retire, send, wait_until

pytestmark = pytest.mark.broker

NOTICES = ("cityops/alerts/#", "cityops/push/#")


def told(messages: list, rule: str, sid: str, state: str) -> set[tuple[str, str]]:
    """The (tier, target) pairs told ``state`` of ``rule`` on ``sid``."""
    return {(n["tier"], n["target"]) for n in notices(messages)
            if n["rule_id"] == rule and n["sensor_id"] == sid and n["state"] == state}


def ended(messages: list, rule: str, sid: str) -> list[dict]:
    return [n for n in notices(messages) if n["rule_id"] == rule and n["sensor_id"] == sid
            and n["state"] == "resolved"]


def hot_pack(tmp_path: Path) -> Path:
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "hot.yaml").write_text(HOT, encoding="utf-8")
    return packs


def test_files_changed_while_stopped_end_their_incidents_for_every_tier_told_once(
        mosquitto, runtime, tmp_path: Path) -> None:
    packs, registry = hot_pack(tmp_path), retire(tmp_path, "no-such-sensor")
    rt = runtime(mosquitto.url, "changed", args=["--packs", str(packs), "--registry", str(registry)],
                 env={"CITYOPS_RELOAD__WATCH_EVERY": "0s"})
    sub = Subscriber(mosquitto.url, *NOTICES).start()
    try:
        send(mosquitto.url, NEIGHBOURS[0], 8.0)        # hot.gas only (≥ 5; gas.leak is ≥ 20)
        send(mosquitto.url, GAS_ALONE, 27.5)           # gas.leak and hot.gas
        firing_of(sub, GAS_ALONE)
        wait_until(lambda: told(sub.messages, "hot.gas", NEIGHBOURS[0], "firing"), 15,
                   "hot.gas fires", rt)
        assert rt.stop() == 0                           # a snapshot, judged by these files
        firing = {(rule, sid): told(sub.messages, rule, sid, "firing")
                  for rule, sid in (("hot.gas", NEIGHBOURS[0]), ("hot.gas", GAS_ALONE),
                                    ("gas.leak", GAS_ALONE))}
        assert all(len(t) >= 3 for t in firing.values()), firing

        (packs / "hot.yaml").unlink()                   # the rule is removed ...
        retire(tmp_path / "next", GAS_ALONE)            # ... and the sensor retired
        (registry / "sensors.csv").write_bytes(
            (tmp_path / "next" / "registry" / "sensors.csv").read_bytes())
        rt.start()
        for (rule, sid), tiers in firing.items():
            wait_until(lambda: told(sub.messages, rule, sid, "resolved") == tiers, 15,
                       f"{rule} on {sid} resolved to every tier told", rt)
        assert all("规则已删除" in n["summary"] for sid in (NEIGHBOURS[0], GAS_ALONE)
                   for n in ended(sub.messages, "hot.gas", sid))
        assert all("设备已注销" in n["summary"] for n in ended(sub.messages, "gas.leak", GAS_ALONE))
        assert "the files are now" in rt.stderr()

        # once: a second restart tells nothing again (the probe's notices come after any)
        assert rt.stop() == 0
        before = len(notices(sub.messages))
        rt.start()
        send(mosquitto.url, NEIGHBOURS[1], 30.0)
        firing_of(sub, NEIGHBOURS[1])
        again = [n for n in notices(sub.messages)[before:] if n["state"] == "resolved"]
        assert not again, again
    finally:
        sub.close()


def test_a_kill_between_a_reload_and_its_snapshot_tells_its_resolves_at_the_restart(
        mosquitto_factory, runtime, tmp_path: Path) -> None:
    """The broker is away when the reload resolves a removed rule's incident, so the resolves
    wait in the process, no snapshot is taken; kill -9. The journaled reload makes them again."""
    broker = mosquitto_factory()
    packs = hot_pack(tmp_path)
    rt = runtime(broker.url, "window", args=["--packs", str(packs)],
                 env={"CITYOPS_RELOAD__WATCH_EVERY": "0s"})
    sub = Subscriber(broker.url, *NOTICES).start()
    try:
        send(broker.url, NEIGHBOURS[0], 8.0)
        wait_until(lambda: len(told(sub.messages, "hot.gas", NEIGHBOURS[0], "firing")) >= 3, 15,
                   "hot.gas fires", rt)
        tiers = told(sub.messages, "hot.gas", NEIGHBOURS[0], "firing")
    finally:
        sub.close()
    broker.stop()
    (packs / "hot.yaml").unlink()
    rt.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: reloads(rt, "ok") == 1, 30, "the reload done", rt)
    assert "the journal keeps the reload" in rt.stderr()    # its resolves not delivered
    rt.kill()
    broker.start()
    sub = Subscriber(broker.url, *NOTICES).start()
    try:
        rt.start()
        wait_until(lambda: told(sub.messages, "hot.gas", NEIGHBOURS[0], "resolved") == tiers, 15,
                   "the resolve to every tier told", rt)
        assert all("规则已删除" in n["summary"] for n in ended(sub.messages, "hot.gas", NEIGHBOURS[0]))
    finally:
        sub.close()
