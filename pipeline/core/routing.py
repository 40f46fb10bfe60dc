"""Who is told: the tier policy, the shallow routing tree, and the on-call worker of the place.

The default policy (rules/routing.yaml, docs/routing.md): blue → street + grid worker,
yellow → + district, orange → + the department sub-centre of the category, red → + city; a
route's `notify: [owner]` adds the sensor's responsible party (registry `owners:`). A
route is a child of the root with matchers (like Alertmanager's, one level deep, first match
wins) that overrides only the options it sets.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from pipeline.core.models import Severity, Tier
from pipeline.core.registry import Place, Registry, Worker
from rules.schema import Route, Routing, TierName


@dataclass(frozen=True)
class RouteOptions:
    name: str
    tiers: dict[Severity, list[TierName]]
    escalate_street: int | None
    escalate_district: int | None
    remind_every: int | None
    max_reminders: int
    push: bool
    notify: tuple[str, ...] = ()       # besides the tiers: "owner"
    escalate_grid: int | None = None        # the community chain (grid → community → street)
    escalate_community: int | None = None
    escalate_until: str = "acknowledged"    # or "on_site": what stops escalation and reminders


@dataclass(frozen=True, slots=True)
class Target:
    tier: Tier
    target: str                 # district/street code, dept id, worker or owner id, or "city"
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
            push=r.push if r and r.push is not None else root.push,
            notify=tuple(r.notify if r and r.notify is not None else root.notify),
            escalate_grid=esc.grid, escalate_community=esc.community,
            escalate_until=r.escalate_until if r and r.escalate_until else root.escalate_until)

    def route(self, labels: dict[str, Any]) -> RouteOptions:
        for r, opts in self.routes:
            if all(_matches(labels.get(k), want) for k, want in r.match.items()):
                return opts
        return self.default

    def targets(self, opts: RouteOptions, severity: Severity, place: Place, category: str,
                at_ms: int, idx: int | None = None) -> list[Target]:
        """The tiers ``severity`` reaches, then those the route notifies besides (``owner``:
        sensor ``idx``'s responsible party, when the registry names one)."""
        out: list[Target] = []
        for tier in opts.tiers[severity]:
            t = self.target(tier, place, category, at_ms, opts.push)
            if t is not None and t not in out:
                out.append(t)
        if "owner" in opts.notify and idx is not None:
            owner = self.registry.owner_of(idx)
            if owner is not None:
                out.append(Target(Tier.owner, owner.id))
        return out

    def target(self, tier: str, place: Place, category: str, at_ms: int, push: bool = True
               ) -> Target | None:
        if tier == "street":
            return Target(Tier.street, place.street)
        if tier == "community":
            return Target(Tier.community, place.community) if place.community else None
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


def sensor_labels(registry: Registry, idx: int) -> dict[str, Any]:
    """The labels a route may match that come from where sensor ``idx`` is and what it is."""
    p = registry.place_of(idx)
    labels: dict[str, Any] = {"kind": registry.kinds[registry.kind_of[idx]],
                              "district": p.district, "street": p.street,
                              "community": p.community, "grid": p.grid}
    for k, v in registry.sensor_facts(idx).items():
        labels["sensor." + k] = v
    return labels


def unreachable_owners(rules: Any, registry: Registry, selected: dict[str, Any] | None = None,
                       shown: int = 5) -> list[str]:
    """For `cityops rules check`: per route that notifies owners, the sensors it would take
    whose owner the registry cannot reach (no `owner`, an `owner` no `owners:` entry is named,
    an entry with neither phone nor channels). Their owners are told nothing. ``selected``:
    rule id -> its compiled `where:` mask (None: every sensor of its kinds)."""
    router = Router(rules.routing, registry)
    notifying = {opts.name for _, opts in router.routes if "owner" in opts.notify}
    if "owner" in router.default.notify:
        notifying.add("root")
    if not notifying:
        return []
    missing: dict[tuple[str, str], list[str]] = {}
    for rule in rules.rules:
        spec = rule.spec
        kinds = set(spec.sensors)
        categories = {spec.category.value} if spec.category else \
            {rules.kinds[k].category.value for k in kinds if k in rules.kinds}
        if "root" not in notifying and not any(
                r.name in notifying and _matches(spec.id, r.match.get("rule_id", spec.id))
                and any(_matches(c, r.match.get("category", c)) for c in categories)
                for r in rules.routing.routes):
            continue            # (a city's registry has millions of sensors: look only where it may)
        severities = _severities(spec)
        mask = (selected or {}).get(spec.id)
        for idx in registry.sensors_of_kinds(kinds):
            gap = _owner_gap(registry, idx)        # first: most sensors' owners can be reached
            if gap is None or (mask is not None and not mask[idx]):
                continue
            category = spec.category or rules.kinds[registry.kinds[registry.kind_of[idx]]].category
            labels = {"rule_id": spec.id, "category": category.value, **sensor_labels(registry, idx)}
            names = {router.route({**labels, "severity": sev.value}).name for sev in severities}
            sid = registry.sensor_ids[idx]
            for name in names & notifying:
                missing.setdefault((name, gap[0]), []).append(f"{sid} ({gap[1]})" if gap[1] else sid)
    out = []
    doc = rules.routing_doc
    for (name, gap_kind), sensors in sorted(missing.items()):
        sensors = sorted(set(sensors))
        why, fix = _GAPS[gap_kind]
        where = ""
        if doc is not None:
            i = next((i for i, r in enumerate(rules.routing.routes) if r.name == name), None)
            line = doc.line(("routes", i, "notify") if i is not None else ("notify",))
            where = f"{doc.path}:{line}: " if line else f"{doc.path}: "
        more = f" and {len(sensors) - shown:,} more" if len(sensors) > shown else ""
        out.append(f"{where}route {name} notifies owners, but {len(sensors):,} sensor(s) {why}: "
                   f"{', '.join(sensors[:shown])}{more}; their owners will not be told "
                   f"({fix} {registry.source})")
    return out


def _severities(spec: Any) -> set[Severity]:
    """The severities a rule's incidents can have (a modifier may raise any of them)."""
    found = {lv.severity for lv in getattr(spec, "levels", None) or ()}
    found |= set((getattr(spec, "events", None) or {}).values())
    if isinstance(getattr(spec, "severity", None), Severity):
        found.add(spec.severity)
    if getattr(spec, "modifiers", None) and found:
        lowest = min(s.rank for s in found)
        found |= {s for s in Severity if s.rank >= lowest}
    return found or set(Severity)


# why an owner cannot be reached (the sensors follow), and what to do about it (in which file)
_GAPS = {
    "none": ("have no `owner`", "fill their `owner` cell in the sensors file of"),
    "unlisted": ("name an owner that has no `owners:` entry (no contact)",
                 "add the owners to `owners:` in"),
    "silent": ("belong to an owner with neither `phone` nor `channels`",
               "give the owners one in"),
}


def _owner_gap(registry: Registry, idx: int) -> tuple[str, str] | None:
    """Why sensor ``idx``'s owner cannot be reached (a key of _GAPS) and whose it is; None
    when it can."""
    cell = registry.owner[idx]
    if not cell:
        return "none", ""
    owner = registry.owner_named.get(cell)
    if owner is None:
        return "unlisted", cell
    if not owner.phone and not owner.channels:
        return "silent", owner.id
    return None


def _matches(have: Any, want: Any) -> bool:
    if isinstance(want, list):
        return any(_matches(have, w) for w in want)
    if isinstance(want, str) and isinstance(have, str) and ("*" in want or "?" in want
                                                            or "[" in want):
        return fnmatch.fnmatchcase(have, want)
    if isinstance(have, Severity):
        have = have.value
    return have == want
