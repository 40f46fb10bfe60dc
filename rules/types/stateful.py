"""What threshold, rate and window rules share: levels from low to high severity, each a
comparison of one of the type's quantities with a (per-sensor) threshold, hysteresis (``clear``,
per-level ``clear``), ``for:``, ``clear_for:`` and flapping. The running form is
``rules.evaluators.Stateful``."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from rules.types.base import Binding, RuleType, comparison, per_sensor


class StatefulType(RuleType):
    def reading(self, spec: Any) -> str | None:
        return "value"

    def check(self, r: Any, kinds: dict, ids: dict[str, str]) -> None:
        spec = r.spec
        qs = set()
        for i, lv in enumerate(spec.levels):
            qs.add(comparison(r, ("levels", i, "when"), lv.when)[0])
        ranks = [lv.severity.rank for lv in spec.levels]
        if ranks != sorted(set(ranks)):
            raise r.doc.error(r.loc + ("levels",), f"rule {spec.id}: list levels from low to high "
                              "severity, one per severity")
        self.check_quantities(r, qs)
        if spec.clear:
            comparison(r, ("clear",), spec.clear)
        for i, lv in enumerate(spec.levels):
            if lv.clear:
                comparison(r, ("levels", i, "clear"), lv.clear)

    def check_quantities(self, r: Any, qs: set[str]) -> None:
        """The quantities the levels compare, all together."""

    @abstractmethod
    def order(self, spec: Any, first: str) -> list[str]:
        """The quantities in the order the evaluator computes them (``first``: what the first
        level compares). Each stateful type gives its own."""

    def levels(self, r: Any, b: Binding) -> tuple[list[str], dict[str, Any]]:
        """The quantities in order, and the levels and clears compiled to (quantity number, op,
        threshold slot) with the thresholds: the keyword arguments of ``Stateful``."""
        spec = r.spec
        comps = [comparison(r, ("levels", i, "when"), lv.when) for i, lv in enumerate(spec.levels)]
        clear = comparison(r, ("clear",), spec.clear) if spec.clear else None
        own = [(i, comparison(r, ("levels", i, "clear"), lv.clear))
               for i, lv in enumerate(spec.levels) if lv.clear]
        nodes = [c[2] for c in comps] + ([clear[2]] if clear else []) + [c[2] for _, c in own]
        order = self.order(spec, comps[0][0])
        default, special = per_sensor(r, b.reg, nodes, b.sensors, "threshold")
        levels = [(order.index(q), op, i) for i, (q, op, _) in enumerate(comps)]
        clear_t = (order.index(clear[0]), clear[1], len(comps)) if clear else None
        first_own = len(comps) + (1 if clear else 0)
        level_clears: list = [None] * len(comps)
        for n, (i, (q, op, _)) in enumerate(own):
            level_clears[i] = (order.index(q), op, first_own + n)
        return order, {"levels": levels, "ranks": [lv.severity.rank for lv in spec.levels],
                "clear": clear_t, "default": default, "thresholds": special,
                "level_clears": level_clears}
