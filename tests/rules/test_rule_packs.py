"""Rule packs (rules.schema, rules.compiler): the built-in packs load and bind to the Chengdu
registry; a mistake in a pack or in the routing tree stops the start with file, line and a
message that says what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import registry
from pipeline.core.engine import Engine
from pipeline.core.models import Severity
from rules.compiler import PACKS, ROUTING, load_rules
from rules.yamlfile import ConfigError
from tests.support import line_of

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED_KINDS = {"gas_household", "gas_commercial", "waterlogging", "river_gauge", "rain_gauge",
                    "air_quality", "dust_monitor", "site_camera", "tower_crane", "billboard_tilt",
                    "manhole_cover", "door_magnet"}


# ---- the built-in packs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin():
    return load_rules()


def test_builtin_packs_load(builtin):
    names = {p.pack for p in builtin.packs}
    assert names == {path.stem for path in PACKS.glob("*.yaml")}
    assert len(builtin.rules) > 0
    assert set(builtin.kinds) == DOCUMENTED_KINDS
    ids = [r.spec.id for r in builtin.rules]
    assert len(ids) == len(set(ids))
    for r in builtin.rules:
        assert r.spec.id.startswith(r.pack.pack + ".")
        assert set(r.spec.sensors) <= set(builtin.kinds)


def test_builtin_routing_gives_every_severity(builtin):
    assert set(builtin.routing.tiers) == set(Severity)
    assert [r.name for r in builtin.routing.routes] == ["gas-at-vulnerable-residents", "device-health",
                                                         "construction-site-owner"]


def test_builtin_packs_compile_against_the_chengdu_fixture(builtin):
    reg = registry.load(None, builtin.kinds)
    engine = Engine(reg, builtin)
    assert [e.id for e in engine.evaluators] == [r.spec.id for r in builtin.rules]
    # per-sensor facts are bound at compile time: a river gauge's 警戒水位 from the registry
    river = engine.by_id["river.level"]
    gauge = reg.index["river-510104-000001"]
    assert river.thresholds[gauge][:2] == (pytest.approx(4.0), pytest.approx(4.5))
    # modifiers: a household gas alarm at a resident living alone is raised one level
    leak = engine.by_id["gas.leak"]
    assert leak.bump[reg.index["gas-510104-000001"]] == 1
    assert reg.index["gas-510104-000002"] not in leak.bump


def test_select_keeps_rules_a_correlation_counts(builtin):
    chosen = builtin.select(["gas.building_cluster"])
    assert sorted(r.spec.id for r in chosen.rules) == ["gas.building_cluster", "gas.leak"]
    with pytest.raises(ConfigError, match="no rule id matches"):
        builtin.select(["nothing.*"])


def test_a_city_pack_of_the_same_name_replaces_the_builtin(tmp_path):
    text = (PACKS / "gas.yaml").read_text(encoding="utf-8").replace("level1_lel: 20", "level1_lel: 15")
    (tmp_path / "gas.yaml").write_text(text, encoding="utf-8")
    rs = load_rules([tmp_path])
    gas = [p for p in rs.packs if p.pack == "gas"]
    assert len(gas) == 1 and gas[0].params["level1_lel"] == 15
    assert str(tmp_path / "gas.yaml") in rs.sources


def test_cli_rules_check_passes_on_the_builtin_packs():
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "rules", "check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: ")
    assert "gas.leak" in done.stdout


# ---- bad packs ------------------------------------------------------------------------------------

PACK = """\
pack: demo
title: 测试规则包
kinds:
  demo_meter: {name: 测试水位计, unit: cm, category: waterlogging}
  demo_camera:
    name: 测试摄像头
    category: construction
    reading: event
    events: {spark: 火花, smoke: 烟雾}
params:
  warn: 10
  high: 20
rules:
  - id: demo.level
    name: 测试超限
    type: threshold
    sensors: [demo_meter]
    levels:
      - {severity: blue, when: "value >= params.warn"}
      - severity: yellow
        when: "value >= params.high"
    clear: "value < params.warn"
    for: 1m
    title: "{place}测试超限"
    summary: "{address}读数{value}{unit}"

  - id: demo.rain
    name: 测试累计
    type: window
    sensors: [demo_meter]
    windows:
      sum_3h: {fn: sum, size: 3h, every: 1h}
      sum_6h: {fn: sum, size: 6h, every: 1h}
    levels:
      - {severity: blue, when: "sum_6h >= params.high"}
      - {severity: orange, when: "sum_3h >= params.high"}

  - id: demo.camera
    name: 测试摄像头报警
    type: event
    sensors: [demo_camera]
    events: {spark: yellow, smoke: orange}

  - id: demo.cluster
    name: 同街道多点
    type: correlation
    sensors: [demo_meter]
    of: [demo.level]
    group_by: street
    min_sensors: 2
    within: 10m
    severity: orange
"""


def test_the_demo_pack_itself_is_good(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(PACK, encoding="utf-8")
    rs = load_rules([path])
    assert {"demo.level", "demo.rain", "demo.camera", "demo.cluster"} <= {r.spec.id for r in rs.rules}


# (id, old text, new text, marker of the line the error names (occurrence), message fragments)
PACK_CASES = [
    ("typo-in-required-field-whne", '        when: "value >= params.high"',
     '        whne: "value >= params.high"', ("whne:", 1), ["unknown field"]),
    ("typo-in-optional-field", "    for: 1m", "    fro: 1m", ("fro: 1m", 1),
     ["fro", "unknown field (check the spelling"]),
    ("unknown-rule-type", "type: threshold", "type: treshold", ("type: treshold", 1),
     ["treshold", "threshold", "window"]),
    ("id-not-starting-with-pack", "id: demo.level", "id: other.level", ("id: other.level", 1),
     ["rule id other.level must start with its pack name 'demo.'"]),
    ("bad-rule-id", "id: demo.rain", "id: demo", ("id: demo", 2), ["rules.1", "id"]),
    ("duplicate-rule-id-in-pack", "id: demo.camera", "id: demo.level", ("id: demo.level", 2),
     ["rule id demo.level is already used in {path}:14"]),
    ("duplicate-rule-id-across-packs", "id: demo.camera", "id: gas.leak", ("id: gas.leak", 1),
     ["rule id gas.leak is already used in " + str(PACKS / "gas.yaml") + ":"]),
    ("unknown-sensor-kind", "sensors: [demo_camera]", "sensors: [demo_camra]",
     ("demo_camra", 1), ["unknown sensor kind 'demo_camra'", "demo_camera"]),
    ("value-rule-on-event-kind", "    sensors: [demo_meter]\n    levels:",
     "    sensors: [demo_camera]\n    levels:", ("sensors: [demo_camera]", 1),
     ["kind demo_camera reports `event` readings"]),
    ("unknown-param", '"value >= params.high"', '"value >= params.hihg"', ("params.hihg", 1),
     ["unknown parameter params.hihg", "high", "warn"]),
    ("unknown-name", '"value >= params.high"', '"value >= hihg"', ("hihg", 1),
     ["unknown name 'hihg'", "params.<name>"]),
    ("level-not-quantity-op-expr", '"value >= params.high"', '"params.warn >= 3"',
     ("params.warn >= 3", 1), ["must compare one of ['battery', 'value'] with a threshold"]),
    ("level-without-comparison", '"value >= params.high"', '"value + params.high"',
     ("value + params.high", 1), ["must compare one of"]),
    ("quantity-on-both-sides", '"value >= params.high"', '"value >= value * 2"',
     ("value * 2", 1), ["['value'] on both sides"]),
    ("window-quantity-on-both-sides", '"sum_6h >= params.high"', '"sum_6h >= sum_3h"',
     ("sum_6h >= sum_3h", 1), ["on both sides"]),
    ("expression-syntax", '"value >= params.high"', '"value >= (params.high"',
     ("(params.high", 1), ["unclosed '(' at column 10"]),
    ("clear-not-a-comparison", 'clear: "value < params.warn"', 'clear: "params.warn"',
     ("clear:", 1), ["'params.warn' must compare"]),
    ("bad-duration", "for: 1m", "for: 5 minutes", ("for: 5 minutes", 1),
     ["'5 minutes' is not a duration", "5m"]),
    ("levels-out-of-order", '- {severity: blue, when: "value', '- {severity: orange, when: "value',
     ("levels:", 1), ["list levels from low to high severity"]),
    ("unknown-severity", "- severity: yellow", "- severity: amber", ("amber", 1),
     ["'blue', 'yellow', 'orange' or 'red'"]),
    ("unknown-template-field", 'title: "{place}测试超限"', 'title: "{place}{foo}测试超限"',
     ("{foo}", 1), ["unknown template field {foo}", "place"]),
    ("unknown-template-field-in-summary", "读数{value}{unit}", "读数{valeu}{unit}", ("{valeu}", 1),
     ["unknown template field {valeu}"]),
    ("correlation-of-unknown-rule", "of: [demo.level]", "of: [demo.levle]", ("of:", 1),
     ["counts unknown rule demo.levle"]),
    ("correlation-min-sensors", "min_sensors: 2", "min_sensors: 1", ("min_sensors", 1),
     ["min_sensors"]),
    ("event-its-kind-does-not-report", "events: {spark: yellow, smoke: orange}",
     "events: {spark: yellow, fire: orange}", ("fire: orange", 1),
     ["event 'fire' is not one its sensor kinds report (smoke, spark)"]),
    ("window-not-a-multiple-of-step", "sum_6h: {fn: sum, size: 6h, every: 1h}",
     "sum_6h: {fn: sum, size: 90m, every: 1h}", ("size: 90m", 1),
     ["window size must be a positive whole multiple of `every`"]),
    ("windows-with-different-steps", "sum_6h: {fn: sum, size: 6h, every: 1h}",
     "sum_6h: {fn: sum, size: 6h, every: 2h}", ("windows:", 1), ["share one step"]),
    ("mixed-tumbling-and-sliding", "sum_3h: {fn: sum, size: 3h, every: 1h}",
     "sum_3h: {fn: sum, size: 1h}", ("windows:", 1), ["all tumbling or all sliding"]),
    ("window-named-like-a-reading-field", "sum_3h:", "value:", ("windows:", 1),
     ["window name 'value'"]),
    ("unknown-window-fn", "{fn: sum, size: 3h", "{fn: median, size: 3h", ("median", 1),
     ["'sum', 'avg', 'min', 'max' or 'count'"]),
    ("kind-with-unknown-category", "category: waterlogging}", "category: flooding}",
     ("flooding", 1), ["kinds.demo_meter.category"]),
    ("yaml-duplicate-key", "    for: 1m", "    for: 1m\n    for: 2m", ("for: 2m", 1),
     ["duplicate key 'for' (first at line {first})"]),
]


def check_bad_file(tmp_path, base: str, name: str, case, load) -> None:
    """Edit ``base`` as the case says, load it, and check file, line and message."""
    _, old, new, (marker, occurrence), fragments = case
    assert base.count(old) == 1, f"ambiguous test edit {old!r}"
    text = base.replace(old, new)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path)
    err = info.value
    line = line_of(text, marker, occurrence)
    assert Path(err.file) == path
    assert err.line == line, err.message
    for fragment in fragments:
        fragment = fragment.replace("{path}", str(path)).replace("{first}", str(line - 1))
        assert fragment in err.message
    assert str(err).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize("case", PACK_CASES, ids=[c[0] for c in PACK_CASES])
def test_bad_pack_names_file_line_and_what_is_wrong(tmp_path, case):
    check_bad_file(tmp_path, PACK, "demo.yaml", case, lambda path: load_rules([path]))


def test_district_override_of_an_undeclared_param(tmp_path):
    text = PACK.replace("params:\n", 'districts:\n  "510104": {wran: 5}\nparams:\n')
    path = tmp_path / "demo.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_rules([path])
    assert Path(info.value.file) == path
    assert "districts.510104: unknown params ['wran']; declare them under params" in info.value.message


SECOND_PACK = """\
pack: demo2
title: 第二个测试包
rules:
  - id: demo2.camera
    name: 测试摄像头报警
    type: event
    sensors: [site_camera]
    events: {smoke_fire: orange}

  - id: demo.rain
    name: 同名规则
    type: event
    sensors: [site_camera]
    events: {smoke_fire: red}
"""


def test_duplicate_rule_id_across_two_city_packs(tmp_path):
    (tmp_path / "a_demo.yaml").write_text(PACK, encoding="utf-8")
    (tmp_path / "b_demo2.yaml").write_text(SECOND_PACK, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_rules([tmp_path])
    assert Path(info.value.file) == tmp_path / "b_demo2.yaml"
    assert info.value.line == line_of(SECOND_PACK, "id: demo.rain")
    where = f"{tmp_path / 'a_demo.yaml'}:{line_of(PACK, 'id: demo.rain')}"
    assert info.value.message == f"rule id demo.rain is already used in {where}"


def test_kind_declared_differently_in_two_packs(tmp_path):
    text = PACK.replace("kinds:\n", "kinds:\n  waterlogging: {name: 积水, unit: mm, category: waterlogging}\n")
    path = tmp_path / "demo.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_rules([path])
    assert Path(info.value.file) == path
    assert info.value.line == line_of(text, "  waterlogging: {name: 积水")
    assert "sensor kind waterlogging is declared differently in" in info.value.message


@pytest.mark.parametrize("text, line, message", [
    ("- a\n- b\n", 1, "a rule pack is a mapping"),
    ("pack: demo\ntitle: [unclosed\n", 2, "YAML syntax"),        # where the [ opened
    ("pack: demo\ntitle: x\nrules: {a: 1}\n", 3, "rules"),
])
def test_pack_that_is_not_a_pack(tmp_path, text, line, message):
    path = tmp_path / "demo.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_rules([path])
    assert (Path(info.value.file), info.value.line) == (path, line)
    assert message in info.value.message


def test_missing_pack_folder(tmp_path):
    with pytest.raises(ConfigError, match="no such rule file or folder"):
        load_rules([tmp_path / "nope"])


# ---- bad routing trees -------------------------------------------------------------------------

ROUTING_YAML = ROUTING.read_text(encoding="utf-8")

ROUTING_CASES = [
    ("unknown-match-label", "match: {category: device}", "match: {categroy: device}",
     ("categroy", 1), ["unknown label 'categroy'", "category"]),
    ("root-missing-a-severity", "  red:    [street, grid, district, dept, city]\n", "",
     ("tiers:", 1), ["the root must give tiers for every severity; missing ['red']"]),
    ("unknown-tier", "blue:   [street, grid]", "blue:   [street, gird]", ("gird", 1),
     ["tiers.blue.1"]),
    ("bad-escalation-duration", "street: 15m", "street: 15 minutes", ("15 minutes", 1),
     ["not a duration"]),
    ("route-typo", "    remind_every: 2m", "    remind_evrey: 2m", ("remind_evrey", 1),
     ["unknown field"]),
]


@pytest.mark.parametrize("case", ROUTING_CASES, ids=[c[0] for c in ROUTING_CASES])
def test_bad_routing_names_file_line_and_what_is_wrong(tmp_path, case):
    check_bad_file(tmp_path, ROUTING_YAML, "routing.yaml", case,
                   lambda path: load_rules(routing=path))


def test_routing_may_match_sensor_attrs(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text(ROUTING_YAML.replace("match: {category: device}",
                                         "match: {category: device, sensor.station: 府河站}"),
                    encoding="utf-8")
    assert load_rules(routing=path).routing.routes[1].match["sensor.station"] == "府河站"


# ---- errors that need the registry -------------------------------------------------------------

def test_threshold_from_a_missing_sensor_attr_names_the_sensor_and_its_csv_line(tmp_path):
    src = registry.FIXTURE.parent
    rows = (src / "sensors.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    gauge = "river-510105-000001,"
    n = next(i for i, row in enumerate(rows) if row.startswith(gauge))
    rows[n] = rows[n].rstrip("\n").rsplit(",", 1)[0] + ",guarantee_level=4.6\n"   # no warning_level
    (tmp_path / "registry.yaml").write_text((src / "registry.yaml").read_text(encoding="utf-8"),
                                            encoding="utf-8")
    (tmp_path / "sensors.csv").write_text("".join(rows), encoding="utf-8")

    rs = load_rules()
    reg = registry.load(tmp_path, rs.kinds)
    with pytest.raises(ConfigError) as info:
        Engine(reg, rs)
    err = info.value
    river = (PACKS / "river.yaml").read_text(encoding="utf-8")
    assert Path(err.file) == PACKS / "river.yaml"
    assert err.line == line_of(river, "id: river.level")
    assert "rule river.level" in err.message
    assert "sensor river-510105-000001 has no sensor.warning_level" in err.message
    assert f"{tmp_path / 'sensors.csv'} (line {n + 1})" in err.message
    assert "where:" in err.message          # and says how to fix it


# ---- the command line --------------------------------------------------------------------------

def test_cli_rules_check_exits_1_with_file_and_line(tmp_path):
    text = PACK.replace('"value >= params.high"', '"value >= params.hihg"')
    path = tmp_path / "demo.yaml"
    path.write_text(text, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "rules", "check", "--packs", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1
    line = line_of(text, "params.hihg")
    assert f"{path}:{line}: rule demo.level: unknown parameter params.hihg" in done.stderr
    assert done.stdout == ""


JINNIU_GAS = "gas-510106-000001"   # a household gas alarm in 金牛区


def test_a_city_params_file_overrides_pack_values_per_district(tmp_path):
    """--params: the city's own thresholds without copying a pack; a district may differ."""
    from pipeline.core.engine import Engine
    from pipeline.core.registry import load as load_registry
    from pipeline.core.wire import WireReading

    path = tmp_path / "params.yaml"
    path.write_text('gas:\n  params: {level1_lel: 25}\n  districts: {"510104": {level1_lel: 12}}\n',
                    encoding="utf-8")
    rules = load_rules(params=path).select(["gas.leak"])
    engine = Engine(load_registry(None, rules.kinds), rules)
    t0 = 1_782_885_600_000
    out = engine.process([WireReading(sensor_id="gas-510104-000002", ts=t0, value=15.0),   # 锦江区: 12
                          WireReading(sensor_id=JINNIU_GAS, ts=t0, value=22.0)])          # elsewhere: 25
    fired = {(n["sensor_id"], n["threshold"]) for n in out.notices}
    assert fired == {("gas-510104-000002", 12.0)}


def test_a_params_file_naming_an_unknown_parameter_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("gas:\n  params: {levl1_lel: 25}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_rules(params=path)
    assert info.value.line == 2 and "levl1_lel" in info.value.message
