"""`cityops rules test`: rule unit tests written as data, like `promtool test rules`.

A test file (YAML) gives a start time, a timeline of steps (readings, acknowledgements, the
watermark moving on) and the state changes it expects, in order. The same engine that runs in
production runs the test; a mismatch prints what was expected and what happened.

    name: gas leak at a resident living alone
    rules: ["gas.*"]                 # globs of rule ids to load (default: all)
    packs: [extra_packs/]            # optional extra rule packs, relative to this file
    start: "2026-07-01T14:00:00+08:00"
    steps:
      - {at: 0s, readings: [{sensor_id: gas-510104-000001, value: 27.5}]}
      - {at: 3m, ack: {rule: gas.leak, subject: gas-510104-000001, by: w-1, tier: street}}
      - {at: 30m, advance: true}     # the watermark reaches start + at
    expect:
      - {at: 0s, rule: gas.leak, subject: gas-510104-000001, state: firing, severity: orange,
         tiers: [street, grid, district, dept]}
      - {at: 3m, rule: gas.leak, state: acknowledged}

Each expected change is compared on the fields it names; `tiers` is the set of tiers that got a
copy. Every change that happened must be expected (a test cannot pass by saying too little), and
one told twice to the same target fails it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.engine import Engine, EngineSettings, Output
from pipeline.core.models import Ack
from pipeline.core.registry import Registry
from pipeline.core.registry import load as load_registry
from pipeline.core.wire import WireReading
from rules.compiler import load_rules
from rules.schema import Duration
from rules.yamlfile import ConfigError, load_yaml, pydantic_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TestReading(_Strict):
    sensor_id: str
    at: Duration | None = Field(default=None, description="own time, if not the step's")
    value: float | None = None
    event: str | None = None
    battery: float | None = None


class TestAck(_Strict):
    rule: str
    subject: str
    by: str = "tester"
    tier: str = "street"
    state: str | None = Field(default=None, description="a handling state: dispatched, "
                              "on_site, handled, closed (none: acknowledged)")
    to: str | None = None
    note: str | None = None


class Step(_Strict):
    at: Duration
    readings: list[TestReading] = []
    ack: TestAck | None = None
    advance: bool = False


class Expect(_Strict):
    at: Duration | None = None
    rule: str | None = None
    subject: str | None = None
    state: str | None = None
    previous_state: str | None = None
    severity: str | None = None
    tiers: list[str] | None = None
    value: float | None = None
    threshold: float | None = None
    flapping: bool | None = None
    escalation: int | None = None
    members: list[str] | None = None
    title_contains: str | None = None
    worker: str | None = None
    refused: str | None = Field(default=None, description="an acknowledgement or handling "
                                "state refused: the dead letter's reason (forbidden, bad_ack)")
    state_by: str | None = None
    dispatched_to: str | None = None


class RuleTest(_Strict):
    name: str
    rules: list[str] = []
    packs: list[str] = []
    registry: str | None = None
    routing: str | None = Field(default=None, description="a routing tree instead of the "
                                "built-in, relative to the file")
    settings: dict[str, Any] = {}
    start: datetime
    steps: list[Step] = Field(min_length=1)
    expect: list[Expect]


@dataclass
class Happened:
    """One state change as the tiers saw it: all copies of (alert_id, seq)."""

    at: int
    notice: dict
    tiers: set[str]
    worker: str | None = None
    targets: set = field(default_factory=set)     # (tier, target) copies seen
    twice: int = 0                                 # copies that came again: told twice

    def describe(self) -> str:
        n = self.notice
        if "refused" in n:
            return f"at {_fmt(self.at)} refused {n['refused']}: {n['detail']}"
        subject = n.get("group") or n["sensor_id"]
        return (f"at {_fmt(self.at)} {n['rule_id']} {subject} {n['state']} {n['severity']} "
                f"tiers={sorted(self.tiers)} value={n['value']} flapping={n['flapping']}")


def _fmt(ms: int) -> str:
    sign = "-" if ms < 0 else ""
    ms = abs(ms)
    return f"{sign}{ms // 60000}m{(ms % 60000) / 1000:g}s"


def collect(notices: list[dict], start_ms: int, into: list[Happened]) -> None:
    index = {(h.notice["alert_id"], h.notice["seq"]): h for h in into if "refused" not in h.notice}
    for n in notices:
        key = (n["alert_id"], n["seq"])
        h = index.get(key)
        if h is None:
            ts = int(datetime.fromisoformat(n["ts"]).timestamp() * 1000)
            h = index[key] = Happened(ts - start_ms, n, set())
            into.append(h)
        h.tiers.add(n["tier"])
        copy = (n["tier"], n["target"])
        h.twice += copy in h.targets
        h.targets.add(copy)
        if n["tier"] == "grid":
            h.worker = n["worker_id"]


def run_file(path: Path, registry_cache: dict[str, Registry] | None = None) -> list[str]:
    """Run one test file; returns the failures (empty when it passes)."""
    doc = load_yaml(path)
    try:
        t = RuleTest.model_validate(doc.data)
    except ValidationError as exc:
        raise pydantic_error(doc, exc) from None
    rs = load_rules([path.parent / p for p in t.packs],
                    routing=path.parent / t.routing if t.routing else None).select(t.rules)
    cache = registry_cache if registry_cache is not None else {}
    key = str(path.parent / t.registry) if t.registry else ""
    if key not in cache:
        cache[key] = load_registry(key or None, rs.kinds)
    engine = Engine(cache[key], rs, EngineSettings(**t.settings))
    start = int(t.start.timestamp() * 1000)
    happened: list[Happened] = []
    for i, step in enumerate(t.steps):
        now = start + step.at
        out = Output()
        if step.readings:
            readings = [WireReading(sensor_id=r.sensor_id, ts=start + (r.at if r.at is not None else step.at),
                                    value=r.value, event=r.event, battery=r.battery)
                        for r in step.readings]
            engine.process(readings, out=out)
        if step.ack:
            a = step.ack
            aid = engine.find_incident(a.rule, a.subject)
            if aid is None:
                raise doc.error(("steps", i, "ack"), f"no open incident of {a.rule} for {a.subject} "
                                "to acknowledge at this point")
            done = engine.ack([Ack(alert_id=aid, by=a.by, tier=a.tier, ts=now, state=a.state,
                                   to=a.to, note=a.note)], out=out)
            for d in done.dead_letters:         # a refusal is what it tells, as a notice would be
                happened.append(Happened(now - start, {"refused": d.reason, "detail": d.detail}, set()))
        if step.advance:
            engine.advance(now, out)
        collect(out.notices, start, happened)
    return compare(t.expect, happened)


def compare(expected: list[Expect], happened: list[Happened]) -> list[str]:
    failures = [f"told twice: {h.describe()}" for h in happened if h.twice]
    for i, want in enumerate(expected):
        if i >= len(happened):
            failures.append(f"expected #{i + 1} did not happen: {want.model_dump(exclude_none=True)}")
            continue
        got = happened[i]
        n = got.notice
        if "refused" in n or want.refused:
            if n.get("refused") != want.refused or (want.at is not None and want.at != got.at):
                failures.append(f"#{i + 1}: expected {want.model_dump(exclude_none=True)}, "
                                f"got {got.describe()}")
            continue
        subject = n.get("group") or n["sensor_id"]
        checks = {
            "at": (want.at, got.at), "rule": (want.rule, n["rule_id"]),
            "subject": (want.subject, subject), "state": (want.state, n["state"]),
            "previous_state": (want.previous_state, n["previous_state"]),
            "severity": (want.severity, n["severity"]),
            "tiers": (set(want.tiers) if want.tiers is not None else None, got.tiers),
            "value": (want.value, n["value"]), "threshold": (want.threshold, n["threshold"]),
            "flapping": (want.flapping, n["flapping"]), "escalation": (want.escalation, n["escalation"]),
            "members": (want.members, n["members"]),
            "worker": (want.worker, got.worker),
            "state_by": (want.state_by, n.get("state_by")),
            "dispatched_to": (want.dispatched_to, n.get("dispatched_to")),
        }
        for name, (w, g) in checks.items():
            if w is None:
                continue
            if isinstance(w, float) and isinstance(g, float) and abs(w - g) < 1e-9:
                continue
            if w != g:
                failures.append(f"#{i + 1} {name}: expected {w!r}, got {g!r}  ({got.describe()})")
        if want.title_contains and want.title_contains not in n["title"]:
            failures.append(f"#{i + 1} title: {n['title']!r} lacks {want.title_contains!r}")
    for extra in happened[len(expected):]:
        failures.append(f"unexpected #{happened.index(extra) + 1}: {extra.describe()}")
    return failures


def run(paths: list[Path]) -> tuple[int, int, list[str]]:
    """Run test files; returns (passed, failed, report lines)."""
    passed = failed = 0
    lines: list[str] = []
    cache: dict[str, Registry] = {}
    files: list[Path] = []
    for p in paths:
        files += sorted(p.glob("*.yaml")) if p.is_dir() else [p]
    for f in files:
        try:
            failures = run_file(f, cache)
        except ConfigError as exc:
            failures = [str(exc)]
        except Exception as exc:    # the engine crashed on this file: a failure, not the end of the run
            failures = [f"error: {type(exc).__name__}: {exc}"]
        name = f.name
        if failures:
            failed += 1
            lines.append(f"FAIL {name}")
            lines += [f"     {x}" for x in failures]
        else:
            passed += 1
            lines.append(f"ok   {name}")
    return passed, failed, lines
