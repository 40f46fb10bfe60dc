"""The city registry (pipeline.core.registry, docs/registry.md): the Chengdu fixture, on-call
resolution, and errors that name the file and the line."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from pipeline.core import registry
from pipeline.core.models import Category
from pipeline.core.registry import SENSOR_COLUMNS, Registry
from rules.compiler import load_rules
from rules.yamlfile import ConfigError
from tests.support import REGISTRY_YAML, SENSORS_CSV, line_of, write_registry

CHENGDU = registry.FIXTURE.parent
DOCUMENTED_KINDS = {"gas_household", "gas_commercial", "waterlogging", "river_gauge", "rain_gauge",
                    "air_quality", "dust_monitor", "site_camera", "tower_crane", "billboard_tilt",
                    "manhole_cover", "door_magnet"}


def at(reg: Registry, hh_mm: str, day: str = "2026-07-01") -> int:
    """Epoch ms of a local (registry time zone) wall-clock time."""
    local = datetime.fromisoformat(f"{day}T{hh_mm}").replace(tzinfo=reg.tz)
    return int(local.timestamp() * 1000)


# ---- the Chengdu fixture -------------------------------------------------------------------

def test_fixture_loads_with_every_level_populated(chengdu):
    assert chengdu.city_code == "510100"
    assert str(chengdu.tz) == "Asia/Shanghai"
    assert len(chengdu.districts) > 0
    assert len(chengdu.streets) > 0
    assert len(chengdu.communities) > 0
    assert len(chengdu.grid_places) > 0
    assert len(chengdu.workers) > 0
    assert len(chengdu.departments) > 0
    assert len(chengdu) > 0
    assert chengdu.source == str(registry.FIXTURE)


def test_fixture_default_path_and_folder_path_load_the_same(chengdu):
    by_folder = registry.load(CHENGDU)
    assert by_folder.sensor_ids == chengdu.sensor_ids
    assert by_folder.grid_index == chengdu.grid_index


def test_fixture_uses_every_documented_sensor_kind(chengdu):
    assert set(chengdu.kinds) == DOCUMENTED_KINDS


def test_every_fixture_sensor_sits_in_a_consistent_place(chengdu):
    for idx, sid in enumerate(chengdu.sensor_ids):
        assert chengdu.index[sid] == idx
        p = chengdu.place_of(idx)
        assert chengdu.grid_index[p.grid] == chengdu.grid_of[idx]
        assert p.grid.startswith(p.community) and len(p.grid) == 15
        assert p.community.startswith(p.street) and len(p.community) == 12
        assert p.street.startswith(p.district) and len(p.street) == 9
        assert chengdu.communities[p.community] == (p.community_name, p.street)
        assert chengdu.streets[p.street] == (p.street_name, p.district)
        assert chengdu.districts[p.district] == p.district_name
        assert -90 <= chengdu.lat[idx] <= 90 and -180 <= chengdu.lon[idx] <= 180


def test_every_fixture_grid_is_covered_by_someone_on_call(chengdu):
    for p in chengdu.grid_places:
        for hh_mm in ("03:00", "10:00", "21:00"):
            assert chengdu.on_call(p.grid, p.street, at(chengdu, hh_mm)) is not None, (p.grid, hh_mm)


def test_every_fixture_category_has_a_department(chengdu):
    assert set(chengdu.dept_of_category) == {c.value for c in Category}


def test_sensor_facts_merge_registry_columns_and_attrs(chengdu):
    gas = chengdu.index["gas-510104-000001"]
    facts = chengdu.sensor_facts(gas)
    assert facts["id"] == "gas-510104-000001"
    assert facts["kind"] == "gas_household"
    assert facts["building"] == "510104020001-b01"
    assert facts["gateway"] == "gw-510104-0001"
    assert facts["lives_alone"] is True
    river = chengdu.sensor_facts(chengdu.index["river-510104-000001"])
    assert river["warning_level"] == 4.5
    assert river["guarantee_level"] == 5.2
    assert river["gateway"] is None and river["building"] is None


@pytest.mark.parametrize("hh_mm, worker", [
    ("08:00", "w-510104020001-01"),      # day shift starts (inclusive)
    ("12:30", "w-510104020001-01"),
    ("19:59", "w-510104020001-01"),
    ("20:00", "w-510104020001-02"),      # night shift starts; the day shift has ended
    ("23:59", "w-510104020001-02"),
    ("00:00", "w-510104020001-02"),      # across midnight
    ("03:30", "w-510104020001-02"),
    ("07:59", "w-510104020001-02"),
])
def test_fixture_on_call_day_and_night_shift(chengdu, hh_mm, worker):
    w = chengdu.on_call("510104020001001", "510104020", at(chengdu, hh_mm))
    assert w is not None and w.id == worker


def test_fixture_on_call_uses_local_time_not_utc(chengdu):
    # 01:00 UTC is 09:00 in Chengdu: the day shift
    utc_1am = int(datetime.fromisoformat("2026-07-01T01:00:00+00:00").timestamp() * 1000)
    assert chengdu.on_call("510104020001001", "510104020", utc_1am).id == "w-510104020001-01"


# ---- small registries written for a test -----------------------------------------------------

@pytest.fixture
def small(tmp_path) -> Registry:
    return registry.load(write_registry(tmp_path))


def test_small_registry_loads(small):
    assert len(small) == 4
    assert set(small.kinds) == {"gas_household", "waterlogging", "river_gauge"}
    assert small.gateways == ["gw-1"]
    assert small.gateway_of[small.index["wl-510104-000001"]] == -1
    assert small.attrs[small.index["river-510104-000001"]] == {
        "warning_level": 4.5, "guarantee_level": 5.2, "station": "府河站"}
    assert small.workers_of_grid["510104020001001"] == ["w-day", "w-night"]
    assert small.duty_officer == {"510104020": "w-duty"}


@pytest.mark.parametrize("grid, hh_mm, expected, why", [
    ("510104020001001", "10:00", "w-day", "primary on its day shift"),
    ("510104020001001", "22:00", "w-night", "the other primary on the night shift"),
    ("510104020001001", "02:00", "w-night", "night shift across midnight"),
    ("510104020001002", "23:00", "w-night", "only primary, on duty"),
    ("510104020001002", "10:00", "w-duty", "only primary off duty and no backup: duty officer"),
    ("510104020001003", "10:00", "w-office", "primary on duty"),
    ("510104020001003", "18:00", "w-evening", "primary off duty: its backup, who covers no grid"),
    ("510104020001003", "23:00", "w-duty", "primary and backup both off duty: duty officer"),
    ("510104020001003", "06:00", "w-duty", "primary and backup both off duty: duty officer"),
    ("510104020001004", "12:00", "w-duty", "nobody covers the grid: duty officer"),
])
def test_on_call_resolution(small, grid, hh_mm, expected, why):
    w = small.on_call(grid, "510104020", at(small, hh_mm))
    assert w is not None and w.id == expected, why


def test_on_call_none_when_nobody_and_no_duty_officer(small):
    assert small.on_call("510104021001001", "510104021", at(small, "12:00")) is None


@pytest.mark.parametrize("shift, inside, outside", [
    ("00:00-24:00", ["00:00", "12:00", "23:59"], []),
    ("08:00-20:00", ["08:00", "19:59"], ["07:59", "20:00"]),
    ("20:00-08:00", ["20:00", "23:59", "00:00", "07:59"], ["08:00", "19:59"]),
    ("22:30-06:15", ["22:30", "06:14"], ["06:15", "22:29"]),
])
def test_worker_shifts(tmp_path, shift, inside, outside):
    text = REGISTRY_YAML.replace('shift: "08:00-20:00"', f'shift: "{shift}"')
    w = registry.load(write_registry(tmp_path, text)).workers["w-day"]

    def minute(hh_mm: str) -> int:
        h, m = hh_mm.split(":")
        return int(h) * 60 + int(m)

    assert all(w.on_duty(minute(t)) for t in inside)
    assert not any(w.on_duty(minute(t)) for t in outside)


def test_known_kinds_accepts_declared_kinds(tmp_path):
    reg = registry.load(write_registry(tmp_path), known_kinds=DOCUMENTED_KINDS)
    assert len(reg) == 4


# ---- errors: file and line ------------------------------------------------------------------

Y, C = "registry.yaml", "sensors.csv"

# (id, file, old text, new text, marker of the line the error names (occurrence), message)
YAML_CASES = [
    ("district-code-not-in-city", '- code: "510104"', '- code: "520104"', ('"520104"', 1),
     "district code 520104 must be 6 digits starting with the city's 5101"),
    ("district-code-5-digits", '- code: "510104"', '- code: "51010"', ('"51010"', 1),
     "district code 51010 must be 6 digits"),
    ("street-not-in-district", '- code: "510104020"', '- code: "510105020"', ('"510105020"', 1),
     "street code 510105020 must have 9 digits and start with its district code 510104"),
    ("community-not-in-street", '- code: "510104020001"', '- code: "510104021001"',
     ('"510104021001"', 1), "community code 510104021001 must have 12 digits and start with its "
     "street code 510104020"),
    ("grid-14-digits", '- code: "510104020001001"', '- code: "51010402000100"',
     ('"51010402000100"', 1), "grid code 51010402000100 must have 15 digits and start with its "
     "community code 510104020001"),
    ("grid-not-in-community", '- code: "510104020001002"', '- code: "510104020002002"',
     ('"510104020002002"', 1), "grid code 510104020002002 must have 15 digits"),
    ("city-code", 'city: {code: "510100"', 'city: {code: "5101"', ("city:", 1),
     "city code must be 6 digits"),
    ("unknown-time-zone", "timezone: Asia/Shanghai", "timezone: Asia/Chengdu", ("timezone:", 1),
     "unknown time zone 'Asia/Chengdu'"),
    ("worker-unknown-grid", 'grids: ["510104020001003"]', 'grids: ["510104020001009"]',
     ('"510104020001009"', 1), "worker w-office covers unknown grid 510104020001009"),
    ("backup-not-a-worker", "backup: w-evening", "backup: w-evenin", ("backup: w-evenin", 1),
     "backup w-evenin is not a listed worker"),
    ("duty-officer-not-a-worker", "duty_officer: w-duty", "duty_officer: w-dutty",
     ("duty_officer:", 1), "duty officer w-dutty is not a listed worker"),
    ("worker-listed-twice", "id: w-evening", "id: w-office", ("id: w-office", 2),
     "worker w-office is listed twice"),
    ("bad-shift", 'shift: "09:00-17:00"', 'shift: "9:00-17:00"', ('"9:00-17:00"', 1),
     "shift must look like"),
    ("bad-worker-id", "id: w-day", "id: W_Day", ("id: W_Day", 1), "worker id"),
    ("unknown-category", "categories: [gas]", "categories: [gass]", ("categories:", 1),
     "categories.0"),
    ("unknown-key-typo", "timezone: Asia/Shanghai", "timezon: Asia/Shanghai", ("timezon:", 1),
     "timezon: unknown field"),
    ("unknown-key-in-worker", "    backup: w-night", "    backup: w-night\n    phnoe: '1'",
     ("phnoe", 1), "unknown field"),
    ("typo-in-required-key", "districts:", "distrcts:", ("distrcts:", 1), "unknown field"),
    ("yaml-syntax", "name: 锦江区", "name: 锦江区: 成都", ("锦江区: 成都", 1), "YAML syntax"),
    ("yaml-bad-indent", "    name: 罗川", "   name: 罗川", ("   name: 罗川", 1), "YAML syntax"),
]


@pytest.mark.parametrize("case", YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_registry_yaml_errors_name_file_and_line(tmp_path, case):
    _, old, new, (marker, occurrence), message = case
    assert REGISTRY_YAML.count(old) == 1, f"ambiguous test edit {old!r}"
    text = REGISTRY_YAML.replace(old, new)
    path = write_registry(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        registry.load(path)
    err = info.value
    line = line_of(text, marker, occurrence)
    assert Path(err.file) == path
    assert err.line == line, err.message
    assert message in err.message
    assert str(err).startswith(f"{path}:{line}: ")


def test_duplicate_yaml_key_names_both_lines(tmp_path):
    text = REGISTRY_YAML.replace("    name: 锦江区", "    name: 锦江区\n    streets: []\n    name: 青羊区")
    path = write_registry(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        registry.load(path)
    first, second = line_of(text, "name: 锦江区"), line_of(text, "name: 青羊区")
    assert (Path(info.value.file), info.value.line) == (path, second)
    assert info.value.message == f"YAML syntax: duplicate key 'name' (first at line {first})"


def test_duplicate_grid_code_names_the_first_line(tmp_path):
    text = REGISTRY_YAML.replace('- code: "510104020001002"', '- code: "510104020001001"')
    path = write_registry(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        registry.load(path)
    first = line_of(text, '- code: "510104020001001"', 1)
    second = line_of(text, '- code: "510104020001001"', 2)
    assert (Path(info.value.file), info.value.line) == (path, second)
    assert info.value.message == f"code 510104020001001 is used twice (first at line {first})"


GOOD_ROW = "gas-510104-000002,gas_household,510104020001001,gw-1,30.651800,104.081800,红星路三段192号,510104020001-b01,,,"  # noqa: E501

# (id, old row text, new row text, message); the error names the line of the new row
CSV_CASES = [
    ("unknown-grid", "510104020001001,gw-1,30.651800", "510104020009001,gw-1,30.651800",
     "sensor gas-510104-000002 is in unknown grid '510104020009001'"),
    ("lat-not-a-number", "30.651800,104.081800", "北纬30.65,104.081800",
     "lat/lon must be decimal degrees, got '北纬30.65', '104.081800'"),
    ("lat-out-of-range", "30.651800,104.081800", "93.651800,104.081800", "lat/lon out of range"),
    ("lon-out-of-range", "30.651800,104.081800", "30.651800,-181.5", "lat/lon out of range"),
    ("lat-empty", "30.651800,104.081800", ",104.081800", "lat/lon must be decimal degrees"),
    ("attrs-without-equals", "510104020001-b01,,,", "510104020001-b01,,,lives_alone",
     "attrs entry 'lives_alone' must be key=value with a lower-case key"),
    ("attrs-upper-case-key", "510104020001-b01,,,", "510104020001-b01,,,Lives_Alone=true",
     "attrs entry 'Lives_Alone=true' must be key=value"),
    ("attrs-empty-key", "510104020001-b01,,,", "510104020001-b01,,,=1", "attrs entry '=1'"),
    ("too-few-columns", "510104020001-b01,,,", "510104020001-b01,,", "expected 11 columns, found 10"),
    ("too-many-columns", "510104020001-b01,,,", "510104020001-b01,,,,", "expected 11 columns, found 12"),
    ("bad-sensor-id", "gas-510104-000002,", "gas 510104/000002,", "sensor id 'gas 510104/000002'"),
    ("empty-sensor-id", "gas-510104-000002,", ",", "sensor id ''"),
]


@pytest.mark.parametrize("case", CSV_CASES, ids=[c[0] for c in CSV_CASES])
def test_sensors_csv_errors_name_file_and_line(tmp_path, case):
    _, old, new, message = case
    assert GOOD_ROW.count(old) == 1
    bad_row = GOOD_ROW.replace(old, new)
    csv_text = SENSORS_CSV.replace(GOOD_ROW, bad_row)
    path = write_registry(tmp_path, csv_text=csv_text)
    with pytest.raises(ConfigError) as info:
        registry.load(path)
    err = info.value
    line = line_of(csv_text, bad_row)
    assert Path(err.file) == tmp_path / "sensors.csv"
    assert err.line == line, err.message
    assert message in err.message
    assert str(err).startswith(f"{err.file}:{line}: ")


def test_sensors_csv_wrong_header(tmp_path):
    header = ",".join(SENSOR_COLUMNS)
    swapped = header.replace("lat,lon", "lon,lat")
    path = write_registry(tmp_path, csv_text=SENSORS_CSV.replace(header, swapped))
    with pytest.raises(ConfigError) as info:
        registry.load(path)
    assert (Path(info.value.file), info.value.line) == (tmp_path / "sensors.csv", 1)
    assert info.value.message == "header must be exactly: " + header


def test_sensors_csv_empty_file(tmp_path):
    path = write_registry(tmp_path, csv_text="")
    with pytest.raises(ConfigError) as info:
        registry.load(path)
    assert info.value.line == 1 and "header must be exactly" in info.value.message


def test_duplicate_sensor_id_names_both_lines(tmp_path):
    dup = "gas-510104-000001,gas_household,510104020001002,,30.65,104.08,,,,,\n"
    csv_text = SENSORS_CSV + dup
    path = write_registry(tmp_path, csv_text=csv_text)
    with pytest.raises(ConfigError) as info:
        registry.load(path)
    first = line_of(csv_text, "gas-510104-000001,", 1)
    second = line_of(csv_text, "gas-510104-000001,", 2)
    assert (first, second) == (2, 6)
    assert (Path(info.value.file), info.value.line) == (tmp_path / "sensors.csv", second)
    assert info.value.message == f"sensor gas-510104-000001 is listed twice (first at line {first})"


def test_duplicate_sensor_id_after_a_blank_line(tmp_path):
    # blank lines are skipped, but they still count as lines of the file
    dup = "\ngas-510104-000002,gas_household,510104020001002,,30.65,104.08,,,,,\n"
    csv_text = SENSORS_CSV + dup
    path = write_registry(tmp_path, csv_text=csv_text)
    with pytest.raises(ConfigError) as info:
        registry.load(path)
    assert info.value.line == line_of(csv_text, "gas-510104-000002,", 2) == 7
    assert "(first at line 3)" in info.value.message


def test_unknown_sensor_kind_when_known_kinds_given(tmp_path):
    csv_text = SENSORS_CSV.replace("wl-510104-000001,waterlogging,", "wl-510104-000001,water_logging,")
    path = write_registry(tmp_path, csv_text=csv_text)
    registry.load(path)            # without known kinds, any kind is taken as it is
    with pytest.raises(ConfigError) as info:
        registry.load(path, known_kinds=DOCUMENTED_KINDS)
    assert (Path(info.value.file), info.value.line) == (tmp_path / "sensors.csv", 4)
    assert "unknown sensor kind 'water_logging'" in info.value.message
    assert "waterlogging" in info.value.message      # it lists what the packs declare


def test_missing_sensors_file(tmp_path):
    path = write_registry(tmp_path, REGISTRY_YAML.replace("sensors: sensors.csv", "sensors: nope.csv"))
    with pytest.raises(ConfigError) as info:
        registry.load(path)
    assert info.value.file.endswith("nope.csv") and info.value.line is None
    assert "cannot read the sensors file" in info.value.message


def test_missing_registry_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        registry.load(tmp_path / "nothing.yaml")
    assert info.value.line is None and "cannot read" in info.value.message


@pytest.mark.parametrize("text", ["- just\n- a list\n", "just a string\n"])
def test_registry_that_is_not_a_mapping(tmp_path, text):
    path = write_registry(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        registry.load(path)
    assert info.value.line == 1 and "a registry is a mapping" in info.value.message


def test_registry_that_is_not_utf8(tmp_path):
    path = write_registry(tmp_path)
    path.write_bytes(REGISTRY_YAML.encode("gb18030"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        registry.load(path)


def test_config_error_attributes():
    err = ConfigError("a/b.yaml", 7, "something is wrong")
    assert (err.file, err.line, err.message) == ("a/b.yaml", 7, "something is wrong")
    assert str(err) == "a/b.yaml:7: something is wrong"
    assert str(ConfigError("a/b.yaml", None, "x")) == "a/b.yaml: x"


# ---- the compiled registry (pipeline/core/registry_cache.py) --------------------------------------

COLUMNS = ("sensor_ids", "kind_of", "grid_of", "gateway_of", "lat", "lon", "address", "building",
           "owner", "owner_contact")


def same_registry(a: Registry, b: Registry) -> None:
    for name in COLUMNS:
        assert list(getattr(a, name)) == list(getattr(b, name)), name
    assert dict(a.attrs.items()) == dict(b.attrs.items())
    for name in ("city_code", "city_name", "tz", "districts", "streets", "communities",
                 "grid_places", "grid_index", "departments", "dept_of_category", "workers",
                 "workers_of_grid", "duty_officer", "kinds", "gateways", "owners", "owner_named"):
        assert getattr(a, name) == getattr(b, name), name
    for i, sid in enumerate(a.sensor_ids):
        assert b.index[sid] == i and b.sensor_facts(i) == a.sensor_facts(i)
    assert b.index.lookup([a.sensor_ids[3], "nope", a.sensor_ids[3] + "\0"]).tolist() == [3, -1, -1]


def test_compiled_registry_is_written_once_then_mapped(tmp_path, monkeypatch):
    import numpy as np
    monkeypatch.setenv("CITYOPS_CACHE", str(tmp_path / "cache"))
    kinds = load_rules().kinds
    parsed = registry.load(None, kinds)
    assert not isinstance(parsed.kind_of.base, np.memmap)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    mapped = registry.load(None, kinds)
    assert isinstance(mapped.kind_of.base, np.memmap) and isinstance(mapped.sensor_ids.blob.base, np.memmap)
    same_registry(parsed, mapped)


def test_compiled_registry_follows_changes_to_its_files(tmp_path, monkeypatch):
    monkeypatch.setenv("CITYOPS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "city"
    folder.mkdir()
    for name in ("registry.yaml", "sensors.csv"):
        (folder / name).write_bytes((registry.FIXTURE.parent / name).read_bytes())
    first = registry.load(folder)
    rows = (folder / "sensors.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "sensors.csv").write_text("".join(rows[:-1]), encoding="utf-8")   # one sensor gone
    fewer = registry.load(folder)
    assert len(fewer) == len(first) - 1 and first.sensor_ids[-1] not in fewer.index
    assert len(registry.load(folder)) == len(fewer)
    text = (folder / "registry.yaml").read_text(encoding="utf-8")
    (folder / "registry.yaml").write_text(text.replace("name: 成都市", "name: 蓉城"), encoding="utf-8")
    assert registry.load(folder).city_name == "蓉城"


def test_a_cache_that_cannot_be_written_is_no_error(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("x")
    monkeypatch.setenv("CITYOPS_CACHE", str(blocked / "cache"))
    same_registry(registry.load(None), registry.load(None))


def test_a_partition_subset_keeps_every_column(chengdu):
    keep = list(range(1, len(chengdu), 3))
    sub = chengdu.subset(keep)
    for new, old in enumerate(keep):
        assert sub.sensor_ids[new] == chengdu.sensor_ids[old] and sub.index[chengdu.sensor_ids[old]] == new
        assert sub.sensor_facts(new) == chengdu.sensor_facts(old)
        assert (sub.address[new], sub.owner_contact[new], sub.lat[new]) == \
            (chengdu.address[old], chengdu.owner_contact[old], chengdu.lat[old])


def rss_file_pages() -> int:
    """This process's resident file-backed pages (kB): what mapped columns cost it."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def test_released_pages_are_given_back_and_read_again_unchanged(tmp_path, monkeypatch):
    """A worker gives back the mapped pages its partition's subset touched: the process's
    file-backed resident memory falls, and the registry reads the same afterwards."""
    from pipeline.core.registry_cache import release_pages
    monkeypatch.setenv("CITYOPS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "city"
    from pipeline.tools.registry_gen import generate
    generate(folder, 60_000, seed=3)
    parsed = registry.load(folder)
    mapped = registry.load(folder)
    assert release_pages(parsed) == 0                  # nothing mapped: nothing to give back
    for name in COLUMNS:                               # every page of every column in
        col = getattr(mapped, name)
        list(col) if not hasattr(col, "sum") else col.sum()
    touched = rss_file_pages()
    assert release_pages(mapped) > 0
    assert touched - rss_file_pages() > 1_000          # kB: the columns' pages left the process
    same_registry(parsed, mapped)


def instances(cls: type) -> int:
    import gc
    return sum(1 for o in gc.get_objects() if type(o) is cls)


def test_the_compiled_place_tree_is_read_when_asked_not_held_whole(tmp_path, monkeypatch):
    """Grids, grid workers and owners grow with the city: loaded from the compiled form they
    are mapped records, so a process holds none of them until it asks, and then only those
    (a worker: the grids of its partition's sensors, the people its notices name). What it
    reads is what the parsed registry says, on a partition's subset as on the whole city."""
    import numpy as np

    from pipeline.shared.reading_router import ReadingRouter
    from pipeline.core.registry import Owner, Place, Worker
    monkeypatch.setenv("CITYOPS_CACHE", str(tmp_path / "cache"))
    from pipeline.tools.registry_gen import generate
    generate(tmp_path / "city", 20_000, seed=5)
    parsed = registry.load(tmp_path / "city")
    before = {cls: instances(cls) for cls in (Place, Worker, Owner)}
    mapped = registry.load(tmp_path / "city")
    assert len(mapped.grid_places) == len(parsed.grid_places) > 200
    assert len(mapped.workers) > 100 and len(mapped.owners) > 100
    assert {cls: instances(cls) for cls in (Place, Worker, Owner)} == before, "nothing built"
    router = ReadingRouter(mapped, 8)
    sub = mapped.subset(np.flatnonzero(router.partition_of == 3))
    owned = {int(g) for g in np.asarray(sub.grid_of)}
    for i in range(0, len(sub), 7):
        whole = mapped.index[sub.sensor_ids[i]]
        assert sub.place_of(i) == parsed.place_of(whole)
        assert sub.owner_of(i) == parsed.owner_of(whole)
        place = sub.place_of(i)
        at_ms = at(sub, "03:00")
        assert sub.on_call(place.grid, place.street, at_ms) == parsed.on_call(place.grid, place.street, at_ms)
    assert set(mapped.grid_places._made) <= owned < set(range(len(parsed.grid_places)))
    assert mapped.grid_places[1:4] == parsed.grid_places[1:4] and mapped.grid_places[-1] == parsed.grid_places[-1]
    with pytest.raises(IndexError):
        mapped.grid_places[len(parsed.grid_places)]
    assert instances(Place) - before[Place] == len(mapped.grid_places._made)
    for who in ("workers", "owners", "owner_named", "workers_of_grid", "grid_index"):
        got, want = getattr(mapped, who), getattr(parsed, who)
        assert list(got) == list(want) and list(got.values()) == list(want.values()), who
        assert dict(got.items()) == want and got.get("nope") is None and "nope" not in got, who


@pytest.mark.parametrize("people", ["workers and no owners", "neither"])
def test_a_compiled_registry_without_owners_or_workers_reads_as_parsed(tmp_path, monkeypatch, people):
    monkeypatch.setenv("CITYOPS_CACHE", str(tmp_path / "cache"))
    text = REGISTRY_YAML if people != "neither" else (
        REGISTRY_YAML[:REGISTRY_YAML.index("workers:")] + "sensors: sensors.csv\n").replace(
            "duty_officer: w-duty", "")
    path = write_registry(tmp_path / "city", text)
    parsed, mapped = registry.load(path), registry.load(path)
    assert not isinstance(mapped.owners, dict) and not mapped.owners and mapped.owner_of(0) is None
    assert len(mapped.workers) == (5 if people != "neither" else 0)
    same_registry(parsed, mapped)
    place = mapped.place_of(0)
    for hh_mm in ("03:00", "10:00", "21:00"):
        assert mapped.on_call(place.grid, place.street, at(mapped, hh_mm)) == \
            parsed.on_call(place.grid, place.street, at(parsed, hh_mm))
