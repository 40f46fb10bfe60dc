"""Issue 12 (hardening), end to end: `cityops run` against a real Mosquitto under input that
used to hurt it. Each test failed on the code before its fix:

- a 32 KB gateway array of `1`s (16,384 bad elements) made 515 MB of dead letters (RSS 1 GB);
- a payload the engine failed on took its whole batch down and came back at every restart;
- an ack stamped 1e17 stopped escalation in silence, one stamped 1e20 crash-looped the snapshot;
- after an outage longer than `clear_for` the wall clock resolved a gas leak that was still on;
- one sensor's reading from the future moved every timer in the city.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from bench.harness.brokers import Mosquitto, Subscriber, publish, publish_many
from tests import poison_seam
from tests.support import (
    ACK_TOPIC,
    DEAD_TOPIC,
    GAS_ALONE,
    NOTICE_FILTERS,
    ROOT,
    Runtime,
    dead_letters,
    dumps,
    notices,
    now_ms,
    reading,
    settle,
    wait_until,
)

NEIGHBOUR = "gas-510104-000002"


def rss_mb(rt: Runtime) -> float:
    assert rt.proc is not None
    for line in Path(f"/proc/{rt.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def metric(rt: Runtime, name: str) -> float:
    return rt.metrics().get(name, 0.0)


# ---- item 1: a dead letter costs its element; poison is quarantined -----------------------------

def test_a_32kb_array_of_ones_costs_its_elements_and_the_runtime_stays_up(
        mosquitto: Mosquitto, runtime) -> None:
    rt = runtime(mosquitto.url, "ones")
    ones = b"[" + b",".join([b"1"] * 16_384) + b"]"
    assert len(ones) == 32_769
    before = rss_mb(rt)
    assert publish(mosquitto.url, "cityops/gateways/gw-510104-0001", ones) == 0
    wait_until(lambda: metric(rt, 'cityops_dead_letters_total{reason="invalid"}') == 16_384, 60,
               "16,384 dead letters", rt, interval=0.5)
    grew = rss_mb(rt) - before
    print(f"RSS {before:.0f} MB before, {before + grew:.0f} MB after 16,384 dead letters")
    assert grew < 100, f"RSS grew {grew:.0f} MB for 16,384 dead letters of one byte each"
    assert rt.running and rt.health()[0] == 200


def test_a_poison_payload_is_quarantined_its_batch_evaluated_and_not_replayed(
        mosquitto: Mosquitto, runtime) -> None:
    """tests/poison_seam.py makes the engine raise on one marker reading (no real input does
    today). Its neighbours in the batch are evaluated; after kill -9 the journal is replayed
    without it."""
    url = mosquitto.url
    rt = runtime(url, "poison", module="tests.poison_seam",
                 env={"CITYOPS_STATE__SNAPSHOT_EVERY": "1h"})    # the journal keeps it all
    ts = now_ms()
    poison = dumps(reading(NEIGHBOUR, poison_seam.POISON_VALUE, ts=ts))
    with Subscriber(url, DEAD_TOPIC, *NOTICE_FILTERS) as sub:
        publish_many(url, [(f"cityops/readings/{GAS_ALONE}", dumps(reading(GAS_ALONE, 55.0, ts=ts - 1))),
                           (f"cityops/readings/{NEIGHBOUR}", poison)])
        sub.wait_for(lambda m: len(dead_letters(m)) >= 1 and len(notices(m)) >= 5, timeout=15)
        msgs = settle(sub)
    [d] = dead_letters(msgs)
    assert (d.reason, d.payload.encode(), d.source) == ("poison", poison,
                                                       f"cityops/readings/{NEIGHBOUR}")
    assert "ZeroDivisionError" in d.detail
    assert {(n["sensor_id"], n["state"]) for n in notices(msgs)} == {(GAS_ALONE, "firing")}
    assert metric(rt, "cityops_engine_errors_total") == 1
    assert metric(rt, 'cityops_dead_letters_total{reason="poison"}') == 1

    rt.kill()
    rt.start()
    assert "journal entries replayed" in rt.stderr()
    assert metric(rt, "cityops_engine_errors_total") == 0, "the restart met the poison again"
    assert "ZeroDivisionError" not in rt.err_path.read_text(), rt.logs()
    assert rt.running and rt.health()[0] == 200


# ---- item 3: acks are held to a reading's bounds -----------------------------------------------

def test_acks_stamped_1e17_and_1e20_are_bad_acks_and_escalation_goes_on(
        mosquitto: Mosquitto, runtime, tmp_path: Path) -> None:
    routing = yaml.safe_load((ROOT / "rules" / "routing.yaml").read_text())
    routing.update(escalate_after={"street": "3s", "district": "3s"}, remind_every="1h")
    (tmp_path / "routing.yaml").write_text(yaml.safe_dump(routing, allow_unicode=True))
    (tmp_path / "cityops.yaml").write_text("engine:\n  allowed_lateness: 500ms\n"
                                           "state:\n  snapshot_every: 1s\n")
    url = mosquitto.url
    rt = runtime(url, "hugets", args=["--routing", str(tmp_path / "routing.yaml"),
                                      "--config", str(tmp_path / "cityops.yaml")],
                 env={"CITYOPS_TICK": "200ms"})
    manhole = "mh-510104-000001"      # `opened`: blue, street + grid worker, nobody acks
    with Subscriber(url, DEAD_TOPIC, *NOTICE_FILTERS) as sub:
        publish(url, "cityops/gateways/gw-510104-0012", dumps([reading(manhole, ts=now_ms(),
                                                                       event="opened")]))
        fired = sub.wait_for(lambda m: any(n["state"] == "firing" for n in notices(m)), 10)
        alert = next(n["alert_id"] for n in notices(fired))
        for ts in ("1e17", "1e20"):
            publish(url, f"{ACK_TOPIC}/w-510104020001-01",        # a roster worker's own topic
                    f'{{"alert_id": "{alert}", "ts": {ts}}}')
        msgs = sub.wait_for(lambda m: any(n["state"] == "escalated" for n in notices(m)), 20)
        msgs = settle(sub)
    bad = [d for d in dead_letters(msgs) if d.reason == "bad_ack"]
    assert len(bad) == 2 and all("is not a time" in d.detail for d in bad), bad
    assert not any(n["state"] == "acknowledged" for n in notices(msgs))
    wait_until(lambda: metric(rt, "cityops_journal_entries") == 0, 10, "a snapshot", rt)
    assert rt.running


# ---- item 4: after an outage, the clock waits for the backlog ----------------------------------

def test_after_an_outage_longer_than_clear_for_a_leak_still_on_is_not_resolved(
        mosquitto: Mosquitto, runtime, tmp_path: Path) -> None:
    """The leak dips under the clear level, cityops is killed, the gas comes back while it is
    down (behind 3,000 other readings the broker keeps for it) and the outage outlasts
    clear_for. Before: the first clock tick after the restart resolved the leak, then the
    backlog fired it again."""
    packs = tmp_path / "packs"
    packs.mkdir()
    gas = (ROOT / "rules" / "packs" / "gas.yaml").read_text()
    assert "clear_for: 2m" in gas
    (packs / "gas.yaml").write_text(gas.replace("clear_for: 2m", "clear_for: 5s"))
    (tmp_path / "cityops.yaml").write_text("engine:\n  allowed_lateness: 500ms\n"
                                           "state:\n  snapshot_every: 1h\n")
    url = mosquitto.url
    rt = runtime(url, "outage", args=["--packs", str(packs), "--config",
                                      str(tmp_path / "cityops.yaml")],
                 env={"CITYOPS_TICK": "200ms"})
    topic = f"cityops/readings/{GAS_ALONE}"
    with Subscriber(url, *NOTICE_FILTERS) as sub:
        t0 = now_ms()
        publish(url, topic, dumps(reading(GAS_ALONE, 55.0, ts=t0)))
        sub.wait_for(lambda m: len(notices(m)) >= 5, 10)
        publish(url, topic, dumps(reading(GAS_ALONE, 5.0, ts=t0 + 100)))     # dips: 5 s to clear
        wait_until(lambda: metric(rt, "cityops_payloads_total") == 2, 5, "the dip taken", rt)
        rt.kill()
        quiet = "gas-510104-000003"
        publish_many(url, [(f"cityops/readings/{quiet}", dumps(reading(quiet, 1.0, ts=t0 + 200 + i)))
                           for i in range(3000)]
                     + [(topic, dumps(reading(GAS_ALONE, 55.0, ts=t0 + 1500)))])  # still on
        wait_until(lambda: now_ms() > t0 + 100 + 5000 + 2000, 15, "an outage longer than clear_for")
        rt.start()
        wait_until(lambda: rt.health()[1].get("catching_up") is False, 30, "caught up", rt)
        wait_until(lambda: metric(rt, "cityops_inbox_depth") == 0, 10, "backlog in", rt)
        time.sleep(1.0)                    # time is the thing: several ticks after the backlog
        msgs = settle(sub)
    # the replay sends its notice again (at-least-once): the same one, not a second firing
    states = sorted({(n["state"], n["seq"]) for n in notices(msgs) if n["tier"] == "street"})
    assert states == [("firing", 1)], f"the leak was still on: {states}"
    assert "caught up with the broker's backlog" in rt.stderr()


# ---- item 5: one reading from the future moves no timer ----------------------------------------

def test_one_reading_4_minutes_ahead_resolves_nothing_and_sends_no_reminder_early(
        mosquitto: Mosquitto, runtime) -> None:
    url = mosquitto.url
    rt = runtime(url, "future")            # live defaults: allowed_lateness 10 s, clear_for 2 min
    with Subscriber(url, *NOTICE_FILTERS) as sub:
        t0 = now_ms()
        publish(url, f"cityops/readings/{GAS_ALONE}", dumps(reading(GAS_ALONE, 55.0, ts=t0)))
        sub.wait_for(lambda m: len(notices(m)) >= 5, 10)
        publish(url, f"cityops/readings/{GAS_ALONE}", dumps(reading(GAS_ALONE, 1.0, ts=t0 + 1000)))
        publish(url, f"cityops/readings/{NEIGHBOUR}",
                dumps(reading(NEIGHBOUR, 1.0, ts=now_ms() + 4 * 60_000)))
        wait_until(lambda: metric(rt, "cityops_payloads_total") == 3, 5, "all three taken", rt)
        time.sleep(2.0)                    # time is the thing: ten ticks, on the wall clock
        msgs = settle(sub)
    assert not dead_letters(msgs)
    states = {n["state"] for n in notices(msgs)}
    assert states == {"firing"}, f"time moved on one sensor's word: {states}"


# ---- item 10: a resent alarm is not lost to ordering --------------------------------------------

def test_an_alarm_resent_after_a_broker_restart_behind_a_newer_reading_fires(
        mosquitto: Mosquitto, runtime) -> None:
    """The gateway's normal reading of t0+2 s got through; its alarm of t0 was in flight when the
    broker died and is resent when it is back, after the newer one. Before: dead letter `stale`,
    no notice. Now it is late (within allowed_lateness, 10 s live) and fires at its own time; an
    alarm older than that is still refused as `stale`, with the newest reading named."""
    url = mosquitto.url
    rt = runtime(url, "late")
    topic = f"cityops/readings/{GAS_ALONE}"
    t0 = now_ms()
    publish(url, topic, dumps(reading(GAS_ALONE, 1.0, ts=t0 + 2000)))
    wait_until(lambda: metric(rt, "cityops_payloads_total") == 1, 5, "the normal reading", rt)
    mosquitto.restart(hard=True)
    wait_until(lambda: rt.health()[1].get("broker_connected") is True, 30, "reconnected", rt)
    with Subscriber(url, *NOTICE_FILTERS, DEAD_TOPIC) as sub:
        publish(url, topic, dumps(reading(GAS_ALONE, 27.5, ts=t0)))              # resent, late
        publish(url, topic, dumps(reading(GAS_ALONE, 60.0, ts=t0 + 2000 - 11_000)))   # stale
        sub.wait_for(lambda m: any(n["tier"] == "street" for n in notices(m)) and dead_letters(m),
                     15)
        wait_until(lambda: metric(rt, "cityops_payloads_total") == 3, 5, "all three taken", rt)
        msgs = settle(sub)
    street = [n for n in notices(msgs) if n["tier"] == "street"]
    assert [(n["state"], n["seq"], n["value"], n["severity"]) for n in street] == [
        ("firing", 1, 27.5, "orange")]               # yellow, raised one level: lives alone
    assert street[0]["started_at"] == street[0]["ts"]          # at its own time, t0
    [dead] = dead_letters(msgs)
    assert dead.reason == "stale" and str(t0 + 2000) in dead.detail
    assert metric(rt, "cityops_late_readings_total") == 1


# ---- item 11: the smaller ones -------------------------------------------------------------------

def test_wrong_topic_levels_oversize_and_refused_readings_are_accounted_for(
        mosquitto: Mosquitto, runtime) -> None:
    """A reading one level too deep is a dead letter `wrong_topic` (it used to vanish in the
    broker); an oversize payload is journaled as the 4 KiB its dead letter keeps; readings_total
    counts only readings the engine took."""
    url = mosquitto.url
    rt = runtime(url, "small", env={"CITYOPS_STATE__SNAPSHOT_EVERY": "1h"})
    ts = now_ms()
    good = dumps(reading(NEIGHBOUR, 1.0, ts=ts))
    deep = [(f"cityops/readings/{NEIGHBOUR}/extra", good),
            ("cityops/gateways/gw-510104-0001/a/b", dumps([reading(NEIGHBOUR, 1.0, ts=ts)]))]
    huge = dumps([reading(NEIGHBOUR, 1.0, ts=ts + i) for i in range(6000)])
    with Subscriber(url, DEAD_TOPIC) as sub:
        publish_many(url, [*deep, (f"cityops/readings/{NEIGHBOUR}", good),
                           ("cityops/readings/gas-999999-000001",
                            dumps(reading("gas-999999-000001", 1.0, ts=ts))),
                           ("cityops/gateways/gw-510104-0001", huge)])
        sub.wait_for(lambda m: len(dead_letters(m)) >= 4, 15)
        dead = dead_letters(settle(sub))
    wrong = sorted((d.source, d.payload.encode()) for d in dead if d.reason == "wrong_topic")
    assert wrong == sorted((t, p) for t, p in deep), dead
    assert sorted(d.reason for d in dead) == ["oversize", "unknown_sensor", "wrong_topic",
                                              "wrong_topic"]
    m = rt.metrics()
    assert m['cityops_dead_letters_total{reason="wrong_topic"}'] == 2
    assert m["cityops_readings_total"] == 1, "a refused reading is not a reading taken"
    assert 0 < m["cityops_journal_bytes"] < 4096 + 2000, "the oversize payload journaled whole"


def test_retained_garbage_is_dead_lettered_once_not_at_every_reconnect(
        mosquitto: Mosquitto, runtime) -> None:
    url = mosquitto.url
    topic = f"cityops/readings/{NEIGHBOUR}"
    rt = runtime(url, "retained")
    try:
        with Subscriber(url, DEAD_TOPIC) as sub:
            publish(url, topic, b"firmware 1.2 garbage", retain=True)
            sub.wait_for(lambda m: len(dead_letters(m)) >= 1, 10)
            rt.stop()
            rt.start()                          # same session: the broker replays the retained
            rt.stop()
            rt.start()
            wait_until(lambda: metric(rt, "cityops_retained_skipped_total") >= 1, 10,
                       "the replayed retained message skipped", rt)
            dead = dead_letters(settle(sub, quiet=1.0))
        assert [(d.reason, d.payload) for d in dead] == [("malformed", "firmware 1.2 garbage")]
    finally:
        publish(url, topic, b"", retain=True)   # the module's broker is shared: clear it


def test_a_runtime_restarted_more_often_than_its_snapshot_interval_still_snapshots(
        mosquitto: Mosquitto, runtime) -> None:
    url = mosquitto.url
    rt = runtime(url, "restarts", env={"CITYOPS_STATE__SNAPSHOT_EVERY": "1h"})
    ts = now_ms()
    for k in range(3):                          # kill -9 each time, long before the hour
        publish(url, f"cityops/readings/{NEIGHBOUR}", dumps(reading(NEIGHBOUR, 1.0, ts=ts + k)))
        wait_until(lambda: metric(rt, "cityops_journal_entries") > 0, 10, "journaled", rt)
        rt.kill()
        rt.start()
        wait_until(lambda: metric(rt, "cityops_journal_entries") == 0, 10,
                   "a snapshot after the start", rt)
    rt.stop()
    rt.env["CITYOPS_STATE__SNAPSHOT_BYTES"] = "2000"       # and once the journal passes a size
    rt.start()
    publish_many(url, [(f"cityops/readings/{NEIGHBOUR}",
                        dumps(reading(NEIGHBOUR, 1.0, ts=ts + 100 + i))) for i in range(40)])
    wait_until(lambda: metric(rt, "cityops_readings_total") >= 43, 10, "readings taken", rt)
    wait_until(lambda: metric(rt, "cityops_journal_bytes") < 2000, 10, "a size snapshot", rt)
