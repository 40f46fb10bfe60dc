"""Hot reload: a new set of rules, params, routing and registry while the pipeline runs.

    new = load_set(settings)                    # validated whole, or ConfigError (file:line)
    engine2 = new.engine(settings.engine)
    out = carry(engine, engine2, at_ms)         # state across; what cannot go on resolves

The engine stays pure: a reload builds a new Engine from the new files and carries the old
one's state into it (snapshot -> restore, keyed by rule and sensor ids), so an incident of an
unchanged rule goes on under the same alert_id and a changed threshold applies from the next
reading. What cannot go on is resolved, with its reason, to every tier that was told it fired:
a rule that is gone (规则已删除), a rule whose kind of state changed (规则已更改: another type,
other windows or another rate span), a sensor that is gone (设备已注销) or, in one Kafka
partition, moved to another street's partition (设备已迁出本分区). ``diff`` says what a reload
would change (``cityops rules diff OLD NEW`` prints it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from pipeline.core.engine import Engine, EngineSettings, Output
from pipeline.core.models import State
from pipeline.core.registry import FIXTURE, Registry, check_districts
from pipeline.core.registry import load as load_registry
from rules.compiler import PACKS, ROUTING, RuleSet, comparison, load_rules, params_for
from rules.expr import evaluate

RULE_GONE = "规则已删除"
RULE_CHANGED = "规则已更改"
SENSOR_GONE = "设备已注销"
SENSOR_MOVED = "设备已迁出本分区"


# ---- the set a reload replaces --------------------------------------------------------------

@dataclass
class CitySet:
    """Rules (packs, params, routing) and the registry, checked together, and the digest of
    the files they were read from (two Kafka workers compare it before they switch)."""

    rules: RuleSet
    registry: Registry
    digest: str

    def engine(self, settings: EngineSettings | None = None) -> Engine:
        return Engine(self.registry, self.rules, settings)


def set_files(s: Any) -> dict[str, list[Path]]:
    """The files a set is read from (settings ``s``), by role, in the order they are read:
    built-in packs, the city's packs, routing, params, the registry and its CSV files."""
    packs: list[Path] = []
    for p in s.packs:
        p = Path(p)
        packs += sorted(p.glob("*.yaml")) if p.is_dir() else [p]
    reg = Path(s.registry) if s.registry else FIXTURE
    folder = reg if reg.is_dir() else reg.parent
    return {"builtin": sorted(PACKS.glob("*.yaml")), "packs": packs,
            "routing": [Path(s.routing) if s.routing else ROUTING],
            "params": [Path(s.params)] if s.params else [],
            "registry": [folder / "registry.yaml" if reg.is_dir() else reg,
                         *sorted(folder.glob("*.csv"))]}


def watched_files(s: Any) -> list[Path]:
    """Every file of the set: what the watch looks at and the digest covers."""
    return [p for paths in set_files(s).values() for p in paths]


def files_digest(files: Iterable[Path], read: dict[Path, Path | None] | None = None) -> str:
    """The set's digest: each file's name and bytes. ``read``: where to read a file's bytes
    instead (a kept copy of it; None: it was missing)."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f).encode() + b"\0")
        src = read.get(f, f) if read is not None else f
        try:
            h.update(src.read_bytes() if src is not None else b"\0missing")
        except OSError:
            h.update(b"\0missing")
    return h.hexdigest()[:16]


def stamp(files: Iterable[Path]) -> tuple:
    """Cheap to take every second: each file's size and modification time."""
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(f), -1, -1))
    return tuple(out)


def load_set(s: Any, compile_check: bool = True) -> CitySet:
    """Everything read and checked as at a start (ConfigError with file and line on the first
    mistake); ``compile_check`` also binds the rules to the registry (per-sensor thresholds,
    `where:`), where the rest of the mistakes show."""
    files = watched_files(s)
    digest = files_digest(files)
    rules = load_rules(s.packs, s.routing, params=s.params)
    registry = load_registry(s.registry, rules.kinds)
    check_districts(rules.packs, rules.sources, registry, s.params)
    new = CitySet(rules, registry, digest)
    if compile_check:
        new.engine(s.engine)
    return new


# ---- carrying state across ------------------------------------------------------------------

def state_shape(spec: Any) -> tuple:
    """What a rule's saved state means: a new rule with another shape cannot read it."""
    return spec.state_shape()


def carry(old: Engine, new: Engine, at: int,
          in_city: Callable[[str], bool] | None = None) -> Output:
    """Move ``old``'s state into the fresh engine ``new``; returns the resolve notices of the
    incidents that cannot go on (stamped ``at``, or their last notice's time if later).
    ``in_city(sensor_id)``: whether a sensor the new engine does not hold is still in the city
    (a Kafka partition's engine holds only its streets' sensors); default: no."""
    state = msgspec.msgpack.decode(old.snapshot())
    reshaped = {e.id for e in old.evaluators
                if e.id in new.by_id and state_shape(e.spec) != state_shape(new.by_id[e.id].spec)}
    if reshaped:
        for rid in reshaped:
            del state["rules"][rid]
        state["timers"] = [t for t in state["timers"] if t[2] not in reshaped]
        book = state["book"]
        for bucket in ("open", "resolved", "closable"):       # incidents, by rule
            if bucket in book:
                book[bucket] = [row for row in book[bucket] if row["rule"] not in reshaped]
    new.restore(msgspec.msgpack.encode(state))
    new.clock_bound, new.keep_accepted = old.clock_bound, old.keep_accepted
    out = Output()
    gone = [inc for aid, inc in old.book.open.items() if aid not in new.book.open]
    for inc in sorted(gone, key=lambda i: (i.started, i.aid)):
        if inc.rule not in new.by_id:
            why = RULE_GONE
        elif inc.rule in reshaped:
            why = RULE_CHANGED
        elif in_city is not None and inc.idx is not None \
                and in_city(old.registry.sensor_ids[inc.idx]):
            why = SENSOR_MOVED
        else:
            why = SENSOR_GONE
        prev, inc.state = inc.state, State.resolved
        # the old book wrote what was told; it tells the end to every tier and person told
        old.book._send(inc, State.resolved, prev, max(at, inc.last_ts), out.notices, [],
                       f"{why}，本事件随配置重载结束。")
        new.counters["reload_resolved"] += 1
    return out


# ---- what changes ----------------------------------------------------------------------------

@dataclass
class Diff:
    rules_added: list[str] = field(default_factory=list)
    rules_removed: list[str] = field(default_factory=list)
    rules_changed: list[str] = field(default_factory=list)
    thresholds: list[str] = field(default_factory=list)     # lines: rule, level, district, old → new
    routes: list[str] = field(default_factory=list)
    sensors_added: list[str] = field(default_factory=list)
    sensors_retired: list[str] = field(default_factory=list)
    sensors_moved: list[str] = field(default_factory=list)  # lines: id, old grid → new grid

    def empty(self) -> bool:
        return not any(getattr(self, f) for f in self.__dataclass_fields__)

    def counts(self) -> dict[str, int]:
        return {f: len(getattr(self, f)) for f in self.__dataclass_fields__}

    def text(self, limit: int = 50) -> str:
        if self.empty():
            return "no change: the new set makes the same rules, thresholds, routes and sensors"
        lines: list[str] = []

        def section(title: str, items: list[str]) -> None:
            if not items:
                return
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {x}" for x in items[:limit])
            if len(items) > limit:
                lines.append(f"  … {len(items) - limit} more")
        section("rules added", self.rules_added)
        section("rules removed (their open incidents resolve: 规则已删除)", self.rules_removed)
        section("rules changed", self.rules_changed)
        section("thresholds (after params, per district)", self.thresholds)
        section("routes", self.routes)
        section("sensors added", self.sensors_added)
        section("sensors retired (their open incidents resolve: 设备已注销)", self.sensors_retired)
        section("sensors moved", self.sensors_moved)
        return "\n".join(lines)


def diff(old: CitySet, new: CitySet) -> Diff:
    d = Diff()
    before = {r.spec.id: r for r in old.rules.rules}
    after = {r.spec.id: r for r in new.rules.rules}
    for rid in sorted(after.keys() - before.keys()):
        d.rules_added.append(f"{rid}  {after[rid].spec.type}  {after[rid].spec.name}")
    for rid in sorted(before.keys() - after.keys()):
        d.rules_removed.append(f"{rid}  {before[rid].spec.type}  {before[rid].spec.name}")
    for rid in sorted(before.keys() & after.keys()):
        a, b = before[rid], after[rid]
        what = _spec_changes(a.spec, b.spec)
        if what:
            note = ("; its state is not carried: open incidents resolve (规则已更改)"
                    if state_shape(a.spec) != state_shape(b.spec) else "")
            d.rules_changed.append(f"{rid}: {', '.join(what)}{note}")
        d.thresholds += _threshold_changes(rid, a, b, old.registry, new.registry)
    d.routes = _route_changes(old.rules.routing, new.rules.routing)
    _sensor_changes(old.registry, new.registry, d)
    return d


def _spec_changes(a: Any, b: Any) -> list[str]:
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    return sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))


def _levels(r: Any, district: str | None) -> list[tuple[str, Any]]:
    """(level, threshold) of a threshold/rate/window rule with the pack's params for a
    district (None: the pack's own); a threshold from the registry's sensor facts is shown as
    its expression."""
    spec = r.spec
    if not hasattr(spec, "levels"):
        return []
    params = params_for(r.pack, district)
    out = []
    for i, lv in enumerate(spec.levels):
        q, op, rhs = comparison(r, ("levels", i, "when"), lv.when)
        try:
            v = evaluate(rhs, lambda name: params[name.partition(".")[2]]
                         if name.startswith("params.") else _no(name))
            shown: Any = round(v, 9) if isinstance(v, float) else v
        except KeyError:
            shown = lv.when.split(op, 1)[1].strip()     # per sensor: the expression itself
        out.append((f"{lv.severity.value}  {{where}}: {q} {op} ", shown))
    return out


def _no(name: str) -> Any:
    raise KeyError(name)


def _threshold_changes(rid: str, a: Any, b: Any, ra: Registry, rb: Registry) -> list[str]:
    lines = []
    districts = [None] + sorted(set(ra.districts) | set(rb.districts))
    base_a, base_b = _levels(a, None), _levels(b, None)
    for d in districts:
        la, lb = _levels(a, d), _levels(b, d)
        if d is not None and la == base_a and lb == base_b:
            continue                       # neither pack sets this district apart
        for (name_a, va), (name_b, vb) in zip(la, lb, strict=False):    # more levels: below
            if va != vb or name_a != name_b:
                where = "default" if d is None else f"{d} {rb.districts.get(d) or ra.districts.get(d, '')}"
                lines.append(f"{rid}  {name_b.format(where=where)}{_num(va)} → {_num(vb)}")
        if len(la) != len(lb):
            where = "default" if d is None else d
            lines.append(f"{rid}  levels {where}: {len(la)} → {len(lb)}")
    return lines


def _num(v: Any) -> str:
    if isinstance(v, float) and not math.isnan(v) and v == int(v):
        return str(int(v))
    return str(v)


def _route_changes(a: Any, b: Any) -> list[str]:
    out = []
    root_a = a.model_dump(mode="json", exclude={"routes"})
    root_b = b.model_dump(mode="json", exclude={"routes"})
    for k in sorted(root_a.keys() | root_b.keys()):
        if root_a.get(k) != root_b.get(k):
            out.append(f"root {k}: {root_a.get(k)} → {root_b.get(k)}")
    ra = {r.name: r.model_dump(mode="json") for r in a.routes}
    rb = {r.name: r.model_dump(mode="json") for r in b.routes}
    out += [f"+ route {n}  match {rb[n]['match']}" for n in rb if n not in ra]
    out += [f"- route {n}" for n in ra if n not in rb]
    for n in rb:
        if n in ra and ra[n] != rb[n]:
            keys = sorted(k for k in ra[n].keys() | rb[n].keys() if ra[n].get(k) != rb[n].get(k))
            out.append(f"~ route {n}: " + "; ".join(f"{k} {ra[n].get(k)} → {rb[n].get(k)}"
                                                   for k in keys))
    order_a = [n for n in ra if n in rb]
    order_b = [n for n in rb if n in ra]
    if order_a != order_b:
        out.append(f"route order (the first match takes an alert): {order_a} → {order_b}")
    return out


def _sensor_changes(a: Registry, b: Registry, d: Diff) -> None:
    """Column-wise (a city has a million sensors): each side's ids looked up in the other's
    index, grids and gateways compared as arrays; lines only for what changed."""
    ids_a, ids_b = list(a.sensor_ids), list(b.sensor_ids)
    in_b = b.index.lookup(ids_a)                 # a's sensors in b (-1: retired)
    in_a = a.index.lookup(ids_b)
    d.sensors_added = [f"{ids_b[j]}  {b.kinds[b.kind_of[j]]}  {_place(b, j)}"
                       for j in np.flatnonzero(in_a < 0).tolist()]
    d.sensors_retired = [f"{ids_a[i]}  {a.kinds[a.kind_of[i]]}  {_place(a, i)}"
                         for i in np.flatnonzero(in_b < 0).tolist()]
    both = np.flatnonzero(in_b >= 0)
    if not len(both):
        return
    there = in_b[both]
    grid_a = np.array([p.grid for p in a.grid_places] or [""])[np.asarray(a.grid_of)[both]]
    grid_b = np.array([p.grid for p in b.grid_places] or [""])[np.asarray(b.grid_of)[there]]
    gw_a = _gateway_ids(a)[np.asarray(a.gateway_of)[both] + 1]
    gw_b = _gateway_ids(b)[np.asarray(b.gateway_of)[there] + 1]
    for k in np.flatnonzero((grid_a != grid_b) | (gw_a != gw_b)).tolist():
        moved = (f"grid {grid_a[k]} → {grid_b[k]}" if grid_a[k] != grid_b[k]
                 else f"gateway {gw_a[k] or None} → {gw_b[k] or None}")
        d.sensors_moved.append(f"{ids_a[both[k]]}  {moved}")


def _gateway_ids(reg: Registry) -> np.ndarray:
    """Gateway ids by number + 1 ("" first: no gateway)."""
    return np.array([""] + list(reg.gateways))


def _place(reg: Registry, idx: int) -> str:
    p = reg.place_of(idx)
    return f"grid {p.grid}"


def same_sensors(a: Any, b: Any) -> bool:
    """The same sensors, numbered alike, of the same kinds in the same grids (what the history
    sink's lines are made of)."""
    return (len(a) == len(b) and np.array_equal(a.sensor_ids.fixed_width(), b.sensor_ids.fixed_width())
            and np.array_equal(np.asarray(a.grid_of), np.asarray(b.grid_of))
            and np.array_equal(np.asarray(a.kind_of), np.asarray(b.kind_of)) and a.kinds == b.kinds)


# ---- counters ---------------------------------------------------------------------------------
