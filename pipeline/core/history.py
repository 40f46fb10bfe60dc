"""History as decoded batches: read once, given to as many engines as want it (a backtest's two).

Three sources, batched exactly as ``cityops replay`` batches them, so an engine given these
batches says what a replay of the same file says:

- JSONL: lines of readings or gateway arrays, ``--batch`` lines at a time, decoded by
  ``wire.decode_batch`` (the engine's own decoder) into readings, dead letters and spans;
- CSV with a column mapping (``pipeline.core.replay.csv_readings``): each row is a payload;
- the history store the sink wrote (``influx://``, connectors/history_export.py): the readings
  in event-time order, each its own payload.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import wire
from pipeline.core.engine import Engine, Output
from pipeline.core.replay import CsvMapping, _earliest, csv_readings
from pipeline.core.replay import ReplayStats
from pipeline.core.wire import WireReading


@dataclass
class Batch:
    """Readings decoded once. ``spans`` (JSONL): what ``Engine.ingest_decoded`` needs to
    dead-letter a refused reading with its payload's bytes; else ``ends``: where each payload
    ends. ``first_ts``: the time of the input that opens the batch, for acknowledgements due
    before it (``--ack-after`` takes one input per batch)."""
    readings: list
    dead: list = field(default_factory=list)
    spans: wire.Spans | None = None
    ends: list[int] | None = None
    first_ts: int | None = None

    def feed(self, engine: Engine, clock: int) -> Output:
        if self.spans is not None:
            return engine.ingest_decoded((self.readings, self.dead, self.spans), now_ms=clock)
        return engine.process(self.readings, now_ms=clock, ends=self.ends)


@dataclass
class Progress:
    """How far the reading has got: inputs (lines, rows or recorded points), missing cells."""
    lines: int = 0
    missing: int = 0


def jsonl_batches(path: Path, batch: int, seen: Progress, one_at_a_time: bool = False
                  ) -> Iterator[Batch]:
    source = str(path)
    with path.open("rb") as f:
        chunk: list[bytes] = []
        for raw in f:
            raw = raw.strip()
            if not raw:
                continue
            seen.lines += 1
            chunk.append(raw)
            if len(chunk) >= batch:
                yield _decoded(chunk, source, seen, one_at_a_time)
                chunk = []
        if chunk:
            yield _decoded(chunk, source, seen, one_at_a_time)


def _decoded(chunk: list[bytes], source: str, seen: Progress, one_at_a_time: bool) -> Batch:
    readings, dead, spans = wire.decode_batch(chunk, source)
    # replay's own rule for the time an acknowledgement must come before (a line decoded alone)
    first = _earliest(chunk[0]) if one_at_a_time else None
    return Batch(readings, dead, spans, first_ts=first)


def csv_batches(path: Path, mapping: CsvMapping, batch: int, seen: Progress) -> Iterator[Batch]:
    stats = ReplayStats()
    pending: list[WireReading] = []
    ends: list[int] = []
    first: int | None = None
    for rows in csv_readings(path, mapping, stats):
        seen.lines, seen.missing = stats.lines, stats.missing
        if rows:
            first = min(r.ts for r in rows)  # type: ignore[assignment]  # the row an ack must come before (ts: ms)
        pending += rows
        ends.append(len(pending))
        if len(pending) >= batch:
            yield Batch(pending, ends=ends, first_ts=first)
            pending, ends = [], []
    if pending:
        yield Batch(pending, ends=ends, first_ts=first)


def recorded_batches(recorded, batch: int, seen: Progress) -> Iterator[Batch]:
    """``connectors.history_export.Recorded`` readings, ``batch`` at a time, one per payload."""
    from connectors.history_export import EVENT_NAME
    ids, ts, val = recorded.sensor_ids, recorded.ts.tolist(), recorded.value.tolist()
    for lo in range(0, len(ts), batch):
        hi = min(lo + batch, len(ts))
        readings = [WireReading(sensor_id=ids[i], ts=ts[i], value=None, event=EVENT_NAME)
                    if val[i] != val[i] else WireReading(sensor_id=ids[i], ts=ts[i], value=val[i])
                    for i in range(lo, hi)]
        seen.lines = hi
        yield Batch(readings, ends=list(range(1, hi - lo + 1)), first_ts=ts[lo])
