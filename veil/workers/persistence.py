"""What a data owner's worker must not lose across restarts: one SQLite file, or PostgreSQL.

Three tables:

- ``audit``: every request that moves data out (get, move, remote_get) and every
  refusal (past a burst per user and window, counted in summary rows:
  refusal_rows.py), with who asked (the authenticated principal and session) and
  the outcome. Never holds tokens or tensor values. Indexed for the console's filters.
- ``kv``: a generic ``(namespace, key) -> bytes`` table for owner state (the DP
  privacy-budget ledger keeps its balances here).
- ``ledger``: an append-only list of ``(namespace, key, amount, note)`` entries
  (spent budgets), summed with :meth:`OwnerDB.ledger_total`.

Datasets themselves are *not* stored: they are reloaded from their declared
sources at every start.

With a ``postgresql://`` URL instead of a file, several worker processes of one
owner (replicas) share these tables: audit rows and ledger entries from all of
them land in the same place (the ``worker`` column tells them apart).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from veil.workers.database import Database, ReaderSlot, is_database_url, redact

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    worker TEXT NOT NULL,
    action TEXT NOT NULL,
    principal TEXT NOT NULL,
    session TEXT NOT NULL,
    object_ids TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (namespace, key)
);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    amount REAL NOT NULL,
    note TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_by_key ON ledger (namespace, key);
"""


def private_dir(data_dir: str | Path) -> Path:
    """``data_dir``, created mode 0700 (the audit log, review queue and privacy ledger are the owner's only);
    an existing folder this user owns that group or others may enter is tightened to 0700."""
    folder = Path(data_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()  # (through a symbolic link: the folder it names is what must be ours)
    if info.st_uid != os.geteuid():  # another local user prepared it: they could read, delete or swap the state
        raise PermissionError(f"--data-dir {folder} belongs to another user: refused (use a folder of your own)")
    if info.st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder


class OwnerDB:
    """The worker's durable state. Thread-safe (one connection behind a lock).

    Args:
        path: the SQLite file, ``":memory:"`` for a worker that keeps nothing, or a
            ``postgresql://`` URL (shared by all the owner's worker processes).
    """

    FILENAME = "veil-worker.sqlite3"

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        self._db = Database(self.path)
        self._lock = self._db.lock
        self._reader = ReaderSlot(self._db)
        #: weak ``wait()`` methods of the threads writing audit rows into it (audit_writer.py): a read of the
        #: log waits for the rows handed to them before it
        self.row_writers: list[Any] = []
        self._db.executescript(_SCHEMA)
        add_audit_indexes(self)

    def loop_write_lock(self) -> Any:
        """The lock an event loop may take, never waiting, to write its own audit rows (audit_writer.py); None
        where a write can wait on I/O (a file's checkpoint, a PostgreSQL server): only an in-memory database."""
        return self._lock if self.path == ":memory:" else None

    def reader(self) -> Database:
        """A read-only connection of its own for the owner's long reads (the console's audit search scans the
        whole log): they never hold the lock every audit row, request and decision waits for."""
        with self._lock:
            return self._reader.get()

    @classmethod
    def in_dir(cls, data_dir: str | Path | None, db: str | None = None) -> "OwnerDB":
        """The database at URL ``db`` if given, else under ``data_dir`` (created), else in memory."""
        if db is not None:
            if not is_database_url(db):
                raise ValueError(f"--db expects a postgresql:// URL, got {redact(db)!r}")
            return cls(db)
        if data_dir is None:
            return cls(":memory:")
        return cls(private_dir(data_dir) / cls.FILENAME)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._reader.close()

    # ------------------------------------------------------------- audit

    def audit(self, worker: str, action: str, principal: str, session: str, object_ids: list | tuple = (),
              outcome: str = "allowed", detail: str = "") -> None:
        """Appends one audit record (``outcome`` is "allowed" or "refused"), after the rows handed to its row
        writers before it (a governance row, a release's, went before an earlier refusal still queued)."""
        self._after_handed_rows()
        ids = json.dumps([i for i in object_ids if type(i) is int][:1000])
        with self._lock:
            self._db.execute(
                "INSERT INTO audit (ts, worker, action, principal, session, object_ids, outcome, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), worker, action, principal, session, ids, outcome, detail[:500]),
            )

    def _after_handed_rows(self) -> None:
        """Waits for the rows handed to the row writers so far (none on a writer's own thread: audit_writer.py;
        none inside a write transaction, whose lock the writer's row needs)."""
        if self._db._in_transaction:
            return
        for writer in list(self.row_writers):
            wait = writer()
            if wait is not None:
                wait()

    def audit_entries(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The most recent ``limit`` records, oldest first."""
        self._after_handed_rows()
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, ts, worker, action, principal, session, object_ids, outcome, detail"
                " FROM audit ORDER BY seq DESC LIMIT ?", (limit,),
            ).fetchall()
        names = ("seq", "ts", "worker", "action", "principal", "session", "object_ids", "outcome", "detail")
        out = [dict(zip(names, r)) for r in reversed(rows)]
        for r in out:
            r["object_ids"] = json.loads(r["object_ids"])
        return out

    # ---------------------------------------------------------- key-value

    def kv_put(self, namespace: str, key: str, value: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO kv (namespace, key, value, updated) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(namespace, key) DO UPDATE SET value = excluded.value, updated = excluded.updated",
                (namespace, key, bytes(value), time.time()),
            )

    def kv_get(self, namespace: str, key: str, default: bytes | None = None) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE namespace = ? AND key = ?", (namespace, key)).fetchone()
        return default if row is None else bytes(row[0])

    def kv_delete(self, namespace: str, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM kv WHERE namespace = ? AND key = ?", (namespace, key))

    def kv_keys(self, namespace: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT key FROM kv WHERE namespace = ? ORDER BY key", (namespace,))]

    def kv_items(self, namespace: str) -> list[tuple[str, bytes]]:
        """Every (key, value) of ``namespace`` in one query, by key."""
        with self._lock:
            return [(r[0], bytes(r[1])) for r in self._db.execute(
                "SELECT key, value FROM kv WHERE namespace = ? ORDER BY key", (namespace,))]

    # ------------------------------------------------------------- ledger

    def ledger_append(self, namespace: str, key: str, amount: float, note: str = "") -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO ledger (ts, namespace, key, amount, note) VALUES (?, ?, ?, ?, ?)",
                (time.time(), namespace, key, float(amount), note),
            )

    def ledger_total(self, namespace: str, key: str) -> float:
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE namespace = ? AND key = ?", (namespace, key)
            ).fetchone()
        return float(row[0])


# ------------------------------------------------- audit indexes (the console's filters)
# The audit log grows with every request that moves data out and with refusals (in bounded numbers:
# refusal_rows.py); the console's Audit page filters it by user, action and time, newest first. Without these
# a filter on a user only old rows name scanned the whole log under the lock the worker's audit writes wait
# for. ``seq`` is named in each index for PostgreSQL (in SQLite it is the rowid every index ends with).

AUDIT_INDEXES = """
CREATE INDEX IF NOT EXISTS audit_by_principal ON audit (principal, seq);
CREATE INDEX IF NOT EXISTS audit_by_action ON audit (action, seq);
CREATE INDEX IF NOT EXISTS audit_by_ts ON audit (ts);
"""


def add_audit_indexes(db: OwnerDB) -> None:
    """Migration: the audit log's indexes (every open: a database made before them gets them). Idempotent."""
    with db._lock:
        db._db.executescript(AUDIT_INDEXES)


# ------------------------------------------------- release requests (governance, issue #16)
# Kept apart from _SCHEMA so a database adapter (e.g. PostgreSQL) can apply it as its own migration.

RELEASE_REQUESTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS release_requests (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    worker TEXT NOT NULL,
    principal TEXT NOT NULL,
    session TEXT NOT NULL,
    object_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    shape TEXT NOT NULL,
    dtype TEXT NOT NULL,
    digest TEXT NOT NULL,
    sources TEXT NOT NULL,
    graph TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL,
    decided_ts REAL,
    decided_by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS release_requests_by_object ON release_requests (object_id, principal);
-- a denial holds for the value (governance.release.decide looks it up before filing any request)
CREATE INDEX IF NOT EXISTS release_requests_by_digest ON release_requests (principal, digest);
-- the pending badge on every console page and the cap on a user's pending requests count by state: without
-- it each count scanned every request row (~400 KB of op graph each), ~170 ms per page at 500 rows
CREATE INDEX IF NOT EXISTS release_requests_by_state ON release_requests (state, principal, ts);
"""


def add_release_requests_table(db: OwnerDB) -> None:
    """Migration: the owner's review queue (``veil.governance.requests``). Idempotent."""
    with db._lock:
        db._db.executescript(RELEASE_REQUESTS_SCHEMA)


def db_update(db: OwnerDB, sql: str, params: tuple = ()) -> int:
    """Runs one UPDATE/DELETE under the database lock; returns how many rows it changed (``rowcount``: the
    arbiter between processes of one owner; ``RETURNING`` would need SQLite >= 3.35).

    In a transaction of its own: on PostgreSQL only its COMMIT can then be lost with the connection, and
    ``write_transaction`` looks that one up, so a decision or a release that was recorded is never reported
    as refused (a lone statement lost with its connection may have been committed, or not: nobody can tell).
    (The transaction takes the database lock itself: held here too, it would be held through that lookup.)"""
    with db._db.write_transaction():
        return db._db.execute(sql, params).rowcount


def db_update_then(db: OwnerDB, sql: str, params: tuple, then_sql: str, then_params: tuple) -> int:
    """:func:`db_update`, and ``then_sql`` in the same transaction only when ``sql`` changed a row (a change and
    its mark, kept together); returns how many rows ``sql`` changed."""
    with db._db.write_transaction():
        changed = db._db.execute(sql, params).rowcount
        if changed:
            db._db.execute(then_sql, then_params)
        return changed


@contextmanager
def serialized_write(db: OwnerDB, lock_name: str) -> Iterator[Database]:
    """A write transaction the owner's processes run one at a time per ``lock_name``: SQLite's ``BEGIN
    IMMEDIATE`` holds the whole file, and on PostgreSQL a transaction-scoped advisory lock on the name (read
    committed let two transactions each read before the other wrote). Yields the database to run statements in
    it; commits at the end, rolls back on an exception. Refused inside another write transaction of the
    connection (RuntimeError): PostgreSQL's ``BEGIN`` there only warns, and this ``COMMIT`` would end the outer
    transaction half done."""
    with db._db.lock:
        if db._db._in_transaction:
            raise RuntimeError(f"serialized_write({lock_name!r}) inside another write transaction: refused")
    with db._db.write_transaction():
        if db._db.dialect == "postgresql":
            db._db.execute("SELECT pg_advisory_xact_lock(?)", (zlib.crc32(lock_name.encode()),))
        yield db._db


def db_clock(db: OwnerDB) -> float:
    """Now, in seconds since the epoch, on the clock every process of the owner shares: the PostgreSQL server's
    (replicas on several hosts each had their own, and a host running behind wrote times that sorted before
    what another host wrote earlier: give_backs.py's twin check read a twin as older than the approval it
    followed), the host's for a SQLite file (one host)."""
    if db._db.dialect != "postgresql":
        return time.time()
    with db._lock:
        return float(db._db.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8").fetchone()[0])


def insert_below_cap(db: OwnerDB, lock_name: str, count_sql: str, count_params: tuple, cap: int,
                     insert_sql: str, insert_params: tuple) -> int | None:
    """Runs ``insert_sql`` only while ``count_sql`` counts fewer than ``cap`` rows, the two in one
    :func:`serialized_write` on ``lock_name`` (read committed let two of the owner's processes both count below
    the cap, then both insert). Returns the count when it was at the cap (nothing inserted), else None."""
    with serialized_write(db, lock_name) as tx:
        (count,), = tx.execute(count_sql, count_params).fetchall()
        if int(count) >= cap:
            return int(count)
        tx.execute(insert_sql, insert_params)
        return None


def db_read(db: OwnerDB, sql: str, params: tuple = ()) -> list[tuple]:
    """Runs one query on the database's read-only connection (:meth:`OwnerDB.reader`); returns the rows."""
    reader = db.reader()
    with reader.lock:
        return reader.execute(sql, params).fetchall()


def db_execute(db: OwnerDB, sql: str, params: tuple = ()) -> list[tuple]:
    """Runs one statement under the database lock; returns the rows (``?`` placeholders; none for a statement
    without a result: psycopg refuses ``fetchall`` there, so INSERT/UPDATE failed on PostgreSQL)."""
    with db._lock:
        cursor = db._db.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []
