"""InfluxDB line protocol for cityops history: what the sink writes, and fast.

The names below are the contract with the Grafana dashboard (deploy/grafana/dashboards), whose
test checks every name its queries use against them.

Readings, one measurement per sensor kind (``gas_household``, ``waterlogging`` …):

    gas_household,community=…,district=510104,grid=…,street=…,sensor=gas-510104-000001 value=27.5 1782885780000

A discrete event (a camera's ``no_helmet``, a heartbeat) has no value: it is written as
``event=1i``, a count, so "events per hour" is a sum. Down-sampled (``readings_every``), one
point per sensor per interval, stamped at the interval's start: ``value`` = the latest reading,
``max`` = the largest, or ``event`` = how many events.

Notices, measurement ``alerts``, one point per notice (per tier copy):

    alerts,category=gas,community=…,district=510104,grid=…,kind=gas_household,rule=gas.leak,sensor=gas-510104-000001,severity=red,state=firing,street=…,target=city,tier=city alert_id="…",seq=1i,value=55.0,threshold=50.0 1782885780000

Tags left out when a notice has none (a group incident has no grid; ``acked_tier`` only once
acknowledged). An ``acknowledged`` notice also carries ``ack_seconds`` (its ts − started_at):
time to acknowledge. Every tier told gets its own copy; to count incidents once, take one tier
(the dashboard takes the street's: the tier policy tells every alert's street).

Timestamps are event time in milliseconds (write precision ms).

Speed: the pipeline takes ~350,000 readings/s per core, and history must cost it little. Tag
text is made once per (kind, grid) and kept; a batch is formatted column-wise: numbers by numpy
(connectors/numtext.py), tag text and sensor ids picked by numpy, the lines put together by one
``bytes.join``. No Python code runs per reading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import numpy as np

from connectors import numtext

ALERTS = "alerts"
READING_TAGS = ("community", "district", "grid", "street", "sensor")
READING_FIELDS = ("value", "max", "event")
# tag -> the notice key it comes from; in key order (what InfluxDB likes best)
ALERT_TAGS = {"acked_tier": "acked_tier", "category": "category", "community": "community",
              "district": "district", "grid": "grid", "kind": "kind", "rule": "rule_id",
              "sensor": "sensor_id", "severity": "severity", "state": "state",
              "state_tier": "state_tier", "street": "street", "target": "target", "tier": "tier"}
# and, on a closed notice, the caller's time-to-close fields (``closed_fields`` below)
ALERT_FIELDS = ("alert_id", "seq", "value", "threshold", "ack_seconds")
# A closed notice -> its extra fields by name (seconds to each step): pipeline/core/close_figures.py
ClosedFields = Callable[[dict], Mapping[str, float]]


class SensorTable(Protocol):
    """What the reading lines need of the sensor registry (pipeline/core/registry.py's Registry):
    per sensor number its id, kind number and grid number; the kinds' names; per grid number
    its place (community, district, grid, street)."""

    sensor_ids: Any
    kind_of: np.ndarray
    grid_of: np.ndarray
    kinds: Sequence[str]
    grid_places: Sequence[Any]

    def __len__(self) -> int: ...

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def escape_tag(v: str) -> str:
    """Tag keys and values: comma, equals sign and space are escaped; a newline cannot be
    written at all, so it becomes a space."""
    return v.replace("\n", " ").replace(",", r"\,").replace("=", r"\=").replace(" ", r"\ ")


def escape_measurement(v: str) -> str:
    return v.replace("\n", " ").replace(",", r"\,").replace(" ", r"\ ")


def escape_string(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_ms(t: Any) -> int:
    """A notice time (RFC 3339 text, datetime or epoch ms) as epoch milliseconds, exactly."""
    if isinstance(t, int):
        return t
    dt = datetime.fromisoformat(t) if isinstance(t, str) else t
    return (dt - _EPOCH) // _MS


def notice_line(n: dict, closed_fields: ClosedFields | None = None) -> str:
    """One notice as an ``alerts`` point. Absent tags (a group incident has no grid) are left
    out; value and threshold are floats always, so the field type never changes. A closed
    notice also gets ``closed_fields(n)``."""
    tags = "".join(f",{k}={escape_tag(str(n[src]))}" for k, src in ALERT_TAGS.items()
                   if n.get(src) not in (None, ""))
    fields = [f"alert_id={escape_string(str(n['alert_id']))}", f"seq={int(n['seq'])}i"]
    for name in ("value", "threshold"):
        v = n.get(name)
        if v is not None and math.isfinite(v):        # nan, inf: not writable, left out
            fields.append(f"{name}={float(v)!r}")
    ts = to_ms(n["ts"])
    if n.get("state") == "acknowledged" and n.get("started_at") is not None:
        fields.append(f"ack_seconds={(ts - to_ms(n['started_at'])) / 1000!r}")
    elif n.get("state") == "closed" and closed_fields is not None:    # time to close, by step
        fields += [f"{k}={float(v)!r}" for k, v in closed_fields(n).items()]
    return f"{ALERTS}{tags} {','.join(fields)} {ts}"


class ReadingLines:
    """Line protocol for readings columns (sensor numbers, ts ms, values; nan = an event)."""

    def __init__(self, registry: SensorTable) -> None:
        if ALERTS in registry.kinds:
            raise ValueError(f"a sensor kind named {ALERTS!r} would share the notices' "
                             "measurement; rename the kind")
        self.registry = registry
        self.n_grids = max(1, len(registry.grid_places))
        # sensor -> its (kind, grid) number, which names its measurement and tags
        self.head_of = (np.asarray(registry.kind_of, dtype=np.int64) * self.n_grids
                        + np.asarray(registry.grid_of, dtype=np.int64))
        # made the first time they are written: measurement and tags per (kind, grid), and
        # each sensor's id as bytes (about 50 bytes per sensor heard from)
        self.heads = _Cache(len(registry.kinds) * self.n_grids, self._head)
        self.ids = _Cache(len(registry), lambda i: registry.sensor_ids[i].encode())

    def _lines(self, sensors: np.ndarray, numbers: bytes) -> list[bytes]:
        """Each sensor's measurement, tags and id, then its row of ``numbers``: the pieces of
        the lines, for one ``b"".join`` of the whole request body (one big allocation, not
        several: fresh large buffers cost page faults)."""
        parts: list[Any] = [None] * (3 * len(sensors))
        parts[0::3] = self.heads.get(self.head_of[sensors])
        parts[1::3] = self.ids.get(sensors)     # sensor ids need no escaping (registry's pattern)
        parts[2::3] = numbers.splitlines(keepends=True)
        return parts

    def _head(self, key: int) -> bytes:
        kind, grid = divmod(key, self.n_grids)
        p = self.registry.grid_places[grid]
        tags = {"community": p.community, "district": p.district, "grid": p.grid,
                "street": p.street}
        text = "".join(f",{k}={escape_tag(v)}" for k, v in tags.items() if v)
        return f"{escape_measurement(self.registry.kinds[kind])}{text},sensor=".encode()

    def readings(self, sensors: np.ndarray, ts: np.ndarray, values: np.ndarray) -> list[bytes]:
        """Every reading: ``value=…``, or ``event=1i`` for an event. One line per reading."""
        event = np.isnan(values)
        v = ~event
        parts = []
        if v.any():
            parts += self._lines(sensors[v], numtext.join(
                int(v.sum()), b" value=", numtext.float_text(values[v]), b" ",
                numtext.int_text(ts[v]), b"\n"))
        if event.any():
            parts += self._lines(sensors[event], numtext.join(
                int(event.sum()), b" event=1i ", numtext.int_text(ts[event]), b"\n"))
        return parts

    def sampled(self, sensors: np.ndarray, ts: np.ndarray, last: np.ndarray, peak: np.ndarray,
                count: np.ndarray) -> list[bytes]:
        """Down-sampled intervals: ``value=latest,max=largest``, or ``event=count``. One line
        per interval."""
        event = np.isnan(last)
        v = ~event
        parts = []
        if v.any():
            parts += self._lines(sensors[v], numtext.join(
                int(v.sum()), b" value=", numtext.float_text(last[v]), b",max=",
                numtext.float_text(peak[v]), b" ", numtext.int_text(ts[v]), b"\n"))
        if event.any():
            parts += self._lines(sensors[event], numtext.join(
                int(event.sum()), b" event=", numtext.int_text(count[event]), b"i ",
                numtext.int_text(ts[event]), b"\n"))
        return parts


class _Cache:
    """Texts by number, each made the first time it is asked for."""

    def __init__(self, size: int, make: Any) -> None:
        self.texts = np.full(size, None, dtype=object)
        self.made = np.zeros(size, dtype=bool)
        self.make = make

    def get(self, keys: np.ndarray) -> list:
        made = self.made[keys]
        if not made.all():
            new = keys[~made]
            for key in np.unique(new).tolist():
                self.texts[key] = self.make(key)
            self.made[new] = True
        return self.texts[keys].tolist()


class DownSampler:
    """One point per sensor per interval of ``every`` ms (aligned to the epoch): the latest
    value and the largest (or, for events, how many), stamped at the interval's start.

    An interval is written once the sensor reports in a later one, or once the newest event
    time seen from any sensor has passed its end (``due``); ``drain`` writes what is still open
    (at close). A late reading into an interval already written writes it again with every
    reading of it counted (InfluxDB keeps the last write of a series and time). Readings of one
    sensor never go back in time: the engine refuses an older one as stale.

    State is five columns over the registry's sensors (33 bytes per sensor), numpy throughout.
    """

    def __init__(self, every_ms: int, n_sensors: int) -> None:
        self.every = every_ms
        self.bucket = np.full(n_sensors, -1, dtype=np.int64)
        self.last = np.zeros(n_sensors)
        self.peak = np.zeros(n_sensors)
        self.count = np.zeros(n_sensors, dtype=np.int64)
        self.dirty = np.zeros(n_sensors, dtype=bool)    # holds readings not yet written
        self.newest = 0

    def absorb(self, sensors: np.ndarray, ts: np.ndarray, values: np.ndarray) -> tuple:
        """Take readings; returns the intervals they closed (sensors, start ms, last, max,
        count)."""
        if not len(sensors):
            return self._none()
        first_ts = int(ts.min())
        if int(ts.max()) - first_ts < 1 << 40 and int(sensors.max()) < 1 << 23:
            order = np.argsort((sensors << 40) | (ts - first_ts))   # one key: sensor, then time
        else:
            order = np.lexsort((ts, sensors))
        s, t, v = sensors[order], ts[order], values[order]
        b = t // self.every
        n = len(s)
        first = np.ones(n, dtype=bool)
        first[1:] = (s[1:] != s[:-1]) | (b[1:] != b[:-1])
        starts = np.flatnonzero(first)
        ends = np.append(starts[1:], n) - 1
        gs, gb = s[starts], b[starts]
        glast, gpeak = v[ends], np.fmax.reduceat(v, starts)
        gcount = np.diff(np.append(starts, n))
        same = self.bucket[gs] == gb                  # continues the sensor's open interval
        held = gs[same]
        gpeak[same] = np.fmax(gpeak[same], self.peak[held])
        gcount[same] += self.count[held]
        newest_of_sensor = np.ones(len(gs), dtype=bool)
        newest_of_sensor[:-1] = gs[1:] != gs[:-1]
        oldest_of_sensor = np.ones(len(gs), dtype=bool)
        oldest_of_sensor[1:] = gs[1:] != gs[:-1]
        # a sensor's held interval is closed by a reading in another one
        closing = gs[oldest_of_sensor & ~same]
        closing = closing[self.dirty[closing]]
        done = self._take(closing)
        shut = ~newest_of_sensor                      # closed within this batch
        keep = newest_of_sensor
        ks = gs[keep]
        self.bucket[ks], self.last[ks], self.peak[ks] = gb[keep], glast[keep], gpeak[keep]
        self.count[ks] = gcount[keep]
        self.dirty[ks] = True
        self.newest = max(self.newest, int(t.max()))
        return tuple(np.concatenate([a, c]) for a, c in zip(
            done, (gs[shut], gb[shut] * self.every, glast[shut], gpeak[shut], gcount[shut]), strict=True))

    def due(self) -> tuple:
        """Intervals that ended before the newest event time seen."""
        return self._take(np.flatnonzero(self.dirty & ((self.bucket + 1) * self.every
                                                        <= self.newest)))

    def drain(self) -> tuple:
        return self._take(np.flatnonzero(self.dirty))

    def _take(self, sensors: np.ndarray) -> tuple:
        self.dirty[sensors] = False
        return (sensors, self.bucket[sensors] * self.every, self.last[sensors],
                self.peak[sensors], self.count[sensors])

    @staticmethod
    def _none() -> tuple:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0), np.zeros(0), empty
