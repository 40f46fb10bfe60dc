"""``type: rate``: levels compare ``rise`` and ``fall`` over the closed window [t - over, t]
of a sensor's own readings with thresholds (the ``Stateful`` machinery)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from rules.evaluators import Stateful
from rules.schema import Duration, _Stateful
from rules.types.base import Binding, register
from rules.types.stateful import StatefulType


class RateRule(_Stateful):
    """Quantities `rise` (value minus the lowest in the closed window [t - over, t]) and `fall`
    (the highest in it minus value), over the sensor's own readings, exactly."""

    type: Literal["rate"]
    over: Duration
    resolution: int = Field(default=12, ge=2, le=120, description="accepted for old packs; no "
                            "effect: the window is exact")

    def state_shape(self) -> tuple:
        return self.type, self.over


class Rate(Stateful):
    """Rate of change: ``rise`` is the value minus the lowest of the sensor's readings in the
    closed window [t - over, t] and ``fall`` the highest minus the value, exactly, whatever the
    reporting interval (the reading made exactly ``over`` before counts: "0.4 m in 1 h").

    Per sensor two monotonic queues of (ts, value): the lows ascending and the highs descending,
    so each reading costs O(1) however many readings the window holds."""

    type = "rate"

    def __init__(self, *args: Any, over: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.over = over
        self.lows: dict[int, deque] = {}
        self.highs: dict[int, deque] = {}

    def observe(self, s: int, ts: int, v: float) -> None:
        if self.selected is not None and not self.selected[s]:
            return
        lows = self.lows.get(s)
        highs: deque
        if lows is None:
            lows, highs = self.lows[s], self.highs[s] = deque(), deque()   # (ts, value) each
        else:
            highs = self.highs[s]
        start = ts - self.over
        while lows and lows[0][0] < start:
            lows.popleft()
        while highs and highs[0][0] < start:
            highs.popleft()
        while lows and lows[-1][1] >= v:
            lows.pop()
        lows.append((ts, v))
        while highs and highs[-1][1] <= v:
            highs.pop()
        highs.append((ts, v))
        self.update(s, ts, (round(v - lows[0][1], 6), round(highs[0][1] - v, 6)))

    def dump(self, sid: Callable[[int | str], Any]) -> dict:
        d = super().dump(sid)
        d["window"] = [[sid(s), list(self.lows[s]), list(self.highs[s])] for s in self.lows]
        return d

    def load(self, state: dict, sidx: Callable[[Any], int | str | None]) -> int:
        lost = super().load(state, sidx)
        for key, lows, highs in state.get("window", []):
            s = sidx(key)
            if isinstance(s, int):                  # a window is a sensor's
                self.lows[s] = deque((t, v) for t, v in lows)
                self.highs[s] = deque((t, v) for t, v in highs)
        return lost


class RateType(StatefulType):
    name = "rate"
    schema = RateRule
    summary = "{address}：{kind_name}变化{value}{unit}，达到阈值{threshold}{unit}（{level}级）。{notes}"

    def quantities(self, spec: Any) -> set[str]:
        return {"rise", "fall"}

    def order(self, spec: Any, first: str) -> list[str]:
        return ["rise", "fall"]

    def compile(self, r: Any, b: Binding) -> Rate:
        _, kw = self.levels(r, b)
        return Rate(r.spec, b, over=r.spec.over, **kw)


register(RateType())
