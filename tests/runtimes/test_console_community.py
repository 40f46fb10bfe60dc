"""The console's community page, in a real browser: a real Mosquitto, `cityops run` with the
community routes (tests/rules/routing/community.yaml), `cityops console`, Chromium.

A blue waterlogging alert reaches the community (和平社区), not the street. The community's
user sees it on their page — and another community's user does not —, acknowledges it, marks
someone on site, then closes it with the reason (the sensor has not resolved); each step is a
notice the pipeline sends to every tier told, and the incident page shows where it stands.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench.harness.brokers import Mosquitto, Subscriber, publish
from bench.harness.console_browser import Console, api, login, shot, users_file
from tests.support import ROOT, notices, now_ms, wait_until

pytestmark = pytest.mark.broker

WATER = "wl-510104-000001"              # 和平社区第1微网格
COMMUNITY, OTHER_COMMUNITY = "510104020001", "510104020002"


@pytest.fixture
def city(tmp_path: Path, mosquitto: Mosquitto, runtime):
    users = users_file(tmp_path / "users.yaml", {
        "heping": {"scope": "community", "code": COMMUNITY},
        "neighbour": {"scope": "community", "code": OTHER_COMMUNITY}})
    config = tmp_path / "cityops.yaml"
    config.write_text(f"acks:\n  users: {users}\n")
    common = ["--config", str(config), "--routing",
              str(ROOT / "tests" / "rules" / "routing" / "community.yaml")]
    rt = runtime(mosquitto.url, "console-community", args=common, env={"CITYOPS_TICK": "200ms"})
    console = Console(tmp_path, ["--broker", mosquitto.url, *common], {}).start()
    yield rt, console
    assert console.stop() == 0, console.log()


def test_the_community_page_from_alert_to_closed(city, mosquitto: Mosquitto, browser) -> None:
    rt, console = city
    heping = login(browser, console, "heping")
    assert heping.url.endswith("/incidents")          # a community's page, as a street's
    neighbour = login(browser, console, "neighbour")
    with Subscriber(mosquitto.url, "cityops/alerts/#", "cityops/push/#") as sub:
        for ago in (150_000, 0):                      # 18 cm for 2.5 min: blue
            publish(mosquitto.url, f"cityops/readings/{WATER}",
                    json.dumps({"sensor_id": WATER, "ts": now_ms() - ago, "value": 18.0}))
        fired = wait_until(lambda: [n for n in notices(sub.messages) if n["tier"] == "community"],
                           10, "the community's notice")
        aid = fired[0]["alert_id"]
        heping.goto(f"{console.url}/incidents")
        heping.locator(f"tr[data-alert='{aid}']").wait_for(timeout=5000)
        neighbour.reload()
        assert neighbour.locator(f"tr[data-alert='{aid}']").count() == 0
        assert api(neighbour, f"/api/incidents/{aid}")[0] == 404
        shot(heping, "community")

        heping.goto(f"{console.url}/incidents/{aid}")
        assert "社区联勤联动站" in heping.locator(".facts").inner_text()     # who was told
        heping.click("button.ack-button")
        heping.locator("#state[data-state=acknowledged]").wait_for(timeout=5000)
        heping.select_option("select[name=state]", "on_site")
        heping.click("button.handle-button")
        heping.locator("#state[data-state=on_site]").wait_for(timeout=5000)
        heping.select_option("select[name=state]", "closed")
        heping.fill("form.handle input[name=note]", "传感器故障，已报修")
        heping.click("button.handle-button")
        heping.locator("#state[data-state=closed]").wait_for(timeout=5000)
        assert heping.locator("form.handle").count() == 0               # nothing left to do
        timeline = heping.locator(".timeline").inner_text()
        assert "heping 在事件详情页结案：传感器故障，已报修" in timeline
        assert "已到场" in timeline and "已结案" in timeline
        shot(heping, "community-closed")
        states = wait_until(lambda: {n["state"] for n in notices(sub.messages)
                                     if n["alert_id"] == aid} >= {"closed"}, 5, "closed")
        assert states
    mine = [n for n in notices(sub.messages) if n["alert_id"] == aid]
    assert [n["state"] for n in mine if n["tier"] == "community"] == \
        ["firing", "acknowledged", "on_site", "closed"]
    assert {n["tier"] for n in mine} == {"community", "grid"}         # never the street
    assert all(n["state_by"] == "heping" for n in mine if n["state"] in ("on_site", "closed"))
