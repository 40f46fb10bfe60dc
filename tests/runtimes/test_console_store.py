"""The console's materialized view (pipeline/runtimes/opscentre/store.py) and its logins, on notices
the real engine makes: idempotent under redelivery, reminders and old copies change nothing,
what a scope sees in SQL is what Scope.covers says, and Kafka positions commit with the data."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from pipeline.core.engine import Engine
from pipeline.core.identity import AckUsers, Scope
from pipeline.core.models import Tier
from pipeline.core.registry import load as load_registry
from pipeline.runtimes.opscentre.auth import check_password, hash_password
from pipeline.runtimes.opscentre.store import Filters, Store
from rules.compiler import load_rules
from rules.yamlfile import ConfigError

T0 = 1782885780000          # 2026-07-01 14:03 +08:00


@pytest.fixture(scope="module")
def made() -> tuple[Engine, list[dict]]:
    """A day of the engine: leaks in two streets and two districts, one acknowledged, one
    resolved, reminders and escalations from the clock."""
    rules = load_rules()
    engine = Engine(load_registry(None, rules.kinds), rules)
    out: list[dict] = []
    readings = [("gas-510104-000002", 28.0), ("gas-510104-000042", 35.0),
                ("gas-510105-000007", 60.0), ("gas-510104-000006", 22.0)]
    out += engine.ingest([orjson.dumps({"sensor_id": s, "ts": T0, "value": v})
                          for s, v in readings]).notices
    first = out[0]["alert_id"]
    out += engine.ack([{"alert_id": first, "by": "w-510104020001-01", "tier": "grid",
                        "ts": T0 + 60_000}]).notices
    out += engine.ingest([orjson.dumps({"sensor_id": "gas-510104-000006", "ts": T0 + 120_000,
                                        "value": 1.0})]).notices
    out += engine.advance(T0 + 3 * 3_600_000).notices
    return engine, out


def store_of(tmp_path: Path, engine: Engine) -> Store:
    depts: dict[str, set[str]] = {}
    for c, d in engine.registry.dept_of_category.items():
        depts.setdefault(d, set()).add(c)
    return Store(tmp_path / "console.sqlite", depts)


def everything(store: Store) -> tuple[list[dict], dict[str, list]]:
    rows, _, _ = store.incidents(Scope(Tier.city), Filters(limit=1000))
    return rows, {r["alert_id"]: store.incident(Scope(Tier.city), r["alert_id"])["timeline"]
                  for r in rows}


def test_redelivered_notices_change_nothing(tmp_path: Path, made) -> None:
    engine, notices = made
    assert {n["state"] for n in notices} >= {"firing", "acknowledged", "resolved", "reminder",
                                             "escalated"}
    once = store_of(tmp_path / "a", engine)
    once.apply([("notice", n) for n in notices])
    twice = store_of(tmp_path / "b", engine)
    twice.apply([("notice", n) for n in notices])
    twice.apply([("notice", n) for n in notices[::-1]])      # again, and out of order
    assert everything(once) == everything(twice)


def test_an_incident_is_what_its_newest_state_change_says(tmp_path: Path, made) -> None:
    engine, notices = made
    store = store_of(tmp_path, engine)
    store.apply([("notice", n) for n in notices])
    rows = {r["alert_id"]: r for r in everything(store)[0]}
    by_alert: dict[str, list[dict]] = {}
    for n in notices:
        by_alert.setdefault(n["alert_id"], []).append(n)
    for aid, ns in by_alert.items():
        last = max((n for n in ns if n["state"] != "reminder"), key=lambda n: n["seq"])
        assert rows[aid]["state"] == last["state"], (aid, [n["state"] for n in ns])
        assert rows[aid]["open"] == (last["state"] != "resolved")
        assert set(rows[aid]["told"]) == {n["tier"] for n in ns}
        told = [e for e in store.incident(Scope(Tier.city), aid)["timeline"] if e["what"] == "notice"]
        assert len(told) == len({(n["seq"], n["state"], n["tier"], n["target"], n["ts"]) for n in ns})
    acked = next(r for r in rows.values() if r["acked_by"])
    assert acked["acked_by"] == "w-510104020001-01" and acked["state"] in ("acknowledged", "resolved")


def test_what_a_scope_sees_is_what_its_scope_covers(tmp_path: Path, made) -> None:
    engine, notices = made
    store = store_of(tmp_path, engine)
    store.apply([("notice", n) for n in notices])
    reg = engine.registry
    users = AckUsers(reg)
    rows = everything(store)[0]
    scopes = [Scope(Tier.city), *(Scope(Tier.district, frozenset([d])) for d in reg.districts),
              *(Scope(Tier.street, frozenset([s])) for s in reg.streets),
              *(Scope(Tier.dept, frozenset([d])) for d in reg.departments),
              *users.scopes.values()]           # every roster worker: grids and duty streets
    shown = 0
    for scope in scopes:
        seen = {r["alert_id"] for r in store.incidents(scope, Filters(limit=1000))[0]}
        place = {r["alert_id"]: reg.grid_places[reg.grid_index[r["grid"]]] for r in rows}
        want = {r["alert_id"] for r in rows
                if scope.covers(place[r["alert_id"]], reg.dept_of_category.get(r["category"]))}
        assert seen == want, scope
        for r in rows:
            assert (store.incident(scope, r["alert_id"]) is not None) == (r["alert_id"] in want)
        shown += len(seen)
    assert shown > len(rows)        # the scopes were not all empty


def test_filters_sorting_and_counts(tmp_path: Path, made) -> None:
    engine, notices = made
    store = store_of(tmp_path, engine)
    store.apply([("notice", n) for n in notices])
    city = Scope(Tier.city)
    rows, total, counts = store.incidents(city, Filters(street="510104020", limit=1000))
    assert rows and total == len(rows) and all(r["street"] == "510104020" for r in rows)
    assert sum(counts["severity"].values()) == total
    red = store.incidents(city, Filters(severity="red"))[0]
    assert red and all(r["severity"] == "red" for r in red)
    ranks = {"blue": 1, "yellow": 2, "orange": 3, "red": 4}
    by_sev = [ranks[r["severity"]] for r in store.incidents(city, Filters(sort="severity"))[0]]
    assert by_sev == sorted(by_sev, reverse=True)
    assert all(r["open"] for r in store.incidents(city, Filters(state="open"))[0])
    assert all(r["state"] == "resolved" for r in store.incidents(city, Filters(state="resolved"))[0])


def test_kafka_positions_commit_with_what_they_applied(tmp_path: Path, made) -> None:
    engine, notices = made
    store = store_of(tmp_path, engine)
    store.apply([("notice", notices[0])], {("cityops.alerts.street", 1): 7})
    assert store.offsets() == {("cityops.alerts.street", 1): 7}
    with pytest.raises(KeyError):                  # a failed batch: neither data nor position
        store.apply([("notice", notices[1]), ("notice", {"alert_id": "x"})],
                    {("cityops.alerts.street", 1): 9})
    assert store.offsets() == {("cityops.alerts.street", 1): 7}
    assert len(everything(store)[0]) == 1


def test_logins_are_argon2_hashes_in_acks_users(tmp_path: Path, made) -> None:
    engine, _ = made
    good = tmp_path / "users.yaml"
    good.write_text(f'users:\n  chunxi: {{scope: street, code: "510104020", '
                    f'password: "{hash_password("s3cret")}"}}\n')
    users = AckUsers(engine.registry, good)
    assert check_password(users, "chunxi", "s3cret")
    assert not check_password(users, "chunxi", "S3cret")
    assert not check_password(users, "nobody", "s3cret")
    plain = tmp_path / "plain.yaml"
    plain.write_text('users:\n  chunxi: {scope: street, code: "510104020", password: s3cret}\n')
    with pytest.raises(ConfigError) as err:
        AckUsers(engine.registry, plain)
    assert "plain.yaml:2" in str(err.value) and "argon2id" in str(err.value)
