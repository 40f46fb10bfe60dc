"""Rule packs in, running evaluators out: loaded and checked once, at start.

``load_rules`` reads the built-in packs (rules/packs/*.yaml) and any folders a city adds (a pack
of the same name replaces the built-in one), checks everything a mistake could hide in
(duplicate ids, unknown kinds, parameters, quantities, template fields, routing labels) and
stops with file and line. ``compile_rules`` then binds the rules to a registry: per-sensor
thresholds (a district's override, a river gauge's 警戒水位), ``where:`` masks and severity
modifiers are worked out here, once, so the hot path only looks them up.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.core.registry import Registry
from rules.yamlfile import ConfigError, Located, load_yaml, pydantic_error
from rules import evaluators as ev
from rules.expr import ExprError, Node, evaluate, parse
from rules.schema import (MATCH_LABELS, AbsenceRule, CorrelationRule, EventRule, Pack, RateRule,
                          Routing, SensorKind, ThresholdRule, WindowRule)

PACKS = Path(__file__).parent / "packs"
ROUTING = Path(__file__).parent / "routing.yaml"

# What a title or summary template may name (docs/rules.md lists them).
TEMPLATE_FIELDS = {
    "place", "district_name", "street_name", "community_name", "grid_name", "address", "owner",
    "owner_contact", "sensor_id", "kind_name", "rule_name", "value", "threshold", "unit",
    "severity_cn", "level", "event", "event_name", "notes", "members_count", "group", "time",
    "last_seen", "absent_for", "category_cn",
}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass
class LoadedRule:
    spec: Any                      # one of the rule models in rules.schema
    pack: Pack
    doc: Located
    loc: tuple                     # where in doc, for errors


@dataclass
class RuleSet:
    """Every checked rule, the sensor kinds they declare, and the routing tree."""

    packs: list[Pack]
    kinds: dict[str, SensorKind]
    rules: list[LoadedRule]
    routing: Routing
    routing_doc: Located | None = None
    sources: list[str] = field(default_factory=list)

    def select(self, patterns: Iterable[str] | None) -> RuleSet:
        """Only the rules whose ids match one of the glob patterns (e.g. ``weather.*``), plus
        the rules a selected correlation rule counts."""
        pats = list(patterns or [])
        if not pats:
            return self
        chosen = [r for r in self.rules if any(fnmatch.fnmatchcase(r.spec.id, p) for p in pats)]
        if not chosen:
            raise ConfigError("--rules", None, f"no rule id matches {', '.join(pats)}; "
                              "`cityops rules check` lists them")
        need = {o for r in chosen if isinstance(r.spec, CorrelationRule) for o in r.spec.of}
        ids = {r.spec.id for r in chosen}
        chosen += [r for r in self.rules if r.spec.id in need and r.spec.id not in ids]
        return RuleSet(self.packs, self.kinds, chosen, self.routing, self.routing_doc, self.sources)


def load_rules(extra: Iterable[str | Path] = (), routing: str | Path | None = None,
               builtin: bool = True, params: str | Path | None = None) -> RuleSet:
    files: dict[str, tuple[Path, Located, Pack]] = {}
    paths = sorted(PACKS.glob("*.yaml")) if builtin else []
    for folder in extra:
        folder = Path(folder)
        if folder.is_file():
            paths.append(folder)
        elif folder.is_dir():
            paths += sorted(folder.glob("*.yaml"))
        else:
            raise ConfigError(folder, None, "no such rule file or folder")
    for path in paths:
        doc = load_yaml(path)
        if not isinstance(doc.data, dict):
            raise ConfigError(path, 1, "a rule pack is a mapping with pack, title, kinds, params, rules")
        try:
            pack = Pack.model_validate(doc.data)
        except ValidationError as exc:
            raise pydantic_error(doc, exc) from None
        files[pack.pack] = (path, doc, pack)         # a city's pack replaces a built-in one
    if params:
        _override_params(Path(params), files)
    kinds: dict[str, SensorKind] = {}
    kind_src: dict[str, str] = {}
    rules: list[LoadedRule] = []
    seen: dict[str, str] = {}
    for path, doc, pack in files.values():
        for name, kind in pack.kinds.items():
            if name in kinds and kinds[name] != kind:
                raise doc.error(("kinds", name), f"sensor kind {name} is declared differently in "
                                f"{kind_src[name]}; declare it once")
            kinds[name], kind_src[name] = kind, str(path)
        for i, spec in enumerate(pack.rules):
            loc = ("rules", i)
            if spec.id in seen:
                raise doc.error(loc + ("id",), f"rule id {spec.id} is already used in {seen[spec.id]}")
            if not spec.id.startswith(pack.pack + "."):
                raise doc.error(loc + ("id",), f"rule id {spec.id} must start with its pack name "
                                f"'{pack.pack}.'")
            seen[spec.id] = f"{path}:{doc.line(loc)}"
            rules.append(LoadedRule(spec, pack, doc, loc))
    for r in rules:
        _check_rule(r, kinds, seen)
    rdoc = load_yaml(routing or ROUTING)
    try:
        tree = Routing.model_validate(rdoc.data)
    except ValidationError as exc:
        raise pydantic_error(rdoc, exc) from None
    for i, route in enumerate(tree.routes):
        for label in route.match:
            if label not in MATCH_LABELS and not label.startswith("sensor."):
                raise rdoc.error(("routes", i, "match", label),
                                 f"unknown label {label!r}; match on one of {sorted(MATCH_LABELS)} "
                                 "or sensor.<attr>")
    return RuleSet([p for _, _, p in files.values()], kinds, rules, tree, rdoc,
                   [str(p) for p, _, _ in files.values()])


class ParamOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params: dict[str, float] = {}
    districts: dict[str, dict[str, float]] = {}


def _override_params(path: Path, files: dict[str, tuple[Path, Located, Pack]]) -> None:
    """A city's own values for pack parameters, without copying the packs:

        gas:
          params: {level1_lel: 25}
          districts: {"510108": {level1_lel: 15}}
    """
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError(path, 1, "a params file maps pack names to {params, districts}")
    for name, body in doc.data.items():
        if name not in files:
            raise doc.error((name,), f"no rule pack named {name!r}; packs: {', '.join(sorted(files))}")
        try:
            o = ParamOverride.model_validate(body)
        except ValidationError as exc:
            raise pydantic_error(doc, exc, prefix=(name,)) from None
        src, pdoc, pack = files[name]
        for where, values in [(("params",), o.params)] + [(("districts", d), v) for d, v in o.districts.items()]:
            unknown = set(values) - set(pack.params)
            if unknown:
                raise doc.error((name,) + where, f"pack {name} has no parameter "
                                f"{', '.join(sorted(unknown))}; it declares {', '.join(sorted(pack.params))}")
        districts = {d: {**pack.districts.get(d, {}), **v} for d, v in o.districts.items()}
        try:
            # from the pack as written, not from its parsed form: parsed durations are already
            # milliseconds and would be read again as seconds (every duration x1000)
            merged = Pack.model_validate({**pdoc.data, "params": {**pack.params, **o.params},
                                          "districts": {**pack.districts, **districts}})
        except ValidationError as exc:
            raise pydantic_error(doc, exc, prefix=(name,)) from None
        files[name] = (src, pdoc, merged)


def _quantities(spec: Any) -> set[str]:
    if isinstance(spec, ThresholdRule):
        return {"value", "battery"}
    if isinstance(spec, RateRule):
        return {"rise", "fall"}
    if isinstance(spec, WindowRule):
        return set(spec.windows)
    return set()


def _expr(r: LoadedRule, loc: tuple, text: str) -> Node:
    try:
        return parse(text)
    except ExprError as exc:
        raise r.doc.error(r.loc + loc, f"rule {r.spec.id}: {exc}") from None


def _comparison(r: LoadedRule, loc: tuple, text: str) -> tuple[str, str, Node]:
    """`QUANTITY OP expression` -> (quantity, op, right side); flips `50 <= value`."""
    node = _expr(r, loc, text)
    quantities = _quantities(r.spec)
    flip = {">=": "<=", "<=": ">=", ">": "<", "<": ">", "==": "==", "!=": "!="}
    if node.op == "cmp":
        op, a, b = node.args
        if a.op == "name" and a.args[0] in quantities:
            q, rhs = a.args[0], b
        elif b.op == "name" and b.args[0] in quantities:
            q, rhs, op = b.args[0], a, flip[op]
        else:
            q = None
        if q is not None:
            bad = rhs.names() & quantities
            if bad:
                raise r.doc.error(r.loc + loc, f"rule {r.spec.id}: compare one quantity with a "
                                  f"threshold; {sorted(bad)} on both sides of {text!r}")
            _check_names(r, loc, rhs, allow_sensor=True)
            return q, op, rhs
    raise r.doc.error(r.loc + loc, f"rule {r.spec.id}: {text!r} must compare one of "
                      f"{sorted(quantities)} with a threshold, e.g. `{sorted(quantities)[0]} >= 25`")


def _check_names(r: LoadedRule, loc: tuple, node: Node, allow_sensor: bool) -> None:
    for name in node.names():
        root, _, rest = name.partition(".")
        if root == "params":
            if rest not in r.pack.params:
                raise r.doc.error(r.loc + loc, f"rule {r.spec.id}: unknown parameter {name}; "
                                  f"pack {r.pack.pack} declares {sorted(r.pack.params) or 'none'}")
        elif root == "sensor" and rest and allow_sensor:
            continue
        elif root == "place" and rest in ("district", "street", "community", "grid"):
            continue
        else:
            raise r.doc.error(r.loc + loc, f"rule {r.spec.id}: unknown name {name!r}; use "
                              "params.<name>, sensor.<attr> or place.district|street|community|grid")


def _check_rule(r: LoadedRule, kinds: dict[str, SensorKind], ids: dict[str, str]) -> None:
    spec = r.spec
    for i, k in enumerate(spec.sensors):
        if k not in kinds:
            raise r.doc.error(r.loc + ("sensors", i), f"rule {spec.id}: unknown sensor kind {k!r}; "
                              f"declared kinds: {', '.join(sorted(kinds))}")
        want = "event" if isinstance(spec, EventRule) else "value"
        if isinstance(spec, (ThresholdRule, RateRule, WindowRule, EventRule)) and kinds[k].reading != want:
            if not (isinstance(spec, ThresholdRule) and any("battery" in lv.when for lv in spec.levels)):
                raise r.doc.error(r.loc + ("sensors", i), f"rule {spec.id}: kind {k} reports "
                                  f"`{kinds[k].reading}` readings, a {spec.type} rule needs `{want}`")
    if spec.where:
        _check_names(r, ("where",), _expr(r, ("where",), spec.where), allow_sensor=True)
    for i, m in enumerate(spec.modifiers):
        _check_names(r, ("modifiers", i, "if"), _expr(r, ("modifiers", i, "if"), m.if_), True)
    for fld in ("title", "summary", "instruction"):
        text = getattr(spec, fld)
        for name in _PLACEHOLDER.findall(text or ""):
            if name not in TEMPLATE_FIELDS:
                raise r.doc.error(r.loc + (fld,), f"rule {spec.id}: unknown template field "
                                  f"{{{name}}}; use one of {sorted(TEMPLATE_FIELDS)}")
    if hasattr(spec, "levels"):
        qs = set()
        for i, lv in enumerate(spec.levels):
            qs.add(_comparison(r, ("levels", i, "when"), lv.when)[0])
        ranks = [lv.severity.rank for lv in spec.levels]
        if ranks != sorted(set(ranks)):
            raise r.doc.error(r.loc + ("levels",), f"rule {spec.id}: list levels from low to high "
                              "severity, one per severity")
        if isinstance(spec, ThresholdRule) and len(qs) > 1:
            raise r.doc.error(r.loc + ("levels",), f"rule {spec.id}: a threshold rule watches one "
                              "quantity (value or battery); make two rules")
        if spec.clear:
            _comparison(r, ("clear",), spec.clear)
        for i, lv in enumerate(spec.levels):
            if lv.clear:
                _comparison(r, ("levels", i, "clear"), lv.clear)
    if isinstance(spec, EventRule):
        allowed = set().union(*(kinds[k].events for k in spec.sensors))
        for name in list(spec.events) + spec.clear_events:
            if allowed and name not in allowed:
                raise r.doc.error(r.loc + ("events",), f"rule {spec.id}: event {name!r} is not one "
                                  f"its sensor kinds report ({', '.join(sorted(allowed))})")
    if isinstance(spec, AbsenceRule) and isinstance(spec.absent_for, dict):
        for k in spec.absent_for:
            if k not in spec.sensors:
                raise r.doc.error(r.loc + ("absent_for", k), f"rule {spec.id}: absent_for names "
                                  f"kind {k}, which is not in its sensors")
    if isinstance(spec, CorrelationRule):
        for i, other in enumerate(spec.of):
            if other not in ids:
                raise r.doc.error(r.loc + ("of", i), f"rule {spec.id}: counts unknown rule {other}")


# ---- binding to a registry -----------------------------------------------------------------

def params_for(pack: Pack, district: str | None) -> dict[str, float]:
    p = dict(pack.params)
    if district and district in pack.districts:
        p.update(pack.districts[district])
    return p


def _lookup(pack: Pack, reg: Registry, idx: int | None, params: dict[str, float]) -> Callable[[str], Any]:
    facts = reg.sensor_facts(idx) if idx is not None else {}
    place = reg.place_of(idx) if idx is not None else None

    def look(name: str) -> Any:
        root, _, rest = name.partition(".")
        if root == "params":
            return params[rest]
        if root == "sensor":
            if rest not in facts:
                raise KeyError(name)
            return facts[rest]
        if root == "place" and place is not None:
            return getattr(place, rest)
        raise KeyError(name)
    return look


def compile_rules(rs: RuleSet, reg: Registry, sink: list, timers: ev.Timers,
                  subject_name: Callable[[int | str], str]) -> list[ev.Evaluator]:
    out: list[ev.Evaluator] = []
    for number, r in enumerate(rs.rules):
        e = _compile_one(r, rs, reg, number, sink, timers, subject_name)
        e.loaded = r
        out.append(e)
    return out


def _sensors(r: LoadedRule, reg: Registry) -> list[int]:
    return reg.sensors_of_kinds(r.spec.sensors)


def _per_sensor(r: LoadedRule, reg: Registry, nodes: list[Node], sensors: list[int],
                what: str) -> tuple[tuple, dict[int, tuple]]:
    """Thresholds (or any per-sensor constants) for ``nodes``: a default and the sensors whose
    district override or registry facts make them differ."""
    pack = r.pack
    base = params_for(pack, None)
    needs_sensor = any(n.startswith("sensor.") or n.startswith("place.") for node in nodes for n in node.names())

    def values(idx: int | None, params: dict[str, float]) -> tuple:
        look = _lookup(pack, reg, idx, params)
        out = []
        for node in nodes:
            try:
                v = evaluate(node, look)
            except KeyError as exc:
                sid = reg.sensor_ids[idx] if idx is not None else "?"
                raise r.doc.error(r.loc, f"rule {r.spec.id}: sensor {sid} has no {exc.args[0]}; "
                                  f"add it to the sensor's attrs in {Path(reg.source).parent / 'sensors.csv'} "
                                  f"(line {idx + 2 if idx is not None else '?'}) or narrow the rule "
                                  "with `where:`") from None
            except (TypeError, ZeroDivisionError) as exc:
                raise r.doc.error(r.loc, f"rule {r.spec.id}: {what}: {exc}") from None
            # 4.6 - 0.2 is 4.3999999999999995 in binary: thresholds are decimal numbers
            out.append(round(v, 9) if isinstance(v, float) else v)
        return tuple(out)

    if not needs_sensor:
        default = values(None, base)
        special: dict[int, tuple] = {}
        if pack.districts:
            by_district = {d: values(None, params_for(pack, d)) for d in pack.districts}
            for idx in sensors:
                t = by_district.get(reg.place_of(idx).district)
                if t is not None and t != default:
                    special[idx] = t
        return default, special
    default = tuple(float("nan") for _ in nodes)
    special = {}
    for idx in sensors:
        special[idx] = values(idx, params_for(pack, reg.place_of(idx).district))
    return default, special


def _compile_one(r: LoadedRule, rs: RuleSet, reg: Registry, number: int, sink: list,
                 timers: ev.Timers, subject_name: Callable[[int | str], str]) -> ev.Evaluator:
    spec = r.spec
    sensors = _sensors(r, reg)
    common = (spec, number, sink, timers, subject_name)
    if isinstance(spec, (ThresholdRule, RateRule, WindowRule)):
        comps = [_comparison(r, ("levels", i, "when"), lv.when) for i, lv in enumerate(spec.levels)]
        clear = _comparison(r, ("clear",), spec.clear) if spec.clear else None
        own = [(i, _comparison(r, ("levels", i, "clear"), lv.clear))
               for i, lv in enumerate(spec.levels) if lv.clear]
        nodes = [c[2] for c in comps] + ([clear[2]] if clear else []) + [c[2] for _, c in own]
        if isinstance(spec, ThresholdRule):
            order = ["value" if comps[0][0] == "value" else "battery"]
        elif isinstance(spec, RateRule):
            order = ["rise", "fall"]
        else:
            order = list(spec.windows)
        default, special = _per_sensor(r, reg, nodes, sensors, "threshold")
        levels = [(order.index(q), op, i) for i, (q, op, _) in enumerate(comps)]
        clear_t = (order.index(clear[0]), clear[1], len(comps)) if clear else None
        first_own = len(comps) + (1 if clear else 0)
        level_clears: list = [None] * len(comps)
        for n, (i, (q, op, _)) in enumerate(own):
            level_clears[i] = (order.index(q), op, first_own + n)
        ranks = [lv.severity.rank for lv in spec.levels]
        args = common + (levels, ranks, clear_t, default, special)
        if isinstance(spec, ThresholdRule):
            e: ev.Evaluator = ev.Threshold(*args, level_clears=level_clears)
            e.reads = order[0]
        elif isinstance(spec, RateRule):
            e = ev.Rate(*args, level_clears=level_clears, over=spec.over)
        else:
            first = next(iter(spec.windows.values()))
            step = first.every or first.size
            e = ev.Windowed(*args, level_clears=level_clears, step=step,
                            tumbling=first.every is None,
                            windows=[(w.fn, w.size // step) for w in spec.windows.values()])
            e.type = "window"
    elif isinstance(spec, EventRule):
        e = ev.Events(*common)
    elif isinstance(spec, AbsenceRule):
        absent = np.zeros(len(reg), dtype=np.int64)
        kind_of = np.frombuffer(reg.kind_of, dtype=np.uint8) if len(reg) else np.zeros(0, np.uint8)
        for k in spec.sensors:
            if k in reg.kinds:
                ms = spec.absent_for[k] if isinstance(spec.absent_for, dict) and k in spec.absent_for \
                    else (spec.absent_for if not isinstance(spec.absent_for, dict) else 0)
                if ms:
                    absent[kind_of == reg.kinds.index(k)] = ms
        gw = np.frombuffer(reg.gateway_of, dtype=np.int32) if len(reg) else np.zeros(0, np.int32)
        e = ev.Absence(*common, absent_ms=absent, gateway_of=gw if spec.group_by_gateway else None)
    elif isinstance(spec, CorrelationRule):
        e = ev.Correlation(*common, group_of=_group_of(reg, spec.group_by))
    else:  # pragma: no cover - the schema admits no other type
        raise AssertionError(spec)
    if spec.where:
        node = parse(spec.where)
        mask = bytearray(len(reg))
        for idx in _candidates(reg, sensors, [node]):
            mask[idx] = bool(_holds(r, reg, idx, node))
        e.selected = mask
        if isinstance(e, ev.Absence):
            e.absent_ms[np.frombuffer(bytes(mask), dtype=np.uint8) == 0] = 0
    if spec.modifiers:
        mods = [(parse(m.if_), m.raise_) for m in spec.modifiers]
        for idx in _candidates(reg, sensors, [n for n, _ in mods]):
            bump = sum(up for node, up in mods if _holds(r, reg, idx, node))
            if bump:
                e.bump[idx] = bump
    return e


def _candidates(reg: Registry, sensors: list[int], nodes: list[Node]) -> list[int]:
    """Sensors for which a `where:`/`if:` expression can be true. A sensor lacking a name the
    expression reads does not match; when it reads only per-sensor attrs, only sensors with
    attrs can match (most of a million sensors have none)."""
    names = {n for node in nodes for n in node.names()}
    attrs_only = all(n.startswith("sensor.") and n[7:] not in Registry.BASE_FACTS for n in names)
    if attrs_only and names:
        having = set(reg.attrs.keys())
        return [i for i in sensors if i in having]
    return sensors


def _holds(r: LoadedRule, reg: Registry, idx: int, node: Node) -> bool:
    look = _lookup(r.pack, reg, idx, params_for(r.pack, reg.place_of(idx).district))
    try:
        return bool(evaluate(node, look))
    except KeyError:
        return False


def _group_of(reg: Registry, by: str) -> Callable[[int], str | None]:
    if by == "building":
        return lambda idx: reg.building[idx] or None
    return lambda idx: getattr(reg.place_of(idx), by)


def modifier_notes(r: LoadedRule, reg: Registry, idx: int) -> list[str]:
    """The `note` of each modifier that applies to sensor ``idx`` (said in the summary)."""
    return [m.note for m in r.spec.modifiers if m.note and _holds(r, reg, idx, parse(m.if_))]
