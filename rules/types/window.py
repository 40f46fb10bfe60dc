"""``type: window``: levels compare named windows of a sensor's readings (sum, avg, min, max,
count; sliding or tumbling) with thresholds (the ``Stateful`` machinery)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rules.evaluators import Stateful
from rules.schema import Duration, _Stateful, _Strict
from rules.types.base import Binding, register
from rules.types.stateful import StatefulType


class Window(_Strict):
    fn: Literal["sum", "avg", "min", "max", "count"]
    size: Duration
    every: Duration | None = Field(default=None, description="slide step; none = tumbling")

    @model_validator(mode="after")
    def _fits(self) -> Window:
        step = self.every or self.size
        if self.size <= 0 or step <= 0 or self.size % step:
            raise ValueError("window size must be a positive whole multiple of `every`")
        if self.size // step > 168:
            raise ValueError("at most 168 steps in a window (e.g. 7d every 1h)")
        return self


class WindowRule(_Stateful):
    type: Literal["window"]
    windows: dict[str, Window] = Field(min_length=1)

    @field_validator("windows")
    @classmethod
    def _names(cls, v: dict[str, Window]) -> dict[str, Window]:
        for name in v:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in ("value", "battery", "rise", "fall"):
                raise ValueError(f"window name {name!r}: lower-case, and not a reading field")
        steps = {w.every or w.size for w in v.values()}
        if len(steps) != 1:
            raise ValueError("all windows of one rule share one step (`every`, or the size when tumbling)")
        if len({w.every is None for w in v.values()}) != 1:
            raise ValueError("a rule's windows are all tumbling or all sliding")
        return v

    def state_shape(self) -> tuple:
        return self.type, tuple((k, w.fn, w.size, w.every) for k, w in self.windows.items())


class Windowed(Stateful):
    """Window rules (sum/avg/min/max/count, sliding or tumbling) and rate-of-change rules.

    Per sensor a ring of ``n`` step-buckets ``[bucket, sum, count, min, max] * n``. Sliding
    windows are evaluated on every reading over the trailing buckets; tumbling windows when a
    reading opens the next bucket (at the closed bucket's end time).
    """

    type = "window"

    def __init__(self, *args: Any, step: int, windows: list[tuple[str, int]], tumbling: bool,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.step = step
        self.windows = windows            # (fn, steps) per quantity, in quantity order
        self.n = max(steps for _, steps in windows)
        self.tumbling = tumbling
        self.rings: dict[int, list] = {}

    def observe(self, s: int, ts: int, v: float) -> None:
        if self.selected is not None and not self.selected[s]:
            return
        b = ts // self.step
        ring = self.rings.get(s)
        if ring is None:
            ring = self.rings[s] = [-1, 0.0, 0, 0.0, 0.0] * self.n
        if self.tumbling:
            if ring[0] != b:
                if ring[0] >= 0 and ring[0] < b:
                    closed_end = (ring[0] + 1) * self.step
                    q = self._quantities(ring, ring[0], None)
                    self.update(s, closed_end, q)
                elif ring[0] > b:
                    return                   # a reading for a window already closed
                ring[0:5] = [b, v, 1, v, v]
            else:
                ring[1] += v
                ring[2] += 1
                if v < ring[3]:
                    ring[3] = v
                if v > ring[4]:
                    ring[4] = v
            return
        i = (b % self.n) * 5
        if ring[i] != b:
            if ring[i] > b:
                return                       # older than the ring: already slid out
            ring[i:i + 5] = [b, v, 1, v, v]
        else:
            ring[i + 1] += v
            ring[i + 2] += 1
            if v < ring[i + 3]:
                ring[i + 3] = v
            if v > ring[i + 4]:
                ring[i + 4] = v
        self.update(s, ts, self._quantities(ring, b, v))

    def _quantities(self, ring: list, b: int, v: float | None) -> tuple:
        out = []
        n = self.n
        for fn, steps in self.windows:
            total, count, lo, hi = 0.0, 0, None, None
            for bb in range(b - steps + 1, b + 1):
                i = (bb % n) * 5
                if ring[i] == bb:
                    total += ring[i + 1]
                    count += ring[i + 2]
                    lo = ring[i + 3] if lo is None or ring[i + 3] < lo else lo
                    hi = ring[i + 4] if hi is None or ring[i + 4] > hi else hi
            if fn == "sum":
                out.append(round(total, 6))
            elif fn == "avg":
                out.append(round(total / count, 6) if count else 0.0)
            elif fn == "count":
                out.append(float(count))
            elif fn == "min":
                out.append(lo if lo is not None else 0.0)
            elif fn == "max":
                out.append(hi if hi is not None else 0.0)
        return tuple(out)

    def dump(self, sid: Callable[[int | str], Any]) -> dict:
        d = super().dump(sid)
        d["rings"] = [[sid(s), r] for s, r in self.rings.items()]
        return d

    def load(self, state: dict, sidx: Callable[[Any], int | str | None]) -> int:
        lost = super().load(state, sidx)
        self.rings.update(self.by_sensor(state.get("rings", []), sidx))
        return lost


class WindowType(StatefulType):
    name = "window"
    schema = WindowRule
    summary = "{address}：{kind_name}{rule_name}，统计值{value}{unit}，达到阈值{threshold}{unit}（{level}级）。{notes}"

    def quantities(self, spec: Any) -> set[str]:
        return set(spec.windows)

    def order(self, spec: Any, first: str) -> list[str]:
        return list(spec.windows)

    def compile(self, r: Any, b: Binding) -> Windowed:
        spec = r.spec
        _, kw = self.levels(r, b)
        first = next(iter(spec.windows.values()))
        step = first.every or first.size
        return Windowed(spec, b, step=step, tumbling=first.every is None,
                        windows=[(w.fn, w.size // step) for w in spec.windows.values()], **kw)


register(WindowType())
