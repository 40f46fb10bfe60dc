"""``type: event``: discrete events (camera violations, crane alarms, door magnets), one
incident per sensor while they keep coming."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rules.evaluators import FIRING, UPGRADE, RESOLVE, Evaluator, Track
from rules.schema import Duration, _RuleBase
from rules.types.base import Binding, RuleType, register
from rules.vocabulary import Severity


class EventRule(_RuleBase):
    type: Literal["event"]
    events: dict[str, Severity] = Field(min_length=1, description="event name -> severity")
    clear_events: list[str] = []
    resolve_after: Duration = Field(default=1_800_000, description="quiet after the last event")


class Events(Evaluator):
    """Discrete events (camera violations, crane alarms, door magnets): one incident per sensor
    while events keep coming; it resolves after ``resolve_after`` of quiet or on a clear event."""

    type = "event"
    reads = "event"
    takes_late = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.severity_of = {e: sev.rank for e, sev in self.spec.events.items()}
        self.clear_events = set(self.spec.clear_events)
        self.quiet = self.spec.resolve_after

    def event_names(self) -> frozenset[str]:
        return frozenset((*self.severity_of, *self.clear_events))

    def observe(self, s: int, ts: int, event: str) -> None:
        if self.selected is not None and not self.selected[s]:
            return
        rank = self.severity_of.get(event)
        tr = self.tracks.get(s)
        if rank is None:
            if tr is not None and event in self.clear_events:
                self._end(s, tr, ts)
            return
        if tr is not None and ts >= tr.due:          # the old incident went quiet before this
            self._end(s, tr, tr.due)
            tr = None
        if tr is None:
            self._open(s, ts, event, rank)
            return
        tr.extra += 1                                # repeats are one incident, counted
        self._repeat(s, tr, ts, event, rank)

    def late(self, s: int, ts: int, event: str) -> None:
        """A late named event acts as it would have in order, but a clear event ends nothing
        (a newer event may have raised it again) and a late repeat is not counted."""
        if self.selected is not None and not self.selected[s]:
            return
        rank = self.severity_of.get(event)
        if rank is None:
            return
        tr = self.tracks.get(s)
        if tr is not None and ts >= tr.due:
            self._end(s, tr, tr.due)
            tr = None
        if tr is None:
            if ts >= self.ended.get(s, -(1 << 62)):
                self._open(s, ts, event, rank)
            return
        self._repeat(s, tr, ts, event, rank)

    def _open(self, s: int, ts: int, event: str, rank: int) -> None:
        tr = self.tracks[s] = Track(FIRING, ts, rank, None, None)
        tr.event, tr.extra = event, 1
        tr.due = ts + self.quiet
        self._new_incident(s, tr, ts)
        self.timers.push(tr.due, self.number, s)

    def _repeat(self, s: int, tr: Track, ts: int, event: str, rank: int) -> None:
        tr.due = max(tr.due, ts + self.quiet)
        if rank > tr.rank:
            tr.rank, tr.event = rank, event
            self._emit(UPGRADE, s, tr, ts)

    def _end(self, s: int | str, tr: Track, ts: int) -> None:
        self._emit(RESOLVE, s, tr, ts)
        del self.tracks[s]
        self._ended(s, ts)

    def on_timer(self, due: int, s: Any) -> None:
        tr = self.tracks.get(s)
        if tr is None:
            return
        if tr.due > due:
            self.timers.push(tr.due, self.number, s)   # extended by a repeat: look again then
            return
        self._end(s, tr, tr.due)


class EventType(RuleType):
    name = "event"
    schema = EventRule
    summary = "{address}：{kind_name}报告“{event_name}”（{owner}）。{notes}"
    owner_what = "{kind_name}报告“{event_name}”"

    def reading(self, spec: Any) -> str | None:
        return "event"

    def check(self, r: Any, kinds: dict, ids: dict[str, str]) -> None:
        spec = r.spec
        allowed = set().union(*(kinds[k].events for k in spec.sensors))
        for name in list(spec.events) + spec.clear_events:
            if allowed and name not in allowed:
                raise r.doc.error(r.loc + ("events",), f"rule {spec.id}: event {name!r} is not one "
                                  f"its sensor kinds report ({', '.join(sorted(allowed))})")

    def compile(self, r: Any, b: Binding) -> Events:
        return Events(r.spec, b)


register(EventType())
