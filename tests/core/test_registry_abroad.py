"""A registry outside China (docs/registry.md, "Outside China"): any IANA time zone works; place
codes must keep the GB/T 2260 digit structure (6/9/12/15 digits), other codes are refused."""

from __future__ import annotations

import pytest

from pipeline.core import registry
from pipeline.core.engine import Engine
from rules.compiler import load_rules
from rules.yamlfile import ConfigError
from tests.support import REGISTRY_YAML, SENSORS_CSV, write_registry

BERLIN = (REGISTRY_YAML.replace("timezone: Asia/Shanghai", "timezone: Europe/Berlin")
          .replace("name: 成都市", "name: Berlin"))
# Berlin's coordinates: the registry checks only that they are on the globe
BERLIN_CSV = SENSORS_CSV.replace("30.651742,104.081720", "52.520008,13.404954")


def test_a_city_in_another_time_zone_gets_its_local_time_and_shifts(tmp_path) -> None:
    rules = load_rules()
    reg = registry.load(write_registry(tmp_path, BERLIN, BERLIN_CSV), rules.kinds)
    assert str(reg.tz) == "Europe/Berlin" and reg.city_name == "Berlin"
    engine = Engine(reg, rules)
    # 19:00 in Berlin is 01:00 in Chengdu: the day-shift worker (08:00-20:00) is on call here
    out = engine.ingest([b'{"sensor_id": "gas-510104-000001", "ts": "2026-07-01T19:00:00+02:00", '
                         b'"value": 55}'])
    push = [n for n in out.notices if n["tier"] == "grid"]
    assert [n["worker_id"] for n in push] == ["w-day"]
    assert push[0]["ts"] == "2026-07-01T19:00:00+02:00"


@pytest.mark.parametrize("old, new, says", [
    ('code: "510104"\n', 'code: "BE01"\n', "district code BE01 must be 6 digits"),
    ('{code: "510100"', '{code: "DE-BE"', "city code must be 6 digits"),
    ("timezone: Asia/Shanghai", "timezone: Mars/Olympus", "unknown time zone"),
])
def test_codes_outside_the_digit_structure_are_refused_with_file_and_line(tmp_path, old, new,
                                                                           says) -> None:
    with pytest.raises(ConfigError) as info:
        registry.load(write_registry(tmp_path, REGISTRY_YAML.replace(old, new, 1)))
    assert says in info.value.message and info.value.line
