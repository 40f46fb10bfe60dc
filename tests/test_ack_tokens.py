"""Acknowledge tokens (pipeline/ack_tokens.py) and the push configuration that guards them.

A token acknowledges one alert, for one tier, as one recipient, until it expires: one made with
another key, one whose claims or signature were changed, an expired one and one presented for
another worker are refused, each with its reason.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from pipeline.ack_tokens import MAX_TOKEN, AckTokens, BadToken
from pipeline.config import load_settings
from pipeline.yamlfile import ConfigError

SECRET = b"k" * 32
NOW = 1_782_885_780_000                  # 2026-07-01T14:03:00+08:00
HOUR = 3_600_000
AID = "a-7f3c2e9b1d0a"
WORKER = "w-510104020001-01"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def reason(tokens: AckTokens, token: str, now: int = NOW, worker: str | None = None) -> str:
    with pytest.raises(BadToken) as e:
        tokens.verify(token, now, worker)
    return e.value.reason


def test_a_token_names_alert_tier_worker_and_expiry() -> None:
    tokens = AckTokens(SECRET, HOUR)
    token = tokens.issue(AID, "grid", WORKER, NOW)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    c = tokens.verify(token, NOW + HOUR - 1000, WORKER)
    assert (c.alert_id, c.tier, c.worker_id, c.expires_s) == (AID, "grid", WORKER,
                                                                (NOW + HOUR) // 1000)
    assert tokens.verify(token, NOW).worker_id == WORKER     # over HTTP no topic names a worker


def test_forged_tampered_expired_and_someone_elses_tokens_are_refused() -> None:
    tokens = AckTokens(SECRET, HOUR)
    token = tokens.issue(AID, "grid", WORKER, NOW)
    body, sig = token.split(".")

    assert reason(tokens, AckTokens(b"x" * 32, HOUR).issue(AID, "grid", WORKER, NOW)) == "forged"
    other_claims = b64(f"{AID}\ngrid\nw-510104020001-02\n{(NOW + HOUR) // 1000}".encode())
    assert reason(tokens, f"{other_claims}.{sig}") == "forged"           # claims changed
    longer = b64(f"{AID}\ngrid\n{WORKER}\n{(NOW + 365 * 24 * HOUR) // 1000}".encode())
    assert reason(tokens, f"{longer}.{sig}") == "forged"                  # expiry pushed out
    flipped = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    assert reason(tokens, f"{body}.{flipped}") == "forged"                # signature changed
    assert reason(tokens, token, now=NOW + HOUR + 1000) == "expired"
    assert reason(tokens, token, worker="w-510104020001-02") == "wrong_worker"
    for junk in ("", "abc", "a.b.c", "!!!.???", body, "." + sig, "x" * (MAX_TOKEN + 1)):
        assert reason(tokens, junk) in ("malformed", "forged"), junk


def test_signed_claims_that_make_no_sense_are_malformed() -> None:
    """Only the key's holder can sign; even so a token must read as alert/tier/worker/expiry."""
    tokens = AckTokens(SECRET, HOUR)
    for claims in (f"{AID}\nnot-a-tier\n{WORKER}\n9999999999", f"{AID}\ngrid\n{WORKER}",
                   f"{AID}\ngrid\n{WORKER}\nsoon"):
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
