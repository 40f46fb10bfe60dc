"""The rule language: what a rule pack (YAML) may say, checked strictly when it is loaded.

A pack declares the sensor kinds it understands, its parameters (with per-district overrides),
and its rules. Every rule has a stable id (``pack.name``) that shows up in notices, metrics and
errors. Conditions are expressions of ``rules.expr`` (never Python).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from rules.vocabulary import Category, Severity

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(v: Any) -> int:
    """'90s', '5m', '1.5h', '1d' (or a number of seconds) -> milliseconds."""
    if isinstance(v, bool):
        raise ValueError("a duration such as 30s, 5m, 1h or 1d")
    if isinstance(v, (int, float)):
        if v < 0:
            raise ValueError("a duration cannot be negative")
        return int(v * 1000)
    m = _DURATION.match(str(v))
    if not m:
        raise ValueError(f"{v!r} is not a duration; write e.g. 30s, 5m, 1h or 1d")
    return int(float(m[1]) * _UNIT_MS[m[2]])


def format_duration(ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        if ms and ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


Duration = Annotated[int, BeforeValidator(parse_duration)]
RuleId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SensorKind(_Strict):
    name: str = Field(description="Chinese name, used in titles")
    unit: str = ""
    category: Category
    reading: Literal["value", "event"] = "value"
    events: dict[str, str] = Field(default={}, description="event name -> Chinese name")


class Level(_Strict):
    severity: Severity
    when: str = Field(description="`QUANTITY OP expression`, e.g. `value >= params.level1_lel`")
    clear: str | None = Field(default=None, description="this level's own hysteresis (Kapacitor's "
                              "warnReset/critReset): when it holds, a firing incident steps down "
                              "below this level; on the lowest level, it clears")


class Modifier(_Strict):
    """Raise an incident's severity from what the registry knows about the sensor."""

    if_: str = Field(alias="if", description="expression over sensor.*, e.g. sensor.lives_alone")
    raise_: int = Field(default=1, alias="raise", ge=1, le=3, description="levels to raise")
    note: str = Field(default="", description="said in the summary, e.g. 独居老人")


class Flapping(_Strict):
    """A subject that fires again within `window` of resolving reopens the same incident, which
    then needs `window` of quiet to resolve: one incident, not many."""

    window: Duration


class _RuleBase(_Strict):
    if TYPE_CHECKING:
        type: str                   # each type's model says its own Literal (rules/types/*.py)
    id: RuleId
    name: str = Field(description="short Chinese name, the default title")
    sensors: list[str] = Field(min_length=1, description="sensor kinds the rule watches")
    where: str | None = Field(default=None, description="expression over sensor.*: which sensors")
    category: Category | None = None
    title: str | None = None
    summary: str | None = None
    instruction: str | None = Field(default=None, description="what the sensor's owner is asked "
                                    "to do: ends the owner's push (a template)")
    modifiers: list[Modifier] = []

    def counts(self) -> list[str]:
        """The rules whose incidents this rule counts (a correlation rule's ``of``)."""
        return []

    def state_shape(self) -> tuple:
        """What this rule's saved state means: a new rule with another shape cannot read it."""
        return (self.type,)


class _Stateful(_RuleBase):
    levels: list[Level] = Field(min_length=1)
    clear: str | None = Field(default=None, description="hysteresis: when a firing incident clears "
                              "(default: when no level holds)")
    for_: Duration = Field(default=0, alias="for")
    clear_for: Duration = 0
    flapping: Flapping | None = None

    @model_validator(mode="after")
    def _one_kind_of_clear(self) -> _Stateful:
        if self.clear is not None and any(lv.clear for lv in self.levels):
            raise ValueError("give `clear:` per level or once for the rule, not both")
        return self


if TYPE_CHECKING:
    Rule = Any      # the union of the rule types' schemas, made by rules.types when they are loaded


class Pack(_Strict):
    pack: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    title: str
    source: str = Field(default="", description="the standards or practice the values rest on")
    kinds: dict[str, SensorKind] = {}
    params: dict[str, float] = {}
    districts: dict[str, dict[str, float]] = Field(
        default={}, description="per-district parameter overrides, by 6-digit district code")
    rules: list[Rule] = []      # the union of the registered types (rules.types fills it)

    @model_validator(mode="after")
    def _ids(self) -> Pack:
        for code, values in self.districts.items():
            if not re.fullmatch(r"\d{6}", code):
                raise ValueError(f"districts: {code!r} is not a 6-digit district code")
            unknown = set(values) - set(self.params)
            if unknown:
                raise ValueError(f"districts.{code}: unknown params {sorted(unknown)}; "
                                 f"declare them under params")
        return self


# ---- routing ------------------------------------------------------------------------------

TierName = Literal["street", "grid", "district", "dept", "city", "community"]
EscalateUntil = Literal["acknowledged", "on_site"]
NotifyName = Literal["owner"]


class Escalation(_Strict):
    # grid and community: the community chain 网格 → 社区 → 街道 (docs/routing.md); a route
    # without them climbs street → district → city as before
    grid: Duration | None = Field(default=None, description="nobody answered this long after the "
                                  "incident started (the grid worker was told): tell the community")
    community: Duration | None = Field(default=None, description="nobody answered this long after "
                                       "the community was told: tell the street")
    street: Duration | None = Field(default=None, description="unacknowledged this long after the "
                                    "incident started (the street was told): tell the district")
    district: Duration | None = Field(default=None, description="unacknowledged this long after the "
                                      "district was told (at once, or by escalation): tell the city")


class Route(_Strict):
    """A child of the routing tree: the first route whose `match` fits takes the alert, and
    its options override the root's (Alertmanager-style, one level deep)."""

    name: str
    match: dict[str, Any] = Field(min_length=1)
    tiers: dict[Severity, list[TierName]] | None = None
    escalate_after: Escalation | None = None
    remind_every: Duration | None = None
    max_reminders: int | None = Field(default=None, ge=0)
    push: bool | None = None
    notify: list[NotifyName] | None = Field(default=None, description="besides the tiers: "
                                            "`owner`, the sensor's responsible party")
    escalate_until: EscalateUntil | None = Field(default=None, description="what stops "
                                                 "escalation and reminders: `acknowledged` (the "
                                                 "default) or `on_site` (someone arrived)")


class Routing(_Strict):
    tiers: dict[Severity, list[TierName]]
    escalate_after: Escalation = Escalation()
    remind_every: Duration | None = None
    max_reminders: int = Field(default=3, ge=0, description="then stop: escalation has taken over")
    push: bool = True
    notify: list[NotifyName] = []
    routes: list[Route] = []
    escalate_until: EscalateUntil = "acknowledged"

    @field_validator("tiers")
    @classmethod
    def _all(cls, v: dict) -> dict:
        missing = [s.value for s in Severity if s not in v]
        if missing:
            raise ValueError(f"the root must give tiers for every severity; missing {missing}")
        return v


MATCH_LABELS = {"rule_id", "category", "severity", "kind", "district", "street", "community", "grid"}

# The rule types (rules/types/*.py) use the shared pieces above; importing them registers each
# type and makes ``Rule``, the union ``Pack.rules`` takes, out of the registered ones.
import rules.types  # noqa: E402,F401
