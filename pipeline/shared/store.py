"""Local state that survives kill -9: the engine's last snapshot plus a journal of every input since.

The engine is deterministic, so "state" is a snapshot and the ordered inputs after it: batches
of readings (with the clock they were judged by), acknowledgements, and watermark moves. A
batch is journaled (one SQLite transaction, WAL mode) *before* its MQTT messages are
acknowledged to the broker; on restart the snapshot is restored and the journal replayed, which
rebuilds the exact state and regenerates the same notices (idempotent by alert_id/state/seq).
A snapshot is taken only once every notice before it has been delivered, and it truncates the
journal.

Inputs the engine failed on (pipeline.shared.quarantine) are named in a table beside the journal, by
journal entry and position, so a replay passes them over instead of failing on them again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

READINGS, ACKS, ADVANCE = "readings", "acks", "advance"
SILENCES = "silences"       # made and ended (pipeline/core/silences.py): journaled like acks
RELOAD = "reload"           # the set judged by from here on: items [digest] (pipeline/shared/kept_sets.py)


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str            # readings | acks | advance | silences
    at: int              # the clock (ms) the input was judged by, or the watermark
    items: list          # readings: [[topic, payload], ...]; acks, silences: [payload, ...];
    #                      advance: []; reload: [digest of the new set]


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # WAL + NORMAL: a committed batch survives the process being killed; a power cut may
        # lose the last few, which the broker still holds unacknowledged or the gateways resend
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY CHECK (id = 1),"
                        " upto INTEGER NOT NULL, blob BLOB NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY,"
                        " kind TEXT NOT NULL, at INTEGER NOT NULL, body BLOB NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS poison (seq INTEGER NOT NULL,"
                        " item INTEGER NOT NULL, detail TEXT NOT NULL, PRIMARY KEY (seq, item))")
        # 'set': the digest of the set the snapshot, and the journal after it up to a reload
        # entry, were judged by (absent: a state from before sets were kept)
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = self.db.execute("SELECT max(seq) FROM journal").fetchone()
        snap = self.db.execute("SELECT upto FROM snapshot").fetchone()
        self.seq = max(row[0] or 0, snap[0] if snap else 0)
        self.journaled_since_snapshot, self.journaled_bytes = self.db.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM journal").fetchone()

    def append(self, kind: str, at: int, items: list) -> int:
        self.seq += 1
        body = msgspec.msgpack.encode(items)
        self.db.execute("INSERT INTO journal (seq, kind, at, body) VALUES (?, ?, ?, ?)",
                        (self.seq, kind, at, body))
        self.journaled_since_snapshot += 1
        self.journaled_bytes += len(body)
        return self.seq

    def append_many(self, entries: list[tuple[str, int, list]]) -> list[int]:
        """Several inputs in one transaction: one commit (the costly part) per batch. Returns
        their journal numbers."""
        self.db.execute("BEGIN")
        try:
            seqs = [self.append(kind, at, items) for kind, at, items in entries]
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return seqs

    def quarantine(self, seq: int, poisoned: list[tuple[int, str]]) -> None:
        """Journal entry ``seq``'s items the engine failed on: a replay passes them over."""
        self.db.executemany("INSERT OR REPLACE INTO poison (seq, item, detail) VALUES (?, ?, ?)",
                            [(seq, item, detail) for item, detail in poisoned])

    def poisoned(self) -> dict[int, dict[int, str]]:
        """Per journal entry, its quarantined items and why."""
        out: dict[int, dict[int, str]] = {}
        for seq, item, detail in self.db.execute("SELECT seq, item, detail FROM poison"):
            out.setdefault(seq, {})[item] = detail
        return out

    def save_snapshot(self, blob: bytes, set_digest: str | None = None) -> None:
        """The engine state as of everything journaled so far, judged by the set
        ``set_digest``; the journal restarts empty."""
        self.db.execute("BEGIN")
        self.db.execute("INSERT OR REPLACE INTO snapshot (id, upto, blob) VALUES (1, ?, ?)",
                        (self.seq, blob))
        if set_digest is not None:
            self._set(set_digest)
        self.db.execute("DELETE FROM journal WHERE seq <= ?", (self.seq,))
        self.db.execute("DELETE FROM poison WHERE seq <= ?", (self.seq,))
        self.db.execute("COMMIT")
        self.journaled_since_snapshot = self.journaled_bytes = 0
        # SQLite reuses the journal's freed pages, but the WAL file only ever grows unless
        # truncated: at a snapshot it holds nothing the database file does not
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def clear(self) -> None:
        """Forget everything: the next start is a new city."""
        self.db.execute("BEGIN")
        self.db.execute("DELETE FROM snapshot")
        self.db.execute("DELETE FROM journal")
        self.db.execute("DELETE FROM meta")
        self.db.execute("COMMIT")
        self.journaled_since_snapshot = 0

    def judged_by(self) -> str | None:
        """The set the state starts with: the snapshot's, else the journal's first entries'."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'set'").fetchone()
        return row[0] if row else None

    def begin_with(self, set_digest: str) -> None:
        """A state with nothing in it yet will be judged by ``set_digest``."""
        self._set(set_digest)

    def _set(self, digest: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('set', ?)", (digest,))

    def load(self) -> tuple[bytes | None, Iterator[Entry]]:
        snap = self.db.execute("SELECT upto, blob FROM snapshot").fetchone()
        upto = snap[0] if snap else 0
        blob = snap[1] if snap else None

        def entries() -> Iterator[Entry]:
            for seq, kind, at, body in self.db.execute(
                    "SELECT seq, kind, at, body FROM journal WHERE seq > ? ORDER BY seq", (upto,)):
                yield Entry(seq, kind, at, msgspec.msgpack.decode(body))
        return blob, entries()

    def close(self) -> None:
        self.db.close()
