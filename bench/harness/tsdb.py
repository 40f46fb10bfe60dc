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

import json
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection
from typing import Any

from bench.harness.brokers import ServerProcess, find_binary

INSTALL_HINT = ("run `make test` (it installs the Debian package victoria-metrics), or: "
                "apt-get install -y victoria-metrics")
READY_TIMEOUT = 15.0

Point = tuple[str, tuple[tuple[str, str], ...], int, float]   # metric, sorted labels, ts, value


class VictoriaMetricsMissing(RuntimeError):
    """The victoria-metrics binary is not installed."""


class VictoriaMetrics(ServerProcess):
    """``stop()`` lets it write what it holds in memory; ``kill()`` may lose its last second
    of samples (its own design)."""

    name = "victoria-metrics"
    scheme = "http"
    ready_means = "answer /health"
    ready_timeout = READY_TIMEOUT
    stop_timeout = 15.0

    def __init__(self, workdir: str | os.PathLike[str], port: int | None = None, *,
                 binary: str | None = None, cpus: Collection[int] | None = None,
                 nice: int = 0):
        """``cpus``: run it on these CPUs only; ``nice``: at this niceness (benchmarks keep it
        out of the pipeline's way)."""
        self.binary = binary or find_binary("victoria-metrics")
        if not self.binary:
            raise VictoriaMetricsMissing(f"`victoria-metrics` is not installed: {INSTALL_HINT}")
        super().__init__(workdir, port)
        self.data_dir = self.workdir / "data"
        self.cpus = set(cpus) if cpus else None
        self.nice = nice

    def command(self) -> list[str]:
        # -search.latencyOffset: samples are searchable 1 s after they arrive, not 30 s
        args = [self.binary, f"-httpListenAddr={self.host}:{self.port}",
                f"-storageDataPath={self.data_dir}", "-retentionPeriod=100y",
                "-search.latencyOffset=1s"]
        # util-linux and coreutils: no code between fork and exec, and the pid is the server's
        if self.cpus:
            args = ["env", f"GOMAXPROCS={len(self.cpus)}",
                    "taskset", "-c", ",".join(map(str, sorted(self.cpus))), *args]
        if self.nice:
            args = ["nice", "-n", str(self.nice), *args]
        return args

    def ready(self) -> bool:
        return self._get("/health", 0.5) == b"OK"

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
            out += [(name, key, ts, v) for ts, v in zip(series["timestamps"], series["values"], strict=True)]
        return out

    def wait_points(self, done: Callable[[list[Point]], bool], timeout: float = 20.0,
                    match: str = '{__name__=~".+"}') -> list[Point]:
        """Poll ``points()`` until ``done(points)``; the last answer either way."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.points(match)
            if done(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.2)         # polls points() (a wait on done())
