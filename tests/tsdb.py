"""A real time-series database for the history tests: VictoriaMetrics, InfluxDB's write path.

Plain module (no pytest in it): tests/conftest.py turns it into fixtures.

No InfluxDB 2.x server can be had here (INFRA.md); Debian's ``victoria-metrics`` takes InfluxDB
line protocol on ``/api/v2/write``, so the sink's real influxdb-client writes to it unchanged.
Reading back: ``/api/v1/export`` (metric ``{measurement}_{field}``, tags as labels, string fields
stored as 0, millisecond timestamps).

    vm = VictoriaMetrics(tmp_dir)        # 127.0.0.1, a free port, data in tmp_dir/data
    vm.start()                           # ready when /health says OK; raises with the log tail
    vm.url                               # "http://127.0.0.1:PORT": CITYOPS_INFLUX__URL
    vm.points()                          # every sample: (metric, labels, ts ms, value)
    vm.stop(); vm.kill(); vm.restart()   # SIGTERM (data flushed) / SIGKILL; same port, same data
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Self

from tests.brokers import find_binary, free_port

INSTALL_HINT = ("run `make test` (it installs the Debian package victoria-metrics), or: "
                "apt-get install -y victoria-metrics")
READY_TIMEOUT = 15.0

Point = tuple[str, tuple[tuple[str, str], ...], int, float]   # metric, sorted labels, ts, value


class VictoriaMetricsMissing(RuntimeError):
    """The victoria-metrics binary is not installed."""


_running: set[VictoriaMetrics] = set()


@atexit.register
def _kill_leftovers() -> None:
    for vm in list(_running):
        vm.kill()


class VictoriaMetrics:
    def __init__(self, workdir: str | os.PathLike[str], port: int | None = None, *,
                 binary: str | None = None, cpus: Collection[int] | None = None,
                 nice: int = 0):
        """``cpus``: run it on these CPUs only; ``nice``: at this niceness (benchmarks keep it
        out of the pipeline's way)."""
        self.binary = binary or find_binary("victoria-metrics")
        if not self.binary:
            raise VictoriaMetricsMissing(f"`victoria-metrics` is not installed: {INSTALL_HINT}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "victoria-metrics.log"
        self.cpus = set(cpus) if cpus else None
        self.nice = nice
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = READY_TIMEOUT) -> VictoriaMetrics:
        if self.running:
            raise RuntimeError(f"victoria-metrics on port {self.port} is already running")
        # -search.latencyOffset: samples are searchable 1 s after they arrive, not 30 s
        args = [self.binary, f"-httpListenAddr={self.host}:{self.port}",
                f"-storageDataPath={self.data_dir}", "-retentionPeriod=100y",
                "-search.latencyOffset=1s"]
        env = None
        if self.cpus:                 # util-linux and coreutils: no code between fork and exec
            args = ["taskset", "-c", ",".join(map(str, sorted(self.cpus))), *args]
            env = {**os.environ, "GOMAXPROCS": str(len(self.cpus))}
        if self.nice:
            args = ["nice", "-n", str(self.nice), *args]
        with open(self.log_path, "ab") as out, open(os.devnull, "rb") as devnull:
            self._proc = subprocess.Popen(args, stdin=devnull, stdout=out, env=env,
                                          stderr=subprocess.STDOUT)
        _running.add(self)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                _running.discard(self)
                raise RuntimeError(f"victoria-metrics exited with code {code} at start\n"
                                   + self._tail())
            try:
                if self._get("/health", 0.5) == b"OK":
                    return self
            except OSError:
                pass                # not listening yet: try again until the deadline
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"victoria-metrics did not answer /health on {self.url} "
                                   f"within {timeout:.0f} s\n" + self._tail())
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM and wait: VictoriaMetrics writes what it holds in memory before it exits."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"victoria-metrics did not stop within {timeout:.0f} s of "
                                   "SIGTERM\n" + self._tail()) from None
        self._proc = None
        _running.discard(self)

    def kill(self) -> None:
        """SIGKILL: samples of its last second in memory may be lost (its own design)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None
        _running.discard(self)

    def restart(self, *, hard: bool = False) -> VictoriaMetrics:
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    # -- reading back ----------------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 10.0, **params: str) -> bytes:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=timeout) as r:
            return r.read()

    def export(self, match: str = '{__name__=~".+"}') -> list[dict[str, Any]]:
        """Every series matching ``match``, as /api/v1/export gives them (one JSON per line),
        after a flush so that what was written is searchable."""
        self._get("/internal/force_flush")
        # the whole of time: by default the export ends now, and an ack may be stamped ahead
        text = self._get("/api/v1/export", 30.0,
                         **{"match[]": match, "start": "0", "end": "4102444800"})
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def points(self, match: str = '{__name__=~".+"}') -> list[Point]:
        out = []
        for series in self.export(match):
            labels = dict(series["metric"])
            name = labels.pop("__name__")
            key = tuple(sorted(labels.items()))
            out += [(name, key, ts, v) for ts, v in zip(series["timestamps"], series["values"])]
        return out

    def wait_points(self, done: Callable[[list[Point]], bool], timeout: float = 20.0,
                    match: str = '{__name__=~".+"}') -> list[Point]:
        """Poll ``points()`` until ``done(points)``; the last answer either way."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.points(match)
            if done(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.2)

    def _tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"({self.log_path} does not exist)"
        return f"--- {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"VictoriaMetrics({self.url}, pid={self.pid}, workdir={str(self.workdir)!r})"
