"""What a rule type is: the one interface the compiler, the engine and the lifecycle ask.

A rule type is one module of ``rules/types/`` that registers a ``RuleType``:

* ``schema``: the pydantic model of its YAML (``type:`` names it);
* ``check``: what ``cityops rules check`` finds wrong with one rule of it, with file and line;
* ``compile``: the rule bound to a registry, as a running ``rules.evaluators.Evaluator``, which
  answers the engine's screening (``reads``, ``quiet_floor``, ``battery_ceiling``,
  ``event_names``, ``takes_late``), evaluates (``observe``, ``late``, ``on_timer``) and keeps its
  state (``tracks``, ``dump``/``load``).

``TYPES`` maps the ``type:`` string to the type; the compiler finds a rule's type there and
nowhere else, so a new rule type is one new module plus its line in ``rules/types/__init__``.

The compiler binds rules to a registry through ``SensorRegistry``: the facts it uses, declared
here, so the rule language does not depend on the pipeline's registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from rules.expr import ExprError, Node, evaluate, parse

if TYPE_CHECKING:
    from rules.compiler import LoadedRule
    from rules.evaluators import Evaluator, Timers
    from rules.schema import Pack, SensorKind, _RuleBase


class SensorRegistry(Protocol):
    """The facts of a registry (``pipeline.core.registry.Registry``) the compiler binds rules to."""

    BASE_FACTS: ClassVar[tuple[str, ...]]
    source: Any
    kind_of: Any                # bytes-like, a kind number (uint8) per sensor
    gateway_of: Any             # bytes-like, a gateway number (int32) per sensor, -1: none

    # read, never set: a column (pipeline.core.columns.Strings) is a read-only Sequence
    @property
    def sensor_ids(self) -> Sequence[str]: ...
    @property
    def kinds(self) -> Sequence[str]: ...
    @property
    def building(self) -> Sequence[str]: ...
    attrs: Any                  # sensor number -> its own attributes (only the sensors with some)

    def __len__(self) -> int: ...
    def sensors_of_kinds(self, kinds: Sequence[str]) -> list[int]: ...
    def sensor_facts(self, idx: int) -> dict[str, Any]: ...
    def place_of(self, idx: int) -> Any: ...


class WatchesSilence(Protocol):
    """What the engine's absence scan (vectorised over every sensor, in the engine) drives in
    a rule whose ``scans_silence`` is true: per sensor the silence that counts (``absent_ms``,
    0: not watched) and its gateway (``gateway_of``, None: no gateway incidents); the silent
    sensors (``silent``: sensor -> subject of its incident, "" itself; ``silent_mask``), the
    incidents (``tracks``); ``mark`` a sensor silent, ``fire`` an incident, ``recover`` a
    sensor that reported (the sensors no longer silent by it)."""

    absent_ms: Any                  # numpy int64 per sensor
    gateway_of: Any                 # numpy int32 per sensor, -1: none; or None
    silent: dict[int, str]
    silent_mask: Any                # numpy bool per sensor
    tracks: dict

    def mark(self, s: int, subject: str) -> None: ...
    def fire(self, s: int | str, ts: int, last: int, members: list[int] | None) -> None: ...
    def recover(self, s: int, ts: int) -> list[int]: ...


@dataclass
class Binding:
    """What one rule is compiled with: the registry, its place in the engine (timer owner), the
    engine's list of changes and timers, how subjects are named, and what the compiler worked
    out for every type: the sensors of its kinds, its ``where:`` mask (None: every sensor) and
    its modifiers' severity bumps."""

    reg: SensorRegistry
    number: int
    sink: list
    timers: Timers
    subject_name: Callable[[int | str], str]
    loaded: LoadedRule
    sensors: list[int]
    selected: bytearray | None = None
    bump: dict[int, int] = field(default_factory=dict)


class RuleType(ABC):
    """One rule type: the extension point. A type is one module under rules/types/ with one
    subclass of this (``name``, ``schema``, ``compile`` and what it changes of the defaults below),
    registered by ``register`` and listed in ``rules.types.MODULES``."""

    name: ClassVar[str]
    schema: ClassVar[type[_RuleBase]]
    shows_unit: ClassVar[bool] = True     # whether its notices give the kind's unit
    summary: ClassVar[str]                # a notice's summary when the rule gives none
    owner_what: ClassVar[str | None] = None   # what the owner's push says happened (None:
    #                                           the rule's name, the reading and the threshold)
    template_fields: ClassVar[frozenset[str]] = frozenset()   # its own, besides TEMPLATE_FIELDS

    def notice_facts(self, spec: Any, subject: int | str, heard: int | None, kind: str,
                     members: int, fmt_time: Callable[[int], str]
                     ) -> tuple[dict, str | None, str | None, list[str]]:
        """For a notice of its incident on ``subject`` (``heard``: when the subject was last
        heard from, if the change says): extra template fields, the group and the kind the
        notice names instead of the sensor's (None: the sensor's), and more notes."""
        return {}, None, None, []

    def reading(self, spec: Any) -> str | None:
        """The reading (``value`` or ``event``) its sensor kinds must report; None: any."""
        return None

    def quantities(self, spec: Any) -> set[str]:
        """What its comparisons (`levels`, `clear`) may compare with a threshold."""
        return set()

    def check(self, r: LoadedRule, kinds: dict[str, SensorKind], ids: dict[str, str]) -> None:
        """What is wrong with this rule beyond the schema and the checks every type shares
        (raises ConfigError with the rule's file and line); by default nothing more."""
        return None

    @abstractmethod
    def compile(self, r: LoadedRule, b: Binding) -> Evaluator:
        """The rule bound to a registry: its evaluator (rules.evaluators.Evaluator)."""


TYPES: dict[str, RuleType] = {}


def register(t: RuleType) -> RuleType:
    if t.name in TYPES:
        raise ValueError(f"rule type {t.name} is registered twice")
    TYPES[t.name] = t
    return t


# ---- checks and thresholds the types share --------------------------------------------------

def expr(r: LoadedRule, loc: tuple, text: str) -> Node:
    try:
        return parse(text)
    except ExprError as exc:
        raise r.doc.error(r.loc + loc, f"rule {r.spec.id}: {exc}") from None


def comparison(r: LoadedRule, loc: tuple, text: str) -> tuple[str, str, Node]:
    """`QUANTITY OP expression` -> (quantity, op, right side); flips `50 <= value`."""
    node = expr(r, loc, text)
    quantities = TYPES[r.spec.type].quantities(r.spec)
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
            check_names(r, loc, rhs, allow_sensor=True)
            return q, op, rhs
    raise r.doc.error(r.loc + loc, f"rule {r.spec.id}: {text!r} must compare one of "
                      f"{sorted(quantities)} with a threshold, e.g. `{sorted(quantities)[0]} >= 25`")


def check_names(r: LoadedRule, loc: tuple, node: Node, allow_sensor: bool) -> None:
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


def params_for(pack: Pack, district: str | None) -> dict[str, float]:
    p = dict(pack.params)
    if district and district in pack.districts:
        p.update(pack.districts[district])
    return p


def lookup(pack: Pack, reg: SensorRegistry, idx: int | None,
           params: dict[str, float]) -> Callable[[str], Any]:
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


def per_sensor(r: LoadedRule, reg: SensorRegistry, nodes: list[Node], sensors: list[int],
               what: str) -> tuple[tuple, dict[int, tuple]]:
    """Thresholds (or any per-sensor constants) for ``nodes``: a default and the sensors whose
    district override or registry facts make them differ."""
    pack = r.pack
    base = params_for(pack, None)
    needs_sensor = any(n.startswith("sensor.") or n.startswith("place.") for node in nodes for n in node.names())

    def values(idx: int | None, params: dict[str, float]) -> tuple:
        look = lookup(pack, reg, idx, params)
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
