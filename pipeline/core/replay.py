"""Replay: history in, notices out, through the same engine as the live runtimes.

Input is JSONL (one reading object or gateway array per line) or CSV with a column mapping
(``*.map.yaml``: which columns make the time, which column feeds which sensor). Output is the
notices as JSON lines with sorted keys, the same bytes on every run, then a final flush of the
watermark so that every due timer (clear_for, quiet periods) has had its say.
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
import time
from pathlib import Path
from typing import IO, Annotated, Any
from zoneinfo import ZoneInfo

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core import wire
from pipeline.core.close_figures import CloseFigures
from pipeline.core.engine import Engine, Output
from pipeline.core.models import HandlingState, MAX_TS_MS
from pipeline.core.wire import WireReading
from rules.yamlfile import ConfigError, load_yaml, pydantic_error

DEMO_CSV = Path(__file__).parents[1] / "fixtures" / "chengdu" / "uci_chengdu_pm25_weather_2010_2015.csv"
DEMO_MAP = Path(__file__).parents[1] / "fixtures" / "chengdu" / "uci_chengdu.map.yaml"


class CsvTime(BaseModel):
    model_config = ConfigDict(extra="forbid")
    columns: list[str] = Field(min_length=1, description="[ts] (RFC 3339 or epoch ms), or "
                               "[year, month, day, hour] (local time)")
    timezone: str = "Asia/Shanghai"


class CsvColumn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    column: str
    sensor_id: str


class CsvMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    time: CsvTime
    missing: list[str] = ["NA", ""]
    readings: list[CsvColumn] = Field(min_length=1)


def load_mapping(path: str | Path) -> CsvMapping:
    doc = load_yaml(path)
    try:
        return CsvMapping.model_validate(doc.data)
    except ValidationError as exc:
        raise pydantic_error(doc, exc) from None


@dataclass
class ReplayStats:
    lines: int = 0
    readings: int = 0
    missing: int = 0
    notices: int = 0
    dead_letters: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)
    close: CloseFigures = field(default_factory=CloseFigures)    # time to close (快速处置)


def csv_readings(path: Path, mapping: CsvMapping, stats: ReplayStats) -> Iterator[list[WireReading]]:
    """One list of readings per CSV row (all sensors of that hour)."""
    tz = ZoneInfo(mapping.time.timezone)
    missing = set(mapping.missing)
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f)
        header = rows.fieldnames or []
        for col in mapping.time.columns + [c.column for c in mapping.readings]:
            if col not in header:
                raise ConfigError(path, 1, f"no column {col!r}; the header has {', '.join(header)}")
        tcols = mapping.time.columns
        for line, row in enumerate(rows, start=2):
            stats.lines += 1
            try:
                if len(tcols) == 1:
                    raw = row[tcols[0]]
                    ts = int(raw) if raw.isdigit() else int(datetime.fromisoformat(raw).timestamp() * 1000)
                else:
                    parts = [int(row[c]) for c in tcols]
                    # (ignored: mypy cannot tell that *parts, 2 to 6 numbers, stops short of tzinfo)
                    ts = int(datetime(*parts, tzinfo=tz).timestamp() * 1000)  # type: ignore[misc, arg-type]
            except (ValueError, TypeError) as exc:
                raise ConfigError(path, line, f"cannot read the time: {exc}") from None
            batch = []
            for c in mapping.readings:
                cell = row[c.column].strip()
                if cell in missing:
                    stats.missing += 1
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    raise ConfigError(path, line, f"column {c.column!r}: {cell!r} is not a number "
                                      f"(list it under `missing:` if it means no reading)") from None
                batch.append(WireReading(sensor_id=c.sensor_id, ts=ts, value=value))
            yield batch


class AckAfter:
    """Someone acknowledges every incident ``delay`` ms after it fires (or fires again after
    resolving), at the first tier it told: replayed history then shows what acknowledged
    incidents do, not reminders and escalations nobody would have let happen.

    An ack must reach the engine at its event time, before a later reading moves the
    watermark past the escalation it prevents: ``due_by(ts)`` applies those due by the next
    input's time, so the replay goes an input at a time."""

    BY = "replay"

    def __init__(self, delay_ms: int) -> None:
        self.delay = delay_ms
        self.due: list[tuple[int, str, str]] = []        # (due ms, alert_id, tier): a heap
        self.seen: set[tuple[str, int]] = set()

    def watch(self, o: Output) -> None:
        for n in o.notices:
            key = (n["alert_id"], n["seq"])
            if n["state"] == "firing" and n.get("previous_state") in (None, "resolved") \
                    and key not in self.seen:
                self.seen.add(key)
                fired = int(datetime.fromisoformat(n["ts"]).timestamp() * 1000)
                heapq.heappush(self.due, (fired + self.delay, n["alert_id"], n["tier"]))

    def due_by(self, engine: Engine, ts: int) -> Iterator[Output]:
        while self.due and self.due[0][0] <= ts:
            at, alert_id, tier = heapq.heappop(self.due)
            o = engine.advance(at)
            yield engine.ack([{"alert_id": alert_id, "by": self.BY, "tier": tier, "ts": at}], o)


class HandlingRecord(BaseModel):
    """One line of a handling log (`cityops replay --handling FILE`): what a person did to an
    incident, named by its alert id or by the rule and sensor (or gateway) of the incident
    open then."""

    model_config = ConfigDict(extra="forbid")

    ts: datetime | Annotated[int, Field(ge=0, le=MAX_TS_MS)]
    state: HandlingState
    by: str = Field(min_length=1, max_length=64)
    tier: str
    alert_id: str | None = None
    rule_id: str | None = None
    sensor_id: str | None = None
    note: str | None = Field(default=None, max_length=500)
    to: str | None = Field(default=None, min_length=1, max_length=64)

    @property
    def ts_ms(self) -> int:
        return self.ts if isinstance(self.ts, int) else int(self.ts.timestamp() * 1000)


class HandlingLog:
    """A handling log replayed with the readings: each record reaches the engine at its time,
    as ``AckAfter``'s acknowledgements do (the replay then goes an input at a time)."""

    def __init__(self, path: Path) -> None:
        self.due: list[tuple[int, int, HandlingRecord]] = []
        with path.open("rb") as f:
            for line, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rec = HandlingRecord.model_validate_json(raw)
                except ValidationError as exc:
                    raise ConfigError(path, line, wire.ack_refusal(exc)) from None
                if rec.alert_id is None and (rec.rule_id is None or rec.sensor_id is None):
                    raise ConfigError(path, line, "name the incident: alert_id, or rule_id and "
                                      "sensor_id")
                self.due.append((rec.ts_ms, line, rec))
        heapq.heapify(self.due)

    def due_by(self, engine: Engine, ts: int) -> Iterator[Output]:
        while self.due and self.due[0][0] <= ts:
            at, _, rec = heapq.heappop(self.due)
            # (ignored: without alert_id, rule_id and sensor_id are set: the loading checked it)
            aid = (rec.alert_id or engine.find_incident(rec.rule_id, rec.sensor_id)  # type: ignore[arg-type]
                   or f"{rec.rule_id}@{rec.sensor_id}")
            o = engine.advance(at)
            yield engine.ack([{"alert_id": aid, "by": rec.by, "tier": rec.tier, "ts": at,
                               "state": rec.state, "note": rec.note, "to": rec.to}], o)


def _earliest(raw: bytes) -> int | None:
    readings, _ = wire.decode(raw)
    return min((r.ts for r in readings), default=None)


def replay(engine: Engine, source: Path, out: IO[bytes], *, mapping: CsvMapping | None = None,
           batch: int = 1000, dead: IO[bytes] | None = None,
           progress: Callable[[ReplayStats], None] | None = None,
           on_output: Callable[[Output], None] | None = None,
           ack_after: int | None = None, handling: Path | None = None) -> ReplayStats:
    stats = ReplayStats()
    acks = AckAfter(ack_after) if ack_after is not None else None
    log = HandlingLog(handling) if handling is not None else None
    if acks is not None or log is not None:
        batch = 1
    # The wall clock only refuses readings from the future; history is never ahead of it, so
    # the output stays byte-identical from run to run.
    clock = int(time.time() * 1000)
    opt = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE

    def emit(o: Output) -> None:
        for n in o.notices:
            out.write(orjson.dumps(n, option=opt))
            stats.by_tier[n["tier"]] = stats.by_tier.get(n["tier"], 0) + 1
        stats.notices += len(o.notices)
        stats.close.observe(o.notices)
        stats.dead_letters += len(o.dead_letters)
        if dead is not None:
            for d in o.dead_letters:
                dead.write(d.model_dump_json().encode() + b"\n")
        if on_output:
            on_output(o)
        if acks is not None:
            acks.watch(o)

    def settle(ts: int | None) -> None:
        if acks is not None and ts is not None:
            for o in acks.due_by(engine, ts):
                emit(o)
        if log is not None and ts is not None:
            for o in log.due_by(engine, ts):
                emit(o)

    if mapping is not None:
        pending: list[WireReading] = []
        ends: list[int] = []            # each CSV row is a payload: batching changes nothing
        for rows in csv_readings(source, mapping, stats):
            settle(min((r.ts for r in rows), default=None))  # type: ignore[arg-type]  # ts: ms, csv_readings
            pending += rows
            ends.append(len(pending))
            if len(pending) >= batch:
                stats.readings += len(pending)
                emit(engine.process(pending, now_ms=clock, ends=ends))
                pending, ends = [], []
                if progress:
                    progress(stats)
        if pending:
            stats.readings += len(pending)
            emit(engine.process(pending, now_ms=clock, ends=ends))
    else:
        with source.open("rb") as f:
            chunk: list[bytes] = []
            for raw in f:
                raw = raw.strip()
                if not raw:
                    continue
                stats.lines += 1
                if acks is not None or log is not None:
                    settle(_earliest(raw))
                chunk.append(raw)
                if len(chunk) >= batch:
                    emit(engine.ingest(chunk, source=str(source), now_ms=clock))
                    chunk = []
                    if progress:
                        progress(stats)
            if chunk:
                emit(engine.ingest(chunk, source=str(source), now_ms=clock))
        stats.readings = engine.counters["readings"]
    # History is over: let every timer that the data would have reached run out.
    settle(engine.max_ts + 1)
    if log is not None and log.due:         # handled and closed after the last reading: history too
        settle(max(at for at, _, _ in log.due))
    emit(engine.advance(engine.max_ts + 1))
    return stats


def notice_line(n: dict[str, Any]) -> bytes:
    return orjson.dumps(n, option=orjson.OPT_SORT_KEYS)
