"""The console's silences page in a real browser: a real Mosquitto, `cityops run`, `cityops
console` and Chromium driven by Playwright (as tests/runtimes/test_console_browser.py).

锦江区's duty desk silences 春熙路街道 from the page; a gas leak there fires and is held (the
page lists it under the silence, no tier is told) while the silence is in force; a user of the
neighbour street sees the silence but may not end it, nor silence a street not theirs; the
district ends it from the page and the tiers are told. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import pytest

from bench.harness.brokers import Mosquitto, Subscriber, mosquitto_pub
from bench.harness.console_browser import login, shot
from tests.support import CONSOLE_GAS, dumps, notices, now_ms, reading, wait_until

pytestmark = pytest.mark.broker


def test_silences_are_made_seen_and_ended_in_the_console(console_city, mosquitto: Mosquitto,
                                                         browser) -> None:
    rt, console = console_city
    url = mosquitto.url
    district = login(browser, console, "jinjiang")
    district.goto(f"{console.url}/silences")
    district.locator("#silences-unknown, #silences-none").first.wait_for(timeout=5000)
    district.select_option("select[name=place]", "street:510104020")
    district.select_option("select[name=category]", "gas")
    district.select_option("select[name=hours]", "2")
    district.fill("input[name=reason]", "燃气管网检修<b>夜间</b>")
    district.click("#new-silence button[type=submit]")

    def row():
        district.goto(f"{console.url}/silences")
        return district.locator("tr[data-silence]").count() == 1
    wait_until(row, 10, "the silence listed (the pipeline's retained list)")
    text = district.locator("tr[data-silence]").inner_text()
    assert "street = 510104020" in text and "category = gas" in text
    assert "燃气管网检修<b>夜间</b>" in text and "jinjiang" in text     # text, not HTML

    with Subscriber(url, "cityops/alerts/#", "cityops/push/#") as sub:
        mosquitto_pub(url, "cityops/gateways/gw-510104-0001",
                      dumps([reading(CONSOLE_GAS, 28.0, ts=now_ms())]))

        def muted():
            district.goto(f"{console.url}/silences")
            return district.locator(".muted-incident").count() == 1
        wait_until(muted, 10, "the leak listed under its silence")
        assert "通知暂缓" in district.locator(".muted-incident").inner_text()
        assert [n for n in notices(sub.messages) if n["sensor_id"] == CONSOLE_GAS] == []
        shot(district, "silences")

        # the neighbour street sees it, may not end it, and may not silence 春熙路
        neighbour = login(browser, console, "neighbour")
        neighbour.goto(f"{console.url}/silences")
        assert neighbour.locator("tr[data-silence]").count() == 1
        assert neighbour.locator("button.end-silence").count() == 0
        assert neighbour.locator("select[name=place] option[value='street:510104020']").count() == 0
        refused = neighbour.request.post(f"{console.url}/silences", form={
            "csrf": neighbour.locator("meta[name=csrf]").get_attribute("content"),
            "place": "street:510104020", "hours": "1", "reason": "x"})
        assert refused.status == 403 and "510104021" in refused.text()

        district.goto(f"{console.url}/silences")
        district.click("button.end-silence")
        told = wait_until(lambda: [n for n in notices(sub.messages) if n["sensor_id"] == CONSOLE_GAS],
                          10, "the held leak told when the silence ended")
    assert {n["state"] for n in told} == {"firing"} and "静默结束" in told[0]["summary"]

    def gone():
        district.goto(f"{console.url}/silences")
        return district.locator("#silences-none").count() == 1
    wait_until(gone, 10, "the silence gone from the page")
