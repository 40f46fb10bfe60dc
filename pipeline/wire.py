"""Where a reading enters: bytes from a gateway become typed readings or dead letters.

One msgspec pass parses and checks the JSON (the contract of ``pipeline.models.Reading``) for a
whole gateway array at once; only when an array holds a bad element do we fall back to looking
at its elements one by one, so one bad reading never costs the good ones around it.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Union

import msgspec

from pipeline.models import DeadLetter

MAX_PAYLOAD_BYTES = 256 * 1024   # a gateway batch of ~1,000 readings; larger is a fault, not data


class WireReading(msgspec.Struct, gc=False):
    """Hot-path twin of models.Reading; ``ts`` is normalised to epoch ms by ``decode``."""

    sensor_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
    ts: Union[Annotated[int, msgspec.Meta(ge=0)], Annotated[datetime, msgspec.Meta(tz=True)]]
    value: Union[float, None] = None
    event: Union[Annotated[str, msgspec.Meta(min_length=1, max_length=64)], None] = None
    unit: Union[str, None] = None
    seq: Union[int, None] = None
    battery: Union[Annotated[float, msgspec.Meta(ge=0, le=100)], None] = None
    gateway_id: Union[str, None] = None


_one = msgspec.json.Decoder(WireReading)
_many = msgspec.json.Decoder(list[WireReading])
_batch = msgspec.json.Decoder(list[Union[list[WireReading], WireReading]])
_any = msgspec.json.Decoder()
_convert = msgspec.convert


def dead_letter(reason: str, detail: str, payload: bytes, index: int | None = None,
                source: str | None = None) -> DeadLetter:
    try:
        text, enc = payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, enc = base64.b64encode(payload).decode("ascii"), "base64"
    return DeadLetter(reason=reason, detail=detail, payload=text, payload_encoding=enc,
                      index=index, source=source)


def _check(r: WireReading) -> str | None:
    """What the JSON schema cannot say; None if the reading is good. Normalises ts to ms."""
    if (r.value is None) == (r.event is None):
        return "a reading carries exactly one of `value` or `event`"
    ts = r.ts
    if ts.__class__ is not int:
        r.ts = int(ts.timestamp() * 1000)
    return None


def decode(payload: bytes, source: str | None = None,
           readings: list | None = None, dead: list | None = None) -> tuple[list, list]:
    """Decode one MQTT/Kafka payload (an object or an array) into readings and dead letters.

    Appends into ``readings`` / ``dead`` when given, so a runtime can decode a whole batch of
    payloads into one list without copying.
    """
    readings = [] if readings is None else readings
    dead = [] if dead is None else dead
    if len(payload) > MAX_PAYLOAD_BYTES:
        dead.append(dead_letter("oversize", f"payload of {len(payload)} bytes is over the "
                                f"{MAX_PAYLOAD_BYTES}-byte limit; split the gateway batch",
                                payload[:4096], source=source))
        return readings, dead
    head = payload[:1].lstrip() or payload.lstrip()[:1]
    try:
        got = _many.decode(payload) if head == b"[" else [_one.decode(payload)]
    except msgspec.ValidationError as exc:
        if head != b"[":
            dead.append(dead_letter("invalid", str(exc), payload, source=source))
            return readings, dead
        got = _one_by_one(payload, source, dead)
    except msgspec.DecodeError as exc:
        dead.append(dead_letter("malformed", f"not JSON: {exc}", payload, source=source))
        return readings, dead
    for i, r in enumerate(got):
        if r is None:
            continue
        problem = _check(r)
        if problem is None:
            readings.append(r)
        else:
            dead.append(dead_letter("invalid", problem, payload,
                                    index=i if head == b"[" else None, source=source))
    return readings, dead


def _one_by_one(payload: bytes, source: str | None, dead: list) -> list:
    """Slow path for an array with a bad element: keep the good ones, dead-letter the rest."""
    out: list = []
    for i, item in enumerate(_any.decode(payload)):
        try:
            out.append(_convert(item, WireReading))
        except msgspec.ValidationError as exc:
            dead.append(dead_letter("invalid", str(exc), payload, index=i, source=source))
            out.append(None)
    return out


def decode_batch(payloads: list[bytes], source: str | None = None
                 ) -> tuple[list, list, list[tuple[int, bytes, str | None]]]:
    """Decode many payloads at once: one C call for the whole batch when all are good (the
    common case), payload by payload otherwise. Returns readings, dead letters, and spans
    (end position in readings, payload, source) to find a reading's original bytes later."""
    readings: list = []
    dead: list = []
    spans: list[tuple[int, bytes, str | None]] = []
    if all(len(p) <= MAX_PAYLOAD_BYTES for p in payloads):
        try:
            got = _batch.decode(b"[" + b",".join(payloads) + b"]")
        except (msgspec.ValidationError, msgspec.DecodeError):
            got = None
        if got is not None:
            for p, item in zip(payloads, got):
                if item.__class__ is list:
                    readings += item
                else:
                    readings.append(item)
                spans.append((len(readings), p, source))
            bad = False
            for r in readings:
                ts = r.ts
                if ts.__class__ is not int:
                    r.ts = int(ts.timestamp() * 1000)
                if (r.value is None) == (r.event is None):
                    bad = True
            if not bad:
                return readings, dead, spans
            readings, spans = [], []
    for p in payloads:                     # slow path: someone sent something bad
        decode(p, source, readings, dead)
        spans.append((len(readings), p, source))
    return readings, dead, spans
