"""Signed acknowledgement tokens: the link in a push acknowledges one firing of one alert, for
one tier, as one recipient, until it expires — and nothing else.

    token  = b64url(claims) "." b64url(HMAC-SHA256(secret, "cityops-ack-v1\\n" + claims))
    claims = alert_id "\\n" tier "\\n" recipient id "\\n" seq "\\n" expiry (epoch seconds)

`seq` is the notice's the link came with: the engine refuses it once the incident has resolved
and fired again (a flapping alert keeps its alert_id), so a link from the first firing cannot
acknowledge the second.

The claims are readable (the recipient sees them in the push anyway) and cannot be changed
without the secret. Nothing is stored on the server: any process holding the secret can check a
token, and a restart forgets none. The MAC is checked, in constant time, before a claim is read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.models import Ack, DeadLetter, HandlingState, Tier
from pipeline.core.wire import ack_refusal, dead_letter

_DOMAIN = b"cityops-ack-v1\n"       # a key used elsewhere can never make a valid token
MAX_TOKEN = 1024
_TIERS = frozenset(t.value for t in Tier)
REASONS = ("malformed", "forged", "expired", "wrong_worker")


class BadToken(ValueError):
    """A token that acknowledges nothing; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AckClaim:
    alert_id: str
    tier: str
    worker_id: str
    seq: int
    expires_s: int

    def ack(self, now_ms: int, note: str, state: str | None = None, to: str | None = None) -> Ack:
        """The acknowledgement the claim stands for, made now (``state``: a handling state,
        on_site or handled, from the recipient's reply)."""
        return Ack(alert_id=self.alert_id, by=self.worker_id, tier=Tier(self.tier), ts=now_ms,
                   note=note, seq=self.seq, state=state, to=to)


REPLY_NOTE = "reply to the push"


class PushReply(BaseModel):
    """A reply that says more than the bare token: a handling state from the worker's app,
    `{"token": …, "state": "on_site"}`, `{"token": …, "state": "handled", "note": "已关阀"}`."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=MAX_TOKEN)
    state: HandlingState | None = None
    note: str | None = Field(default=None, max_length=500)
    to: str | None = Field(default=None, min_length=1, max_length=64)


def read_reply(payload: bytes) -> PushReply:
    """A push reply: the token alone (it acknowledges), or a PushReply object."""
    text = payload.decode("utf-8", "replace").strip()
    if not text.startswith("{"):
        return PushReply(token=text[:MAX_TOKEN + 1])
    try:
        return PushReply.model_validate_json(payload)
    except ValidationError as exc:
        raise BadToken("malformed", "a reply is the token, or {\"token\", \"state\", \"note\"} "
                       f"with state one of acknowledged, dispatched, on_site, handled, closed: "
                       f"{ack_refusal(exc)}") from None


def reply_worker(topic: str, prefix: str) -> str:
    """Whose reply a message on `{prefix}/push/{worker_id}/ack` is (the broker's ACL lets a
    worker publish only on its own)."""
    return topic[len(f"{prefix}/push/"):].removesuffix("/ack")


def claimed_tier(token: str) -> str | None:
    """The tier a token says it is for, unchecked: for display only (`cityops tail`)."""
    try:
        parts = _unb64(token.strip().split(".")[0]).decode("utf-8").split("\n")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return parts[1] if len(parts) == 5 and parts[1] in _TIERS else None


def refused(exc: BadToken, payload: bytes, source: str) -> DeadLetter:
    """A reply whose token acknowledges nothing, as the dead letter that says why."""
    return dead_letter("bad_ack", f"acknowledge token refused ({exc.reason}): {exc}", payload,
                       source=source)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AckTokens:
    def __init__(self, secret: bytes, ttl_ms: int) -> None:
        self._key = secret
        self.ttl_ms = ttl_ms

    def _mac(self, claims: bytes) -> bytes:
        return hmac.new(self._key, _DOMAIN + claims, hashlib.sha256).digest()

    def issue(self, alert_id: str, tier: str, worker_id: str, seq: int, now_ms: int) -> str:
        expires = (now_ms + self.ttl_ms) // 1000
        claims = f"{alert_id}\n{tier}\n{worker_id}\n{seq}\n{expires}".encode()
        return f"{_b64(claims)}.{_b64(self._mac(claims))}"

    def verify(self, token: str, now_ms: int, worker_id: str | None = None) -> AckClaim:
        """The claim a token makes, or BadToken. ``worker_id``: the token must be that
        recipient's (an MQTT reply comes on the worker's own topic)."""
        token = token.strip()
        if not token or len(token) > MAX_TOKEN or token.count(".") != 1:
            raise BadToken("malformed", "not an acknowledgement token")
        body, sig = token.split(".")
        try:
            claims, mac = _unb64(body), _unb64(sig)
        except (binascii.Error, ValueError):
            raise BadToken("malformed", "not an acknowledgement token") from None
        if not hmac.compare_digest(mac, self._mac(claims)):
            raise BadToken("forged", "the token's signature does not match")
        parts = claims.decode("utf-8", "replace").split("\n")
        if len(parts) != 5 or parts[1] not in _TIERS or not (parts[3] + parts[4]).isdigit() \
                or not parts[3]:
            raise BadToken("malformed", "the token's claims are not readable")
        claim = AckClaim(parts[0], parts[1], parts[2], int(parts[3]), int(parts[4]))
        if now_ms // 1000 > claim.expires_s:
            raise BadToken("expired", "the acknowledge link has expired")
        if worker_id is not None and worker_id != claim.worker_id:
            raise BadToken("wrong_worker", f"the token is not {worker_id}'s")
        return claim
