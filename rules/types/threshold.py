"""``type: threshold``: levels compare one quantity of each reading, ``value`` or ``battery``,
with thresholds (a district's, a sensor's own), with hysteresis, ``for:``, ``clear_for:`` and
flapping (the ``Stateful`` machinery)."""

from __future__ import annotations

from typing import Any, Literal

from rules.evaluators import CLEARING, PENDING, REOPEN, RESOLVED, UPGRADE, FIRING, Stateful, Track
from rules.schema import _Stateful
from rules.types.base import Binding, register
from rules.types.stateful import StatefulType


class ThresholdRule(_Stateful):
    type: Literal["threshold"]


class Threshold(Stateful):
    type = "threshold"

    def __init__(self, spec: Any, b: Binding, reads: str, **kw: Any) -> None:
        super().__init__(spec, b, **kw)
        self.reads = reads                   # value, or battery

    def quiet_floor(self) -> tuple[float, dict] | None:
        """Only ">=" / ">" levels, the same thresholds for every sensor, no `where:`: a value
        under the lowest fires nothing, and without an incident open clears nothing."""
        if not self.rising or self.floor or self.selected is not None:
            return None
        return self.floor_default, self.tracks

    def battery_ceiling(self) -> float:
        """Battery rules fire on low levels: with only "<=" / "<" levels, the same for every
        sensor and no `where:`, a level over the highest threshold changes nothing."""
        ops = {op for _, op, _ in self.spec_levels}
        if self.thresholds or self.selected is not None or not ops <= {"<=", "<"}:
            return float("inf")
        return max(self.default[slot] for _, _, slot in self.levels)

    @property
    def takes_late(self) -> bool:          # type: ignore[override]
        return self.for_ms == 0 and self.reads == "value"

    def observe(self, s: int, ts: int, v: float) -> None:
        if self.selected is not None and not self.selected[s]:
            return
        if self.rising and s not in self.tracks:
            floor = self.floor.get(s, self.floor_default) if self.floor else self.floor_default
            if v < floor:
                return
        self.update(s, ts, (v,))

    def late(self, s: int, ts: int, v: float) -> None:
        """A late value can open an incident, reopen it in its flapping window, step it up or
        stop its clearing, never lower or end one: the readings after it were judged already."""
        if self.selected is not None and not self.selected[s]:
            return
        rank, at, value = self.rank_of(s, (v,))
        if rank < 0:
            return
        tr = self.tracks.get(s)
        if tr is not None and tr.phase == CLEARING and ts >= tr.due:
            self._resolve(s, tr, tr.due)             # it was over before this reading
            tr = self.tracks.get(s)
        if tr is not None and tr.phase == RESOLVED and ts >= tr.due:
            del self.tracks[s]                       # the flapping window is over
            tr = None
        if tr is None:
            if ts >= self.ended.get(s, -(1 << 62)):
                tr = self.tracks[s] = Track(PENDING, ts, rank, value, at)
                self._new_incident(s, tr, ts)
            return
        if tr.phase == RESOLVED:
            if ts >= tr.due - self.flap_ms:          # after the resolve, within the window
                tr.phase, tr.flapping, tr.value, tr.threshold = FIRING, True, value, at
                tr.rank = max(rank, tr.rank)
                self._emit(REOPEN, s, tr, ts)
            return
        if self.per_level:                           # its steps down were judged in order
            return
        if tr.phase == CLEARING and ts > tr.since:
            tr.phase = FIRING                        # clear_for starts again at the next clear
        if rank > tr.rank:
            tr.rank, tr.value, tr.threshold = rank, value, at
            self._emit(UPGRADE, s, tr, ts)


class ThresholdType(StatefulType):
    name = "threshold"
    schema = ThresholdRule
    summary = "{address}：{kind_name}读数{value}{unit}，达到阈值{threshold}{unit}（{level}级）。{notes}"

    def reading(self, spec: Any) -> str | None:
        # a battery level comes with any reading, a value or an event
        return None if any("battery" in lv.when for lv in spec.levels) else "value"

    def quantities(self, spec: Any) -> set[str]:
        return {"value", "battery"}

    def check_quantities(self, r: Any, qs: set[str]) -> None:
        if len(qs) > 1:
            raise r.doc.error(r.loc + ("levels",), f"rule {r.spec.id}: a threshold rule watches one "
                              "quantity (value or battery); make two rules")

    def order(self, spec: Any, first: str) -> list[str]:
        return ["value" if first == "value" else "battery"]

    def compile(self, r: Any, b: Binding) -> Threshold:
        order, kw = self.levels(r, b)
        return Threshold(r.spec, b, reads=order[0], **kw)


register(ThresholdType())
