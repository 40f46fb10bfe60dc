"""The operations-centre console end to end, in a real browser: a real Mosquitto, a real
`cityops run`, a real `cityops console`, and Debian's Chromium driven by Playwright.

One story: a gas reading published with `mosquitto_pub` reaches the street page and the city
big screen; the street acknowledges it with a note, the district page shows it acknowledged and
its escalation stops while another street's unacknowledged leak escalates; the grid worker's
phone-sized page shows the push; a user of another street sees nothing of it (page and API);
HTML in a sensor's address (registry) and in a notice is shown as text; the console restarted
shows the same open incidents, and what arrived while it was down. Screenshots of each page go
to tests/artifacts/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.harness.brokers import Mosquitto, Subscriber, mosquitto_pub, publish
from bench.harness.console_browser import PASSWORD, PHONE, Console, api, login, shot
from bench.harness.kafka_broker import CityopsProcess, TopicReader, produce
from tests.support import (CONSOLE_ESCALATE_S, CONSOLE_GAS, CONSOLE_GAS_GRID, CONSOLE_LATENESS_S, HOSTILE,
                           console_city_files, dumps, notices, now_ms, on_shift, reading, wait_until)

pytestmark = pytest.mark.broker

OTHER_GAS = "gas-510104-000042"      # the neighbour street 510104021, gw-510104-0007 (not alone)


def test_the_console_end_to_end_in_a_browser(console_city, mosquitto: Mosquitto, browser) -> None:
    rt, console = console_city
    url = mosquitto.url
    street = login(browser, console, "chunxi")
    assert street.url.endswith("/incidents")
    big = login(browser, console, "city-duty")
    assert big.url.endswith("/city")
    neighbour = login(browser, console, "neighbour")
    for page in (street, big, neighbour):    # the live stream is open before anything happens
        wait_until(lambda: page.evaluate("document.getElementById('live').dataset.connected"),
                   10, "the page's event stream")

    # a gas reading, published with the real client: on the street page and the big screen
    with Subscriber(url, "cityops/alerts/#", "cityops/push/#") as sub:
        t0 = now_ms()
        mosquitto_pub(url, "cityops/gateways/gw-510104-0001", dumps([reading(CONSOLE_GAS, 28.0, ts=t0)]))
        mosquitto_pub(url, "cityops/gateways/gw-510104-0007", dumps([reading(OTHER_GAS, 28.0, ts=t0)]))
        row = street.locator("tr.row", has_text="燃气")
        row.first.wait_for(timeout=5000)               # within 5 s of the publish
        big.locator("#open-count", has_text="2").wait_for(timeout=5000)
        seen_s = (now_ms() - t0) / 1000
        print(f"on the street page and the big screen {seen_s:.2f} s after mosquitto_pub")
        fired = wait_until(lambda: [n for n in notices(sub.messages) if n["sensor_id"] == CONSOLE_GAS], 5,
                           "the notices")
        aid = fired[0]["alert_id"]
        other = wait_until(lambda: [n for n in notices(sub.messages)
                                    if n["sensor_id"] == OTHER_GAS], 5, "the other street's")[0]

        assert row.count() == 1, "the street page shows another street's incident"
        assert street.locator(f"tr[data-alert='{other['alert_id']}']").count() == 0
        # the address with HTML is text: no element made of it, no script run
        street.goto(f"{console.url}/incidents/{aid}")
        assert HOSTILE in street.locator(".place").inner_text()
        assert street.locator("#pwned-address").count() == 0
        assert street.evaluate("window.pwned") is None
        shot(big, "city")

        # another street's user: nothing of it, by page or API
        neighbour.reload()
        assert neighbour.locator(f"tr[data-alert='{aid}']").count() == 0
        assert neighbour.locator(f"tr[data-alert='{other['alert_id']}']").count() == 1
        assert api(neighbour, f"/api/incidents/{aid}")[0] == 404
        assert aid not in {i["alert_id"] for i in api(neighbour, "/api/incidents")[1]["incidents"]}
        page404 = neighbour.goto(f"{console.url}/incidents/{aid}")
        assert page404.status == 404 and "燃气" not in neighbour.content()
        refused = neighbour.request.post(f"{console.url}/api/incidents/{aid}/ack",
                                         headers={"X-CSRF-Token": neighbour.locator(
                                             "meta[name=csrf]").get_attribute("content")},
                                         data=json.dumps({"note": "not mine"}))
        assert refused.status == 404
        shot(neighbour, "other-street")

        # the street acknowledges, with a note, on the incident page
        shot(street, "incident-before-ack")
        street.fill("input[name=note]", "已派人<b>前往</b>")
        street.click("button.ack-button")
        street.locator("#state[data-state=acknowledged]").wait_for(timeout=5000)
        acked_at = now_ms()
        timeline = street.locator(".timeline").inner_text()
        assert "chunxi 在事件详情页确认：已派人<b>前往</b>" in timeline
        shot(street, "incident-acknowledged")

        district = login(browser, console, "jinjiang")
        row = district.locator(f"tr[data-alert='{aid}']")
        assert row.locator(".state").get_attribute("data-state") == "acknowledged"
        assert "chunxi" in row.inner_text()
        shot(district, "district")

        # the other street's leak, unacknowledged, escalates on time; ours does not
        wait_until(lambda: any(n["alert_id"] == other["alert_id"] and n["state"] == "escalated"
                               for n in notices(sub.messages)), CONSOLE_ESCALATE_S + CONSOLE_LATENESS_S + 10,
                   "the unacknowledged leak's escalation")
        wait_until(lambda: now_ms() > max(acked_at, t0 + 2 * CONSOLE_ESCALATE_S * 1000)
                   + (CONSOLE_LATENESS_S + 2) * 1000, 2 * CONSOLE_ESCALATE_S + 10, "past both deadlines")
        ours = [n for n in notices(sub.messages) if n["alert_id"] == aid]
        assert not [n for n in ours if n["state"] == "escalated"], ours
        assert {n["state"] for n in ours} == {"firing", "acknowledged"}
        big.locator(".waiting", has_text="燃气").wait_for(timeout=5000)  # waiting for an ack
        assert aid not in big.locator(".waiting").inner_html()
        shot(big, "city-escalation-waiting")

    # the grid worker on their phone: the push, newest first, with its state now
    worker = next(n["target"] for n in fired if n["tier"] == "grid")
    assert worker in on_shift(CONSOLE_GAS_GRID, t0) | {"w-510104020-duty"}
    phone = login(browser, console, worker, viewport=PHONE)
    assert phone.url.endswith("/me")
    pushes = phone.locator(f"li.push[data-alert='{aid}']")
    assert pushes.count() == 2                          # it fired; it was acknowledged
    assert "已确认" in pushes.first.inner_text()         # newest first
    assert "报警中" in pushes.last.inner_text()
    shot(phone, "grid-worker")

    # a notice with HTML in it (from whoever may publish on the alerts topics) is text too
    forged = dict(fired[0], alert_id="f" * 16, tier="street", target="510104020", seq=1,
                  title='<script>window.pwned=3</script>【红色预警】<i id="pwned-title">x</i>',
                  summary="<img src=x onerror=window.pwned=4>", severity="red")
    publish(url, "cityops/alerts/street/510104020", dumps(forged))
    street.goto(f"{console.url}/incidents")
    street.locator("tr[data-alert='ffffffffffffffff']").wait_for(timeout=5000)
    assert "<script>window.pwned=3</script>" in street.locator(
        "tr[data-alert='ffffffffffffffff'] .title").inner_text()
    assert street.locator("#pwned-title").count() == 0
    street.goto(f"{console.url}/incidents/{'f' * 16}")
    assert street.evaluate("window.pwned") is None
    shot(street, "street-hostile-notice")

    # restart: the same open incidents, and what arrived while it was down
    before = {i["alert_id"] for i in api(big, "/api/incidents?state=open")[1]["incidents"]}
    street.goto(f"{console.url}/incidents?state=open")
    street_rows = set(street.locator("tr.row").evaluate_all("rs => rs.map(r => r.dataset.alert)"))
    assert aid in street_rows
    assert console.stop() == 0
    t1 = now_ms()
    mosquitto_pub(url, "cityops/gateways/gw-510104-0001",
                  dumps([reading("gas-510104-000003", 31.0, ts=t1)]))
    wait_until(lambda: rt.metrics().get('cityops_notices_total{tier="street"}', 0) >= 4, 10,
               "the pipeline's notice of the leak while the console was down")
    console.start()
    big = login(browser, console, "city-duty")
    after = wait_until(lambda: {i["alert_id"] for i in api(big, "/api/incidents?state=open")[1][
        "incidents"]} - before and {i["alert_id"] for i in api(big, "/api/incidents?state=open")[1][
            "incidents"]}, 10, "the leak that came while the console was down")
    assert before < after and len(after - before) == 1
    # the grid worker acknowledges the new one with one tap on the phone
    (new,) = after - before
    phone = login(browser, console, worker, viewport=PHONE)
    push = phone.locator(f"li.push[data-alert='{new}']").first
    push.locator("button.ack-button").click()
    phone.locator(f"li.push[data-alert='{new}'] .state[data-state=acknowledged]").first.wait_for(
        timeout=5000)
    timeline = api(big, f"/api/incidents/{new}")[1]["timeline"]
    assert [(e["by"], e["detail"]["page"]) for e in timeline if e["what"] == "ack"] == [(worker, "me")]
    shot(phone, "grid-worker-one-tap")
    street = login(browser, console, "chunxi")           # (a new login: new cookies)
    street.goto(f"{console.url}/incidents?state=open")
    again = set(street.locator("tr.row").evaluate_all("rs => rs.map(r => r.dataset.alert)"))
    assert again == street_rows | (after - before)      # the same, and the one while it was down
    shot(big, "city-after-restart")
    shot(street, "street")


def test_security_headers_csrf_and_login(console_city, browser) -> None:
    rt, console = console_city
    page = browser.new_context().new_page()
    r = page.goto(f"{console.url}/incidents")
    assert page.url.startswith(f"{console.url}/login")            # pages need a login
    h = r.headers
    assert "script-src 'self'" in h["content-security-policy"]
    assert "default-src 'none'" in h["content-security-policy"]
    assert h["x-frame-options"] == "DENY"
    assert page.request.get(f"{console.url}/api/incidents").status == 401
    page.fill("input[name=user]", "chunxi")
    page.fill("input[name=password]", "wrong")
    page.click("button[type=submit]")
    assert "用户名或密码错误" in page.content()
    page = login(browser, console, "chunxi")
    cookie = next(c for c in page.context.cookies() if c["name"] == "cityops_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # a state-changing request without the page's CSRF token is refused
    no_token = page.request.post(f"{console.url}/api/incidents/0123/ack", data="{}")
    assert no_token.status == 403 and "CSRF" in no_token.text()
    form = page.request.post(f"{console.url}/incidents/0123/ack", form={"note": "x"})
    assert form.status == 403
    cross = page.request.post(f"{console.url}/api/incidents/0123/ack", data="{}",
                              headers={"Origin": "http://evil.example"})
    assert cross.status == 403
    # guessing is slowed: after 10 wrong passwords, even the right one waits (this client)
    guess = browser.new_context().new_page()
    for n in range(11):
        guess.goto(f"{console.url}/login")
        guess.fill("input[name=user]", "neighbour")
        guess.fill("input[name=password]", "wrong" if n < 10 else PASSWORD)
        guess.click("button[type=submit]")
        guess.wait_for_load_state()
    assert "尝试次数过多" in guess.content() and guess.url.endswith("/login")


def test_the_same_flow_on_the_kafka_runtime(kafka, tmp_path: Path, browser) -> None:
    """`cityops worker` on the Kafka-protocol broker; the console reads the Kafka tier topics
    and sends its acknowledgements to cityops.acks."""
    registry, users, routing, config = console_city_files(tmp_path)
    env = {"CITYOPS_KAFKA__BOOTSTRAP": kafka.bootstrap, "CITYOPS_KAFKA__PARTITIONS": "2",
           "CITYOPS_KAFKA__REPLICATION": "1", "CITYOPS_ACKS__USERS": str(users),
           "CITYOPS_REGISTRY": str(registry), "CITYOPS_ROUTING": str(routing),
           "CITYOPS_ENGINE__ALLOWED_LATENESS": f"{CONSOLE_LATENESS_S}s"}
    w = CityopsProcess("worker", tmp_path, env, "worker").start()
    console = None
    try:
        w.wait_partitions(2)
        console = Console(tmp_path, ["--kafka", kafka.bootstrap], env, name="kconsole").start()
        street = login(browser, console, "chunxi")
        big = login(browser, console, "city-duty")
        neighbour = login(browser, console, "neighbour")
        for page in (street, big):
            wait_until(lambda: page.evaluate("document.getElementById('live').dataset.connected"),
                       10, "the page's event stream")
        t0 = now_ms()
        produce(kafka.bootstrap, "cityops.readings", [
            (CONSOLE_GAS.encode(), dumps(reading(CONSOLE_GAS, 28.0, ts=t0))),
            (OTHER_GAS.encode(), dumps(reading(OTHER_GAS, 28.0, ts=t0)))])
        row = street.locator("tr.row", has_text="燃气")
        row.first.wait_for(timeout=5000)
        big.locator("#open-count", has_text="2").wait_for(timeout=5000)
        print(f"on the street page and the big screen {(now_ms() - t0) / 1000:.2f} s after "
              "the records were produced")
        assert row.count() == 1
        aid = row.first.get_attribute("data-alert")
        shot(big, "kafka-city")

        assert api(neighbour, f"/api/incidents/{aid}")[0] == 404
        neighbour.reload()
        assert neighbour.locator(f"tr[data-alert='{aid}']").count() == 0

        street.goto(f"{console.url}/incidents/{aid}")
        assert HOSTILE in street.locator(".place").inner_text()
        assert street.evaluate("window.pwned") is None
        street.click("button.ack-button")
        street.locator("#state[data-state=acknowledged]").wait_for(timeout=10000)
        acked_at = now_ms()
        district = login(browser, console, "jinjiang")
        assert district.locator(f"tr[data-alert='{aid}'] .state").get_attribute(
            "data-state") == "acknowledged"
        shot(district, "kafka-district")

        # the unacknowledged one escalates (the big screen lists it); ours never does
        big.locator(".waiting", has_text="燃气").wait_for(timeout=(CONSOLE_ESCALATE_S + 15) * 1000)
        wait_until(lambda: now_ms() > max(acked_at, t0 + 2 * CONSOLE_ESCALATE_S * 1000)
                   + (CONSOLE_LATENESS_S + 2) * 1000, 2 * CONSOLE_ESCALATE_S + 10, "past both deadlines")
        states = [e["state"] for e in api(district, f"/api/incidents/{aid}")[1]["timeline"]
                  if e["what"] == "notice"]
        assert "escalated" not in states and "acknowledged" in states, states
        out = TopicReader(kafka.bootstrap, ["cityops.alerts.street", "cityops.push"])
        mine = out.until(lambda recs: any(json.loads(r.value)["alert_id"] == aid
                                          and json.loads(r.value)["state"] == "acknowledged"
                                          for r in recs), timeout=10)
        assert not [r for r in mine if json.loads(r.value)["alert_id"] == aid
                    and json.loads(r.value)["state"] == "escalated"]
        worker_id = next(json.loads(r.value)["target"] for r in mine
                         if json.loads(r.value)["alert_id"] == aid and r.topic == "cityops.push")
        phone = login(browser, console, worker_id, viewport=PHONE)
        assert "已确认" in phone.locator(f"li.push[data-alert='{aid}']").first.inner_text()
        shot(phone, "kafka-grid-worker")
    finally:
        if console is not None:
            assert console.stop() == 0, console.log()
        w.stop()


def test_a_bad_message_on_the_alerts_topics_is_skipped_and_the_console_goes_on(
        console_city, mosquitto: Mosquitto, browser) -> None:
    """Only the pipeline may write there (deploy ACL); should anything else arrive, it is
    skipped with a warning, acknowledged like the rest, and what follows still shows."""
    rt, console = console_city
    good = {"alert_id": "0" * 16, "seq": 1, "rule_id": "gas.leak", "sensor_id": CONSOLE_GAS,
            "kind": "gas_household", "category": "gas", "severity": "yellow", "level": "III",
            "fiware_severity": "medium", "state": "firing", "tier": "street",
            "target": "510104020", "district": "510104", "district_name": "锦江区",
            "street": "510104020", "street_name": "春熙路街道", "title": "【黄色预警】测试",
            "summary": "测试", "started_at": "2026-07-01T14:03:00+08:00",
            "ts": "2026-07-01T14:03:00+08:00"}
    for bad in (b"not json", b"[1, 2]", dumps({"alert_id": "1" * 16}),
                dumps(dict(good, alert_id="2" * 16, ts="yesterday")),
                dumps(dict(good, alert_id="3" * 16, severity="purple"))):
        assert publish(mosquitto.url, "cityops/alerts/street/510104020", bad) == 0
    assert publish(mosquitto.url, "cityops/receipts", dumps({"alert_id": "4" * 16})) == 0
    assert publish(mosquitto.url, "cityops/alerts/street/510104020", dumps(good)) == 0
    page = login(browser, console, "chunxi")
    wait_until(lambda: api(page, f"/api/incidents/{'0' * 16}")[0] == 200, 10,
               "the good notice after the bad ones")
    assert {i["alert_id"] for i in api(page, "/api/incidents")[1]["incidents"]} == {"0" * 16}
    assert console.proc.poll() is None
    assert console.log().count("skipped") == 6, console.log()
