"""Who may acknowledge what (pipeline/core/identity.py), on the Chengdu fixture: the roster's scopes,
the users file checked at load (file:line), bearer tokens, and the engine refusing an ack
outside its sender's scope as `forbidden`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.core.engine import Engine
from pipeline.core.identity import AckUsers
from pipeline.core.models import Ack, AckRequest, Tier
from pipeline.core.registry import load as load_registry
from rules.compiler import load_rules
from rules.yamlfile import ConfigError

TS = 1_782_885_780_000
RULES = load_rules()
REGISTRY = load_registry(None, RULES.kinds)
TOKEN = "a-long-random-token-for-the-district-desk"
USERS = f"""\
users:
  duty-510104: {{scope: district, code: "510104", token_sha256: {hashlib.sha256(TOKEN.encode()).hexdigest()}}}
  gas-centre: {{scope: dept, code: gas}}
  city-duty: {{scope: city}}
  chunxi: {{scope: street, code: ["510104020", "510104021"]}}
"""


@pytest.fixture
def users(tmp_path: Path) -> AckUsers:
    path = tmp_path / "users.yaml"
    path.write_text(USERS)
    return AckUsers(REGISTRY, path)


def place(sensor: str):
    return REGISTRY.place_of(REGISTRY.index[sensor])


def test_grid_workers_answer_for_their_grids_their_backups_and_as_duty_officer(
        users: AckUsers) -> None:
    jinjiang, qingyang = place("gas-510104-000001"), place("gas-510105-000001")
    w1 = Ack(alert_id="a", by="w-510104020001-01", tier=Tier.grid, ts=TS)
    assert users.may_ack(w1, jinjiang, "gas") is None
    assert "answers for grid" in users.may_ack(w1, qingyang, "gas")
    # the street's duty officer is pushed for the whole street (no grids of their own)
    officer = Ack(alert_id="a", by="w-510104020-duty", tier=Tier.grid, ts=TS)
    assert users.may_ack(officer, jinjiang, "gas") is None
    assert users.may_ack(officer, qingyang, "gas") is not None


def test_roster_scopes_are_made_when_asked_and_are_the_roster_s(users: AckUsers) -> None:
    """A worker process holds the scopes of the grid workers who acknowledge through it, not
    one per grid worker of the city; each, when asked, is its grids, its backups' grids and
    the streets it is duty officer of."""
    from pipeline.core.identity import Scope
    assert not any(w in dict.keys(users.scopes) for w in REGISTRY.workers)   # none made yet
    for w in REGISTRY.workers.values():
        grids = set(w.grids).union(*(x.grids for x in REGISTRY.workers.values() if x.backup == w.id))
        streets = {s for s, officer in REGISTRY.duty_officer.items() if officer == w.id}
        assert w.id in users.scopes
        assert users.scopes[w.id] == users.scopes.get(w.id) == Scope(Tier.grid, frozenset(grids),
                                                                      frozenset(streets))
    assert "nobody" not in users.scopes and users.scopes.get("nobody") is None
    with pytest.raises(KeyError):
        users.scopes["nobody"]


def test_users_of_the_file_answer_for_their_district_street_department_or_city(
        users: AckUsers) -> None:
    jinjiang, qingyang = place("gas-510104-000001"), place("gas-510105-000001")

    def may(by: str, tier: Tier, where, category: str = "gas") -> bool:
        return users.may_ack(Ack(alert_id="a", by=by, tier=tier, ts=TS), where, category) is None

    assert may("duty-510104", Tier.district, jinjiang) and not may("duty-510104", Tier.district,
                                                                   qingyang)
    assert not may("duty-510104", Tier.city, jinjiang)          # its tier only
    assert may("gas-centre", Tier.dept, qingyang) and not may("gas-centre", Tier.dept, jinjiang,
                                                              "waterlogging")
    assert may("city-duty", Tier.city, qingyang)
    assert may("chunxi", Tier.street, jinjiang) and not may("chunxi", Tier.street, qingyang)
    assert not may("nobody", Tier.city, jinjiang)


def test_a_request_becomes_the_senders_ack_or_is_refused(users: AckUsers) -> None:
    ack = users.ack("duty-510104", AckRequest(alert_id="a", ts=TS))
    assert (ack.by, ack.tier, ack.seq) == ("duty-510104", Tier.district, None)
    for request, why in ((AckRequest(alert_id="a", ts=TS, by="city-duty"), "says by"),
                         (AckRequest(alert_id="a", ts=TS, tier=Tier.city), "not city")):
        with pytest.raises(ValueError, match=why):
            users.ack("duty-510104", request)
    with pytest.raises(ValueError, match="may not acknowledge"):
        users.ack("gw-510104-0001", AckRequest(alert_id="a", ts=TS))


def test_bearer_tokens_name_their_user(users: AckUsers) -> None:
    assert users.bearer(f"Bearer {TOKEN}") == "duty-510104"
    assert users.bearer(f"bearer {TOKEN}") == "duty-510104"
    for bad in (None, "", TOKEN, f"Basic {TOKEN}", "Bearer ", f"Bearer {TOKEN}x"):
        assert users.bearer(bad) is None, bad


@pytest.mark.parametrize(("text", "line", "message"), [
    ("users:\n  a/b: {scope: city}\n", 2, "letters, digits"),
    ("users:\n  x: {scope: district, code: '999999'}\n", 2, "not in the registry"),
    ("users:\n  x: {scope: street}\n", 2, "needs `code:`"),
    ("users:\n  x: {scope: city, code: '510104'}\n", 2, "no `code`"),
    ("users:\n  x: {code: '510104'}\n", 2, "set `scope:`"),
    ("users:\n  x:\n    scope: mayor\n", 3, "scope"),
    ("users:\n  x: {scope: city, token_sha256: abc}\n", 2, "token_sha256"),
    ("users:\n  x: {scope: city, tokn: abc}\n", 2, "unknown field"),
    ("- just a list\n", 1, "(top)"),
])
def test_a_wrong_users_file_stops_the_start_with_file_and_line(tmp_path: Path, text: str,
                                                               line: int, message: str) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        AckUsers(REGISTRY, path)
    assert e.value.line == line and message in e.value.message, str(e.value)


def test_the_engine_refuses_an_ack_outside_its_senders_scope(users: AckUsers) -> None:
    engine = Engine(REGISTRY, RULES)
    out = engine.ingest([b'{"sensor_id": "gas-510105-000001", "ts": 1782885780000, "value": 30}'])
    aid = out.notices[0]["alert_id"]
    refused = engine.ack([Ack(alert_id=aid, by="duty-510104", tier=Tier.district, ts=TS)],
                         may_ack=users.may_ack)
    assert [d.reason for d in refused.dead_letters] == ["forbidden"] and not refused.notices
    assert engine.counters["dead.forbidden"] == 1
    taken = engine.ack([Ack(alert_id=aid, by="city-duty", tier=Tier.city, ts=TS)],
                       may_ack=users.may_ack)
    assert not taken.dead_letters and {n["state"] for n in taken.notices} == {"acknowledged"}
