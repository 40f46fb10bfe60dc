"""Who is told: the tier policy, the shallow routing tree, and the on-call worker of the place.

The default policy (rules/routing.yaml, docs/routing.md): blue → street + grid worker,
yellow → + district, orange → + the department sub-centre of the category, red → + city. A
route is a child of the root with matchers (like Alertmanager's, one level deep, first match
wins) that overrides only the options it sets.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from pipeline.models import Severity, Tier
from pipeline.registry import Place, Registry, Worker
from rules.schema import Route, Routing


@dataclass(frozen=True)
class RouteOptions:
    name: str
    tiers: dict[Severity, list[str]]
    escalate_street: int | None
    escalate_district: int | None
    remind_every: int | None
    max_reminders: int
    push: bool


@dataclass(frozen=True, slots=True)
class Target:
    tier: Tier
    target: str                 # district/street code, dept id, worker id, or "city"
    worker: Worker | None = None


class Router:
    def __init__(self, routing: Routing, registry: Registry) -> None:
        self.root = routing
        self.registry = registry
        self.default = self._options("root", None)
        self.routes = [(r, self._options(r.name, r)) for r in routing.routes]

    def _options(self, name: str, r: Route | None) -> RouteOptions:
        root = self.root
        esc = (r.escalate_after if r and r.escalate_after else root.escalate_after)
        return RouteOptions(
            name=name,
            tiers={**root.tiers, **(r.tiers or {})} if r else dict(root.tiers),
            escalate_street=esc.street, escalate_district=esc.district,
            remind_every=r.remind_every if r and r.remind_every is not None else root.remind_every,
            max_reminders=r.max_reminders if r and r.max_reminders is not None else root.max_reminders,
            push=r.push if r and r.push is not None else root.push)

    def route(self, labels: dict[str, Any]) -> RouteOptions:
        for r, opts in self.routes:
            if all(_matches(labels.get(k), want) for k, want in r.match.items()):
                return opts
        return self.default

    def targets(self, opts: RouteOptions, severity: Severity, place: Place, category: str,
                at_ms: int) -> list[Target]:
        out: list[Target] = []
        for tier in opts.tiers[severity]:
            t = self.target(tier, place, category, at_ms, opts.push)
            if t is not None and t not in out:
                out.append(t)
        return out

    def target(self, tier: str, place: Place, category: str, at_ms: int, push: bool = True
               ) -> Target | None:
        if tier == "street":
            return Target(Tier.street, place.street)
        if tier == "district":
            return Target(Tier.district, place.district)
        if tier == "city":
            return Target(Tier.city, "city")
        if tier == "dept":
            dept = self.registry.dept_of_category.get(category)
            return Target(Tier.dept, dept) if dept else None
        if tier == "grid" and push:
            w = self.registry.on_call(place.grid, place.street, at_ms)
            return Target(Tier.grid, w.id, w) if w else None
        return None


def _matches(have: Any, want: Any) -> bool:
    if isinstance(want, list):
        return any(_matches(have, w) for w in want)
    if isinstance(want, str) and isinstance(have, str) and any(c in want for c in "*?["):
        return fnmatch.fnmatchcase(have, want)
    if isinstance(have, Severity):
        have = have.value
    return have == want
