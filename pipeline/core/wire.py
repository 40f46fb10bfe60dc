"""Where a reading enters: bytes from a gateway become typed readings or dead letters.

One msgspec pass parses and checks the JSON (the contract of ``pipeline.core.models.Reading``) for a
whole batch of payloads at once; only when something in the batch is bad do we look at the
payloads one by one, and at a bad gateway array element by element, so one bad reading never
costs the good ones around it and nothing raises.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from datetime import datetime
from collections.abc import Iterator, Sequence
from typing import Annotated

import msgspec

from pipeline.core.models import MAX_TS_MS, DeadLetter

MAX_PAYLOAD_BYTES = 256 * 1024   # a gateway batch of ~1,000 readings; larger is a fault, not data
OVERSIZE_KEPT = 4096             # what an oversize payload's dead letter keeps of it
# What a decoder can throw at bad bytes: a bad number or shape, bad UTF-8 inside a string,
# nesting deep enough to exhaust the stack.
_BAD_BYTES = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)


class WireReading(msgspec.Struct, gc=False):
    """Hot-path twin of models.Reading; ``ts`` is normalised to epoch ms by ``decode``."""

    # No pattern here: the registry admits only ids of SENSOR_ID_PATTERN, so any other id is an
    # unknown sensor; a regex per reading would cost more than all the rules (~0.6 µs).
    sensor_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    ts: Annotated[int, msgspec.Meta(ge=0, le=MAX_TS_MS)] | Annotated[datetime, msgspec.Meta(tz=True)]
    value: float | None = None
    event: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    unit: str | None = None
    seq: int | None = None
    battery: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    gateway_id: str | None = None


_one = msgspec.json.Decoder(WireReading)
_many = msgspec.json.Decoder(list[WireReading])
# A batch is parsed as one JSON array, with a number no payload can know between each two:
# `[P1,S,P2,S,P3]` must decode to exactly item, S, item, S, item. A payload that is not one
# JSON value on its own (`{..},{..}`, or a string or bracket left open for the next one to
# close) moves or swallows a separator. Judging each payload's first and last byte, as this
# did before, let crafted neighbours rescue each other (tests/core/test_wire.py, CRAFTED).
_SEPARATOR = secrets.randbits(62) | (1 << 62)   # this process's own; never shown
_JOIN = b",%d," % _SEPARATOR
_batch = msgspec.json.Decoder(list[list[WireReading] | WireReading | int])
_raw_items = msgspec.json.Decoder(list[msgspec.Raw])


def dead_letter(reason: str, detail: str, payload: bytes, index: int | None = None,
                source: str | None = None, payload_digest: str | None = None) -> DeadLetter:
    try:
        text, enc = payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, enc = base64.b64encode(payload).decode("ascii"), "base64"
    return DeadLetter(reason=reason, detail=detail, payload=text, payload_encoding=enc,
                      index=index, source=source, payload_digest=payload_digest)


def oversize(head: bytes, size: int, source: str | None) -> DeadLetter:
    """A payload over the limit: its first OVERSIZE_KEPT bytes are all anyone keeps of it (the
    runtime journals no more than that either)."""
    return dead_letter("oversize", f"payload of {size} bytes is over the {MAX_PAYLOAD_BYTES}-byte "
                       "limit; split the gateway batch", head, source=source)


def digest(payload: bytes) -> str:
    """Names a payload in the dead letters of its elements (blake2b, 128 bits, hex)."""
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


class GatewayArray:
    """A gateway array whose elements are dead-lettered one by one: each dead letter carries
    its own element and the array's digest, never the whole array again, so an array of n bad
    elements costs O(n) bytes of dead letters, not O(n²). Split and hashed once, on demand."""

    __slots__ = ("payload", "_elements", "_digest")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self._elements: list | None = None
        self._digest: str | None = None

    def element(self, index: int) -> bytes:
        if self._elements is None:
            try:
                self._elements = _raw_items.decode(self.payload)
            except _BAD_BYTES:
                self._elements = []
        return bytes(self._elements[index]) if index < len(self._elements) else b""

    def dead_letter(self, reason: str, detail: str, index: int, source: str | None) -> DeadLetter:
        if self._digest is None:
            self._digest = digest(self.payload)
        return dead_letter(reason, detail, self.element(index), index, source, self._digest)


def normalise(r: WireReading) -> str | None:
    """What the JSON schema cannot say; None if the reading is good. Normalises ts to ms."""
    if (r.value is None) == (r.event is None):
        return "a reading carries exactly one of `value` or `event`"
    ts = r.ts
    if ts.__class__ is not int:         # (a datetime: mypy does not narrow on __class__, hence the ignores)
        ms = int(ts.timestamp() * 1000)  # type: ignore[union-attr]
        if not 0 <= ms <= MAX_TS_MS:
            return f"ts {ts.isoformat()} is before 1970 or after 9999"  # type: ignore[union-attr]
        r.ts = ms
    return None


def ack_refusal(exc: ValueError) -> str:
    """One line on why an ack's bytes are not an Ack (pydantic's own first line only says
    "1 validation error for Ack")."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return str(exc).splitlines()[0][:300]
    e = errors[0]
    if e["type"] == "json_invalid":
        return f"not JSON: {e['msg'].removeprefix('Invalid JSON: ')}"
    if e["loc"][:1] == ("ts",):          # a union: pydantic would explain both of its arms
        return (f"ts {str(e.get('input'))[:40]} is not a time: RFC 3339 with an offset, or "
                f"epoch milliseconds from 0 to {MAX_TS_MS} (9999-12-31)")
    where = ".".join(str(p) for p in e["loc"])
    return f"{where}: {e['msg']}"[:300] if where else e["msg"][:300]


def _detail(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text: {exc.reason} at byte {exc.start}"
    if isinstance(exc, RecursionError):
        return "not JSON we can read: nested too deeply"
    if isinstance(exc, msgspec.ValidationError):
        return str(exc)
    return f"not JSON: {exc}"


def decode(payload: bytes, source: str | None = None, readings: list | None = None,
           dead: list | None = None, positions: list | None = None) -> tuple[list, list]:
    """Decode one MQTT/Kafka payload (an object or an array) into readings and dead letters.

    Appends into ``readings`` / ``dead`` when given; ``positions`` (if given) receives, for
    each reading appended, its index in the gateway array (None for a single object).
    """
    readings = [] if readings is None else readings
    dead = [] if dead is None else dead
    if len(payload) > MAX_PAYLOAD_BYTES:
        dead.append(oversize(payload[:OVERSIZE_KEPT], len(payload), source))
        return readings, dead
    is_array = payload.lstrip()[:1] == b"["
    items: Sequence[tuple[int | None, WireReading]] | None = []
    try:
        if is_array:
            items = list(enumerate(_many.decode(payload)))
        else:
            items = [(None, _one.decode(payload))]
    except _BAD_BYTES as exc:
        if not is_array:
            reason = "invalid" if isinstance(exc, msgspec.ValidationError) else "malformed"
            dead.append(dead_letter(reason, _detail(exc), payload, source=source))
            return readings, dead
        items = _element_by_element(payload, source, dead)
        if items is None:
            return readings, dead
    array = GatewayArray(payload) if is_array else None
    for i, r in items:
        problem = normalise(r)
        if problem is None:
            readings.append(r)
            if positions is not None:
                positions.append(i)
        elif array is not None:
            dead.append(array.dead_letter("invalid", problem, i, source))  # type: ignore[arg-type]  # an array's: int
        else:
            dead.append(dead_letter("invalid", problem, payload, source=source))
    return readings, dead


def _element_by_element(payload: bytes, source: str | None,
                        dead: list) -> list[tuple[int, WireReading]] | None:
    """Slow path for an array with a bad element: keep the good ones, dead-letter the rest."""
    try:
        raws = _raw_items.decode(payload)
    except _BAD_BYTES as exc:
        dead.append(dead_letter("malformed", _detail(exc), payload, source=source))
        return None
    out = []
    array = GatewayArray(payload)
    array._elements = raws
    for i, raw in enumerate(raws):
        try:
            out.append((i, _one.decode(raw)))
        except _BAD_BYTES as exc:
            reason = "invalid" if isinstance(exc, msgspec.ValidationError) else "malformed"
            dead.append(array.dead_letter(reason, _detail(exc), i, source))
    return out


class Spans:
    """Where each payload of a decoded batch ends in its readings, with its bytes, its source
    and, for an array with bad elements, the array index of each of its readings: what a
    reading refused later needs to be dead-lettered with its original bytes and its place.
    ``spans[i]`` is payload i's (end, payload, source, indexes or None).

    Columns, not a tuple per payload: the common batch (one object a payload) is three list
    extends in C, and ``one_each`` tells the engine's screen so without comparing the ends
    (tuples, and the list of their ends, were 12 % of the engine on the peer workload)."""

    __slots__ = ("ends", "payloads", "sources", "positions", "one_each")

    def __init__(self) -> None:
        self.ends: list[int] | range = []       # a range: one piece, one reading a payload
        self.payloads: list[bytes] = []
        self.sources: list[str | None] = []
        self.positions: dict[int, list] = {}    # payload number -> its readings' array indexes
        self.one_each = True                    # every payload gave exactly one reading

    def add(self, end: int, payload: bytes, source: str | None, positions: list | None) -> None:
        if self.ends.__class__ is range:    # (a list after this: mypy does not narrow on __class__)
            self.ends = list(self.ends)
        if end - (self.ends[-1] if self.ends else 0) != 1:
            self.one_each = False
        if positions is not None:
            self.positions[len(self.ends)] = positions
        self.ends.append(end)  # type: ignore[union-attr]
        self.payloads.append(payload)
        self.sources.append(source)

    def add_singles(self, base: int, payloads: list[bytes], sources: list) -> None:
        """Payloads of one object each, whose readings start at ``base``."""
        if not self.ends:                       # the common batch: no list of n numbers
            self.ends = range(base + 1, base + len(payloads) + 1)
        else:
            self.ends = [*self.ends, *range(base + 1, base + len(payloads) + 1)]
        self.payloads += payloads
        self.sources += sources

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> tuple[int, bytes, str | None, list | None]:
        return self.ends[i], self.payloads[i], self.sources[i], self.positions.get(i)

    def __iter__(self) -> Iterator[tuple[int, bytes, str | None, list | None]]:
        return map(self.__getitem__, range(len(self.ends)))


def decode_batch(payloads: list[bytes], source: str | list[str] | None = None
                 ) -> tuple[list, list, Spans]:
    """Decode many payloads at once: one C call for the whole batch when all are good (the
    common case); a bad payload is isolated by halving, so it costs a few extra calls, not a
    payload-by-payload pass. Returns readings, dead letters, and the payloads' Spans."""
    readings: list = []
    dead: list = []
    spans = Spans()
    sources = source if isinstance(source, list) else [source] * len(payloads)
    _decode_many(payloads, sources, readings, dead, spans)
    return readings, dead, spans


def _decode_many(payloads: list[bytes], sources: list, readings: list, dead: list,
                 spans: Spans) -> None:
    # No per-reading Python on the fast path: the engine's batch screen checks "exactly one of
    # value or event" and converts RFC 3339 times (see Engine._screen_and_evaluate).
    got = None
    n = len(payloads)
    joined = b"[" + _JOIN.join(payloads) + b"]" if n > 1 else b""
    # none oversize: a payload over the limit is refused unread (the whole is, mostly, under it)
    if joined and (len(joined) <= MAX_PAYLOAD_BYTES or max(map(len, payloads)) <= MAX_PAYLOAD_BYTES):
        try:
            got = _batch.decode(joined)
        except _BAD_BYTES:
            got = None                     # somewhere in here is a bad payload: look closer
    # Each payload one JSON value on its own, an object or an array, or the batch is judged
    # payload by payload (see _SEPARATOR)
    if got is not None and len(got) == 2 * n - 1 and got[1::2].count(_SEPARATOR) == n - 1 \
            and int not in (kinds := set(map(type, items := got[::2]))):
        base = len(readings)
        if list not in kinds:                       # objects only: no Python per payload
            readings += items
            spans.add_singles(base, payloads, sources)
            return
        for p, source, item in zip(payloads, sources, items, strict=True):
            if item.__class__ is list:
                readings += item
            else:
                readings.append(item)
            spans.add(len(readings), p, source, None)
        return
    if len(payloads) > 8:
        half = len(payloads) // 2
        _decode_many(payloads[:half], sources[:half], readings, dead, spans)
        _decode_many(payloads[half:], sources[half:], readings, dead, spans)
        return
    for p, source in zip(payloads, sources, strict=True):
        positions: list = []
        before = len(dead)
        decode(p, source, readings, dead, positions)
        gaps = len(dead) > before and positions and positions[0] is not None
        spans.add(len(readings), p, source, positions if gaps else None)
