"""Reading back the readings the history sink wrote (connectors/influx.py), for a backtest.

The sink writes InfluxDB line protocol: a reading is a point of measurement = its sensor kind,
tag ``sensor``, field ``value`` (or ``event=1i`` for a discrete event, whose name is not kept).
This reads them back through the export API of VictoriaMetrics (``/api/v1/export``: one JSON
object per series per line, metric ``{measurement}_{field}``, tags as labels, millisecond
timestamps) — the line-protocol store the tests run. InfluxDB 2 answers Flux queries, not
this API, and is not read here.

    influx://127.0.0.1:8428            # http://127.0.0.1:8428/api/v1/export
    influx+https://tsdb.example:8428   # the same over https
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import orjson

SCHEMES = {"influx": "http", "influx+http": "http", "influx+https": "https"}
# What a recorded event is called when it comes back: the sink kept its count, not its name, so
# it is an event no rule names (it ends a silence, as a heartbeat does, and fires nothing).
EVENT_NAME = "recorded"
FAR_FUTURE_S = 4102444800            # 2100-01-01: the export ends "now" unless told otherwise


class HistoryError(ValueError):
    """The history address is malformed or the store cannot be read; the message says why
    (the command line shows it as its --history error)."""


def is_history_url(text: str) -> bool:
    return text.split("://", 1)[0] in SCHEMES and "://" in text


def export_url(text: str) -> str:
    """``influx://host:port`` as the http(s) address of its export API; a clear error else."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise HistoryError(f"{text!r}: write the history store as "
                           "influx://HOST:PORT (or influx+https://HOST:PORT)")
    try:
        port = parts.port
    except ValueError:
        raise HistoryError(f"{text!r}: the port is not a number") from None
    netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
    return f"{SCHEMES[parts.scheme]}://{netloc}{parts.path.rstrip('/')}/api/v1/export"


@dataclass
class Recorded:
    """Readings read back, in event-time order (ties by sensor id): columns."""
    sensor_ids: list[str]
    ts: np.ndarray               # epoch ms, int64
    value: np.ndarray            # float64; nan = an event
    series: int = 0

    def __len__(self) -> int:
        return len(self.ts)


def read_readings(url: str, kinds: Iterable[str], start_ms: int | None = None,
                  end_ms: int | None = None, timeout: float = 60.0,
                  progress: Callable[[int, int], None] | None = None) -> Recorded:
    """Every reading of these sensor kinds the store holds between ``start_ms`` and
    ``end_ms`` (inclusive; default the whole of time). ``progress(series, points)`` as they come."""
    names = "|".join(sorted(kinds))
    params = {"match[]": f'{{__name__=~"({names})_(value|event)",sensor!=""}}',
              "start": str(start_ms / 1000 if start_ms is not None else 0),
              "end": str(end_ms / 1000 if end_ms is not None else FAR_FUTURE_S)}
    address = export_url(url)
    ids: list[str] = []
    ts_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    sensor_parts: list[np.ndarray] = []
    number: dict[str, int] = {}
    series = points = 0
    try:
        with urllib.request.urlopen(f"{address}?{urllib.parse.urlencode(params)}",
                                    timeout=timeout) as resp:
            for line in resp:
                if not line.strip():
                    continue
                s = orjson.loads(line)
                sensor = s["metric"]["sensor"]
                n = number.setdefault(sensor, len(number))
                if n == len(ids):
                    ids.append(sensor)
                ts = np.asarray(s["timestamps"], dtype=np.int64)
                if s["metric"]["__name__"].endswith("_event"):
                    val = np.full(len(ts), np.nan)
                else:
                    val = np.asarray(s["values"], dtype=np.float64)
                ts_parts.append(ts)
                val_parts.append(val)
                sensor_parts.append(np.full(len(ts), n, dtype=np.int64))
                series += 1
                points += len(ts)
                if progress:
                    progress(series, points)
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace").strip()
        raise HistoryError(f"{address} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HistoryError(f"cannot read {address}: {reason}") from None
    if not ts_parts:
        return Recorded(ids, np.zeros(0, np.int64), np.zeros(0), series)
    ts = np.concatenate(ts_parts)
    val = np.concatenate(val_parts)
    sensor = np.concatenate(sensor_parts)
    # event time, then sensor id: the same order on every read, whatever order the series came in
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.argsort(np.array(ids, dtype=object))] = np.arange(len(ids))
    order = np.lexsort((rank[sensor], ts))
    return Recorded([ids[i] for i in sensor[order].tolist()], ts[order], val[order], series)
