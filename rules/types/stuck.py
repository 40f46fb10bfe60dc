"""``type: stuck``: a sensor reporting the same value for longer than ``for`` (a frozen gauge:
a water-level or gas sensor that failed still reports, always the same figure).

Judged on the sensor's own readings, in event time. A run starts at a reading whose value is
more than ``tolerance`` from the run's first value (or at the sensor's first reading); a
reading within ``tolerance`` of the run's first value at or after run start + ``for`` fires
the incident, at that reading's time; the next reading outside ``tolerance`` resolves it, at
its time, and starts a new run. No timer: a sensor that goes silent is the absence rule's
business, and a stuck incident waits for the reading that shows the gauge moving again. Late
readings act on nothing (the runs were judged on the readings in order).

State, per watched sensor that has reported: its run (``RunState``, snapshot key ``runs``),
and the incident's ``Track`` while one is open.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import msgspec
from pydantic import Field

from rules.evaluators import FIRING, RESOLVE, Evaluator, Track
from rules.schema import Duration, _RuleBase, format_duration
from rules.types.base import Binding, RuleType, register
from rules.vocabulary import Severity


class StuckRule(_RuleBase):
    type: Literal["stuck"]
    for_: Duration = Field(alias="for", gt=0, description="how long the same value is a stuck sensor")
    tolerance: float = Field(default=0.0, ge=0, description="how far from the run's first value "
                             "still counts as the same (absolute; 0: identical)")
    severity: Severity = Severity.blue


class RunState(msgspec.Struct):
    """A sensor's run of the same value, as a snapshot keeps it (by name)."""

    start: int          # event time of the run's first reading
    value: float        # its value: the others are compared with it


class Stuck(Evaluator):
    type = "stuck"

    def __init__(self, spec: StuckRule, b: Binding) -> None:
        super().__init__(spec, b)
        self.for_ms = spec.for_
        self.tolerance = spec.tolerance
        self.rank = spec.severity.rank
        self.runs: dict[int, RunState] = {}

    def observe(self, s: int, ts: int, v: float) -> None:
        if self.selected is not None and not self.selected[s]:
            return
        run = self.runs.get(s)
        if run is None or round(abs(v - run.value), 6) > self.tolerance:
            tr = self.tracks.pop(s, None)
            if tr is not None:                       # the gauge moved: it was not stuck
                tr.value = v
                self._emit(RESOLVE, s, tr, ts)
            self.runs[s] = RunState(ts, v)
            return
        if s not in self.tracks and ts >= run.start + self.for_ms:
            tr = self.tracks[s] = Track(FIRING, ts, self.rank, run.value, None)
            self._new_incident(s, tr, ts)

    def dump(self, sid: Callable[[int | str], Any]) -> dict:
        d = super().dump(sid)
        d["runs"] = [[sid(s), run] for s, run in self.runs.items()]
        return d

    def load(self, state: dict, sidx: Callable[[Any], int | str | None]) -> int:
        lost = super().load(state, sidx)
        for s, run in self.by_sensor(state.get("runs", []), sidx):
            self.runs[s] = msgspec.convert(run, RunState)
        return lost


class StuckType(RuleType):
    name = "stuck"
    schema = StuckRule
    summary = "{address}：{kind_name}读数停在{value}{unit}超过{stuck_for}，传感器可能故障。{notes}"
    owner_what = "{kind_name}读数停在{value}{unit}超过{stuck_for}"
    template_fields = frozenset({"stuck_for"})

    def reading(self, spec: Any) -> str | None:
        return "value"

    def notice_facts(self, spec: Any, subject: int | str, heard: int | None, kind: str,
                     members: int, fmt_time: Callable[[int], str]
                     ) -> tuple[dict, str | None, str | None, list[str]]:
        return {"stuck_for": format_duration(spec.for_)}, None, None, []

    def compile(self, r: Any, b: Binding) -> Stuck:
        return Stuck(r.spec, b)


register(StuckType())
