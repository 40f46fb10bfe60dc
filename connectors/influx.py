"""History sink: every reading and every notice into InfluxDB 2.x, never in the pipeline's way.

    sink = InfluxSink(settings.influx, registry, closed_fields)   # starts its writer thread
    engine.keep_accepted = True                     # Output.accepted: the readings taken
    sink.add(output)                                # or add_readings(cols) / add_notices(notices)
    sink.stats(); sink.collect()                    # counters; Prometheus metric families
    sink.close(timeout=10.0)                        # flush what it can, then stop

Runtime-agnostic and thread-safe: the live runtime and the Kafka worker call the same four
methods. What is written, and how, is in connectors/lineproto.py.

``add`` only appends column arrays (or notice dicts) to a bounded buffer and returns: formatting
and HTTP happen on the writer thread. The writer takes up to ``batch_size`` points, or what is
there after ``flush_interval``, and writes them with the client's synchronous write. Down-sampled
(``readings_every``), it takes everything once per ``flush_interval`` (or when the buffer is half
full): the readings then make far fewer points, and every request costs the client ~0.7 ms of
CPU whatever its size, so few full requests beat many small ones.

A write that fails is put back at the head of the buffer and tried again after a backoff
(``retry_initial`` doubling to ``retry_max``, with jitter) until the database takes it: an
outage loses nothing while it fits in ``buffer_max`` points. Beyond that the oldest points are
dropped, and counted. A batch the database refuses as malformed (HTTP 400/422) would be refused
forever: it is dropped and counted as ``rejected``. Notices keep flowing to MQTT meanwhile;
history only lags.

Why not the client's own batching mode (``WriteOptions``): its buffer is an unbounded rx
stream we can neither bound nor count; after ``max_retries`` it hands a batch to the error
callback and forgets it (so "loses no point" would mean re-queueing from a callback on its
scheduler thread, racing its windowing); ``close()`` waits up to ``max_close_wait`` with no way
to say what was lost; and its per-record pipeline is what INFRA.md measured at ~11,800
points/s. Our own thread around the synchronous write gives batching, one bounded buffer,
retries that never give up while there is room, and exact counters, in a page of code.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from connectors.lineproto import ClosedFields, DownSampler, ReadingLines, SensorTable, notice_line

log = logging.getLogger("cityops.influx")

READINGS, NOTICES, BATCH = "readings", "notices", "batch"       # what the buffer holds
REFUSED = (400, 422)        # malformed: the same bytes would be refused again


class InfluxOptions(Protocol):
    """The settings the sink reads (pipeline/shared/config.py's InfluxSettings): durations in ms,
    ``timeout`` in ms as the client takes it, ``token`` a secret with get_secret_value()."""

    url: str | None
    org: str
    bucket: str
    token: Any
    timeout: int
    batch_size: int
    buffer_max: int
    flush_interval: int
    retry_initial: int
    retry_max: int
    readings_every: int


class InfluxSink:
    def __init__(self, settings: InfluxOptions, registry: SensorTable,
                 closed_fields: ClosedFields | None = None) -> None:
        """``closed_fields``: a closed notice's extra fields (pipeline/core/close_figures.py's
        closed_fields: its time to close, step by step); none without it."""
        if not settings.url:
            raise ValueError("influx.url is not set: the history sink is off")
        self.s = settings
        self.registry = registry                  # its lines number sensors as this one does
        self.lines = ReadingLines(registry)
        self.closed_fields = closed_fields
        self.sampler = (DownSampler(settings.readings_every, len(registry))
                        if settings.readings_every else None)
        self._cond = threading.Condition()
        self._buffer: deque[tuple[str, int, Any]] = deque()    # (what, points, data), oldest first
        self._buffered = 0
        self._closing = False
        self._dropping = False
        self._deadline = float("inf")
        self._retry_at = 0.0
        self._delay = settings.retry_initial / 1000
        self.counts: Counter[str] = Counter()
        self.last_error = ""
        self.last_error_at = 0.0
        self.up = False
        self._client = InfluxDBClient(
            url=settings.url, org=settings.org, timeout=settings.timeout,
            token=settings.token.get_secret_value() if settings.token else None)
        self._api = self._client.write_api(write_options=SYNCHRONOUS)
        self._thread = threading.Thread(target=self._run, name="influx-writer", daemon=True)
        self._thread.start()

    # ---- the caller's side: never blocks on the database ---------------------------------------
    def add(self, output: Any) -> None:
        """An engine Output: its accepted readings columns and its notices."""
        if output.accepted:
            self.add_readings(output.accepted)
        if output.notices:
            self.add_notices(output.notices)

    def add_readings(self, columns: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Columns of (sensor numbers, event-time ms, values; nan = an event)."""
        self._put([(READINGS, len(c[0]), c) for c in columns if len(c[0])])

    def add_notices(self, notices: list[dict]) -> None:
        if notices:
            self._put([(NOTICES, len(notices), list(notices))])

    def _put(self, items: list[tuple[str, int, Any]]) -> None:
        if not items:
            return
        with self._cond:
            if self._closing:
                self.counts["dropped.closed"] += sum(n for _, n, _ in items)
                return
            self._buffer.extend(items)
            self._buffered += sum(n for _, n, _ in items)
            self._drop_oldest()
            if self._wake():
                self._cond.notify()

    def _wake(self) -> bool:
        """Enough waiting for the writer to start before flush_interval (under the lock)."""
        if self.sampler is not None:
            return self._buffered >= self.s.buffer_max // 2
        return self._buffered >= self.s.batch_size

    def _drop_oldest(self) -> None:
        """Hold at most buffer_max points: the oldest go first, counted (under the lock)."""
        while self._buffered > self.s.buffer_max and self._buffer:
            excess = self._buffered - self.s.buffer_max
            what, n, data = self._buffer[0]
            if what == READINGS and n > excess:
                self._buffer[0] = (what, n - excess, tuple(col[excess:] for col in data))
                n = excess
            else:
                self._buffer.popleft()
            self._buffered -= n
            if not self._dropping:
                log.error("InfluxDB history buffer full (%d points): dropping the oldest; "
                          "see cityops_influx_points_dropped_total", self.s.buffer_max)
                self._dropping = True
            self.counts["dropped.buffer_full"] += n

    # ---- the writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        flush = self.s.flush_interval / 1000
        while True:
            with self._cond:
                if self._retry_at:                  # backing off after a failed write
                    while (left := min(self._retry_at, self._deadline) - time.monotonic()) > 0:
                        self._cond.wait(left)
                    self._retry_at = 0.0
                else:
                    self._cond.wait_for(lambda: self._closing or self._wake(), flush)
                closing = self._closing
                if closing and time.monotonic() >= self._deadline:
                    self._give_up()
                    return
                items = self._take()
                finished = closing and not self._buffer
            try:
                batches = self._format(items, final=finished)
            except Exception:
                log.exception("could not format %d history points; dropped",
                              sum(n for _, n, _ in items))
                self._count("dropped.rejected", sum(n for _, n, _ in items))
                batches = []
            written = self._write(batches)
            if finished and written and not self._buffer:
                return

    def _take(self) -> list[tuple[str, int, Any]]:
        """Up to batch_size points from the head of the buffer, or all of it to down-sample
        (under the lock). A batch that failed before goes again alone, as it was."""
        if self._buffer and self._buffer[0][0] == BATCH:
            item = self._buffer.popleft()
            self._buffered -= item[1]
            return [item]
        items = []
        room = self.s.batch_size if self.sampler is None else self._buffered
        while self._buffer and room > 0 and self._buffer[0][0] != BATCH:
            what, n, data = self._buffer[0]
            if what == READINGS and n > room:
                items.append((what, room, tuple(col[:room] for col in data)))
                self._buffer[0] = (what, n - room, tuple(col[room:] for col in data))
                n = room
            else:
                items.append(self._buffer.popleft())
            self._buffered -= n
            room -= n
        return items

    def _format(self, items: list[tuple[str, int, Any]], final: bool) -> list[tuple[bytes, int]]:
        """Line protocol, in bodies of at most batch_size points, each joined once."""
        size = self.s.batch_size
        groups: list[tuple[list[bytes], int]] = []        # (pieces of whole lines, lines)
        cols = [data for what, _, data in items if what == READINGS]
        if cols:
            s, t, v = (np.concatenate([c[i] for c in cols]) for i in range(3))
            if self.sampler is None:
                groups += _sliced(self.lines.readings, size, s, t, v)
            else:
                groups += _sliced(self.lines.sampled, size, *self.sampler.absorb(s, t, v))
        if self.sampler is not None:
            groups += _sliced(self.lines.sampled, size,
                              *(self.sampler.drain() if final else self.sampler.due()))
        notices = [n for what, _, data in items if what == NOTICES for n in data]
        if notices:
            groups.append(self._notice_lines(notices))
        bodies = [(data, n) for what, n, data in items if what == BATCH]
        parts: list[bytes] = []
        lines = 0
        for pieces, n in groups:
            if lines and lines + n > size:
                bodies.append((b"".join(parts), lines))
                parts, lines = [], 0
            parts += pieces
            lines += n
        if lines:
            bodies.append((b"".join(parts), lines))
        return bodies

    def _notice_lines(self, notices: list[dict]) -> tuple[list[bytes], int]:
        lines = []
        for n in notices:
            try:
                lines.append((notice_line(n, self.closed_fields) + "\n").encode())
            except (KeyError, TypeError, ValueError):
                log.exception("a notice the history cannot write; dropped: %r",
                              {k: n.get(k) for k in ("alert_id", "state", "seq", "tier")})
                self._count("dropped.rejected", 1)
        return lines, len(lines)

    def _write(self, batches: list[tuple[bytes, int]]) -> bool:
        """Write in order; on failure the rest goes back to the head of the buffer."""
        for i, (body, n) in enumerate(batches):
            try:
                self._api.write(self.s.bucket, self.s.org, body, write_precision=WritePrecision.MS)
            except ApiException as exc:
                if exc.status in REFUSED:
                    self._failed(exc)
                    log.error("InfluxDB refused %d points as malformed; dropped (%s)", n,
                              self.last_error)
                    self._count("dropped.rejected", n)
                    continue
                self._retry_later(batches[i:], exc)
                return False
            except Exception as exc:        # connection refused, reset, timed out: retry
                self._retry_later(batches[i:], exc)
                return False
            with self._cond:
                self.counts["written"] += n
                self.counts["writes"] += 1
                if not self.up:
                    log.info("InfluxDB history: writing to %s (bucket %s)", self.s.url,
                             self.s.bucket)
                self.up = True
                self._dropping = False
                self._delay = self.s.retry_initial / 1000
        return True

    def _count(self, key: str, n: int) -> None:
        with self._cond:
            self.counts[key] += n

    def _retry_later(self, batches: list[tuple[bytes, int]], exc: Exception) -> None:
        self._failed(exc)
        with self._cond:
            if self.up or not self.counts["write_failures"]:
                log.warning("InfluxDB write failed, retrying with backoff; history is buffered "
                            "(%s)", self.last_error)
            self.up = False
            self.counts["write_failures"] += 1
            for body, n in reversed(batches):
                self._buffer.appendleft((BATCH, n, body))
                self._buffered += n
            self._drop_oldest()
            # closing: no long backoff, try again soon until close's deadline
            delay = self.s.retry_initial / 1000 if self._closing else self._delay
            self._retry_at = time.monotonic() + delay * random.uniform(0.8, 1.2)
            self._delay = min(self._delay * 2, self.s.retry_max / 1000)

    def _failed(self, exc: Exception) -> None:
        # the token travels in a header, never in what is described here
        if isinstance(exc, ApiException):
            what = f"HTTP {exc.status} {exc.reason}: {(exc.body or b'')[:200]!r}"
        else:
            what = f"{type(exc).__name__}: {str(exc)[:200]}"
        self.last_error, self.last_error_at = what, time.time()

    def _give_up(self) -> None:
        """Close's deadline passed with points still unwritten (under the lock)."""
        left = self._buffered + (int(self.sampler.dirty.sum()) if self.sampler else 0)
        if left:
            log.error("InfluxDB history: %d points not written at shutdown (%s)",
                      left, self.last_error or "timed out")
            self.counts["dropped.shutdown"] += left
            self._buffer.clear()
            self._buffered = 0

    # ---- stop and observe --------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> bool:
        """Write what is buffered (down-sampled intervals still open included) within
        ``timeout`` seconds; what is left then is counted as dropped. True if all was written."""
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            if self._retry_at:                  # backing off: try once more now
                self._retry_at = time.monotonic()
            self._cond.notify_all()
        self._thread.join(timeout + 1.0)
        if self._thread.is_alive():           # stuck in a request: it is a daemon thread
            with self._cond:
                self._give_up()
        self._client.close()
        return not (self.counts["dropped.shutdown"] or self._thread.is_alive())

    def stats(self) -> dict[str, Any]:
        with self._cond:
            c = self.counts
            return {"written": c["written"], "writes": c["writes"],
                    "write_failures": c["write_failures"], "buffered": self._buffered,
                    "dropped": {k[8:]: v for k, v in c.items() if k.startswith("dropped.") and v},
                    "up": self.up, "last_error": self.last_error,
                    "last_error_at": self.last_error_at}

    def collect(self) -> Iterator[Metric]:
        """Prometheus metric families (a prometheus-client collector's ``collect``)."""
        st = self.stats()
        yield CounterMetricFamily("cityops_influx_points_written_total",
                                  "History points written to InfluxDB.", value=st["written"])
        yield CounterMetricFamily("cityops_influx_write_failures_total",
                                  "Failed InfluxDB writes (retried).", value=st["write_failures"])
        dropped = CounterMetricFamily("cityops_influx_points_dropped_total",
                                      "History points never written, by reason.", labels=["reason"])
        for reason in ("buffer_full", "rejected", "shutdown", "closed"):
            dropped.add_metric([reason], st["dropped"].get(reason, 0))
        yield dropped
        yield GaugeMetricFamily("cityops_influx_points_buffered",
                                "History points waiting to be written.", value=st["buffered"])
        yield GaugeMetricFamily("cityops_influx_up", "1 while the last InfluxDB write succeeded.",
                                value=int(st["up"]))
        failed = GaugeMetricFamily("cityops_influx_last_error_timestamp_seconds",
                                   "When the last write failed, and why (label).", labels=["error"])
        failed.add_metric([st["last_error"]], round(st["last_error_at"], 3))
        yield failed


def _sliced(lines_of: Any, size: int, *columns: np.ndarray) -> list[tuple[list[bytes], int]]:
    """``lines_of`` over slices of at most ``size`` rows of the columns: (pieces, lines)."""
    n = len(columns[0])
    return [(lines_of(*(c[i:i + size] for c in columns)), min(size, n - i))
            for i in range(0, n, size)]

