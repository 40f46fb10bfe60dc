"""Contender (b) of bench/kafka_bench.py: the Faust agent a newcomer writes first.

    NAIVE_BOOTSTRAP=127.0.0.1:9092 NAIVE_APP_ID=bench-b NAIVE_TOPIC=bench-b.readings \
    NAIVE_OUT=bench-b.notices NAIVE_PARTITIONS=4 NAIVE_LIMITS=limits.json \
    NAIVE_EXPECTED=20000 NAIVE_PROGRESS=progress.json \
        .venv/bin/python bench/naive_faust_app.py worker -l warn

One event at a time (`async for value in stream`): stdlib JSON decode, the sensor's last value
into a changelog-backed table, a notice sent for a reading over its sensor's threshold
(NAIVE_LIMITS: sensor id -> limit, the same dict contender (a) uses). This is INFRA.md's "Faust
agent pass-through, one event at a time (agent + table + send)" line, made to do the same work as
(a) plus the one piece of state a rule engine cannot do without.

Progress goes to NAIVE_PROGRESS (JSON: records taken, wall and CPU time at the first and at the
last, notices) every half second, written whole and renamed so the bench never reads half a file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import faust

ENV = os.environ
PARTITIONS = int(ENV["NAIVE_PARTITIONS"])
EXPECTED = int(ENV["NAIVE_EXPECTED"])
PROGRESS = Path(ENV["NAIVE_PROGRESS"])
LIMITS: dict[str, float] = json.loads(Path(ENV["NAIVE_LIMITS"]).read_text())

app = faust.App(
    ENV["NAIVE_APP_ID"],
    broker=f"kafka://{ENV['NAIVE_BOOTSTRAP']}",
    store="memory://",
    datadir=str(PROGRESS.parent / f"{ENV['NAIVE_APP_ID']}-data"),
    topic_partitions=PARTITIONS, topic_replication_factor=1,
    # INFRA.md: tansu makes a group's first join wait half the session timeout (30-110 s with
    # Faust's defaults)
    broker_session_timeout=6.0, broker_heartbeat_interval=1.0,
    consumer_auto_offset_reset="earliest",
    web_enabled=False)
RAW = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
readings = app.topic(ENV["NAIVE_TOPIC"], partitions=PARTITIONS, **RAW)
notices = app.topic(ENV["NAIVE_OUT"], partitions=PARTITIONS, **RAW)
last_value = app.Table("last_value", default=float, partitions=PARTITIONS)
stats = {"count": 0, "first": None, "last": None, "notices": 0, "cpu_first": 0.0,
         "cpu_last": 0.0}


@app.agent(readings)
async def evaluate(stream):
    async for value in stream:
        if stats["first"] is None:
            stats["first"], stats["cpu_first"] = time.time(), time.process_time()
        r = json.loads(value)
        v = r.get("value")
        if v is not None:
            sid = r["sensor_id"]
            last_value[sid] = v
            if v >= LIMITS.get(sid, float("inf")):
                await notices.send(key=sid.encode(), value=json.dumps(
                    {"sensor_id": sid, "ts": r["ts"], "value": v, "limit": LIMITS[sid]}).encode())
                stats["notices"] += 1
        stats["count"] += 1
        if stats["count"] == EXPECTED:
            stats["last"], stats["cpu_last"] = time.time(), time.process_time()


@app.timer(interval=0.5)
async def report() -> None:
    tmp = PROGRESS.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(PROGRESS)


if __name__ == "__main__":
    app.main()
