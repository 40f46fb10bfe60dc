"""The distributed runtime (`cityops worker`) on a real Kafka-protocol broker (issue 4).

    .venv/bin/python bench/kafka_bench.py              # 200,000 readings; (b) 20,000; 20 s at 5,000/s
    .venv/bin/python bench/kafka_bench.py --quick      # a smoke test (< 2 min), figures not meaningful
    .venv/bin/python bench/kafka_bench.py --profile bench/out/kafka-worker.txt   # + py-spy, (c) (d)

One broker for the run: tansu (bench/harness/kafka_broker.py's Tansu: in memory, a free port of
127.0.0.1). Each contender gets topics of its own prefix and its own consumer group, so none sees
another's records; every input topic has --partitions partitions (4) and ONE consumer process
takes them all.

Input: the engine bench's reading mix (bench/engine_bench.py make_payloads: mostly quiet, ~0.05 %
of gas readings over the threshold, camera violations, batteries) on the fixture registry
(pipeline/fixtures/chengdu, 533 sensors), split into one record per reading, keyed by sensor_id,
with event times rebased to the minutes before each load (the engine refuses readings a week
behind its wall-clock watermark). The fixture is what `cityops worker` loads by default; the cost
measured here is per Kafka record, which a bigger registry does not change much (the engine
bench covers 1,000,000 sensors: --registry takes another). Every record goes to its street's
partition (pipeline/runtimes/bridge.py ReadingRouter, as `cityops bridge` produces them), so (c) measures
evaluation, not the worker forwarding misrouted records (cityops_forwarded_total is reported and
should stay 0). The generator's few malformed payloads are left out: every record is a reading,
so the three contenders count the same thing. The records are loaded BEFORE the contender
starts: each drains a backlog, measured from its first record taken to its last, by counting
records (never end_offsets(): wrong on tansu, INFRA.md).

  (a) raw kafka-python, in its own process: KafkaConsumer (group) poll -> orjson decode + the
      sensor's threshold (gas sensors 20 %LEL, gas.leak's level1) -> a notice produced for each
      reading over it and nothing else -> commit after every poll: the ceiling of a hand-written
      consumer. From the first poll that returned records to the last record done.
  (b) a naive Faust agent (bench/naive_faust_app.py, `faust worker` subprocess): one event at a
      time, stdlib JSON, the sensor's last value into a table, a notice over threshold; only
      --naive-readings records since it is slow. From its first event to its last, as it counts.
  (c) `python -m pipeline.cli worker` (bench/harness/kafka_broker.py's CityopsProcess) with every built-in
      pack: readings/s from its /metrics, cityops_readings_total (readings the engines took)
      polled every 100 ms: the readings counted between the first poll that saw any and the first
      that saw them all, over the time between those polls.
  (d) latency, the same worker once caught up: a paced kafka-python producer (its own process)
      sends --rate readings/s for --latency-seconds; every 100 ms one of them is a gas reading
      of 30 %LEL from a gas sensor without an incident (cleared 0.5 s later), and a reader of
      {prefix}.alerts.street (fetch_max_wait 10 ms: see NoticeClock) notes when that
      incident's firing notice arrives: p50/p99/max of send -> notice, and whether the worker
      kept up (readings taken, partition lag and event-time lag polled from /metrics).

CPU: each contender's own CPU seconds over its measured span (process_time in (a) and (b),
/proc for the worker), so "records per CPU second" tells an expensive contender from one that
was short of a core on a shared machine.

Targets (issue 4): (c) >= 10x (b) and >= 0.6x (a), per worker process; p99 reading -> notice
< 250 ms at 5,000 readings/s. Everything shares the machine's cores with tansu (and, in (d),
with the producer), so compare ratios, not absolutes. Every process it starts is stopped at the
end, errors included.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine_bench import T0, make_payloads  # noqa: E402
from runtime_bench import GAS, PROBE_LEL, pct, py_spy, reading, stop_spy  # noqa: E402

from bench.harness.kafka_broker import CityopsProcess, Tansu, tansu_binary  # noqa: E402
from connectors import kafka as kt  # noqa: E402
from pipeline.core.registry import load as load_registry  # noqa: E402
from pipeline.shared.config import KafkaSettings  # noqa: E402
from pipeline.shared.reading_router import ReadingRouter  # noqa: E402
from rules.compiler import load_rules  # noqa: E402

GAS_LIMIT = 20.0            # gas.leak's level1_lel (rules/packs/gas.yaml): what (a) and (b) check
STALL_S = 30.0              # no progress for this long: the contender is stuck, not slow
TARGET_VS_NAIVE, TARGET_VS_RAW, TARGET_P99_MS = 10.0, 0.6, 250.0


# ---- input -----------------------------------------------------------------------------------

def make_records(reg, router: ReadingRouter, n: int) -> list[tuple[int, bytes, dict]]:
    """``n`` (partition, key, reading) with ``ts`` relative to the start (``load`` rebases it).
    One millisecond of event time per reading, so a sensor's readings never share a stamp (the
    engine would take the second for a redelivered duplicate)."""
    out: list[tuple[int, bytes, dict]] = []
    extra = n // 100 + 100          # the malformed payloads left out, and then some
    for payload in make_payloads(reg, n + extra, span_ms=n + extra):
        try:
            rows = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue                    # the generator's malformed payloads: see the docstring
        for r in rows if isinstance(rows, list) else [rows]:
            r["ts"] -= T0
            sid = r["sensor_id"]
            out.append((int(router.partition_of[reg.index[sid]]), sid.encode(), r))
    return out[:n]


def gas_limits(reg) -> dict[str, float]:
    return {sid: GAS_LIMIT for sid, k in zip(reg.sensor_ids, reg.kind_of, strict=True) if reg.kinds[k] in GAS}


def kafka_settings(bootstrap: str, prefix: str, partitions: int) -> KafkaSettings:
    return KafkaSettings(bootstrap=bootstrap, prefix=prefix, partitions=partitions, replication=1)


def load(bootstrap: str, topic: str, records: list[tuple[int, bytes, dict]]) -> float:
    """Produce the records, their event times ending now; returns the seconds it took."""
    from kafka import KafkaProducer
    base = int(time.time() * 1000) - (records[-1][2]["ts"] if records else 0) - 1
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                      batch_size=512 * 1024, max_request_size=4 * 1024 * 1024)
    t = time.perf_counter()
    try:
        for part, key, r in records:
            p.send(topic, key=key, value=orjson.dumps({**r, "ts": r["ts"] + base}),
                   partition=part)
        p.flush()
    finally:
        p.close()
    return time.perf_counter() - t


# ---- (a) raw kafka-python ----------------------------------------------------------------------

def _raw_consumer(bootstrap: str, topic: str, out_topic: str, group: str, expected: int,
                  limits: dict[str, float], results) -> None:
    """Consume -> decode -> threshold -> produce what is over -> commit; report (records,
    first poll with records, last record done, notices, CPU seconds between)."""
    from kafka import KafkaConsumer, KafkaProducer
    signal.signal(signal.SIGTERM, signal.SIG_DFL)         # not the parent's handler
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             session_timeout_ms=6000, heartbeat_interval_ms=1000)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    inf = float("inf")
    n = notices = 0
    first = last = cpu0 = cpu1 = 0.0
    waited_since = time.monotonic()
    try:
        while n < expected:
            batches = consumer.poll(timeout_ms=500)
            if not batches:
                if time.monotonic() - waited_since > (60 if not n else STALL_S):
                    break
                continue
            if not n:
                first, cpu0 = time.time(), time.process_time()
            for records in batches.values():
                for rec in records:
                    try:
                        r = orjson.loads(rec.value)
                    except orjson.JSONDecodeError:
                        continue
                    v = r.get("value")
                    if v is not None and v >= limits.get(r["sensor_id"], inf):
                        producer.send(out_topic, key=rec.key, value=orjson.dumps(
                            {"sensor_id": r["sensor_id"], "ts": r["ts"], "value": v}))
                        notices += 1
                n += len(records)
            consumer.commit()
            last, cpu1 = time.time(), time.process_time()
            waited_since = time.monotonic()
        producer.flush()
        results.put((n, first, last, notices, cpu1 - cpu0))
    finally:
        producer.close()
        consumer.close()


def phase_raw(bootstrap: str, records, partitions: int, limits, ctx) -> dict:
    prefix = "bench-a"
    topic, out_topic = f"{prefix}.readings", f"{prefix}.notices"
    kt.ensure_topics(kafka_settings(bootstrap, prefix, partitions), [topic, out_topic])
    load_s = load(bootstrap, topic, records)
    results = ctx.Queue()
    proc = ctx.Process(target=_raw_consumer, daemon=True,
                       args=(bootstrap, topic, out_topic, f"{prefix}-group", len(records),
                             limits, results))
    proc.start()
    try:
        n, first, last, notices, cpu = results.get(timeout=120 + len(records) / 1000)
    except queue.Empty:
        raise RuntimeError("(a) the raw consumer did not report") from None
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    if n < len(records):
        raise RuntimeError(f"(a) the raw consumer took {n:,} of {len(records):,} records")
    return {"records": n, "seconds": last - first, "cpu_s": cpu, "notices": notices,
            "load_s": load_s}


# ---- (b) a naive Faust agent ------------------------------------------------------------------

class NaiveFaust(CityopsProcess):
    """bench/naive_faust_app.py as a `faust worker` subprocess (CityopsProcess's stop and log)."""

    def start(self) -> NaiveFaust:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "naive_faust_app.py"), "worker",
                 "-l", "warn"], cwd=self.workdir, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self


def phase_naive(bootstrap: str, workdir: Path, records, partitions: int, limits) -> dict:
    prefix = "bench-b"
    topic, out_topic = f"{prefix}.readings", f"{prefix}.notices"
    kt.ensure_topics(kafka_settings(bootstrap, prefix, partitions), [topic, out_topic])
    load_s = load(bootstrap, topic, records)
    limits_file, progress = workdir / "naive-limits.json", workdir / "naive-progress.json"
    limits_file.write_text(json.dumps(limits))
    app = NaiveFaust("naive", workdir, {
        "NAIVE_BOOTSTRAP": bootstrap, "NAIVE_APP_ID": f"{prefix}-app", "NAIVE_TOPIC": topic,
        "NAIVE_OUT": out_topic, "NAIVE_PARTITIONS": str(partitions),
        "NAIVE_LIMITS": str(limits_file), "NAIVE_EXPECTED": str(len(records)),
        "NAIVE_PROGRESS": str(progress)}, "naive-faust").start()
    try:
        seen, changed = -1, time.monotonic()
        while True:
            if app.proc.poll() is not None:
                raise RuntimeError(f"(b) the naive Faust app exited with {app.proc.returncode}\n"
                                   + app.log())
            try:
                st = json.loads(progress.read_text())
            except FileNotFoundError:
                st = {"count": 0, "last": None}
            if st["last"] is not None:
                return {"records": st["count"], "seconds": st["last"] - st["first"],
                        "cpu_s": st["cpu_last"] - st["cpu_first"], "notices": st["notices"],
                        "load_s": load_s}
            if st["count"] != seen:
                seen, changed = st["count"], time.monotonic()
            elif time.monotonic() - changed > (90 if not seen else STALL_S):
                raise RuntimeError(f"(b) the naive Faust app stalled at {seen:,} of "
                                   f"{len(records):,} records\n{app.log()}")
            time.sleep(0.2)
    finally:
        app.stop()


# ---- (c) cityops worker ------------------------------------------------------------------------

def metrics(w: CityopsProcess) -> dict[str, float]:
    """Every cityops_* sample of one /metrics answer."""
    return w.metric("cityops_")


def total(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def lags(m: dict[str, float]) -> list[float]:
    return [v for k, v in m.items() if k.startswith("cityops_partition_lag{")]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc): with other work on
    the machine, readings per CPU second tell "expensive" from "starved"."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain(w: CityopsProcess, expected: int) -> tuple[list[tuple[float, float, float]], dict]:
    """Poll /metrics every 100 ms until the worker's engines took ``expected`` readings;
    (time, readings so far, its CPU seconds) per poll, and the last answer. Each sample's time
    is the middle of its request."""
    samples: list[tuple[float, float, float]] = []
    changed = time.monotonic()
    patience = 120.0                # start-up: topics, the group's first join, table recovery
    while True:
        if w.proc.poll() is not None:
            raise RuntimeError(f"(c) the worker exited with {w.proc.returncode}\n{w.log()}")
        t = time.time()
        try:
            m = metrics(w)
        except OSError:
            m = None                    # its HTTP face is not up yet
        if m is not None:
            r = total(m, "cityops_readings_total")
            samples.append(((t + time.time()) / 2, r, cpu_seconds(w.proc.pid)))
            if r >= expected:
                return samples, m
            if len(samples) > 1 and r != samples[-2][1]:
                changed, patience = time.monotonic(), STALL_S
        if time.monotonic() - changed > patience:
            got = samples[-1][1] if samples else 0
            raise RuntimeError(f"(c) the worker stalled at {got:,.0f} of {expected:,} readings\n"
                               + w.log())
        time.sleep(0.1)


def drain_rate(samples: list[tuple[float, float, float]], expected: int
               ) -> tuple[float, float, float]:
    """(readings, seconds, CPU seconds) between the first poll that saw readings taken and the
    first that saw them all."""
    start = next(i for i, x in enumerate(samples) if x[1] > 0)
    end = next(i for i, x in enumerate(samples) if x[1] >= expected)
    if end == start:
        raise RuntimeError("(c) the backlog was drained between two polls: give more --readings")
    a, b = samples[start], samples[end]
    return b[1] - a[1], b[0] - a[0], b[2] - a[2]


def _paced(bootstrap: str, topic: str, reg, partition_of: list[int], rate: float,
           seconds: float, probes: list[str], results) -> None:
    """``rate`` readings/s for ``seconds``; every 100 ms one of them is a probe (a gas reading
    over the threshold from ``probes``), cleared 0.5 s later. Reports (sent, start, end,
    {sensor: wall time the probe was handed to the producer})."""
    from kafka import KafkaProducer
    signal.signal(signal.SIGTERM, signal.SIG_DFL)         # not the parent's handler
    # what `cityops bridge` uses (acks=all, linger 5 ms): the latency a real feed would see
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                      batch_size=256 * 1024)
    rnd = random.Random(11)
    order = list(range(len(reg)))
    last_ts: dict[str, int] = {}
    sent_at: dict[str, float] = {}
    clears: list[tuple[float, str]] = []
    busy: set[str] = set()          # probed: the background leaves them alone

    def ts_for(sid: str) -> int:
        ts = max(int(time.time() * 1000), last_ts.get(sid, 0) + 1)
        last_ts[sid] = ts
        return ts

    def send(sid: str, value: dict) -> None:
        p.send(topic, key=sid.encode(), value=orjson.dumps(value),
               partition=partition_of[reg.index[sid]])

    try:
        sent = g = 0
        t0 = time.perf_counter()
        w0 = time.time()
        next_probe = t0 + 1.0          # a second of background first
        pending = list(probes)
        while (now := time.perf_counter()) - t0 < seconds:
            due = (now - t0) * rate
            while sent < due:
                if g % len(order) == 0:
                    rnd.shuffle(order)
                idx = order[g % len(order)]
                g += 1
                sid = reg.sensor_ids[idx]
                if sid not in busy:
                    send(sid, reading(reg, rnd, idx, ts_for(sid), incidents=False))
                    sent += 1
            if pending and now >= next_probe:
                sid = pending.pop(0)
                busy.add(sid)
                sent_at[sid] = time.time()
                send(sid, {"sensor_id": sid, "ts": ts_for(sid), "value": PROBE_LEL})
                clears.append((now + 0.5, sid))
                next_probe += 0.1
            while clears and clears[0][0] <= now:           # back under clear_lel
                sid = clears.pop(0)[1]
                send(sid, {"sensor_id": sid, "ts": ts_for(sid), "value": 1.0})
            time.sleep(0.001)
        p.flush()
        results.put((sent, w0, time.time(), sent_at))
    finally:
        p.close()


class NoticeClock:
    """A reader of the street tier in a thread: when each gas.leak firing notice arrived.

    Not bench/harness/kafka_broker.py's TopicReader: its consumer keeps kafka-python's 500 ms
    fetch_max_wait, and tansu answers a waiting fetch late instead of when a record comes
    (measured here at 1,000 records/s: +130 ms p50 and +270 ms p99 with 500 ms, +16 / +33 ms
    with 20 ms). That would be counted as the worker's latency."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer, TopicPartition
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                      enable_auto_commit=False, auto_offset_reset="earliest",
                                      fetch_max_wait_ms=10)
        tps = [TopicPartition(topic, p)
               for p in sorted(self.consumer.partitions_for_topic(topic) or ())]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.arrived: dict[str, float] = {}
        self.leaked: set[str] = set()        # sensors with any gas.leak notice so far
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def poll(self, timeout_s: float) -> list:
        return [rec for batch in self.consumer.poll(timeout_ms=int(timeout_s * 1000)).values()
                for rec in batch]

    def take(self, records: list) -> None:
        t = time.time()
        for rec in records:
            n = orjson.loads(rec.value)
            if n.get("rule_id") != "gas.leak":
                continue
            self.leaked.add(n["sensor_id"])
            if n.get("state") == "firing":
                self.arrived.setdefault(n["sensor_id"], t)

    def settle(self, quiet: float = 1.0) -> None:
        """Read what the topic holds already (the backlog's incidents)."""
        calm = time.monotonic() + quiet
        while time.monotonic() < calm:
            got = self.poll(0.25)
            if got:
                self.take(got)
                calm = time.monotonic() + quiet
        self.arrived.clear()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.take(self.poll(0.1))

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(5)
        self.consumer.close()


def phase_latency(bootstrap: str, w: CityopsProcess, names: dict[str, str], reg,
                  router: ReadingRouter, rate: float, seconds: float, ctx) -> dict:
    m = metrics(w)
    deadline = time.monotonic() + STALL_S
    while any(lags(m)):                         # caught up first
        if time.monotonic() > deadline:
            raise RuntimeError(f"(d) the worker did not catch up: lag {lags(m)}")
        time.sleep(0.2)
        m = metrics(w)
    clock = NoticeClock(bootstrap, names["alerts.street"])
    proc = None
    try:
        clock.settle()
        pool = [sid for sid in gas_limits(reg) if sid not in clock.leaked]
        random.Random(5).shuffle(pool)
        probes = pool[:max(0, int((seconds - 1.5) * 10))]    # one per 100 ms after the first second
        clock.thread.start()
        results = ctx.Queue()
        proc = ctx.Process(target=_paced, daemon=True, args=(
            bootstrap, names["readings"], reg, router.partition_of.tolist(), rate, seconds,
            probes, results))
        m0 = metrics(w)
        w0, cpu0 = time.time(), cpu_seconds(w.proc.pid)
        proc.start()
        max_lag = 0.0
        behind: list[float] = []        # per poll, the partition furthest behind the clock
        got = None
        while got is None:
            try:
                got = results.get(timeout=0.25)
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError("(d) the paced producer died") from None
                if time.time() - w0 > seconds + 60:
                    raise RuntimeError("(d) the paced producer did not finish") from None
            m = metrics(w)
            max_lag = max(max_lag, sum(lags(m)))
            if time.time() - w0 > 1.5:          # past the backlog: the paced readings
                behind.append(max(v for k, v in m.items()
                                  if k.startswith("cityops_partition_event_lag_seconds{")))
        sent, p0, p1, sent_at = got
        # the last probes' notices, and the worker's last readings
        calm = time.monotonic() + 5
        while time.monotonic() < calm and (set(sent_at) - set(clock.arrived) or any(lags(metrics(w)))):
            time.sleep(0.1)
        m1 = metrics(w)
        w1, cpu1 = time.time(), cpu_seconds(w.proc.pid)
    finally:
        clock.close()
        if proc is not None:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
    lat = sorted(1000 * (clock.arrived[sid] - t) for sid, t in sent_at.items() if sid in clock.arrived)
    taken = total(m1, "cityops_readings_total") - total(m0, "cityops_readings_total")
    return {"rate": rate, "seconds": seconds, "sent": sent, "sent_per_s": sent / (p1 - p0),
            "probes": len(sent_at), "samples": len(lat), "lost": len(sent_at) - len(lat),
            "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else float("nan"), "taken": taken,
            "taken_per_s": taken / (w1 - w0), "cpu_s": cpu1 - cpu0, "wall_s": w1 - w0,
            "max_lag": max_lag, "end_lag": sum(lags(m1)),
            "event_lag_p50_s": pct(sorted(behind), 50), "event_lag_max_s": max(behind, default=0)}


def phase_worker(bootstrap: str, workdir: Path, records, partitions: int, reg,
                 router: ReadingRouter, args, ctx) -> tuple[dict, dict]:
    prefix = "bench-c"
    names = kt.topic_names(prefix)
    kt.ensure_topics(kafka_settings(bootstrap, prefix, partitions))   # all of the worker's
    load_s = load(bootstrap, names["readings"], records)
    env = {"CITYOPS_KAFKA__BOOTSTRAP": bootstrap, "CITYOPS_KAFKA__PARTITIONS": str(partitions),
           "CITYOPS_KAFKA__REPLICATION": "1", "CITYOPS_KAFKA__PREFIX": prefix,
           "CITYOPS_WORKER__APP_ID": f"{prefix}-worker"}
    if args.registry:
        env["CITYOPS_REGISTRY"] = str(args.registry)
    w = CityopsProcess("worker", workdir, env, "cityops-worker").start()
    spy = None
    try:
        if args.profile is not None:
            spy = py_spy(w.proc.pid, args.profile)
        samples, m = drain(w, len(records))
        stop_spy(spy)
        spy = None
        taken, seconds, cpu = drain_rate(samples, len(records))
        c = {"records": taken, "seconds": seconds, "cpu_s": cpu, "load_s": load_s,
             "notices": int(total(m, "cityops_notices_total")),
             "forwarded": int(total(m, "cityops_forwarded_total")),
             "dead_letters": int(total(m, "cityops_dead_letters_total")),
             "engine_errors": int(total(m, "cityops_engine_errors_total")),
             "checkpoints": int(total(m, "cityops_checkpoints_total"))}
        if args.profile is not None:
            spy = py_spy(w.proc.pid, args.profile.with_stem(args.profile.stem + "-latency"))
        d = phase_latency(bootstrap, w, names, reg, router, args.rate, args.latency_seconds, ctx)
        return c, d
    finally:
        stop_spy(spy)
        w.stop()


# ---- report --------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=200_000, help="records for (a) and (c)")
    ap.add_argument("--naive-readings", type=int, default=20_000,
                    help="records for (b), the naive Faust agent (slow)")
    ap.add_argument("--partitions", type=int, default=4, help="of every contender's input topic")
    ap.add_argument("--rate", type=float, default=5_000, help="(d) readings/s")
    ap.add_argument("--latency-seconds", type=float, default=20.0, help="(d) how long")
    ap.add_argument("--registry", type=Path, help="a registry folder (default: the fixture, "
                    "pipeline/fixtures/chengdu); `cityops registry generate` makes bigger ones")
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="py-spy record of the worker during (c) into FILE and during (d) into "
                    "FILE-latency: collapsed stacks of the thread holding the GIL (PYSPY_FLAGS, "
                    "default --gil)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "kafka_bench.json",
                    help="where the figures go as JSON")
    ap.add_argument("--quick", action="store_true", help="small (20,000 / 2,000 readings, 5 s "
                    "of latency): a smoke test, not a measurement")
    args = ap.parse_args()
    if args.quick:
        args.readings = min(args.readings, 20_000)
        args.naive_readings = min(args.naive_readings, 2_000)
        args.latency_seconds = min(args.latency_seconds, 5.0)
    command = shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT))
                          else sys.executable, *sys.argv])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))      # finally-blocks run

    rules = load_rules()
    reg = load_registry(args.registry, rules.kinds)
    router = ReadingRouter(reg, args.partitions)
    records = make_records(reg, router, args.readings)
    limits = gas_limits(reg)
    ctx = mp.get_context("fork")
    tansu_version = subprocess.run([tansu_binary(), "--version"], capture_output=True, text=True,
                                   check=False).stdout.strip()
    print(f"kafka bench: {'fixture' if args.registry is None else args.registry} registry "
          f"({len(reg):,} sensors), {len(rules.rules)} rules of every built-in pack")
    print(f"machine: {os.cpu_count()} cores shared by the broker, the contender and the bench; "
          f"load average {os.getloadavg()[0]:.2f} before the run (compare ratios, not absolutes)")
    print(f"input: {len(records):,} readings, one per record keyed by sensor_id, on its street's "
          f"partition of {args.partitions}, loaded before each contender starts", flush=True)

    with tempfile.TemporaryDirectory(prefix="cityops-kafka-bench-") as tmp:
        workdir = Path(tmp)
        broker = Tansu(workdir / "tansu")
        try:
            broker.start()
            print(f"broker: {tansu_version} at {broker.bootstrap} (memory storage)", flush=True)
            t = time.perf_counter()
            a = phase_raw(broker.bootstrap, records, args.partitions, limits, ctx)
            print(f"(a) done in {time.perf_counter() - t:.1f}s", flush=True)
            t = time.perf_counter()
            b = phase_naive(broker.bootstrap, workdir, records[:args.naive_readings],
                            args.partitions, limits)
            print(f"(b) done in {time.perf_counter() - t:.1f}s", flush=True)
            t = time.perf_counter()
            c, d = phase_worker(broker.bootstrap, workdir, records, args.partitions, reg,
                                router, args, ctx)
            print(f"(c) and (d) done in {time.perf_counter() - t:.1f}s", flush=True)
        finally:
            broker.stop()

    for x in (a, b, c):
        x["per_s"] = x["records"] / x["seconds"]
        x["per_cpu_s"] = x["records"] / x["cpu_s"] if x["cpu_s"] > 0 else float("nan")
    rows = [("(a) raw kafka-python consume -> produce", a),
            ("(b) naive Faust agent, one event at a time", b),
            ("(c) cityops worker, every built-in pack", c)]
    print()
    print(f"{'':46}{'records':>10}{'seconds':>9}{'records/s':>11}{'vs (a)':>8}{'vs (b)':>8}"
          f"{'CPU busy':>10}{'per CPU-s':>11}")
    for label, x in rows:
        print(f"{label:46}{x['records']:>10,.0f}{x['seconds']:>9.2f}{x['per_s']:>11,.0f}"
              f"{x['per_s'] / a['per_s']:>7.2f}x{x['per_s'] / b['per_s']:>7.1f}x"
              f"{x['cpu_s'] / x['seconds']:>9.0%}{x['per_cpu_s']:>11,.0f}")
    print("(CPU busy: the contender process's CPU time over its wall time; near 100 % it was the "
          "limit itself, well under it it waited for the broker or for a core)")
    print(f"(a) {a['notices']:,} notices; (b) {b['notices']:,} notices (of its "
          f"{b['records']:,} records); (c) {c['notices']:,} notices, {c['dead_letters']:,} dead "
          f"letters, {c['forwarded']:,} forwarded, {c['engine_errors']} engine errors, "
          f"{c['checkpoints']} checkpoints")
    print(f"(c) counted by cityops_readings_total polled every 100 ms; loading took "
          f"{c['load_s']:.1f} s ({len(records) / c['load_s']:,.0f} records/s, not measured)")
    print(f"(d) reading -> street-tier notice, {d['samples']} samples at {d['sent_per_s']:,.0f} "
          f"readings/s sent for {d['seconds']:.0f} s"
          + (f", {d['lost']} probes got no notice" if d["lost"] else ""))
    print(f"      p50 {d['p50_ms']:.1f} ms   p95 {d['p95_ms']:.1f} ms   p99 {d['p99_ms']:.1f} ms"
          f"   max {d['max_ms']:.1f} ms")
    print(f"      the worker took {d['taken_per_s']:,.0f} readings/s meanwhile (CPU busy "
          f"{d['cpu_s'] / d['wall_s']:.0%}); lag (all partitions) max {d['max_lag']:,.0f} records, "
          f"{d['end_lag']:,.0f} at the end; its newest reading was {d['event_lag_p50_s']:.1f} s "
          f"behind the clock (median of the polls; max {d['event_lag_max_s']:.1f} s)")
    vs_b, vs_a = c["per_s"] / b["per_s"], c["per_s"] / a["per_s"]
    checks = [(f"(c) >= {TARGET_VS_NAIVE:.0f}x (b)", vs_b >= TARGET_VS_NAIVE, f"{vs_b:.1f}x"),
              (f"(c) >= {TARGET_VS_RAW}x (a)", vs_a >= TARGET_VS_RAW, f"{vs_a:.2f}x"),
              (f"p99 < {TARGET_P99_MS:.0f} ms at {args.rate:,.0f} readings/s",
               d["samples"] > 0 and not d["lost"] and d["p99_ms"] < TARGET_P99_MS
               and d["end_lag"] == 0, f"{d['p99_ms']:.1f} ms")]
    print("targets (per worker process): " + "; ".join(
        f"{name}: {'met' if ok else 'MISSED'} ({fig})" for name, ok, fig in checks))
    if args.quick:
        print("(--quick: too small to be a measurement)")
    print(f"command: {command}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "command": command, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "broker": tansu_version,
        "cores": os.cpu_count(), "sensors": len(reg), "partitions": args.partitions,
        "raw": a, "naive": b, "worker": c, "latency": d,
        "targets": {name: {"met": ok, "figure": fig} for name, ok, fig in checks},
        "quick": args.quick}, indent=2) + "\n")
    print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
