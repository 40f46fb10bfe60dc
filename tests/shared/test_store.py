"""The runtime's state file (pipeline/shared/store.py) stays bounded: a snapshot truncates the
journal and the SQLite WAL (issue 12, item 11: the WAL grew 12.7 MB/h in a soak)."""

from __future__ import annotations

from pathlib import Path

from pipeline.shared.store import READINGS, StateStore


def test_a_snapshot_truncates_the_wal_and_counts_bytes_from_zero(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite")
    wal = tmp_path / "state.sqlite-wal"
    for k in range(3):
        for i in range(200):
            store.append_many([(READINGS, i, [["cityops/readings/x", b"r" * 10_000]])])
        assert store.journaled_bytes > 200 * 10_000
        assert wal.stat().st_size > 2_000_000
        store.save_snapshot(b"state %d" % k)
        assert wal.stat().st_size == 0, f"round {k}: the WAL kept {wal.stat().st_size} bytes"
        assert (store.journaled_since_snapshot, store.journaled_bytes) == (0, 0)
    assert (tmp_path / "state.sqlite").stat().st_size < 4_000_000     # freed pages reused
    store.close()
    again = StateStore(tmp_path / "state.sqlite")
    blob, entries = again.load()
    assert blob == b"state 2" and list(entries) == [] and again.journaled_bytes == 0
    again.close()


def test_poison_records_go_with_the_journal_they_name(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite")
    [seq] = store.append_many([(READINGS, 1, [["t", b"a"], ["t", b"b"]])])
    store.quarantine(seq, [(1, "ZeroDivisionError: x")])
    assert store.poisoned() == {seq: {1: "ZeroDivisionError: x"}}
    store.save_snapshot(b"s")
    assert store.poisoned() == {}
    store.close()
