"""The live runtime (`cityops run`) against a real Mosquitto: sustained throughput and notice latency.

    .venv/bin/python bench/runtime_bench.py            # 60,000 gateway payloads, 300 latency samples
    .venv/bin/python bench/runtime_bench.py --quick    # a smoke test (< 30 s), figures not meaningful
    .venv/bin/python bench/runtime_bench.py --profile bench/out/runtime.txt   # + py-spy of (b) drain
    .venv/bin/python bench/runtime_bench.py --runtime-env 'CITYOPS_MQTT={"protocol": 311}'

One broker for the run: Debian's mosquitto with deploy/mosquitto/mosquitto.conf's tuning
(persistence, autosave 60 s, 1000 in flight, 1,000,000 queued, TCP_NODELAY) but anonymous, on a
free port of 127.0.0.1 (started by bench/harness/brokers.py's Mosquitto). Inputs: the fixture registry
(pipeline/fixtures/chengdu, 533 sensors) with every built-in pack; what its gateways publish,
one payload per gateway with a reading from each sensor behind it (sensors without a gateway
publish alone on cityops/readings/{id}), current epoch-ms timestamps, mostly quiet values (a
rare gas leak, camera violation or low battery, a few malformed payloads), QoS 1.

  (a) baseline: a bare paho 2.x subscriber (MQTT 5, QoS 1, in its own process) takes the same
      payloads, orjson-parses them and compares each reading with one threshold (INFRA.md's
      "paho-mqtt QoS 1 drain + orjson + threshold rule ~11,000 msg/s" line);
  (b) `python -m pipeline.cli run --broker URL --state TMP` (a subprocess, its own HTTP port
      and client id), readings/s from its /metrics (cityops_readings_total, cityops_inbox_depth,
      cityops_engine_batch_seconds) polled every 100 ms; (b)/(a) in the same run.
  Both are measured twice:
      live   while --publishers processes publish the payloads as fast as they can. On a small
             machine the publishers take CPU from the consumer, so this is a floor; the output
             says whether a backlog was left when they were done (the consumer was the limit)
             or not (the publishers were). Two by default: one paho publisher process made
             ~4,400 payloads/s here, about what either consumer takes, so with one the
             publisher was the limit.
      drain  the consumer subscribes on a persistent session and goes away, the payloads are
             published, it comes back and takes what the broker kept for it, alone on the
             machine with the broker (from 5 % of the readings taken, past the start-up): what
             one process can take.
  (c) notice latency: a fresh `cityops run`, a paced background of --rate readings/s, and every
      100 ms one reading over the gas threshold (20 %LEL) from a gas sensor without an open
      incident; a paho subscriber on cityops/alerts/street/# times publish -> the incident's
      street notice. Each probed sensor is cleared a moment later and goes back to the pool
      when its incident resolves (clear_for 2 min behind a 60 s watermark: ~3 min), so more
      samples than the fixture's 366 gas sensors take a few minutes.

Every process it starts (mosquitto, cityops run, publishers, the baseline subscriber) is stopped
at the end, errors included.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness.brokers import Mosquitto, free_port, host_port  # noqa: E402
from pipeline.core.registry import load as load_registry  # noqa: E402
from rules.compiler import load_rules  # noqa: E402

PREFIX = "cityops"
from engine_bench import EVENTS, NORMAL  # noqa: E402  the same reading mix as the engine bench
BAD = b'{"sensor_id": "gas-000", "ts": "yesterday"'
PROBE_LEL = 30.0                 # over gas.leak's level1_lel (20): a new incident, street told
GAS = ("gas_household", "gas_commercial")


# ---- what the gateways publish ------------------------------------------------------------

def topics_of(reg) -> list[tuple[str, list[int]]]:
    """One entry per publisher: (topic, the sensors in its payload)."""
    behind: dict[int, list[int]] = {}
    alone: list[int] = []
    for idx, g in enumerate(reg.gateway_of):
        (behind.setdefault(g, []) if g >= 0 else alone).append(idx)
    return ([(f"{PREFIX}/gateways/{reg.gateways[g]}", members) for g, members in behind.items()]
            + [(f"{PREFIX}/readings/{reg.sensor_ids[i]}", [i]) for i in alone])


def reading(reg, rnd: random.Random, idx: int, ts: int, incidents: bool) -> dict:
    kind = reg.kinds[reg.kind_of[idx]]
    r: dict = {"sensor_id": reg.sensor_ids[idx], "ts": ts}
    if kind in EVENTS:
        r["event"] = (rnd.choice(EVENTS[kind]) if incidents and rnd.random() < 0.002
                      else "heartbeat")
    else:
        lo, hi = NORMAL[kind]
        v = rnd.uniform(lo, hi)
        if incidents and kind in GAS and rnd.random() < 0.0005:
            v = rnd.uniform(20, 60)                          # a leak
        r["value"] = round(v, 2)
    if rnd.random() < 0.05:                                  # some devices report battery
        r["battery"] = round(rnd.uniform(5, 25) if incidents and rnd.random() < 0.002
                             else rnd.uniform(40, 100), 1)
    return r


def make_payloads(reg, groups, n_payloads: int, seed: int = 7
                  ) -> tuple[list[tuple[int, str, bytes]], int]:
    """``n_payloads`` (group number, topic, payload): rounds in which every gateway (and every
    sensor without one) publishes once, in a shuffled order; a round's readings share one
    timestamp, the rounds spread over the minute before now (so a sensor's readings are strictly
    newer one after the other: no stale readings, no duplicates)."""
    rnd = random.Random(seed)
    rounds = -(-n_payloads // len(groups))
    now = int(time.time() * 1000)
    step = max(1, 60_000 // rounds)
    out: list[tuple[int, str, bytes]] = []
    n = 0
    for rno in range(rounds):
        ts = now - (rounds - rno) * step
        order = list(range(len(groups)))
        rnd.shuffle(order)
        for gno in order:
            if len(out) == n_payloads:
                break
            topic, members = groups[gno]
            if len(out) % 5000 == 4999:                       # a few bad payloads, as in life
                out.append((gno, topic, BAD))
                continue
            batch = [reading(reg, rnd, i, ts, incidents=True) for i in members]
            n += len(batch)
            out.append((gno, topic, orjson.dumps(batch if len(batch) > 1 else batch[0])))
    return out, n


# ---- child processes: publishers and the baseline subscriber -------------------------------

def _client(name: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{name}-{uuid.uuid4().hex[:8]}",
                       protocol=mqtt.MQTTv5)


def _publisher(url: str, k: int, msgs: list[tuple[str, bytes]], go, results) -> None:
    """Publish ``msgs`` at QoS 1 as fast as one paho client can (1000 in flight); report
    (k, count, start, last PUBACK)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)         # not the parent's handler
    host, port = host_port(url)
    c = _client(f"pub{k}")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    acked = [0]
    done = threading.Event()
    connected = threading.Event()

    def on_publish(client, userdata, mid, rc, props) -> None:
        acked[0] += 1
        if acked[0] >= len(msgs):
            done.set()

    c.on_connect = lambda *a: connected.set()
    c.on_publish = on_publish
    c.connect(host, port, 60)
    c.loop_start()
    try:
        if not connected.wait(10):
            raise SystemExit(f"publisher {k}: no CONNACK")
        go.wait()
        t0 = time.time()
        for topic, payload in msgs:
            c.publish(topic, payload, qos=1)
        done.wait(600)
        results.put(("pub", k, acked[0], t0, time.time()))
    finally:
        c.disconnect()
        c.loop_stop()


def _baseline(url: str, expected: int, drain: bool, ready, go, results) -> None:
    """A bare paho subscriber: QoS 1, MQTT 5, automatic PUBACK; orjson + one threshold.

    ``drain``: subscribe on a persistent session, go away, and come back (``go``) once the
    publishers are done: then count what the broker had queued."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)         # not the parent's handler
    host, port = host_port(url)
    cid = f"bench-baseline-{uuid.uuid4().hex[:8]}"
    state = {"readings": 0, "msgs": 0, "hits": 0}
    subscribed = threading.Event()

    def on_connect(client, userdata, flags, rc, props) -> None:
        if not flags.session_present:
            client.subscribe([(f"{PREFIX}/readings/+", 1), (f"{PREFIX}/gateways/+", 1)])
        else:
            subscribed.set()

    def on_message(client, userdata, msg) -> None:
        state["msgs"] += 1
        try:
            rows = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            return
        for r in rows if isinstance(rows, list) else [rows]:
            state["readings"] += 1
            v = r.get("value")
            if v is not None and v >= 20:
                state["hits"] += 1

    def connect(clean: bool) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        c.on_connect = on_connect
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600 if drain else 0
        c.connect(host, port, 60, clean_start=clean, properties=props)
        c.loop_start()
        if not subscribed.wait(10):
            raise SystemExit("baseline: no SUBACK")
        return c

    c = connect(True)
    samples: list[tuple[float, int, int]] = []
    try:
        if drain:
            c.disconnect()
            c.loop_stop()
            subscribed.clear()
            ready.set()
            go.wait()
            c = connect(False)
        else:
            ready.set()
        last_change = time.monotonic()
        while state["readings"] < expected:
            time.sleep(0.1)
            samples.append((time.time(), state["readings"], state["msgs"]))
            if len(samples) > 1 and samples[-1][1] != samples[-2][1]:
                last_change = time.monotonic()
            elif time.monotonic() - last_change > 30:
                break
        samples.append((time.time(), state["readings"], state["msgs"]))
        results.put(("base", samples, state["hits"]))
    finally:
        c.disconnect()
        c.loop_stop()


# ---- cityops run as a subprocess --------------------------------------------------------------

class Runtime:
    """``python -m pipeline.cli run --broker URL --state PATH`` with its own HTTP port and
    client id; ready when /healthz says it is connected."""

    def __init__(self, url: str, workdir: Path, name: str, env: dict[str, str]) -> None:
        self.url, self.workdir, self.name, self.extra_env = url, workdir, name, env
        self.port = free_port()
        self.client_id = f"cityops-bench-{name}-{uuid.uuid4().hex[:8]}"   # the session: kept
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Runtime:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
        env.update(CITYOPS_HTTP__PORT=str(self.port), CITYOPS_MQTT__CLIENT_ID=self.client_id)
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "pipeline.cli", "run", "--broker", self.url,
               "--state", str(self.workdir / f"{self.name}-state.sqlite")]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cityops run exited with {self.proc.returncode}\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass                    # not answering yet: try again
            time.sleep(0.05)
        raise RuntimeError(f"cityops run not healthy within {timeout:.0f} s\n{self.tail()}")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return f"--- {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- rates from (time, count) samples ----------------------------------------------------------

@dataclass
class Rate:
    readings: int = 0
    seconds: float = 0.0
    msgs: int = 0

    @property
    def per_s(self) -> float:
        return self.readings / self.seconds if self.seconds > 0 else 0.0

    @property
    def msgs_per_s(self) -> float:
        return self.msgs / self.seconds if self.seconds > 0 else 0.0


def rate_of(samples: list[tuple[float, int, int]], expected: int, skip: float = 0.0) -> Rate:
    """``samples``: (time, readings so far, messages so far). From the last sample with at most
    ``skip`` of the readings taken (live: none; drain: 5 %, past the start-up) to the first
    with all of them."""
    start = max((i for i, x in enumerate(samples) if x[1] <= skip * expected), default=0)
    end = next((i for i, x in enumerate(samples) if x[1] >= expected), len(samples) - 1)
    a, b = samples[start], samples[end]
    return Rate(b[1] - a[1], b[0] - a[0], b[2] - a[2])


@dataclass
class Phase:
    rate: Rate
    pub: tuple[float, float, int] = (0.0, 0.0, 0)     # publishers: start, last PUBACK, count
    backlog: int = 0             # payloads published, not yet consumed, when publishing ended
    extra: dict = field(default_factory=dict)


def backlog_at(samples: list[tuple[float, int, int]], pub: tuple[float, float, int]) -> int:
    return pub[2] - next((x[2] for x in samples if x[0] >= pub[1]), samples[-1][2])


def publish_all(url: str, payloads, publishers: int, ctx) -> tuple[mp.Queue, list, object]:
    """Start ``publishers`` processes (a gateway always goes through the same one, so its
    readings stay in order), each connected and waiting for ``go``; returns (results, procs,
    go)."""
    go = ctx.Event()
    results = ctx.Queue()
    procs = []
    for k in range(publishers):
        mine = [(t, p) for g, t, p in payloads if g % publishers == k]
        procs.append(ctx.Process(target=_publisher, args=(url, k, mine, go, results), daemon=True))
    for p in procs:
        p.start()
    time.sleep(0.5)                                       # connected
    return results, procs, go


def publisher_figures(results: list[tuple]) -> tuple[float, float, int]:
    """(start, end, count) over all publishers."""
    return (min(r[3] for r in results), max(r[4] for r in results), sum(r[2] for r in results))


def wait_publishers(results, publishers: int, timeout: float = 600) -> tuple[float, float, int]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < publishers:
        try:
            got.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            raise RuntimeError(f"{publishers - len(got)} publisher(s) not done in {timeout:.0f} s") from None
    return publisher_figures(got)


def stop_procs(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
        p.join(5)


def phase_baseline(url: str, payloads, expected: int, publishers: int, ctx, drain: bool) -> Phase:
    ready, go = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    sub = ctx.Process(target=_baseline, args=(url, expected, drain, ready, go, results), daemon=True)
    sub.start()
    procs = [sub]
    try:
        if not ready.wait(15):
            raise RuntimeError("baseline subscriber did not subscribe in 15 s")
        pub_results, pubs, pub_go = publish_all(url, payloads, publishers, ctx)
        procs += pubs
        pub_go.set()
        pub = wait_publishers(pub_results, publishers)
        go.set()                                          # drain: come back now
        try:
            _, samples, _ = results.get(timeout=300 + expected / 2000)
        except queue.Empty:
            raise RuntimeError("the baseline subscriber did not finish") from None
        if samples[-1][1] < expected:
            raise RuntimeError(f"baseline received {samples[-1][1]:,} of {expected:,} readings")
        return Phase(rate_of(samples, expected, 0.05 if drain else 0.0), pub,
                     0 if drain else backlog_at(samples, pub))
    finally:
        stop_procs(procs)


def watch(rt: Runtime, expected: int, publishers: int = 0, pub_results=None,
          ) -> tuple[list[tuple[float, int, int]], list[float], list[tuple], dict, dict]:
    """Poll /metrics every 100 ms until the runtime has taken ``expected`` readings (and the
    publishers, if any, are done); (samples, inbox depths, publisher results, first and last
    metrics)."""
    samples: list[tuple[float, int, int]] = []
    inbox: list[float] = []
    got: list[tuple] = []
    first = rt.metrics()
    last_change = time.monotonic()
    while True:
        t = time.time()
        m = rt.metrics()
        r = int(m["cityops_readings_total"])
        samples.append((t, r, int(m["cityops_payloads_total"])))
        inbox.append(m["cityops_inbox_depth"])
        while pub_results is not None:
            try:
                got.append(pub_results.get_nowait())
            except queue.Empty:
                break
        if len(samples) > 1 and r != samples[-2][1]:
            last_change = time.monotonic()
        if r >= expected and len(got) >= publishers:
            return samples, inbox, got, first, m
        if time.monotonic() - last_change > 30:
            raise RuntimeError(f"cityops run stalled at {r:,} of {expected:,} readings\n"
                               + rt.tail())
        time.sleep(0.1)


def engine_figures(first: dict, last: dict, inbox: list[float]) -> dict:
    dead = {k[len('cityops_dead_letters_total{reason="'):-2]: int(v)
            for k, v in last.items() if k.startswith("cityops_dead_letters_total")}
    return {"engine_s": last["cityops_engine_batch_seconds_sum"]
            - first["cityops_engine_batch_seconds_sum"],
            "batches": last["cityops_engine_batch_seconds_count"]
            - first["cityops_engine_batch_seconds_count"],
            "inbox_max": max(inbox), "inbox_mean": statistics.fmean(inbox), "dead": dead,
            "duplicates": int(last["cityops_duplicates_total"]),
            "notices": int(sum(v for k, v in last.items() if k.startswith("cityops_notices_total"))),
            "open": int(last["cityops_open_incidents"])}


def py_spy(pid: int, out: Path) -> subprocess.Popen:
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                             str(pid), "--rate", "250", "--threads",
                             *os.environ.get("PYSPY_FLAGS", "--gil").split(),
                             "--format", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_spy(spy: subprocess.Popen | None) -> None:
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)                        # py-spy writes its file on SIGINT
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def phase_runtime(url: str, workdir: Path, payloads, expected: int, publishers: int, ctx,
                  env: dict[str, str]) -> Phase:
    """(b) live: cityops run takes the payloads while the publishers publish them."""
    rt = Runtime(url, workdir, "live", env).start()
    procs: list = []
    try:
        pub_results, procs, go = publish_all(url, payloads, publishers, ctx)
        go.set()
        samples, inbox, got, first, last = watch(rt, expected, publishers, pub_results)
        pub = publisher_figures(got)
        return Phase(rate_of(samples, expected), pub, backlog_at(samples, pub),
                     engine_figures(first, last, inbox))
    finally:
        stop_procs(procs)
        rt.stop()


def phase_runtime_drain(url: str, workdir: Path, payloads, expected: int, publishers: int, ctx,
                        env: dict[str, str], profile: Path | None, name: str = "drain") -> Phase:
    """(b) drain: cityops run subscribes (persistent session) and stops; the payloads are
    published; it starts again and takes what the broker kept for it. ``name``: its own state
    file and session, so a second drain is not a redelivery of the first."""
    rt = Runtime(url, workdir, name, env).start()
    procs: list = []
    spy = None
    try:
        time.sleep(0.5)
        rt.stop()
        pub_results, procs, go = publish_all(url, payloads, publishers, ctx)
        go.set()
        pub = wait_publishers(pub_results, publishers)
        rt.start()
        if profile is not None:
            spy = py_spy(rt.proc.pid, profile)
        samples, inbox, _, first, last = watch(rt, expected)
        return Phase(rate_of(samples, expected, 0.05), pub, 0, engine_figures(first, last, inbox))
    finally:
        stop_spy(spy)
        stop_procs(procs)
        rt.stop()


def phase_history(url: str, workdir: Path, payloads, expected: int, publishers: int, ctx,
                  env: dict[str, str], rounds: int = 2) -> dict:
    """(d) the pipeline's readings/s with the history sink on and off: (b) drain, alternating,
    so that the machine's drift falls on both."""
    from bench.harness.tsdb import VictoriaMetrics
    vm = VictoriaMetrics(workdir / "victoria-metrics").start()
    try:
        on_env = {**env, "CITYOPS_INFLUX__URL": vm.url}
        got: dict = {"off": [], "on": []}
        for r in range(rounds):
            got["off"].append(phase_runtime_drain(url, workdir, payloads, expected, publishers,
                                                  ctx, env, None, f"drain-off-{r}"))
            got["on"].append(phase_runtime_drain(url, workdir, payloads, expected, publishers,
                                                 ctx, on_env, None, f"drain-on-{r}"))
        got["points"] = len(vm.points())
        return got
    finally:
        vm.stop()


class NoticeClock:
    """Subscribed to the street tier: when did each probed sensor's gas.leak incident reach it?"""

    def __init__(self, url: str) -> None:
        self.lock = threading.Lock()
        self.sent: dict[str, float] = {}          # sensor -> perf_counter at publish
        self.latencies: list[float] = []
        self.when: list[tuple[float, float]] = []     # (publish time, latency)
        self.fired: list[str] = []                # sensors whose notice came (to clear)
        self.resolved: list[str] = []             # sensors whose incident is over (to reuse)
        self.subscribed = threading.Event()
        host, port = host_port(url)
        self.client = _client("latency")
        self.client.on_connect = lambda c, *a: c.subscribe(f"{PREFIX}/alerts/street/#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, 60)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            self.close()
            raise RuntimeError("latency subscriber: no SUBACK")

    def _on_message(self, client, userdata, msg) -> None:
        t = time.perf_counter()
        n = orjson.loads(msg.payload)
        if n.get("rule_id") != "gas.leak":
            return
        sid, state = n.get("sensor_id"), n.get("state")
        with self.lock:
            if state == "firing" and sid in self.sent:
                sent = self.sent.pop(sid)
                self.latencies.append(t - sent)
                self.when.append((sent, t - sent))
                self.fired.append(sid)
            elif state == "resolved":
                self.resolved.append(sid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def phase_latency(url: str, workdir: Path, reg, groups, rate: float, samples: int,
                  env: dict[str, str], every: float = 0.1, warmup: float = 2.0) -> dict:
    rt = Runtime(url, workdir, "latency", env).start()
    clock = pub = None
    try:
        clock = NoticeClock(url)
        host, port = host_port(url)
        pub = _client("paced")
        pub.max_inflight_messages_set(1000)
        pub.max_queued_messages_set(0)
        pub.connect(host, port, 60)
        pub.loop_start()
        rnd = random.Random(11)
        gas = [reg.sensor_ids[i] for i, k in enumerate(reg.kind_of) if reg.kinds[k] in GAS]
        rnd.shuffle(gas)
        pool = list(gas)
        busy: set[str] = set()                    # probed, not yet resolved: no background
        last_ts: dict[str, int] = {}
        clears: list[tuple[float, str]] = []

        def ts_for(sid: str) -> int:
            ts = max(int(time.time() * 1000), last_ts.get(sid, 0) + 1)
            last_ts[sid] = ts
            return ts

        m0 = rt.metrics()
        t0 = time.perf_counter()
        w0 = time.time()
        next_probe = t0 + warmup
        background = probes = 0
        g = 0
        order = list(range(len(groups)))
        waited_for_pool = 0.0
        while probes < samples or clock.sent:
            now = time.perf_counter()
            if probes >= samples and now - next_probe > 10:      # 10 s after the last probe
                break
            due = (now - t0) * rate
            while background < due:                              # the paced background
                if g % len(order) == 0:
                    rnd.shuffle(order)
                topic, members = groups[order[g % len(order)]]
                g += 1
                batch = [reading(reg, rnd, i, ts_for(reg.sensor_ids[i]), incidents=False)
                         for i in members if reg.sensor_ids[i] not in busy]
                if batch:
                    pub.publish(topic, orjson.dumps(batch if len(batch) > 1 else batch[0]), qos=1)
                    background += len(batch)
            with clock.lock:
                fired, clock.fired = clock.fired, []
                resolved, clock.resolved = clock.resolved, []
            for sid in fired:
                clears.append((now + 0.3, sid))
            for sid in resolved:
                if sid in busy:
                    busy.discard(sid)
                    pool.append(sid)
            while clears and clears[0][0] <= now:               # back under clear_lel
                sid = clears.pop(0)[1]
                pub.publish(f"{PREFIX}/readings/{sid}",
                            orjson.dumps({"sensor_id": sid, "ts": ts_for(sid), "value": 1.0}), qos=1)
            if probes < samples and now >= next_probe:
                if pool:
                    sid = pool.pop(0)
                    busy.add(sid)
                    body = orjson.dumps({"sensor_id": sid, "ts": ts_for(sid), "value": PROBE_LEL})
                    with clock.lock:
                        clock.sent[sid] = time.perf_counter()
                    pub.publish(f"{PREFIX}/readings/{sid}", body, qos=1)
                    probes += 1
                    next_probe += every
                else:                                            # all busy: wait for a resolve
                    waited_for_pool += now - next_probe
                    next_probe = now + 0.05
                    if waited_for_pool > 400:
                        raise RuntimeError("no gas sensor came free in 400 s (incidents not resolving?)")
            time.sleep(0.002)
        w1 = time.time()
        m1 = rt.metrics()
        with clock.lock:
            lat = sorted(clock.latencies)
            first = min((w for w, _ in clock.when), default=0.0)
            slowest = sorted(((d, w - first) for w, d in clock.when), reverse=True)[:3]
            lost = len(clock.sent)
        took = w1 - w0
        taken = m1["cityops_readings_total"] - m0["cityops_readings_total"]
        return {"lat": lat, "slowest": slowest, "lost": lost, "probes": probes, "seconds": took,
                "runtime_rate": taken / took, "background_rate": background / (time.perf_counter() - t0),
                "engine_ms": 1000 * (m1["cityops_engine_batch_seconds_sum"]
                                     - m0["cityops_engine_batch_seconds_sum"])
                / max(1, m1["cityops_engine_batch_seconds_count"] - m0["cityops_engine_batch_seconds_count"]),
                "waited": waited_for_pool}
    finally:
        if pub is not None:
            pub.disconnect()
            pub.loop_stop()
        if clock is not None:
            clock.close()
        rt.stop()


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def bench_config() -> str:
    """deploy/mosquitto/mosquitto.conf's tuning, anonymous (the listener, paths and user are
    set by bench/harness/brokers.py's Mosquitto)."""
    text = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    text = re.sub(r"(?m)^(password_file|acl_file) ", r"# \1 ", text)
    return re.sub(r"(?m)^allow_anonymous .*$", "allow_anonymous true", text)


def mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-h"], check=False, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(r"version (\S+)", out)
    return m[1] if m else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--payloads", type=int, default=60_000,
                    help="gateway payloads for (a) and (b) (~2.8 readings each)")
    ap.add_argument("--publishers", type=int, default=2, help="publisher processes for (a) and (b)")
    ap.add_argument("--rate", type=float, default=2000, help="(c) background readings/s")
    ap.add_argument("--samples", type=int, default=300, help="(c) notices timed")
    ap.add_argument("--quick", action="store_true",
                    help="small (6,000 payloads, 40 samples): a smoke test, not a measurement")
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="py-spy record of cityops run during (b) drain: collapsed stacks per thread, "
                    "only the thread holding the GIL (PYSPY_FLAGS, default --gil; --idle: all)")
    ap.add_argument("--history", action="store_true",
                    help="(d) also: (b) drain with the InfluxDB history sink on (to a "
                    "VictoriaMetrics it starts) and off, two rounds each, alternating")
    ap.add_argument("--runtime-env", action="append", default=[], metavar="CITYOPS_X=V",
                    help="a setting for the cityops run processes of (b) and (c), e.g. "
                    "'CITYOPS_MQTT={\"protocol\": 311}' (repeatable)")
    args = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in args.runtime_env)
    if any(not k.startswith("CITYOPS_") for k in env):
        ap.error("--runtime-env takes CITYOPS_NAME=VALUE")
    if args.quick:
        args.payloads, args.samples = min(args.payloads, 6_000), min(args.samples, 40)
    command = shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT))
                          else sys.executable, *sys.argv])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))      # finally-blocks run

    rules = load_rules()
    reg = load_registry(None, rules.kinds)
    groups = topics_of(reg)
    payloads, expected = make_payloads(reg, groups, args.payloads)
    ctx = mp.get_context("fork")
    print(f"runtime bench: fixture registry ({len(reg):,} sensors, {len(groups)} publishing "
          f"gateways/sensors), {len(rules.rules)} rules of every built-in pack")
    print(f"machine: {os.cpu_count()} cores shared by the broker, the publishers and the consumer; "
          f"load average {os.getloadavg()[0]:.2f} before the run (compare ratios, not absolutes)")
    print(f"input: {len(payloads):,} payloads, {expected:,} readings "
          f"({expected / len(payloads):.1f} per payload), QoS 1, {args.publishers} publisher "
          f"process{'es' if args.publishers > 1 else ''}", flush=True)

    with tempfile.TemporaryDirectory(prefix="cityops-runtime-bench-") as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir / "mosquitto", config=bench_config())
        try:
            broker.start()
            print(f"broker: mosquitto {mosquitto_version(broker.binary)} at {broker.url} "
                  "(deploy/mosquitto tuning, anonymous)", flush=True)
            if env:
                print("cityops run with " + " ".join(f"{k}={v}" for k, v in env.items()))
            url = broker.url
            t = time.perf_counter()
            a_live = phase_baseline(url, payloads, expected, args.publishers, ctx, drain=False)
            a_drain = phase_baseline(url, payloads, expected, args.publishers, ctx, drain=True)
            print(f"(a) done in {time.perf_counter() - t:.1f}s", flush=True)
            t = time.perf_counter()
            b_live = phase_runtime(url, workdir, payloads, expected, args.publishers, ctx, env)
            b_drain = phase_runtime_drain(url, workdir, payloads, expected, args.publishers, ctx,
                                          env, args.profile)
            print(f"(b) done in {time.perf_counter() - t:.1f}s", flush=True)
            t = time.perf_counter()
            c = phase_latency(url, workdir, reg, groups, args.rate, args.samples, env)
            print(f"(c) done in {time.perf_counter() - t:.1f}s", flush=True)
            d = phase_history(url, workdir, payloads, expected, args.publishers, ctx, env) \
                if args.history else None
        finally:
            try:
                broker.stop()
            except RuntimeError as exc:
                print(f"warning: {exc}", file=sys.stderr)

    n_payloads = len(payloads)
    print()
    print(f"{'':50}{'readings/s':>12}{'payloads/s':>12}{'(b)/(a)':>9}")

    def row(label: str, r: Rate, base: Rate | None = None) -> None:
        ratio = f"{r.per_s / base.per_s:.2f}x" if base is not None and base.per_s else ""
        print(f"{label:50}{r.per_s:>12,.0f}{r.msgs_per_s:>12,.0f}{ratio:>9}".rstrip())

    def limit(ph: Phase) -> str:
        p0, p1, sent = ph.pub
        rate = sent / (p1 - p0)
        who = ("the consumer was the limit" if ph.backlog >= 0.02 * n_payloads else
               "the publishers were the limit")
        return (f"publishers {rate:,.0f} payloads/s ({rate * expected / n_payloads:,.0f} "
                f"readings/s); {ph.backlog:,} payloads not yet taken when they were done: {who}")

    def engine(ph: Phase) -> str:
        x = ph.extra
        return (f"engine {x['engine_s']:.1f} s of {ph.rate.seconds:.1f} s, {x['batches']:,.0f} "
                f"batches ({ph.rate.msgs / max(1, x['batches']):,.0f} payloads each), inbox depth "
                f"max {x['inbox_max']:,.0f} mean {x['inbox_mean']:,.0f}")

    print("(a) bare paho subscriber + orjson + threshold")
    row("      live: while the publishers publish", a_live.rate)
    row("      drain: the backlog the broker queued", a_drain.rate)
    print("(b) cityops run, one process")
    row("      live: while the publishers publish", b_live.rate, a_live.rate)
    row("      drain: the backlog the broker queued", b_drain.rate, a_drain.rate)
    print(f"(a) live: {limit(a_live)}")
    print(f"(b) live: {limit(b_live)}")
    print(f"(b) live: {engine(b_live)}")
    print(f"(b) drain: {engine(b_drain)}")
    x = b_live.extra
    print(f"(b) live: {x['notices']:,} notices, {x['open']} open incidents, {x['duplicates']} "
          "duplicates, dead letters: "
          + (", ".join(f"{k} {v}" for k, v in sorted(x["dead"].items())) or "none"))
    lat = [v * 1000 for v in c["lat"]]
    lost = f", {c['lost']} probes got no notice" if c["lost"] else ""
    print(f"(c) publish -> street-tier notice, {len(lat)} samples, runtime taking "
          f"{c['runtime_rate']:,.0f} readings/s (paced background {c['background_rate']:,.0f}/s){lost}")
    print(f"      p50 {pct(lat, 50):.1f} ms   p95 {pct(lat, 95):.1f} ms   p99 {pct(lat, 99):.1f} ms"
          f"   max {max(lat) if lat else float('nan'):.1f} ms   (engine {c['engine_ms']:.2f} ms "
          "per batch)")
    print("      slowest: " + ", ".join(f"{d * 1000:.0f} ms at +{at:.1f} s" for d, at in c["slowest"])
          + " (seconds after the first probe)")
    if d is not None:
        off, on = max(r.rate.per_s for r in d["off"]), max(r.rate.per_s for r in d["on"])
        print(f"(d) history sink, (b) drain, best of {len(d['on'])} rounds each, alternating: "
              f"off {off:,.0f} readings/s, on {on:,.0f} readings/s: the sink costs "
              f"{(1 - on / off) * 100:.1f} % (target < 20 %); {d['points']:,} points in the "
              f"database ({expected:,} readings per run)")
        print("      rounds off: " + ", ".join(f"{r.rate.per_s:,.0f}" for r in d["off"])
              + "; on: " + ", ".join(f"{r.rate.per_s:,.0f}" for r in d["on"]))
    ok_b = b_live.rate.per_s >= 10_000
    ok_c = bool(lat) and pct(lat, 99) < 100 and not c["lost"]
    print(f"targets: >= 10,000 readings/s per process (live): {'met' if ok_b else 'MISSED'} "
          f"({b_live.rate.per_s:,.0f}); p99 < 100 ms at {args.rate:,.0f} readings/s: "
          f"{'met' if ok_c else 'MISSED'} ({pct(lat, 99):.1f} ms)")
    if args.quick:
        print("(--quick: too small to be a measurement)")
    print(f"command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
