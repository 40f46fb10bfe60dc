"""Acknowledge tokens (pipeline/core/ack_tokens.py) and the push configuration that guards them.

A token acknowledges one firing (the seq of its notice) of one alert, for one tier, as one
recipient, until it expires: one made with
another key, one whose claims or signature were changed, an expired one and one presented for
another worker are refused, each with its reason.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from pipeline.core.ack_tokens import MAX_TOKEN, AckTokens, BadToken
from pipeline.shared.config import load_settings
from rules.yamlfile import ConfigError

SECRET = b"k" * 32
NOW = 1_782_885_780_000                  # 2026-07-01T14:03:00+08:00
HOUR = 3_600_000
AID = "a-7f3c2e9b1d0a"
WORKER = "w-510104020001-01"
SEQ = 3


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def reason(tokens: AckTokens, token: str, now: int = NOW, worker: str | None = None) -> str:
    with pytest.raises(BadToken) as e:
        tokens.verify(token, now, worker)
    return e.value.reason


def test_a_token_names_alert_tier_worker_firing_and_expiry() -> None:
    tokens = AckTokens(SECRET, HOUR)
    token = tokens.issue(AID, "grid", WORKER, SEQ, NOW)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    c = tokens.verify(token, NOW + HOUR - 1000, WORKER)
    assert (c.alert_id, c.tier, c.worker_id, c.seq, c.expires_s) == (
        AID, "grid", WORKER, SEQ, (NOW + HOUR) // 1000)
    assert c.ack(NOW, "link").seq == SEQ       # the engine checks it against the firing
    assert tokens.verify(token, NOW).worker_id == WORKER     # over HTTP no topic names a worker


def test_forged_tampered_expired_and_someone_elses_tokens_are_refused() -> None:
    tokens = AckTokens(SECRET, HOUR)
    token = tokens.issue(AID, "grid", WORKER, SEQ, NOW)
    body, sig = token.split(".")

    assert reason(tokens, AckTokens(b"x" * 32, HOUR).issue(AID, "grid", WORKER, SEQ, NOW)) == "forged"
    other_claims = b64(f"{AID}\ngrid\nw-510104020001-02\n{SEQ}\n{(NOW + HOUR) // 1000}".encode())
    assert reason(tokens, f"{other_claims}.{sig}") == "forged"           # claims changed
    longer = b64(f"{AID}\ngrid\n{WORKER}\n{SEQ}\n{(NOW + 365 * 24 * HOUR) // 1000}".encode())
    assert reason(tokens, f"{longer}.{sig}") == "forged"                  # expiry pushed out
    later = b64(f"{AID}\ngrid\n{WORKER}\n{SEQ + 2}\n{(NOW + HOUR) // 1000}".encode())
    assert reason(tokens, f"{later}.{sig}") == "forged"                   # a later firing
    assert reason(tokens, f"{longer}.{sig}") == "forged"                  # expiry pushed out
    flipped = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    assert reason(tokens, f"{body}.{flipped}") == "forged"                # signature changed
    assert reason(tokens, token, now=NOW + HOUR + 1000) == "expired"
    assert reason(tokens, token, worker="w-510104020001-02") == "wrong_worker"
    for junk in ("", "abc", "a.b.c", "!!!.???", body, "." + sig, "x" * (MAX_TOKEN + 1)):
        assert reason(tokens, junk) in ("malformed", "forged"), junk


def test_signed_claims_that_make_no_sense_are_malformed() -> None:
    """Only the key's holder can sign; even so a token must read as alert/tier/worker/seq/expiry
    (a token of the form before seq was bound is one of these)."""
    tokens = AckTokens(SECRET, HOUR)
    for claims in (f"{AID}\nnot-a-tier\n{WORKER}\n1\n9999999999", f"{AID}\ngrid\n{WORKER}",
                   f"{AID}\ngrid\n{WORKER}\n1\nsoon", f"{AID}\ngrid\n{WORKER}\n9999999999",
                   f"{AID}\ngrid\n{WORKER}\n\n9999999999"):
        mac = hmac.new(SECRET, b"cityops-ack-v1\n" + claims.encode(), hashlib.sha256).digest()
        assert reason(tokens, f"{b64(claims.encode())}.{b64(mac)}") == "malformed", claims


def test_push_needs_a_long_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYOPS_PUSH__ENABLED", "true")
    with pytest.raises(ConfigError, match="push.secret"):
        load_settings()
    monkeypatch.setenv("CITYOPS_PUSH__SECRET", "short")
    with pytest.raises(ConfigError, match="32 characters"):
        load_settings()
    monkeypatch.setenv("CITYOPS_PUSH__SECRET", "s" * 32)
    s = load_settings()
    assert s.push.enabled and "s" * 32 not in repr(s)          # a SecretStr: never printed
    monkeypatch.delenv("CITYOPS_PUSH__ENABLED")
    monkeypatch.delenv("CITYOPS_PUSH__SECRET")
    assert not load_settings().push.enabled                      # off by default, no secret needed


@pytest.mark.parametrize(("env", "message"), [
    ({"CITYOPS_PUSH__TIERS": '{"grid": ["webhook"]}'}, "push.webhook needs url and secret"),
    ({"CITYOPS_PUSH__TIERS": '{"grid": ["webhook"]}',
      "CITYOPS_PUSH__WEBHOOK__URL": "http://127.0.0.1:9/hook"}, "push.webhook needs url and secret"),
    ({"CITYOPS_PUSH__TIERS": '{"street": ["mqtt"]}'}, "has its own MQTT topic"),
    ({"CITYOPS_PUSH__TIERS": '{"grid": ["sms"]}'}, "push.sms needs url"),
    ({"CITYOPS_PUSH__TIERS": '{"grid": ["pager"]}'}, "'mqtt', 'webhook', 'wecom'"),
    ({"CITYOPS_PUSH__WECOM__URL": "ftp://robot"}, "http"),
])
def test_push_channels_must_be_configured(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                          message: str) -> None:
    monkeypatch.setenv("CITYOPS_PUSH__ENABLED", "true")
    monkeypatch.setenv("CITYOPS_PUSH__SECRET", "s" * 32)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_a_link_acknowledges_only_the_firing_it_came_with() -> None:
    """gas.leak reopens the same alert_id when it fires again within 30 min of resolving; an
    ack from a link (its seq) of the first firing must not acknowledge the second — also after
    a snapshot and restore."""
    import json

    from pipeline.core.engine import Engine
    from pipeline.core.models import Ack, Tier
    from pipeline.core.registry import load as load_registry
    from rules.compiler import load_rules

    rules = load_rules()
    registry = load_registry(None, rules.kinds)

    def reading(at: int, value: float) -> bytes:
        return json.dumps({"sensor_id": "gas-510104-000004", "ts": at, "value": value}).encode()

    engine = Engine(registry, rules)
    first = engine.ingest([reading(NOW, 30.0)]).notices[0]
    engine.ingest([reading(NOW + 60_000, 2.0)])
    engine.advance(NOW + 4 * 60_000)
    again = engine.ingest([reading(NOW + 5 * 60_000, 30.0)]).notices[0]
    assert again["alert_id"] == first["alert_id"] and again["previous_state"] == "resolved"

    restored = Engine(registry, rules)
    restored.restore(engine.snapshot())
    for e in (engine, restored):
        def link(seq: int) -> Ack:
            return Ack(alert_id=first["alert_id"], by=WORKER, tier=Tier.grid, ts=NOW + 6 * 60_000,
                       seq=seq)
        old = e.ack([link(first["seq"])])
        assert [d.reason for d in old.dead_letters] == ["bad_ack"] and not old.notices
        assert "the alert this link was for is over" in old.dead_letters[0].detail
        ok = e.ack([link(again["seq"])])
        assert not ok.dead_letters and {n["state"] for n in ok.notices} == {"acknowledged"}
