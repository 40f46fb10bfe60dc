"""Silences on Kafka: `cityops silence` against a `cityops worker` on tansu. The silence goes
through the acks topic, fanned out to every partition like an acknowledgement; the partition
holding the street's gas leak holds its notices while another street's go out; the silence
survives kill -9 of the worker (in the checkpoint, or replayed from the fan-out log); ending it
tells the tiers what it held."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.harness.kafka_broker import TopicReader, produce
from tests.support import DUTY_TOKENS, PARTITIONS, ROOT, T, wait_until, worker

pytestmark = pytest.mark.broker

GAS = "gas-510104-000002"        # 锦江区 春熙路街道 510104020
GAS_QY = "gas-510105-000001"     # 青羊区 510105020


class Cli:
    """`cityops silence …` against the worker's HTTP port, as 锦江区's duty desk."""

    def __init__(self, w) -> None:
        self.w = w

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "silence", *args,
                               "--url", f"http://127.0.0.1:{self.w.http_port}",
                               "--token", DUTY_TOKENS["duty-510104"]],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)

    def listed(self) -> dict:
        got = self("list", "--json")
        assert got.returncode == 0, got.stderr
        return {s["id"]: s for s in json.loads(got.stdout)["silences"]}


def test_a_silence_travels_like_an_ack_and_holds_a_streets_alerts_on_kafka(
        kafka, tmp_path: Path, duty_users: Path) -> None:
    w = worker(kafka, tmp_path, "silences", CITYOPS_ACKS__USERS=str(duty_users),
               CITYOPS_ENGINE__ALLOWED_LATENESS="10s")
    try:
        w.wait_partitions(PARTITIONS)
        cli = Cli(w)
        made = cli("add", "--match", "street=510104020", "--for", "1h", "--reason", "管网检修")
        assert made.returncode == 0, made.stderr
        sid = made.stdout.split()[0]
        wait_until(lambda: sid in cli.listed(), 60, "the silence in every partition", interval=0.2)
        now = int(time.time() * 1000)
        produce(kafka.bootstrap, T["readings"], [
            (s.encode(), json.dumps({"sensor_id": s, "ts": now, "value": v}).encode())
            for s, v in ((GAS, 27.5), (GAS_QY, 30.0))])
        street = TopicReader(kafka.bootstrap, [T["alerts.street"]])
        street.until(lambda recs: any(json.loads(r.value)["sensor_id"] == GAS_QY for r in recs),
                     timeout=60, quiet=3.0)
        assert [n for n in street.values() if n["sensor_id"] == GAS] == []
        [muted] = wait_until(lambda: cli.listed()[sid]["muting"], 30, "the leak muted", interval=0.2)
        assert muted["held"]

        w.kill()                                          # kill -9
        w.start()
        w.wait_partitions(PARTITIONS)
        after = wait_until(lambda: cli.listed().get(sid, {}).get("muting"), 60,
                     "the silence and the muted leak back after kill -9", interval=0.2)
        assert [m["alert_id"] for m in after] == [muted["alert_id"]]
        ended = cli("end", sid)
        assert ended.returncode == 0, ended.stderr
        told = TopicReader(kafka.bootstrap, [T["alerts.street"], T["alerts.district"]])
        told.until(lambda recs: {json.loads(r.value)["tier"] for r in recs
                                 if json.loads(r.value)["alert_id"] == muted["alert_id"]}
                   >= {"street", "district"}, timeout=60, quiet=2.0)
        mine = [n for n in told.values() if n["alert_id"] == muted["alert_id"]]
        assert all(n["state"] == "firing" and "静默结束" in n["summary"] for n in mine)
        wait_until(lambda: cli.listed() == {}, 30, "the silence gone", interval=0.2)
    finally:
        w.stop()
