"""The engine's persisted state: named, versioned, and a snapshot of the previous version restores.

``tests/data/snapshot_v1/`` was made by the engine at b2cd0d8, whose snapshots were version 1
(a track or an incident a positional list): the simulator's first 15 minutes of the fixture city
(``pipeline.shared.simulate.Simulator``, seed 7, a step every 5 s from 1782000000 s), the first half of
its payloads taken 50 at a time, three incidents acknowledged at the street tier (one as on
site), then ``Engine.snapshot()``. Today's engine restores it through the migration hook and
must be the engine that took the same input itself: the same state, the same notices after.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import msgspec
import orjson
import pytest

from pipeline.core.engine import SNAPSHOT_VERSION, Engine
from rules.evaluators import TrackState

DATA = Path(__file__).parents[1] / "data" / "snapshot_v1"


@pytest.fixture(scope="module")
def v1() -> tuple[list[bytes], dict, bytes]:
    stream = gzip.decompress((DATA / "payloads.jsonl.gz").read_bytes()).splitlines()
    return stream, orjson.loads((DATA / "acks.json").read_bytes()), (DATA / "engine.msgpack").read_bytes()


def taken(engine: Engine, stream: list[bytes], meta: dict) -> Engine:
    for i in range(0, meta["half"], meta["batch"]):
        engine.ingest(stream[i:min(i + meta["batch"], meta["half"])], now_ms=meta["ingest_now_ms"])
    engine.ack([orjson.dumps(a) for a in meta["acks"]], now_ms=meta["ack_now_ms"])
    return engine


def test_a_version_1_snapshot_restores_as_the_engine_that_took_the_same_input(v1, chengdu, rules):
    stream, meta, blob = v1
    assert msgspec.msgpack.decode(blob)["version"] == 1 < SNAPSHOT_VERSION
    kept = taken(Engine(chengdu, rules), stream, meta)
    restored = Engine(chengdu, rules)
    assert restored.restore(blob) == {}
    assert kept.book.open and any(e.tracks for e in kept.evaluators)
    # the same state, in today's format
    assert msgspec.msgpack.decode(restored.snapshot()) == msgspec.msgpack.decode(kept.snapshot())
    # and the same story after it
    rest = stream[meta["half"]:]
    told = 0
    for i in range(0, len(rest), meta["batch"]):
        want = kept.ingest(rest[i:i + meta["batch"]], now_ms=meta["ingest_now_ms"]).notices
        assert restored.ingest(rest[i:i + meta["batch"]], now_ms=meta["ingest_now_ms"]).notices == want
        told += len(want)
    assert told


def test_tracks_and_incidents_are_kept_by_name(v1, chengdu, rules):
    """A snapshot names every field of a track and of an incident (a field added later takes
    its default when an older snapshot lacks it), and says its version."""
    stream, meta, _ = v1
    state = msgspec.msgpack.decode(taken(Engine(chengdu, rules), stream, meta).snapshot())
    assert state["version"] == SNAPSHOT_VERSION
    tracks = [t for r in state["rules"].values() for _, t in r.get("tracks", [])]
    assert tracks and all(set(t) <= set(TrackState.__struct_fields__) for t in tracks)
    incidents = state["book"]["open"]
    assert incidents and all({"aid", "rule", "state", "sent", "times"} <= set(i) for i in incidents)
    acked = [i for i in incidents if i["acked_by"]]
    assert {i["acked_by"] for i in acked} == {"chunxi"}


def test_a_snapshot_newer_than_the_engine_is_refused_with_its_version(chengdu, rules):
    with pytest.raises(ValueError, match=f"snapshot version {SNAPSHOT_VERSION + 1} is newer"):
        Engine(chengdu, rules).restore(msgspec.msgpack.encode({"version": SNAPSHOT_VERSION + 1}))
