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

from pydantic import BaseModel, ConfigDict, ValidationError

from rules import evaluators as ev
from rules.expr import Node, evaluate, parse
from rules.schema import MATCH_LABELS, Pack, Routing, SensorKind
from rules.yamlfile import ConfigError, Located, load_yaml, pydantic_error
from rules.types.base import (TYPES, Binding, SensorRegistry, check_names, comparison, expr,
                              lookup, params_for)

# what other modules take from here
__all__ = ["TYPES", "LoadedRule", "RuleSet", "comparison", "compile_rules", "load_rules",
           "modifier_notes", "params_for"]

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
        need = {o for r in chosen for o in r.spec.counts()}
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


def _check_rule(r: LoadedRule, kinds: dict[str, SensorKind], ids: dict[str, str]) -> None:
    spec = r.spec
    rtype = TYPES[spec.type]
    want = rtype.reading(spec)
    for i, k in enumerate(spec.sensors):
        if k not in kinds:
            raise r.doc.error(r.loc + ("sensors", i), f"rule {spec.id}: unknown sensor kind {k!r}; "
                              f"declared kinds: {', '.join(sorted(kinds))}")
        if want is not None and kinds[k].reading != want:
            raise r.doc.error(r.loc + ("sensors", i), f"rule {spec.id}: kind {k} reports "
                              f"`{kinds[k].reading}` readings, a {spec.type} rule needs `{want}`")
    if spec.where:
        check_names(r, ("where",), expr(r, ("where",), spec.where), allow_sensor=True)
    for i, m in enumerate(spec.modifiers):
        check_names(r, ("modifiers", i, "if"), expr(r, ("modifiers", i, "if"), m.if_), True)
    fields = TEMPLATE_FIELDS | rtype.template_fields
    for fld in ("title", "summary", "instruction"):
        text = getattr(spec, fld)
        for name in _PLACEHOLDER.findall(text or ""):
            if name not in fields:
                raise r.doc.error(r.loc + (fld,), f"rule {spec.id}: unknown template field "
                                  f"{{{name}}}; use one of {sorted(fields)}")
    rtype.check(r, kinds, ids)


# ---- binding to a registry -----------------------------------------------------------------

def compile_rules(rs: RuleSet, reg: SensorRegistry, sink: list, timers: ev.Timers,
                  subject_name: Callable[[int | str], str]) -> list[ev.Evaluator]:
    return [_compile_one(r, reg, number, sink, timers, subject_name)
            for number, r in enumerate(rs.rules)]


def _compile_one(r: LoadedRule, reg: SensorRegistry, number: int, sink: list,
                 timers: ev.Timers, subject_name: Callable[[int | str], str]) -> ev.Evaluator:
    """The rule's type compiles it; what every type has (``where:``, modifiers) is worked out
    here first and handed over in the ``Binding``."""
    spec = r.spec
    sensors = reg.sensors_of_kinds(spec.sensors)
    b = Binding(reg, number, sink, timers, subject_name, r, sensors)
    if spec.where:
        node = parse(spec.where)
        mask = bytearray(len(reg))
        for idx in _candidates(reg, sensors, [node]):
            mask[idx] = bool(_holds(r, reg, idx, node))
        b.selected = mask
    if spec.modifiers:
        mods = [(parse(m.if_), m.raise_) for m in spec.modifiers]
        for idx in _candidates(reg, sensors, [n for n, _ in mods]):
            bump = sum(up for node, up in mods if _holds(r, reg, idx, node))
            if bump:
                b.bump[idx] = bump
    return TYPES[spec.type].compile(r, b)


def _candidates(reg: SensorRegistry, sensors: list[int], nodes: list[Node]) -> list[int]:
    """Sensors for which a `where:`/`if:` expression can be true. A sensor lacking a name the
    expression reads does not match; when it reads only per-sensor attrs, only sensors with
    attrs can match (most of a million sensors have none)."""
    names = {n for node in nodes for n in node.names()}
    attrs_only = all(n.startswith("sensor.") and n[7:] not in reg.BASE_FACTS for n in names)
    if attrs_only and names:
        having = set(reg.attrs.keys())
        return [i for i in sensors if i in having]
    return sensors


def _holds(r: LoadedRule, reg: SensorRegistry, idx: int, node: Node) -> bool:
    look = lookup(r.pack, reg, idx, params_for(r.pack, reg.place_of(idx).district))
    try:
        return bool(evaluate(node, look))
    except KeyError:
        return False


def modifier_notes(r: LoadedRule, reg: SensorRegistry, idx: int) -> list[str]:
    """The `note` of each modifier that applies to sensor ``idx`` (said in the summary)."""
    return [m.note for m in r.spec.modifiers if m.note and _holds(r, reg, idx, parse(m.if_))]
