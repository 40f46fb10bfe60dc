"""Who may acknowledge what.

An acknowledgement stops escalation and reminders, so it is taken only from a sender the
pipeline can name, and only within that sender's scope:

    over MQTT   the topic {prefix}/acks/{user}: the broker's ACL lets a login publish only on its
                own (deploy/mosquitto: `pattern write cityops/acks/%u`)
    over HTTP   POST /acks with `Authorization: Bearer <token>`, the user's token
    push link   the signed token of the push (pipeline/core/ack_tokens.py), bound to one recipient
                and one firing of one alert — the only way a sensor's owner (registry
                `owners:`, tier owner) acknowledges: owners have no scope here

A user's scope is a tier and the places (or departments) it answers for:

    registry grid workers   tier grid: the grids they serve, those of the workers they back up,
                            and the streets they are duty officer of (as the router pushes them)
    acks.users file         city; district, street, community or grid codes; department ids

`by` and `tier` of the applied Ack are the sender's (a request naming someone else is refused,
not rewritten: it is a mistake or a forgery either way). Whether the incident lies within the
scope is decided where the incident is known, in the engine (`may_ack`, refusal `forbidden`).

The users file, checked once at start (file:line on every mistake):

    users:
      duty-510104: {scope: district, code: "510104", token_sha256: 9f86d08…}
      chunxi-street: {scope: street, code: ["510104020", "510104021"]}
      gas-centre: {scope: dept, code: gas}
      city-duty: {scope: city, token_sha256: …}
      w-510104020001-01: {token_sha256: …}      # a registry worker: its roster scope, a token
      li-wei: {scope: street, code: "510104020", password: "$argon2id$v=19$…"}   # web console
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.core.models import Ack, AckRequest, DeadLetter, Tier
from pipeline.core.registry import Place, Registry
from pipeline.core.wire import ack_refusal, dead_letter
from rules.yamlfile import load_yaml, pydantic_error

USER_PATTERN = r"^[A-Za-z0-9_.-]{1,64}\Z"     # an MQTT username that is one topic level


class Forbidden(ValueError):
    """An acknowledgement its sender may not make."""


class _UserSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: Literal["city", "district", "street", "community", "dept", "grid"] | None = None
    code: str | list[str] | None = None
    token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                                     description="SHA-256 (hex) of the user's HTTP bearer token")
    password: str | None = Field(default=None, description="the web console's login: an "
                                 "argon2id hash, never the password itself")

    @field_validator("password")
    @classmethod
    def _hashed(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("$argon2id$"):
            raise ValueError("write the password's argon2id hash ($argon2id$…, made by "
                             "`cityops console --hash-password`), never the password itself")
        return v


class _UsersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users: dict[str, _UserSpec]


@dataclass(frozen=True, slots=True)
class Scope:
    """What one user may acknowledge: incidents at these places (or of these departments)."""

    tier: Tier
    codes: frozenset[str] = frozenset()       # grid, street or district codes; department ids
    streets: frozenset[str] = frozenset()     # a grid worker's streets as duty officer

    def covers(self, place: Place | None, dept: str | None) -> bool:
        t = self.tier
        if t is Tier.city:
            return True
        if t is Tier.dept:
            return dept in self.codes
        if place is None:
            return False
        if t is Tier.district:
            return place.district in self.codes
        if t is Tier.street:
            return place.street in self.codes
        if t is Tier.community:
            return place.community in self.codes
        return place.grid in self.codes or place.street in self.streets

    def describe(self) -> str:
        if self.tier is Tier.city:
            return "the city"
        codes = sorted(self.codes) + [f"street {s}" for s in sorted(self.streets)]
        return f"{self.tier.value} {', '.join(codes)}"


class _RosterScopes(dict):
    """Users' scopes: those of the acks.users file, set at start, and the registry's grid
    workers', made when one is first asked for. Grid workers grow with the city (25,261 in the
    synthetic 5,000,000-sensor one); a worker process holds the scopes of those who acknowledge
    through it (and, once one has, who backs up whom), not a scope for each. Grid workers
    answer for the grids the router may push them: their own, those of the workers they back
    up, and as a street's duty officer the whole street."""

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.registry = registry
        self._backs_up: dict[str, list[str]] | None = None    # backup -> whom, on first need

    def __missing__(self, user: str) -> Scope:
        scope = self.get(user)
        if scope is None:
            raise KeyError(user)
        return scope

    def __contains__(self, user: object) -> bool:
        return self.get(user) is not None

    def get(self, user: Any, default: Any = None) -> Any:
        scope = dict.get(self, user)
        if scope is not None:
            return scope
        w = self.registry.workers.get(user) if isinstance(user, str) else None
        if w is None:
            return default
        if self._backs_up is None:
            self._backs_up = {}
            for x in self.registry.workers.values():
                if x.backup:
                    self._backs_up.setdefault(x.backup, []).append(x.id)
        grids = set(w.grids)
        for other in self._backs_up.get(user, ()):
            grids |= set(self.registry.workers[other].grids)
        streets = frozenset(s for s, officer in self.registry.duty_officer.items() if officer == user)
        scope = self[user] = Scope(Tier.grid, frozenset(grids), streets)
        return scope


class AckUsers:
    """The users who may acknowledge, their scopes and HTTP tokens; checked once at start."""

    def __init__(self, registry: Registry, path: Path | None = None) -> None:
        self.registry = registry
        self.scopes = _RosterScopes(registry)
        self._tokens: list[tuple[bytes, str]] = []      # (SHA-256 of the token, user)
        self.passwords: dict[str, str] = {}             # user -> argon2id hash (web console)
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        doc = load_yaml(path)
        try:                       # (a file that is not a mapping fails here too, at line 1)
            spec = _UsersFile.model_validate(doc.data)
        except ValidationError as exc:
            raise pydantic_error(doc, exc) from None
        for user, u in spec.users.items():
            where = ("users", user)
            if not re.match(USER_PATTERN, user):
                raise doc.error(where, f"user {user!r}: letters, digits and _.- only, up to 64 "
                                "(it is an MQTT topic level)")
            if u.scope is None:
                if user not in self.scopes:
                    raise doc.error(where, f"user {user!r}: set `scope:` (only the registry's "
                                    "grid workers have one from the roster)")
            else:
                self.scopes[user] = self._scope(doc, where, user, u)
            if u.token_sha256 is not None:
                self._tokens.append((bytes.fromhex(u.token_sha256), user))
            if u.password is not None:
                self.passwords[user] = u.password

    def _scope(self, doc, where: tuple, user: str, u: _UserSpec) -> Scope:
        tier = Tier(u.scope)
        codes = [u.code] if isinstance(u.code, str) else list(u.code or [])
        if tier is Tier.city:
            if codes:
                raise doc.error(where, f"user {user!r}: a city user has no `code`")
            return Scope(tier)
        if not codes:
            raise doc.error(where, f"user {user!r}: scope {tier.value} needs `code:` (which "
                            f"{'department' if tier is Tier.dept else tier.value})")
        reg = self.registry
        scopes: dict[Tier, Container[str]] = {
            Tier.district: reg.districts, Tier.street: reg.streets, Tier.dept: reg.departments,
            Tier.grid: reg.grid_index, Tier.community: reg.communities}
        known = scopes[tier]
        for code in codes:
            if code not in known:
                raise doc.error(where, f"user {user!r}: {tier.value} {code!r} is not in the registry")
        return Scope(tier, frozenset(codes))

    # ---- who is asking --------------------------------------------------------------------
    def bearer(self, authorization: str | None) -> str | None:
        """The user whose token an `Authorization: Bearer …` header carries, or None. Every
        stored hash is compared, in constant time, whoever matches."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for stored, user in self._tokens:
            if hmac.compare_digest(stored, digest):
                found = user
        return found

    def ack(self, user: str, request: AckRequest) -> Ack:
        """The Ack a user's request stands for; Forbidden if the user may acknowledge nothing,
        or names someone else or another tier."""
        scope = self.scopes.get(user)
        if scope is None:
            raise Forbidden(f"{user!r} may not acknowledge alerts (not a registry worker, not in "
                            "acks.users)")
        if request.by is not None and request.by != user:
            raise Forbidden(f"sent by {user!r} but says by {request.by!r}: an acknowledgement is "
                            "its sender's")
        if request.tier is not None and request.tier is not scope.tier:
            raise Forbidden(f"{user!r} acknowledges for tier {scope.tier.value}, not "
                            f"{request.tier.value}")
        return Ack(alert_id=request.alert_id, by=user, tier=scope.tier, ts=request.ts,
                   note=request.note, state=request.state, to=request.to)

    def from_topic(self, user: str | None, payload: bytes, source: str) -> bytes | DeadLetter:
        """An acknowledgement published on `{prefix}/acks/{user}` (None: the bare acks topic,
        which names nobody) as the Ack to apply, or the dead letter that says why not."""
        if user is None:
            return dead_letter("forbidden", f"an acknowledgement on {source} names no sender: "
                               f"publish it on {source}/<your user>", payload, source=source)
        try:
            request = AckRequest.model_validate_json(payload)
        except ValidationError as exc:
            return dead_letter("bad_ack", ack_refusal(exc), payload, source=source)
        try:
            return self.ack(user, request).model_dump_json(exclude_none=True).encode()
        except Forbidden as exc:
            return dead_letter("forbidden", str(exc), payload, source=source)

    def may_ack(self, ack: Ack, place: Place | None, category: str) -> str | None:
        """Why ``ack`` may not acknowledge an incident at ``place`` of ``category``, or None.
        The engine asks, where the incident is known."""
        scope = self.scopes.get(ack.by)
        if scope is None:
            return f"{ack.by!r} may not acknowledge alerts (not a registry worker, not in acks.users)"
        if ack.tier is not scope.tier:
            return f"{ack.by!r} acknowledges for tier {scope.tier.value}, not {ack.tier.value}"
        if not scope.covers(place, self.registry.dept_of_category.get(category)):
            where = f"{place.district_name}{place.street_name} grid {place.grid}" if place else category
            return (f"{ack.by!r} answers for {scope.describe()}; alert {ack.alert_id} is at "
                    f"{where}")
        return None


def acks_user(topic: str, acks_topic: str) -> str | None:
    """The sender an acknowledgement's topic names: `{prefix}/acks/{user}` → user."""
    if not topic.startswith(acks_topic + "/"):
        return None
    return topic[len(acks_topic) + 1:] or None
