"""The push outbox and the alerts' timeline, in a small SQLite file of their own.

A delivery is written here, keyed by its idempotency key, when its notice is handed over and
before anything is sent. So a notice handed over twice — the runtime replays its journal at
start and regenerates the same notices — makes one delivery, a delivery sent once is never sent
again after a restart, and one not yet sent when the process died is sent when it starts
again. The same file keeps every notice the dispatcher saw and each delivery's outcome: the
alert's timeline (`GET /alerts/{alert_id}/timeline`).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import orjson

from connectors.push import Delivery, Recipient

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notices (
    alert_id TEXT NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL, tier TEXT NOT NULL,
    target TEXT NOT NULL, at INTEGER NOT NULL, ts TEXT NOT NULL, title TEXT NOT NULL,
    worker_id TEXT, PRIMARY KEY (alert_id, seq, state, tier, target)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    key TEXT PRIMARY KEY, alert_id TEXT NOT NULL, channel TEXT NOT NULL,
    recipient TEXT NOT NULL, body BLOB NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL, created INTEGER NOT NULL, updated INTEGER NOT NULL, detail TEXT);
CREATE INDEX IF NOT EXISTS deliveries_alert ON deliveries (alert_id);
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries (status) WHERE status = 'pending';
"""


class PushStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # as the runtime's journal: a commit survives kill -9; WAL lets the timeline be read
        # while a lane writes
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def record(self, notices: list[dict], deliveries: list[Delivery], now_ms: int
               ) -> list[Delivery]:
        """One transaction: the notices on their timelines, the deliveries in the outbox.
        Returns the deliveries that were not there yet (the ones to send)."""
        new = []
        with self._lock:
            self.db.execute("BEGIN")
            try:
                self.db.executemany(
                    "INSERT OR IGNORE INTO notices VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(n["alert_id"], n["seq"], n["state"], n["tier"], n["target"], now_ms,
                      n["ts"], n["title"], n.get("worker_id")) for n in notices])
                for d in deliveries:
                    r = d.recipient
                    body = orjson.dumps({"recipient": [r.id, r.name, r.phone], "notice": d.notice})
                    cur = self.db.execute(
                        "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, NULL)",
                        (d.key, d.notice["alert_id"], d.channel, r.id, body, PENDING, now_ms,
                         now_ms))
                    if cur.rowcount:
                        new.append(d)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return new

    def pending(self) -> list[Delivery]:
        """Deliveries handed over but not finished (the last run stopped before them)."""
        with self._lock:
            rows = self.db.execute("SELECT key, channel, body, attempts FROM deliveries "
                                   "WHERE status = 'pending' ORDER BY created").fetchall()
        out = []
        for key, channel, body, attempts in rows:
            b = orjson.loads(body)
            out.append(Delivery(key, channel, Recipient(*b["recipient"]), b["notice"],
                                attempts + 1))
        return out

    def attempted(self, key: str, attempts: int, detail: str, now_ms: int) -> None:
        """A try failed and another will follow: the count survives a restart."""
        with self._lock:
            self.db.execute("UPDATE deliveries SET attempts = ?, detail = ?, updated = ? "
                            "WHERE key = ? AND status = 'pending'", (attempts, detail, now_ms, key))

    def finish(self, key: str, status: str, attempts: int, detail: str | None, now_ms: int) -> None:
        with self._lock:
            self.db.execute("UPDATE deliveries SET status = ?, attempts = ?, detail = ?, "
                            "updated = ? WHERE key = ?", (status, attempts, detail, now_ms, key))

    def timeline(self, alert_id: str) -> list[dict]:
        """Notices seen and deliveries (pending, delivered or failed), oldest first."""
        with self._lock:
            notices = self.db.execute(
                "SELECT at, seq, state, tier, target, ts, title, worker_id FROM notices "
                "WHERE alert_id = ?", (alert_id,)).fetchall()
            deliveries = self.db.execute(
                "SELECT updated, key, channel, recipient, status, attempts, detail, created "
                "FROM deliveries WHERE alert_id = ?", (alert_id,)).fetchall()
        events = [{"at": at, "event": "notice", "seq": seq, "state": state, "tier": tier,
                   "target": target, "ts": ts, "title": title, "worker_id": worker}
                  for at, seq, state, tier, target, ts, title, worker in notices]
        events += [{"at": at, "event": "receipt" if status != PENDING else "pending",
                    "key": key, "channel": channel, "recipient": recipient, "outcome": status,
                    "attempts": attempts, "detail": detail, "handed_over": created}
                   for at, key, channel, recipient, status, attempts, detail, created in deliveries]
        events.sort(key=lambda e: (e["at"], e["event"] != "notice"))
        return events

    def prune(self, before_ms: int) -> None:
        """Forget finished deliveries and notices older than the retention; by then no journal
        can regenerate them."""
        with self._lock:
            self.db.execute("DELETE FROM notices WHERE at < ?", (before_ms,))
            self.db.execute("DELETE FROM deliveries WHERE updated < ? AND status != 'pending'",
                            (before_ms,))

    def close(self) -> None:
        with self._lock:
            self.db.close()
