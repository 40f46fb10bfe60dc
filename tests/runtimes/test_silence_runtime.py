"""Silences end to end: `cityops silence add|list|end` against `cityops run` on a real Mosquitto.
A street's silence holds its gas leak's notices while another street's go out; it survives
kill -9 (journaled like an acknowledgement, replayed at the restart); ending it tells the tiers
what it held. Only a user whose scope covers the street may make or end it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness.brokers import Mosquitto, Subscriber, publish_many
from tests.support import (
    DUTY_TOKENS,
    NOTICE_FILTERS,
    ROOT,
    Runtime,
    dumps,
    notices,
    now_ms,
    reading,
    settle,
    wait_until,
)

pytestmark = pytest.mark.broker

GAS = "gas-510104-000002"        # 锦江区 春熙路街道 510104020
GAS_QY = "gas-510105-000001"     # 青羊区 510105020


def silence(rt: Runtime, user: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "silence", *args,
                           "--url", f"http://127.0.0.1:{rt.http_port}", "--token", DUTY_TOKENS[user]],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


def listed(rt: Runtime) -> dict:
    got = silence(rt, "duty-510104", "list", "--json")
    assert got.returncode == 0, got.stderr
    return {s["id"]: s for s in json.loads(got.stdout)["silences"]}


def test_a_street_silence_holds_its_alerts_survives_kill_9_and_tells_them_when_ended(
        mosquitto: Mosquitto, runtime, duty_users: Path) -> None:
    url = mosquitto.url
    rt = runtime(url, "silence", env={"CITYOPS_ACKS__USERS": str(duty_users),
                                      "CITYOPS_STATE__SNAPSHOT_EVERY": "1h"})   # the journal keeps it
    # 青羊区's duty desk may not silence a street of 锦江区
    refused = silence(rt, "duty-510105", "add", "--match", "street=510104020", "--for", "1h",
                      "--reason", "管网检修")
    assert refused.returncode == 1 and "403" in refused.stderr and "510105" in refused.stderr
    made = silence(rt, "duty-510104", "add", "--match", "street=510104020", "--for", "1h",
                   "--reason", "管网检修")
    assert made.returncode == 0, made.stderr
    sid = made.stdout.split()[0]
    assert sid.startswith("s-")
    wait_until(lambda: sid in listed(rt), 10, "the silence in force", rt)

    ts = now_ms()
    with Subscriber(url, *NOTICE_FILTERS) as sub:
        publish_many(url, [(f"cityops/readings/{GAS}", dumps(reading(GAS, 27.5, ts=ts))),
                           (f"cityops/readings/{GAS_QY}", dumps(reading(GAS_QY, 30.0, ts=ts)))])
        wait_until(lambda: any(n["sensor_id"] == GAS_QY for n in notices(sub.messages)), 10,
                   "the other street's leak told", rt)
        muted = wait_until(lambda: listed(rt)[sid]["muting"], 10, "the leak muted", rt)
        seen = notices(settle(sub))
    assert [n for n in seen if n["sensor_id"] == GAS] == []          # held, not told
    [inc] = muted
    assert inc["held"] and inc["severity"] == "yellow"
    shown = silence(rt, "duty-510104", "list").stdout          # for people
    assert f"{sid}  street=510104020" in shown and "by duty-510104: 管网检修" in shown
    assert f"muting {inc['alert_id']} yellow" in shown and "(notices held)" in shown

    rt.kill()                                                        # kill -9: nothing flushed
    rt.start()
    after = listed(rt)
    assert set(after) == {sid} and after[sid]["muting"] == muted     # replayed from the journal
    with Subscriber(url, *NOTICE_FILTERS) as sub:
        # ending it is as scoped as making it
        assert silence(rt, "duty-510105", "end", sid).returncode == 1
        ended = silence(rt, "duty-510104", "end", sid)
        assert ended.returncode == 0, ended.stderr
        told = wait_until(lambda: [n for n in notices(sub.messages) if n["sensor_id"] == GAS
                                   and n["tier"] == "district"], 10, "the held leak told", rt)
        got = [n for n in notices(settle(sub)) if n["alert_id"] == inc["alert_id"]]
    assert told[0]["state"] == "firing" and "静默结束" in told[0]["summary"]
    assert {n["tier"] for n in got} >= {"street", "district"}
    assert listed(rt) == {}


def test_silence_command_errors_read_well(mosquitto: Mosquitto, runtime, duty_users: Path) -> None:
    rt = runtime(mosquitto.url, "silence-errors", env={"CITYOPS_ACKS__USERS": str(duty_users)})
    cases = [
        (["add", "--match", "street", "--for", "1h", "--reason", "x"], "write LABEL=VALUE"),
        (["add", "--match", "planet=mars", "--for", "1h", "--reason", "x"], "unknown label 'planet'"),
        (["add", "--match", "street=510104020", "--window", "someday", "--reason", "x"],
         'write e.g. "tue 01:00-05:00'),
        (["add", "--match", "street=510104020", "--window", "tue 01:00-05:00 Mars/Olympus",
          "--reason", "x"], "not an IANA time zone"),
        (["add", "--match", "street=510104020", "--until", "tomorrow", "--reason", "x"],
         "RFC 3339 with an offset"),
        (["add", "--match", "street=5101*", "--for", "1h", "--reason", "x"],
         "must name places inside it"),
        (["end", "s-nothing"], "404 no silence s-nothing"),
    ]
    for args, why in cases:
        got = silence(rt, "duty-510104", *args)
        assert got.returncode == 1 and why in got.stderr, (args, got.stderr)
        assert "Traceback" not in got.stderr
