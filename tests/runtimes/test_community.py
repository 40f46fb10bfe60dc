"""五级应用 and 快速处置, end to end: `cityops run` on a real Mosquitto.

The community tier (社区): a blue waterlogging alert reaches the community and the grid worker,
not the street (a route of tests/rules/routing/community.yaml). A gas alarm at a resident living
alone climbs grid → community → street while nobody is on site, though the worker acknowledged
(`escalate_until: on_site`). A worker's push reply marks on_site, then handled. Closing is for
the tier that owns the incident, within the closer's scope. The handling states survive kill -9:
after a restart the incident goes on from where it was, and its closed notice's timeline has
every step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from bench.harness.brokers import Mosquitto, Subscriber, publish
from pipeline.core.models import AlertNotice, DeadLetter
from pipeline.core.registry import load as load_registry
from tests.support import Runtime, now_ms, rt_users, settle

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
COMMUNITY_ROUTING = ROOT / "tests" / "rules" / "routing" / "community.yaml"
COMMUNITY, OTHER_COMMUNITY, STREET = "510104020001", "510104020002", "510104020"
GAS_ALONE, GAS = "gas-510104-000001", "gas-510104-000002"      # grid 510104020001001
WATER = "wl-510104-000001"                                      # the same grid
FILTERS = ("cityops/alerts/#", "cityops/push/+", "cityops/deadletter")
USERS = {"hp-community": {"scope": "community", "code": COMMUNITY},
         "other-community": {"scope": "community", "code": OTHER_COMMUNITY},
         "duty-510104": {"scope": "district", "code": "510104"}}
SECRET = "ack-secret-for-the-community-tests-0123456789"
GRID = "510104020001001"                # 和平社区第1微网格: 张敏 08:00-20:00, 罗川 the night


@pytest.fixture
def worker() -> str:
    """The grid worker on call now, Beijing time (the runtime pushes to whom its clock says)."""
    return load_registry().on_call(GRID, "510104020", now_ms()).id


def notices(msgs: list[tuple[str, bytes]], topic_part: str = "") -> list[dict]:
    out = [json.loads(p) for t, p in msgs
           if (t.startswith("cityops/alerts/") or t.startswith("cityops/push/")) and topic_part in t]
    for n in out:
        AlertNotice.model_validate(n)                  # the public contract, new fields too
    return out


def dead(msgs: list[tuple[str, bytes]]) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(p) for t, p in msgs if t == "cityops/deadletter"]


def told(state: str, topic_part: str = "") -> Callable[[list], list[dict]]:
    return lambda m: [n for n in notices(m, topic_part) if n["state"] == state]


def send(broker: Mosquitto, user: str, body: dict) -> None:
    """What a user's app or console publishes: on the acks topic of its own login."""
    assert publish(broker.url, f"cityops/acks/{user}", json.dumps(body, ensure_ascii=False)) == 0


def send_reading(broker: Mosquitto, sensor: str, value: float, ago_ms: int = 0) -> None:
    body = json.dumps({"sensor_id": sensor, "ts": now_ms() - ago_ms, "value": value})
    assert publish(broker.url, f"cityops/readings/{sensor}", body) == 0


def users(tmp_path: Path) -> dict[str, str]:
    return {"CITYOPS_ACKS__USERS": str(rt_users(tmp_path, USERS))}


def blue_water(broker: Mosquitto, sub: Subscriber) -> dict:
    """18 cm for 2.5 min (the rule's `for: 2m`): a blue alert; its community copy."""
    send_reading(broker, WATER, 18.0, ago_ms=150_000)
    send_reading(broker, WATER, 18.0)
    got = sub.wait_for(lambda m: told("firing", "/community/")(m) and told("firing", "/push/")(m))
    [n] = told("firing", "/community/")(got)
    return n


def test_a_blue_waterlogging_alert_reaches_the_community_not_the_street(worker: str,
        mosquitto: Mosquitto, runtime) -> None:
    runtime(mosquitto.url, "community", args=["--routing", str(COMMUNITY_ROUTING)])
    with Subscriber(mosquitto.url, *FILTERS) as sub:
        n = blue_water(mosquitto, sub)
        msgs = settle(sub)
    assert (n["tier"], n["target"], n["severity"]) == ("community", COMMUNITY, "blue")
    assert n["community_name"] == "和平社区" and "道路积水" in n["title"]
    fired = told("firing")(msgs)
    assert {x["tier"] for x in fired} == {"community", "grid"}
    assert [x["worker_id"] for x in fired if x["tier"] == "grid"] == [worker]
    assert not [t for t, _ in msgs if t.startswith("cityops/alerts/street/")], \
        "the street is not told a blue waterlogging alert on this route"


def test_a_gas_alarm_climbs_grid_community_street_while_nobody_is_on_site(worker: str,
        mosquitto: Mosquitto, runtime, tmp_path: Path) -> None:
    tree = yaml.safe_load(COMMUNITY_ROUTING.read_text(encoding="utf-8"))
    route = tree["routes"][0]
    assert route["name"] == "gas-alone-to-the-door"
    route.update(escalate_after={"grid": "2s", "community": "2s", "street": "1h", "district": "1h"},
                 remind_every="1h")
    fast = tmp_path / "routing.yaml"
    fast.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    runtime(mosquitto.url, "climb", args=["--routing", str(fast)])
    with Subscriber(mosquitto.url, *FILTERS) as sub:
        send_reading(mosquitto, GAS_ALONE, 27.5)
        got = sub.wait_for(lambda m: told("firing", "/push/")(m))
        [fired] = told("firing", "/push/")(got)
        aid = fired["alert_id"]
        assert (fired["severity"], fired["worker_id"]) == ("orange", worker)
        send(mosquitto, worker, {"alert_id": aid, "ts": now_ms()})      # acknowledged, not there
        sub.wait_for(lambda m: told("acknowledged", "/push/")(m))
        got = sub.wait_for(lambda m: told("escalated", f"/street/{STREET}")(m), timeout=20)
        # the community hears both climbs (its own, then the street's); the street the second
        to_community, to_street = told("escalated", f"/community/{COMMUNITY}")(got)
        assert told("escalated", f"/street/{STREET}")(got) == [{**to_street, "tier": "street",
                                                                 "target": STREET}]
        assert (to_community["escalation"], to_street["escalation"]) == (1, 2)
        assert "无人到场，已升级至社区" in to_community["summary"]
        assert "无人到场，已升级至街镇" in to_street["summary"]
        assert not [t for t, _ in got if t.startswith("cityops/alerts/district/")]

        send(mosquitto, worker, {"alert_id": aid, "ts": now_ms(), "state": "on_site"})
        got = sub.wait_for(lambda m: {n["tier"] for n in told("on_site")(m)} ==
                           {"grid", "dept", "community", "street"})
    on_site = told("on_site")(got)
    assert all(n["state_by"] == worker and n["state_tier"] == "grid" and
               n["previous_state"] == "escalated" and "·已到场" in n["title"] for n in on_site)


def test_a_workers_push_reply_marks_on_site_then_handled(worker: str, mosquitto: Mosquitto, runtime) -> None:
    runtime(mosquitto.url, "reply", env={"CITYOPS_PUSH__ENABLED": "true",
                                         "CITYOPS_PUSH__SECRET": SECRET})
    with Subscriber(mosquitto.url, *FILTERS) as sub:
        send_reading(mosquitto, GAS, 27.5)
        got = sub.wait_for(lambda m: told("firing", f"/push/{worker}")(m))
        [push] = told("firing", f"/push/{worker}")(got)
        token, aid = push["ack_token"], push["alert_id"]
        reply = f"cityops/push/{worker}/ack"

        assert publish(mosquitto.url, reply, json.dumps({"token": token, "state": "on_site"})) == 0
        got = sub.wait_for(lambda m: told("on_site", "/street/")(m))
        assert publish(mosquitto.url, reply, json.dumps(
            {"token": token, "state": "handled", "note": "已关阀、已通知燃气公司"},
            ensure_ascii=False)) == 0
        got = sub.wait_for(lambda m: told("handled", "/street/")(m))
        assert publish(mosquitto.url, reply, json.dumps({"token": token, "state": "arrived"})) == 0
        got = sub.wait_for(lambda m: dead(m))
    [on_site] = told("on_site", "/street/")(got)
    [handled] = told("handled", "/street/")(got)
    for n in (on_site, handled):
        assert (n["alert_id"], n["state_by"], n["state_tier"]) == (aid, worker, "grid")
        assert n["acked_by"] == worker            # on site acknowledges too: one notice, not two
    assert handled["previous_state"] == "on_site" and handled["note"] == "已关阀、已通知燃气公司"
    assert "已处置：已关阀、已通知燃气公司" in handled["summary"]
    assert not told("acknowledged")(got)
    [bad] = dead(got)
    assert bad.reason == "bad_ack" and "state one of" in bad.detail


def test_closing_needs_the_owning_tiers_scope(worker: str, mosquitto: Mosquitto, runtime,
                                             tmp_path: Path) -> None:
    runtime(mosquitto.url, "close", args=["--routing", str(COMMUNITY_ROUTING)],
            env=users(tmp_path))
    with Subscriber(mosquitto.url, *FILTERS) as sub:
        aid = blue_water(mosquitto, sub)["alert_id"]          # community + grid: the community's
        reason = {"alert_id": aid, "state": "closed", "note": "传感器故障，已报修"}
        send(mosquitto, worker, {**reason, "ts": now_ms()})                    # not the grid
        send(mosquitto, "other-community", {**reason, "ts": now_ms()})       # not another's
        send(mosquitto, "hp-community", {"alert_id": aid, "state": "closed", "ts": now_ms()})
        got = sub.wait_for(lambda m: len(dead(m)) == 3)
        assert not told("closed")(settle(sub))
        refused = dead(got)
        send(mosquitto, "hp-community", {**reason, "ts": now_ms()})
        got = sub.wait_for(lambda m: {n["tier"] for n in told("closed")(m)} == {"community", "grid"})
    assert [d.reason for d in refused] == ["forbidden", "forbidden", "bad_ack"]
    assert "the tier that owns the incident, community" in refused[0].detail
    assert f"answers for community {OTHER_COMMUNITY}" in refused[1].detail
    assert "has not resolved" in refused[2].detail
    closed = told("closed")(got)
    assert all(n["state_by"] == "hp-community" and n["state_tier"] == "community" and
               n["note"] == "传感器故障，已报修" and set(n["timeline"]) == {"fired", "acknowledged", "closed"}
               for n in closed)


def test_handling_states_survive_kill_9(worker: str, mosquitto: Mosquitto, runtime, tmp_path: Path) -> None:
    rt: Runtime = runtime(mosquitto.url, "kill9", env=users(tmp_path))
    with Subscriber(mosquitto.url, *FILTERS) as sub:
        send_reading(mosquitto, GAS, 27.5)                  # yellow: street, grid, district
        got = sub.wait_for(lambda m: told("firing", "/district/")(m))
        aid = told("firing", "/district/")(got)[0]["alert_id"]
        send(mosquitto, worker, {"alert_id": aid, "ts": now_ms(), "state": "on_site"})
        sub.wait_for(lambda m: told("on_site", "/district/")(m))

        rt.kill()
        rt.start()
        send(mosquitto, worker, {"alert_id": aid, "ts": now_ms(), "state": "handled",
                                 "note": "已关阀"})
        got = sub.wait_for(lambda m: told("handled", "/district/")(m))
        [handled] = told("handled", "/district/")(got)
        assert handled["previous_state"] == "on_site", "the on_site state survived the kill"
        # the district owns it (told at once, yellow): it closes it, with the reason
        send(mosquitto, "duty-510104", {"alert_id": aid, "ts": now_ms(), "state": "closed",
                                        "note": "燃气公司已修复管道"})
        got = sub.wait_for(lambda m: told("closed", "/district/")(m))
    [closed] = told("closed", "/district/")(got)
    assert list(closed["timeline"]) == ["fired", "acknowledged", "on_site", "handled", "closed"]
    assert closed["seq"] == handled["seq"] + 1
    metrics = rt.metrics()
    key = ('cityops_time_to_close_seconds_count{category="gas",district="510104",step="closed",'
           f'street="{STREET}",tier="district"}}')           # labels sorted by name
    assert metrics[key] == 1, sorted(k for k in metrics if "close" in k)
