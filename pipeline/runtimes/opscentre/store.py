"""The console's materialized view: incidents and their timelines, in SQLite (WAL).

Built only from what the pipeline publishes — tier notices, grid pushes, push receipts — plus
the acknowledgements people asked for here. Every message is applied idempotently (a timeline
entry has a natural key; an incident takes a notice only if it is not older than what it
holds), so an at-least-once feed redelivering after a restart changes nothing twice. The feed
acknowledges a message to its broker only after the transaction that applied it committed:
restart-safe without a journal of our own.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from pipeline.core.identity import Scope
from pipeline.core.models import Tier

SCHEMA = """
CREATE TABLE IF NOT EXISTS incidents (
    alert_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL,
    severity TEXT NOT NULL, level TEXT, category TEXT NOT NULL, rule_id TEXT, sensor_id TEXT,
    kind TEXT, district TEXT, district_name TEXT, street TEXT, street_name TEXT,
    community TEXT, community_name TEXT, grid TEXT, grid_name TEXT, address TEXT,
    lat REAL, lon REAL, value REAL, threshold REAL, unit TEXT, event TEXT,
    title TEXT NOT NULL, summary TEXT NOT NULL, started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL, escalation INTEGER NOT NULL DEFAULT 0,
    escalated_at INTEGER, acked_by TEXT, acked_tier TEXT, acked_at INTEGER,
    resolved_at INTEGER, told TEXT NOT NULL DEFAULT '', open INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS incidents_street ON incidents(street, open, started_at);
CREATE INDEX IF NOT EXISTS incidents_district ON incidents(district, open, started_at);
CREATE INDEX IF NOT EXISTS incidents_open ON incidents(open, started_at);
CREATE TABLE IF NOT EXISTS events (
    key TEXT PRIMARY KEY, alert_id TEXT NOT NULL, at INTEGER NOT NULL, what TEXT NOT NULL,
    tier TEXT, target TEXT, state TEXT, seq INTEGER, severity TEXT, title TEXT, detail TEXT,
    by TEXT);
CREATE INDEX IF NOT EXISTS events_alert ON events(alert_id, at);
CREATE INDEX IF NOT EXISTS events_push ON events(target, what, at) WHERE tier = 'grid';
CREATE TABLE IF NOT EXISTS offsets (topic TEXT, partition INTEGER, next INTEGER NOT NULL,
    PRIMARY KEY (topic, partition));
"""

PAGE_ROWS = 100               # a list page's rows (the API may ask up to 1,000)
SEVERITIES = ("blue", "yellow", "orange", "red")
STATES = ("firing", "escalated", "acknowledged", "resolved", "dispatched", "on_site", "handled",
          "closed")
HANDLING = ("dispatched", "on_site", "handled")   # leave an incident open or resolved as it was
# What a notice's place fields are called, in the incident row too.
_PLACE = ("district", "district_name", "street", "street_name", "community", "community_name",
          "grid", "grid_name", "address", "lat", "lon")
_COPIED = ("severity", "level", "category", "rule_id", "sensor_id", "kind", *_PLACE, "value",
           "threshold", "unit", "event", "title", "summary")
SORTS = {"started": "started_at", "updated": "updated_at", "severity": "sev_rank",
         "place": "street_name", "state": "state"}


def ms(text: str | int | float | None) -> int | None:
    """Epoch ms of a notice's time (RFC 3339 with offset, as the pipeline writes it)."""
    if text is None:
        return None
    if isinstance(text, int | float):
        return int(text)
    return int(datetime.fromisoformat(text).timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class Change:
    """One incident the last batch touched, with where it is (who may be told)."""

    alert_id: str
    district: str | None
    street: str | None
    grid: str | None
    category: str
    pushed_to: frozenset[str]
    community: str | None = None


@dataclass(frozen=True, slots=True)
class Filters:
    """What a list page or `GET /api/incidents` asks for (all optional)."""

    category: str | None = None
    severity: str | None = None
    state: str | None = None          # firing | escalated | acknowledged | resolved | open
    district: str | None = None
    street: str | None = None
    community: str | None = None
    grid: str | None = None
    sort: str = "started"
    desc: bool = True
    limit: int = PAGE_ROWS


class Store:
    def __init__(self, path: Path, dept_categories: dict[str, set[str]]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dept_categories = dept_categories          # department id -> its categories
        self._local = threading.local()
        self._write_lock = threading.Lock()
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections are not shared between threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=NORMAL")     # WAL: durable at checkpoints, never torn
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    # ---- writing -------------------------------------------------------------------------------
    def apply(self, messages: Iterable[tuple[str, dict[str, Any]]],
              positions: dict[tuple[str, int], int] | None = None) -> list[Change]:
        """Apply (kind, document) pairs — kind "notice" or "receipt" — in one transaction,
        with where a Kafka feed is now in each partition; returns the incidents touched."""
        touched: dict[str, set[str]] = {}
        with self._write_lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                for kind, doc in messages:
                    if kind == "notice":
                        self._notice(db, doc, touched)
                    elif kind == "receipt":
                        self._receipt(db, doc, touched)
                db.executemany("INSERT OR REPLACE INTO offsets(topic, partition, next) "
                               "VALUES (?, ?, ?)", [(t, p, n) for (t, p), n in (positions or {}).items()])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return self.changes(touched)

    def changes(self, touched: dict[str, set[str]]) -> list[Change]:
        out = []
        for alert_id, workers in touched.items():
            row = self._db().execute("SELECT district, street, grid, category, community FROM "
                                     "incidents WHERE alert_id = ?", (alert_id,)).fetchone()
            if row is not None:
                out.append(Change(alert_id, row["district"], row["street"], row["grid"],
                                  row["category"], frozenset(workers), row["community"]))
        return out

    def _notice(self, db: sqlite3.Connection, n: dict, touched: dict[str, set[str]]) -> None:
        at = ms(n["ts"])
        state, tier = n["state"], n["tier"]
        key = f"n|{n['alert_id']}|{n['seq']}|{state}|{tier}|{n['target']}|{at}"
        detail = orjson.dumps({k: n.get(k) for k in ("summary", "previous_state", "escalation",
                                                     "worker_name", "acked_tier", "value",
                                                     "threshold", "unit")}).decode()
        db.execute("INSERT OR IGNORE INTO events(key, alert_id, at, what, tier, target, state, "
                   "seq, severity, title, detail, by) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                   (key, n["alert_id"], at, "notice", tier, n["target"], state, n["seq"],
                    n["severity"], n["title"], detail, n.get("acked_by")))
        workers = touched.setdefault(n["alert_id"], set())
        if tier == "grid":
            workers.add(n["target"])
        row = db.execute("SELECT seq, state, told, escalated_at, acked_at, updated_at, open, "
                         "resolved_at FROM incidents WHERE alert_id = ?", (n["alert_id"],)).fetchone()
        told = set(row["told"].split(",")) - {""} if row else set()
        told.add(tier)
        if row is None:
            values = {k: n.get(k) for k in _COPIED}
            db.execute(
                "INSERT INTO incidents(alert_id, seq, state, started_at, updated_at, escalation, "
                "escalated_at, acked_by, acked_tier, acked_at, resolved_at, told, open, "
                + ", ".join(values) + ") VALUES (" + ",".join("?" * (13 + len(values))) + ")",
                (n["alert_id"], n["seq"], _incident_state(state, "firing"), ms(n["started_at"]), at,
                 n.get("escalation", 0), at if n.get("escalation") else None, n.get("acked_by"),
                 n.get("acked_tier"), at if state == "acknowledged" else None,
                 at if state == "resolved" else None, ",".join(sorted(told)),
                 int(state != "resolved"), *values.values()))
            return
        if n["seq"] < row["seq"] or (n["seq"] == row["seq"] and state == "reminder"):
            db.execute("UPDATE incidents SET told = ? WHERE alert_id = ?",      # an older copy
                       (",".join(sorted(told)), n["alert_id"]))
            return
        new_state = _incident_state(state, row["state"])
        values = {k: n.get(k) for k in _COPIED}
        sets = ", ".join(f"{k} = ?" for k in values)
        db.execute(
            f"UPDATE incidents SET seq = ?, state = ?, updated_at = MAX(updated_at, ?), "
            f"escalation = MAX(escalation, ?), escalated_at = COALESCE(escalated_at, ?), "
            f"acked_by = COALESCE(?, acked_by), acked_tier = COALESCE(?, acked_tier), "
            f"acked_at = COALESCE(acked_at, ?), resolved_at = ?, told = ?, open = ?, {sets} "
            f"WHERE alert_id = ?",
            (n["seq"], new_state, at, n.get("escalation", 0),
             at if n.get("escalation") else None, n.get("acked_by"), n.get("acked_tier"),
             at if state in ("acknowledged", *HANDLING, "closed") else None,   # (the first)
             row["resolved_at"] if state in (*HANDLING, "closed")
             else at if new_state == "resolved" else None, ",".join(sorted(told)),
             row["open"] if state in HANDLING else int(new_state not in ("resolved", "closed")),
             *values.values(),
             n["alert_id"]))

    def _receipt(self, db: sqlite3.Connection, r: dict, touched: dict[str, set[str]]) -> None:
        at = ms(r.get("at")) or int(time.time() * 1000)
        key = f"r|{r['alert_id']}|{r.get('key')}|{r.get('outcome')}|{r.get('attempts')}"
        detail = orjson.dumps({k: r.get(k) for k in ("channel", "outcome", "attempts",
                                                     "detail")}).decode()
        cur = db.execute("INSERT OR IGNORE INTO events(key, alert_id, at, what, tier, target, "
                         "state, seq, detail) VALUES (?,?,?,?,?,?,?,?,?)",
                         (key, r["alert_id"], at, "receipt", r.get("tier"), r.get("recipient"),
                          r.get("state"), r.get("seq"), detail))
        if cur.rowcount:
            touched.setdefault(r["alert_id"], set())

    def record_ack(self, alert_id: str, user: str, page: str, note: str | None, at: int,
                   state: str | None = None) -> None:
        """Who asked to acknowledge (or to move it to a handling ``state``), from which page,
        when (the pipeline's notice follows on the feed)."""
        with self._write_lock:
            self._db().execute(
                "INSERT OR IGNORE INTO events(key, alert_id, at, what, tier, target, detail, by) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (f"a|{alert_id}|{user}|{at}", alert_id, at, "ack", None, page,
                 orjson.dumps({"note": note, "page": page, "state": state}).decode(), user))

    def offsets(self) -> dict[tuple[str, int], int]:
        """A Kafka feed's next offset per (topic, partition), as last committed."""
        return {(t, p): n for t, p, n in self._db().execute("SELECT topic, partition, next "
                                                             "FROM offsets")}

    # ---- reading -------------------------------------------------------------------------------
    def scope_sql(self, scope: Scope) -> tuple[str, list[Any]]:
        """The WHERE clause that keeps what a scope may see (incidents' columns)."""
        t = scope.tier
        if t is Tier.city:
            return "1", []
        if t is Tier.dept:
            cats = sorted(set().union(*(self.dept_categories.get(d, set()) for d in scope.codes)))
            return f"category IN ({','.join('?' * len(cats))})", cats
        column = {Tier.district: "district", Tier.street: "street", Tier.grid: "grid",
                  Tier.community: "community"}[t]
        codes = sorted(scope.codes)
        sql = f"{column} IN ({','.join('?' * len(codes))})"
        if scope.streets:
            sql = f"({sql} OR street IN ({','.join('?' * len(scope.streets))}))"
            codes += sorted(scope.streets)
        return sql, codes

    def incidents(self, scope: Scope, f: Filters) -> tuple[list[dict], int, dict[str, dict]]:
        """(rows, how many match, counts by severity/category/state of the scope's open
        incidents and of what matches)."""
        where, params = self.scope_sql(scope)
        conds, args = [where], list(params)
        for column in ("category", "severity", "district", "street", "community", "grid"):
            value = getattr(f, column)
            if value:
                conds.append(f"{column} = ?")
                args.append(value)
        if f.state == "open":
            conds.append("open = 1")
        elif f.state:
            conds.append("state = ?")
            args.append(f.state)
        sql_where = " AND ".join(conds)
        order = SORTS.get(f.sort, "started_at")
        db = self._db()
        rows = db.execute(
            f"SELECT *, CASE severity WHEN 'red' THEN 4 WHEN 'orange' THEN 3 WHEN 'yellow' THEN 2 "
            f"ELSE 1 END AS sev_rank FROM incidents WHERE {sql_where} "
            f"ORDER BY {order} {'DESC' if f.desc else 'ASC'}, alert_id LIMIT ?",
            (*args, f.limit)).fetchall()
        # the counts in one pass over what matches (this runs at every live refresh of a page)
        columns = ("severity", "category", "state", "street_name")
        counts: dict[str, dict] = {c: {} for c in columns}
        total = 0
        for *keys, n in db.execute(f"SELECT {', '.join(columns)}, COUNT(*) FROM incidents "
                                   f"WHERE {sql_where} GROUP BY 1, 2, 3, 4", args):
            total += n
            for column, key in zip(columns, keys, strict=True):
                counts[column][key] = counts[column].get(key, 0) + n
        counts = {c: dict(sorted(v.items(), key=lambda kv: -kv[1])) for c, v in counts.items()}
        return [_row(r) for r in rows], total, counts

    def incident(self, scope: Scope, alert_id: str) -> dict | None:
        """One incident of the scope with its whole timeline, or None (none, or not theirs)."""
        where, params = self.scope_sql(scope)
        db = self._db()
        row = db.execute(f"SELECT * FROM incidents WHERE alert_id = ? AND {where}",
                         (alert_id, *params)).fetchone()
        if row is None:
            return None
        out = _row(row)
        out["timeline"] = [_event(e) for e in db.execute(
            "SELECT * FROM events WHERE alert_id = ? ORDER BY at, rowid", (alert_id,))]
        return out

    def pushes(self, worker: str, limit: int = 100) -> list[dict]:
        """The pushes a grid worker got, newest first, with their incident's state now."""
        rows = self._db().execute(
            "SELECT e.at AS pushed_at, e.state AS push_state, e.title AS push_title, "
            "e.severity AS push_severity, i.* FROM events e JOIN incidents i USING (alert_id) "
            "WHERE e.tier = 'grid' AND e.target = ? AND e.what = 'notice' "
            "ORDER BY e.at DESC, e.rowid DESC LIMIT ?", (worker, limit)).fetchall()
        return [_row(r) for r in rows]

    def overview(self, scope: Scope, now: int) -> dict[str, Any]:
        """The big screen: open incidents by severity, category, district; escalations waiting
        for an acknowledgement; incidents started per hour over 24 h; the map's points."""
        where, params = self.scope_sql(scope)
        db = self._db()
        open_where = f"open = 1 AND {where}"

        def by(column: str) -> dict:
            return dict(db.execute(f"SELECT {column}, COUNT(*) FROM incidents WHERE {open_where} "
                                   f"GROUP BY {column} ORDER BY COUNT(*) DESC", params).fetchall())

        waiting = [_row(r) | {"waited_ms": now - r["escalated_at"]} for r in db.execute(
            f"SELECT * FROM incidents WHERE {open_where} AND escalation > 0 AND acked_by IS NULL "
            f"ORDER BY escalated_at LIMIT 50", params)]
        hour = 3_600_000
        first = (now // hour - 23) * hour
        per_hour = dict(db.execute(
            f"SELECT started_at / {hour} * {hour}, COUNT(*) FROM incidents WHERE "
            f"started_at >= ? AND {where} GROUP BY 1", (first, *params)).fetchall())
        points = [dict(r) for r in db.execute(
            f"SELECT alert_id, lat, lon, severity, title, district_name, street_name FROM "
            f"incidents WHERE {open_where} AND lat IS NOT NULL ORDER BY started_at DESC LIMIT 2000",
            params)]
        return {"open": db.execute(f"SELECT COUNT(*) FROM incidents WHERE {open_where}",
                                   params).fetchone()[0],
                "by_severity": by("severity"), "by_category": by("category"),
                "by_district": by("district_name"), "waiting": waiting,
                "last_24h": [{"hour": first + i * hour, "count": per_hour.get(first + i * hour, 0)}
                             for i in range(24)],
                "points": points}


def _incident_state(notice_state: str, current: str) -> str:
    """A reminder leaves the incident as it was; every other notice says what it is now."""
    return current if notice_state == "reminder" else notice_state


def _row(r: sqlite3.Row) -> dict:
    d = dict(r)
    d.pop("sev_rank", None)
    d["told"] = [t for t in (d.get("told") or "").split(",") if t]
    d["open"] = bool(d.get("open"))
    return d


def _event(e: sqlite3.Row) -> dict:
    d = dict(e)
    d.pop("key", None)
    d["detail"] = orjson.loads(d["detail"]) if d.get("detail") else {}
    return d
