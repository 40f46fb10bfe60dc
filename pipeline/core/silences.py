"""Silences and maintenance windows: what mutes an incident's notices, and when.

A **silence** mutes the incidents its matchers fit from `starts_at` to `ends_at`; a
**maintenance window** does the same every week (`schedule`: days, from, to, an IANA time zone),
optionally only between `starts_at` and `ends_at`. The matchers are the routing tree's
(pipeline/core/routing.py: globs and lists over the alert's labels — rule_id, category, severity,
kind, district, street, community, grid, sensor.<attr> — plus `sensor_id`).

Here is only what a silence *is* (its times, what it matches) and the book of those in force;
what muting does to an incident (held notices, paused escalation, the resolve that always goes
out) is the incident lifecycle's (pipeline/core/lifecycle.py). Silences are engine input like
acknowledgements: journaled, in the snapshot, replayed, and acting at event time (the
watermark when they arrive), so replay reproduces them.

    {"op": "add", "id": "s-…", "matchers": {"street": "510104020"}, "starts_at": …,
     "ends_at": …, "by": "duty-510104", "reason": "…"}
    {"op": "add", "id": "s-…", "matchers": {…}, "schedule": {"days": ["tue"], "from": "23:00",
     "to": "05:00", "tz": "Asia/Shanghai"}, "by": …, "reason": …}
    {"op": "end", "id": "s-…", "by": "duty-510104"}
"""

from __future__ import annotations

import hashlib
import re
from datetime import date, datetime, timedelta
from datetime import time as dtime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from pydantic import (AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints,
                      TypeAdapter, ValidationError, field_validator, model_validator)

from pipeline.core.models import MAX_TS_MS
from pipeline.core.routing import _matches
from rules.schema import MATCH_LABELS

NEVER = 1 << 62
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
SILENCE_ID = r"^[A-Za-z0-9_.:-]{1,64}$"
LABELS = MATCH_LABELS | {"sensor_id"}
_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)\Z")

Stamp = AwareDatetime | Annotated[int, Field(ge=0, le=MAX_TS_MS)]
Matcher = str | bool | int | float | list[str | bool | int | float]


def ms(ts: Stamp) -> int:
    return ts if isinstance(ts, int) else int(ts.timestamp() * 1000)


class Schedule(BaseModel):
    """Every week on `days`, from `from` to `to` local time in `tz`. A window whose `to` is not
    after its `from` crosses midnight: it begins on each of `days` and ends the next day."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(min_length=1)
    from_: str = Field(alias="from", description="HH:MM, local time")
    to: str = Field(description="HH:MM, local time; at or before `from`: the next day")
    tz: str = Field(description="an IANA time zone, e.g. Asia/Shanghai")

    @field_validator("from_", "to")
    @classmethod
    def _clock(cls, v: str) -> str:
        if not _CLOCK.match(v):
            raise ValueError(f"{v!r} is not a time of day; write HH:MM, e.g. 01:00 or 23:30")
        return v

    @field_validator("tz")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone; write e.g. Asia/Shanghai") from None
        return v

    @model_validator(mode="after")
    def _length(self) -> Schedule:
        if self.from_ == self.to:
            raise ValueError("`from` and `to` are the same time: a window needs a length "
                             "(for a whole day write e.g. from 00:00 to 23:59)")
        return self

    def occurrences(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The (start, end) in epoch ms of every occurrence that overlaps [lo, hi), in order.
        A local time a DST change skips is read with the offset before the change, one it
        repeats as its first occurrence (zoneinfo, fold=0)."""
        tz = ZoneInfo(self.tz)
        lo, hi = max(lo, 0), max(hi, 1)
        start_t, end_t = _hm(self.from_), _hm(self.to)
        over = end_t <= start_t
        wanted = {DAYS.index(d) for d in self.days}
        day = datetime.fromtimestamp(lo / 1000, tz).date() - timedelta(days=1)
        last = datetime.fromtimestamp(hi / 1000, tz).date()
        out = []
        while day <= last:
            if day.weekday() in wanted:
                a = _at(day, start_t, tz)
                b = _at(day + timedelta(days=1) if over else day, end_t, tz)
                if b > lo and a < hi:
                    out.append((a, b))
            day += timedelta(days=1)
        return out

    def describe(self) -> str:
        return f"{','.join(self.days)} {self.from_}-{self.to} {self.tz}"


def _hm(text: str) -> dtime:
    h, m = text.split(":")
    return dtime(int(h), int(m))


def _at(day: date, t: dtime, tz: ZoneInfo) -> int:
    return int(datetime.combine(day, t, tzinfo=tz).timestamp() * 1000)


class Silence(BaseModel):
    """One silence or maintenance window, as the engine keeps it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=SILENCE_ID)
    matchers: dict[str, Matcher] = Field(min_length=1)
    starts_at: Stamp | None = None
    ends_at: Stamp | None = None
    schedule: Schedule | None = None
    by: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)]

    @field_validator("matchers")
    @classmethod
    def _labels(cls, v: dict) -> dict:
        for label in v:
            if label not in LABELS and not label.startswith("sensor."):
                raise ValueError(f"unknown label {label!r}; match on one of {sorted(LABELS)} "
                                 "or sensor.<attribute>")
        return v

    @model_validator(mode="after")
    def _times(self) -> Silence:
        if self.schedule is None and (self.starts_at is None or self.ends_at is None):
            raise ValueError("a silence needs `starts_at` and `ends_at`; a maintenance window "
                             "needs `schedule`")
        if self.starts_at is not None and self.ends_at is not None and \
                ms(self.ends_at) <= ms(self.starts_at):
            raise ValueError("`ends_at` must be after `starts_at`")
        return self

    @property
    def start(self) -> int:
        return ms(self.starts_at) if self.starts_at is not None else -NEVER

    @property
    def end(self) -> int:
        return ms(self.ends_at) if self.ends_at is not None else NEVER

    def covers(self, labels: dict[str, Any]) -> bool:
        return all(_matches(labels.get(k), want) for k, want in self.matchers.items())

    def active(self, t: int) -> bool:
        if not self.start <= t < self.end:
            return False
        return self.schedule is None or bool(self.schedule.occurrences(t, t + 1))

    def next_edge(self, t: int) -> int:
        """The first time after ``t`` at which it starts or stops muting (NEVER: none)."""
        edges = [e for e in (self.start, self.end) if t < e < NEVER]
        if self.schedule is not None:
            # a window opens and closes at least once a week: look ahead eight days
            lo = max(t, self.start)
            if lo < self.end:
                for a, b in self.schedule.occurrences(lo, lo + 8 * 86_400_000):
                    edges += [e for e in (a, b) if t < e and self.start <= e <= self.end]
        return min(edges, default=NEVER)

    def over(self, t: int) -> bool:
        return self.end <= t

    def view(self) -> dict[str, Any]:
        """For `silence list`, the HTTP face and the console: times as epoch ms."""
        d = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        d["starts_at"], d["ends_at"] = (self.start if self.starts_at is not None else None,
                                        self.end if self.ends_at is not None else None)
        return d


class AddSilence(Silence):
    op: Literal["add"]


class EndSilence(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["end"]
    id: str = Field(pattern=SILENCE_ID)
    by: Annotated[str, StringConstraints(min_length=1, max_length=64)]


Command = TypeAdapter(Annotated[AddSilence | EndSilence, Field(discriminator="op")])


def parse_command(raw: bytes | dict) -> AddSilence | EndSilence:
    """A journaled silence input; ValidationError (or ValueError) if it is not one."""
    return Command.validate_json(raw) if isinstance(raw, bytes) else Command.validate_python(raw)


def is_command(payload: bytes) -> bool:
    """A silence command among acknowledgements (on Kafka they share the acks topic): a JSON
    object with `op`, which an Ack never has."""
    try:
        doc = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return False
    return isinstance(doc, dict) and "op" in doc


def refusal(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"] if x not in ("add", "end"))
        return f"{where}: {err['msg']}" if where else err["msg"]
    return str(exc)


def new_id(body: dict, at_ms: int) -> str:
    """A silence's id, given where it is made (the HTTP face): a digest of what it says and when."""
    h = hashlib.blake2b(msgspec.json.encode([body, at_ms], order="sorted"), digest_size=5)
    return "s-" + h.hexdigest()


class SilenceBook:
    """The silences in force or still to come, and the next time one starts or stops muting."""

    def __init__(self) -> None:
        self.items: dict[str, Silence] = {}
        self.gen = 0                # the edge timer's plan number: an older plan is void
        self.due = NEVER            # ... and its time

    def muting(self, labels: dict[str, Any], t: int) -> str | None:
        """The silence that mutes an incident with these labels at ``t`` (the first by id)."""
        for sid in sorted(self.items):
            s = self.items[sid]
            if s.active(t) and s.covers(labels):
                return sid
        return None

    def next_edge(self, t: int) -> int:
        return min((s.next_edge(t) for s in self.items.values()), default=NEVER)

    def dump(self) -> list:
        return [msgspec.json.encode(s.model_dump(mode="json", by_alias=True, exclude_none=True))
                for s in self.items.values()]

    def load(self, rows: list) -> None:
        for row in rows:
            s = Silence.model_validate_json(row)
            self.items[s.id] = s


def accept(items: dict[str, Silence], raw: bytes | dict, now: int
           ) -> tuple[Silence | EndSilence | None, str | None]:
    """A silence input checked against the silences in force at ``now`` (the watermark): the
    silence to add or the end to apply, or why it is refused."""
    try:
        cmd = parse_command(raw)
    except (ValidationError, ValueError) as exc:
        return None, refusal(exc)
    if isinstance(cmd, EndSilence):
        if cmd.id not in items or items[cmd.id].over(now):
            return None, f"no silence {cmd.id} in force (it ended already, or never existed)"
        return cmd, None
    if cmd.id in items and not items[cmd.id].over(now):
        return None, f"silence {cmd.id} exists already"
    s = Silence.model_construct(**{k: getattr(cmd, k) for k in Silence.model_fields})
    if s.over(now):
        return None, f"silence {cmd.id} ends at {s.end}, before the pipeline's time {now}"
    return s, None


def apply(book: Any, raw: bytes | dict, now: int, out: list[dict]) -> str | None:
    """One silence input to an AlertBook (pipeline/core/lifecycle.py) at ``now``; why it was
    refused, or None."""
    got, why = accept(book.silences.items, raw, now)
    if isinstance(got, Silence):
        book.add_silence(got, now, out)
    elif isinstance(got, EndSilence):
        book.end_silence(got.id, now, out)
    return why
