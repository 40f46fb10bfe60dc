"""The public contracts: what a gateway sends, what a tier topic carries, what an acknowledgement is.

These pydantic models are the documented wire formats (ARCHITECTURE.md, "Public contracts"). The
engine's hot path decodes readings with an equivalent msgspec decoder (``pipeline.core.wire``) because
per-reading pydantic validation alone would cost more than the whole rule evaluation; a property
test keeps the two in agreement.
"""

from __future__ import annotations

import math
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

import msgspec
from pydantic import (AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, field_validator,
                      model_serializer, model_validator)

from rules.vocabulary import SEVERITIES, Category, Severity  # noqa: F401 (the contracts name them)

SENSOR_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}\Z"   # what the registry admits
MAX_TS_MS = 253_402_300_799_999                     # 9999-12-31T23:59:59.999Z
# Any 1-128 character id is well-formed; whether it names a sensor is the registry's word
# (its ids match SENSOR_ID_PATTERN), and an id it does not know is an `unknown_sensor`.
SensorId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
_RFC3339 = msgspec.json.Decoder(Annotated[datetime, msgspec.Meta(tz=True)])


class State(str, Enum):
    firing = "firing"
    escalated = "escalated"
    acknowledged = "acknowledged"
    resolved = "resolved"
    reminder = "reminder"
    # 快速处置: the handling states after acknowledgement (pipeline/core/handling.py)
    dispatched = "dispatched"
    on_site = "on_site"
    handled = "handled"
    closed = "closed"


class Tier(str, Enum):
    """Who a notice is for. `grid` is the push to the on-call grid worker of the place;
    `owner` the push to the sensor's responsible party (registry `owners:`), where a route
    names it (`notify: [owner]`); `community` the community's 联勤联动站, where a route names it."""

    city = "city"
    district = "district"
    street = "street"
    dept = "dept"
    grid = "grid"
    owner = "owner"
    community = "community"


# What an acknowledgement may say (Ack.state): the states a person moves an incident to.
HandlingState = Literal["acknowledged", "dispatched", "on_site", "handled", "closed"]


class Reading(BaseModel):
    """One sensor reading, as a gateway publishes it (a JSON object, or an array of them).

    Strict JSON types: a number is a number (``"27.5"`` is refused), ``ts`` is an RFC 3339
    string with an offset (parsed by the same parser as the hot path) or epoch milliseconds.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    sensor_id: SensorId
    ts: AwareDatetime | Annotated[int, Field(ge=0, le=MAX_TS_MS)] = Field(
        description="event time: RFC 3339 with offset, or epoch milliseconds")
    value: float | None = Field(default=None, description="a measurement (NaN and infinities refused)")
    event: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None, description="a discrete event such as no_helmet, instead of value")
    unit: str | None = None
    seq: int | None = None
    battery: Annotated[float, Field(ge=0, le=100)] | None = None
    gateway_id: str | None = None

    @field_validator("ts", mode="before")
    @classmethod
    def _rfc3339(cls, v: object) -> object:
        if isinstance(v, str):
            try:
                return _RFC3339.decode(msgspec.json.encode(v))
            except msgspec.ValidationError as exc:
                raise ValueError(f"ts must be RFC 3339 with an offset: {exc}") from None
        return v

    @model_validator(mode="after")
    def _one_of_value_or_event(self) -> Reading:
        if (self.value is None) == (self.event is None):
            raise ValueError("a reading carries exactly one of `value` or `event`")
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError("`value` must be a finite number")
        if not isinstance(self.ts, int) and not 0 <= self.ts_ms <= MAX_TS_MS:
            raise ValueError("ts is before 1970 or after 9999")
        return self

    @property
    def ts_ms(self) -> int:
        ts = self.ts
        return ts if isinstance(ts, int) else int(ts.timestamp() * 1000)


class AlertNotice(BaseModel):
    """What every tier topic and push carries. Idempotent by (alert_id, state, seq)."""

    model_config = ConfigDict(extra="forbid")

    alert_id: str = Field(description="stable for the whole incident")
    seq: int = Field(description="state-change number within the incident, from 1")
    rule_id: str
    sensor_id: str = Field(description="the sensor, or the first member of a group incident")
    kind: str = Field(description="sensor kind, or `gateway` / `building` / ... for group incidents")
    category: Category
    severity: Severity
    level: str = Field(description="IV..I, the official level of the severity")
    fiware_severity: str
    state: State
    previous_state: State | None = None
    tier: Tier
    target: str = Field(description="district or street code, department id, worker id; `city`")
    district: str
    district_name: str
    street: str
    street_name: str
    community: str | None = None
    community_name: str | None = None
    grid: str | None = None
    grid_name: str | None = None
    address: str | None = None
    lat: float | None = None
    lon: float | None = None
    value: float | None = None
    threshold: float | None = None
    unit: str | None = None
    event: str | None = None
    started_at: datetime
    ts: datetime
    title: str
    summary: str
    group: str | None = Field(default=None, description="gateway id or place key of a group incident")
    members: list[str] | None = None
    flapping: bool = False
    escalation: int = Field(default=0, description="how many times it has climbed a tier")
    worker_id: str | None = None
    worker_name: str | None = None
    acked_by: str | None = None
    acked_tier: Tier | None = None
    ack_url: str | None = Field(default=None, description="pushes: the recipient's acknowledge "
                                "link (a signed token; GET shows a confirmation, POST acknowledges)")
    ack_token: str | None = Field(default=None, description="pushes: the same token, for an app "
                                  "to publish on {prefix}/push/{worker_id}/ack")
    # handling notices only (dispatched, on_site, handled, closed): absent from the others
    state_by: str | None = Field(default=None, description="who moved the incident to `state`")
    state_tier: Tier | None = None
    dispatched_to: str | None = Field(default=None, description="dispatched: the worker, team "
                                      "or department sent")
    note: str | None = Field(default=None, description="handled: what was done; closed: the "
                             "reason, when the sensor had not resolved")
    timeline: dict[str, datetime] | None = Field(default=None, description="closed: when it "
                                                 "fired, was acknowledged, on site, handled, "
                                                 "resolved and closed (those that happened)")
    silenced: str | None = Field(default=None, description="the silence muting the incident when "
                                 "this notice went out (a resolve or acknowledgement still goes "
                                 "to every tier told)")


class AckRequest(BaseModel):
    """What a person sends to acknowledge (on `{prefix}/acks/{user}` or `POST /acks`). Who
    sends it is the login's: `by` and `tier`, when given, must be the sender's own."""

    model_config = ConfigDict(extra="forbid")

    alert_id: str
    ts: AwareDatetime | Annotated[int, Field(ge=0, le=MAX_TS_MS)]    # as an Ack's
    note: str | None = Field(default=None, max_length=500)
    by: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    tier: Tier | None = None
    state: HandlingState | None = Field(default=None, description="the handling state it moves "
                                        "the incident to; none: acknowledged")
    to: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None, description="dispatched: to whom (a worker, a team, a department)")


class Ack(BaseModel):
    """An acknowledgement as the pipeline applies it: somebody at a tier has taken the incident
    in hand. Made by cityops from an authenticated sender (`by` is the login, `tier` its
    scope's) or from a push link (`seq`: the link's notice)."""

    model_config = ConfigDict(extra="forbid")

    alert_id: str
    by: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    tier: Tier
    ts: AwareDatetime | Annotated[int, Field(ge=0, le=MAX_TS_MS)]
    note: str | None = Field(default=None, max_length=500)
    seq: int | None = Field(default=None, ge=1, description="a push link's acknowledgement: the "
                            "seq of the notice it came with; good only while that firing lasts")
    state: HandlingState | None = Field(default=None, description="the handling state it moves "
                                        "the incident to; none: acknowledged")
    to: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None, description="dispatched: to whom (a worker, a team, a department)")

    @property
    def ts_ms(self) -> int:
        ts = self.ts
        return ts if isinstance(ts, int) else int(ts.timestamp() * 1000)

    @model_serializer(mode="wrap")
    def _without_unset_handling(self, handler: Any) -> dict:
        # a plain acknowledgement is written as before the handling states (journals, dead
        # letters and Kafka records stay byte for byte what older readers know)
        d = handler(self)
        for k in ("state", "to"):
            if d.get(k) is None:
                d.pop(k, None)
        return d


class DeadLetter(BaseModel):
    """Input the pipeline could not use: the reason, the original bytes, where it came from."""

    reason: Literal["malformed", "invalid", "oversize", "unknown_sensor", "wrong_sender", "wrong_kind",
                    "not_finite", "future", "too_old", "stale", "bad_ack", "forbidden",
                    "undeliverable", "poison", "wrong_topic", "bad_silence"]
    detail: str
    payload: str = Field(description="the original bytes as UTF-8 text (or base64 if not UTF-8); "
                         "for an element of a gateway array, that element's bytes only")
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    index: int | None = Field(default=None, description="position in a gateway array, if any")
    payload_digest: str | None = Field(default=None, description="blake2b-128 (hex) of the whole "
                                       "gateway array, when `payload` is one of its elements")
    source: str | None = Field(default=None, description="topic or file it came from")
