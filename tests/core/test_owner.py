"""The sensor's owner is told (issue 16), in the engine and at the edges that are not pushes:

a construction-site camera's violation reaches the project's responsible party (registry
`owners:`) as a notice of tier `owner`, target the owner id, with a summary written for them
(what, where, when, the rule's instruction); the owner's acknowledgement (a push link's, with
`seq`) acknowledges the incident as the owner for every tier told; a snapshot keeps the owner
among those told; replay shows the owner's notices; `cityops route` names the owner; `cityops
rules check` warns, naming route, file, line and sensors, when a route notifies owners the
registry cannot reach; `cityops tail` shows an owner's reply as the owner's. The pushes
themselves: tests/runtimes/test_push_owner.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import registry
from pipeline.core.ack_tokens import AckTokens
from pipeline.core.engine import Engine
from pipeline.core.identity import AckUsers
from pipeline.core.models import AlertNotice
from pipeline.tools.tail import Filter, line_for
from rules.yamlfile import ConfigError

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "pipeline" / "fixtures" / "chengdu"
T0 = 1_782_885_780_000              # 2026-07-01 14:03 +08:00
MIN = 60_000
CAMERA = "cam-510108-000001"        # 成华区万年场安置房项目, 李工
SITE = "site-510108-wannianchang"
DUST = "dust-510108-000001"
GAS = "gas-510104-000002"           # a household: no owners: entry


def ingest(engine: Engine, *readings: dict) -> list[dict]:
    return engine.ingest([json.dumps(r).encode() for r in readings]).notices


def by_tier(notices: list[dict]) -> dict[str, dict]:
    return {n["tier"]: n for n in notices}


def test_a_site_violation_tells_the_projects_owner_what_to_do(chengdu, rules) -> None:
    engine = Engine(chengdu, rules)
    notices = ingest(engine, {"sensor_id": CAMERA, "ts": T0, "event": "no_helmet"})
    for n in notices:
        AlertNotice.model_validate(n)
    told = by_tier(notices)
    assert set(told) == {"street", "grid", "owner"}
    owner = told["owner"]
    assert owner["target"] == SITE
    assert owner["worker_id"] is None and owner["title"] == told["street"]["title"]
    assert owner["summary"] == ("成华区万年场安置房项目负责人李工：07月01日14:03，成都市成华区双桥路35号 "
                                "成华区万年场安置房项目工地 1号摄像头，工地AI摄像头报告“未佩戴安全帽”。"
                                "请立即整改“未佩戴安全帽”，整改完毕后点击链接确认整改。")
    # the other tiers keep the rule's own summary; no private field leaks into any notice
    assert told["street"]["summary"].startswith("成华区万年场安置房项目（成都市成华区双桥路35号")
    assert not [k for n in notices for k in n if k.startswith("_")]


def test_dust_over_the_stop_level_tells_the_owner_to_stop_work(chengdu, rules) -> None:
    engine = Engine(chengdu, rules)
    # an hour at 220 µg/m³, judged when the next hour's first reading comes
    notices = ingest(engine, *({"sensor_id": DUST, "ts": T0 + m * MIN, "value": 220}
                               for m in range(0, 61, 5)))
    owner = by_tier(notices)["owner"]
    assert owner["severity"] == "yellow" and owner["target"] == "site-510108-wannianchang"
    assert "停工整改至PM10小时均值低于150µg/m³" in owner["summary"]


def test_the_owners_link_acknowledges_for_every_tier_as_the_owner(chengdu, rules) -> None:
    engine = Engine(chengdu, rules)
    fired = ingest(engine, {"sensor_id": CAMERA, "ts": T0, "event": "fence_missing"})
    owner = by_tier(fired)["owner"]
    out = engine.ack([{"alert_id": owner["alert_id"], "by": SITE, "tier": "owner",
                       "ts": T0 + 5 * MIN, "seq": owner["seq"]}])
    assert not out.dead_letters
    acked = [n for n in out.notices if n["state"] == "acknowledged"]
    assert {n["tier"] for n in acked} == {"street", "grid", "district", "owner"}
    assert all(n["acked_by"] == SITE and n["acked_tier"] == "owner" for n in acked)
    # acknowledged: no reminder, no escalation afterwards
    later = engine.advance(T0 + 40 * MIN).notices
    assert not [n for n in later if n["state"] in ("reminder", "escalated")]


def test_an_owner_without_the_links_token_may_not_acknowledge(chengdu, rules) -> None:
    engine = Engine(chengdu, rules)
    owner = by_tier(ingest(engine, {"sensor_id": CAMERA, "ts": T0, "event": "no_helmet"}))["owner"]
    out = engine.ack([{"alert_id": owner["alert_id"], "by": SITE, "tier": "owner",
                       "ts": T0 + MIN}], may_ack=AckUsers(chengdu).may_ack)
    [dead] = out.dead_letters
    assert dead.reason == "forbidden" and "may not acknowledge" in dead.detail
    assert not out.notices


def test_a_snapshot_keeps_the_owner_among_those_told(chengdu, rules) -> None:
    engine = Engine(chengdu, rules)
    ingest(engine, {"sensor_id": CAMERA, "ts": T0, "event": "no_helmet"})
    again = Engine(chengdu, rules)
    again.restore(engine.snapshot())
    resolved = [n for n in again.advance(T0 + 31 * MIN).notices if n["state"] == "resolved"]
    assert by_tier(resolved)["owner"]["target"] == SITE


def test_a_household_has_no_owner_to_tell(chengdu, rules) -> None:
    engine = Engine(chengdu, rules)
    notices = ingest(engine, {"sensor_id": GAS, "ts": T0, "value": 55.0})
    assert notices and "owner" not in {n["tier"] for n in notices}


def test_replay_shows_the_owners_notices(tmp_path: Path) -> None:
    readings = tmp_path / "site.jsonl"
    readings.write_text(json.dumps({"sensor_id": CAMERA, "ts": T0, "event": "no_helmet"}) + "\n",
                        encoding="utf-8")
    out = tmp_path / "notices.jsonl"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "replay", str(readings), "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    notices = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(n["tier"], n["target"]) for n in notices if n["tier"] == "owner"] == [("owner", SITE)]
    assert "3 notices (grid 1, owner 1, street 1)" in done.stderr


def test_route_names_the_owner() -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "route", "--rule",
                           "construction.crane_alarm", "--sensor", "crane-510108-000001", "--at",
                           "2026-07-01T14:00"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "route: construction-site-owner" in done.stdout
    assert "责任方 push site-510108-wannianchang 成华区万年场安置房项目 李工 13900000001" in done.stdout


def _registry_copy(tmp: Path, edit) -> Path:
    folder = tmp / "registry"
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("uci_*"))
    path = folder / "registry.yaml"
    path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")
    return folder


def test_rules_check_warns_when_a_route_notifies_owners_it_cannot_reach(tmp_path: Path) -> None:
    # the 万年场 project loses its owners: entry; the 玉林 project keeps one without a phone
    folder = _registry_copy(tmp_path, lambda text: text.replace(
        '  - {id: site-510108-wannianchang, name: 成华区万年场安置房项目, contact: 李工, '
        'phone: "13900000001"}\n', "").replace(
        'contact: 杨工, phone: "13900000004"}', "contact: 杨工}"))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "rules", "check", "--registry",
                           str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr          # a warning: the rest still works
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    routing = ROOT / "rules" / "routing.yaml"
    line = next(i for i, text in enumerate(routing.read_text().splitlines(), 1)
                if text.strip() == "notify: [owner]")
    assert warnings == [
        f"warning: {routing}:{line}: route construction-site-owner notifies owners, but 5 "
        "sensor(s) belong to an owner with neither `phone` nor `channels`: "
        "cam-510107-000001 (site-510107-yulin), cam-510107-000002 (site-510107-yulin), "
        "cam-510107-000003 (site-510107-yulin), crane-510107-000001 (site-510107-yulin), "
        "dust-510107-000001 (site-510107-yulin); their owners will not be told (give the "
        f"owners one in {folder / 'registry.yaml'})",
        f"warning: {routing}:{line}: route construction-site-owner notifies owners, but 7 "
        "sensor(s) name an owner that has no `owners:` entry (no contact): "
        "cam-510108-000001 (成华区万年场安置房项目), cam-510108-000002 (成华区万年场安置房项目), "
        "cam-510108-000003 (成华区万年场安置房项目), cam-510108-000004 (成华区万年场安置房项目), "
        "cam-510108-000005 (成华区万年场安置房项目) and 2 more; their owners will not be told "
        f"(add the owners to `owners:` in {folder / 'registry.yaml'})"]
    clean = subprocess.run([sys.executable, "-m", "pipeline.cli", "rules", "check"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0 and "warning" not in clean.stderr, clean.stderr


@pytest.mark.parametrize("edit, line_of, message", [
    (lambda t: t.replace("id: ad-tianfu,", "id: ad-jincheng,"), "id: ad-jincheng, name: 天府",
     "owner ad-jincheng is listed twice"),
    (lambda t: t.replace("name: 天府视觉广告有限公司,", "name: 锦城户外传媒有限公司,"),
     "id: ad-tianfu,", "owner name 锦城户外传媒有限公司 is used twice"),
    (lambda t: t.replace("id: ad-tianfu,", "id: w-510104020001-01,"), "id: w-510104020001-01, name: 天府",
     "is also a worker's id"),
    (lambda t: t.replace("id: ad-tianfu,", "id: Ad_Tianfu,"), "id: Ad_Tianfu,", "owner id"),
])
def test_owner_mistakes_name_file_and_line(tmp_path: Path, rules, edit, line_of, message) -> None:
    folder = _registry_copy(tmp_path, edit)
    text = (folder / "registry.yaml").read_text(encoding="utf-8").splitlines()
    want = next(i for i, line in enumerate(text, 1) if line_of in line)
    with pytest.raises(ConfigError) as info:
        registry.load(folder, rules.kinds)
    assert info.value.line == want and message in info.value.message, info.value


def test_tail_shows_an_owners_reply_as_the_owners() -> None:
    token = AckTokens(b"k" * 40, 3_600_000).issue("a1", "owner", SITE, 1, T0)
    line = line_for(f"cityops/push/{SITE}/ack", token.encode(), "cityops", Filter([], [], []))
    assert line is not None and line.split()[1:3] == ["site-510108-w…", "owner"]
    garbage = line_for("cityops/push/w-1/ack", b"not a token", "cityops", Filter([], [], []))
    assert garbage is not None and garbage.split()[1:3] == ["w-1", "grid"]


def test_the_synthetic_city_names_every_sites_owner(tmp_path: Path, rules) -> None:
    from pipeline.tools.registry_gen import generate
    from pipeline.core.routing import unreachable_owners
    reg = registry.load(generate(tmp_path, 3000), rules.kinds)
    sites = reg.sensors_of_kinds(["site_camera", "tower_crane", "dust_monitor"])
    assert sites and all(reg.owner_of(i) is not None for i in sites)
    assert all(o.id.startswith("site-") and o.phone for o in reg.owners.values())
    assert unreachable_owners(rules, reg) == []
