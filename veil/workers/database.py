"""One SQL connection for owner state: SQLite (the embedded default) or PostgreSQL.

The owner's audit log, key-value state and privacy ledger are written with the
same SQL on both engines; this adapter hides the three differences that matter:

- placeholders: the callers write ``?``; PostgreSQL (psycopg 3) gets ``%s``;
- schema types: ``INTEGER PRIMARY KEY AUTOINCREMENT``, ``BLOB`` and ``REAL``
  become an identity column, ``BYTEA`` and ``DOUBLE PRECISION``;
- write transactions: :meth:`Database.write_transaction` is ``BEGIN IMMEDIATE``
  on SQLite (one writer per file, across processes) and ``BEGIN`` (read
  committed) on PostgreSQL, where callers lock the rows they read-modify-write
  with ``SELECT ... FOR UPDATE`` (:attr:`Database.for_update`), so that worker
  processes sharing one database serialize on the same row.

A location is a file path (or ``":memory:"``) for SQLite, or a
``postgresql://`` URL. Connection URLs may carry a password: use
:func:`redact` before printing one.

A PostgreSQL server that fails while serving (down, restarting, frozen, cut off)
raises :class:`OwnerStateUnavailableError`, whose text names no host, port,
database or role (a scientist's failed request may carry it): the detail goes to
the owner's log. Every statement has a deadline (see :class:`_Watchdog`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import weakref
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union
from urllib.parse import unquote

from veil.exceptions import VeilError, register_remote_error

log = logging.getLogger(__name__)

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_database_url(location: Any) -> bool:
    """True for a PostgreSQL connection URL (anything else is an SQLite path)."""
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


def redact(location: Any) -> str:
    """The location with any password replaced by ``***`` (safe to print or log): ``user:password@`` in a URL,
    a ``password=`` URL parameter, and a ``password=`` keyword of a ``key=value`` conninfo (as in libpq's
    error lines)."""
    text = str(location)
    # the user info ends at the netloc's last '@' before a '/' (libpq reads an unencoded '?' or '#' there as part
    # of the password; greedy: masking too much is safe)
    text = re.sub(r"(://[^:/@]*:)[^/]*@", r"\1***@", text)
    if "://" in text:  # query keys are percent-decoded by libpq (%70assword is password)
        return re.sub(r"([?&])([^=&#]*)=([^&#\s]*)",
                      lambda g: f"{g[1]}{g[2]}=***" if _SECRET_KEYS.search(unquote(g[2])) else g[0], text)
    return re.sub(r"(\b(?:ssl)?password\s*=\s*)('(?:\\.|[^'\\])*'|\S*)", r"\1***", text, flags=re.I)


#: libpq connection keywords whose value is a secret (the password, the client key's passphrase)
_SECRET_KEYS = re.compile(r"^\s*(?:ssl)?password\s*$", re.I)


class OwnerStateUnavailableError(VeilError):
    """The owner's state database (PostgreSQL) failed while serving: down, restarting, frozen or out of reach.

    The text is generic (no URL, host, port, database or role): a scientist's request that needed the
    state (a DP charge, an audit row) fails with it. The detail goes to the owner's log."""

    value_free = True  # veil's own text, nothing of the owner's data or setup


_UNAVAILABLE = "the owner's state database is unavailable: the request was refused, try again later"
_NOT_RECORDED = ("the owner's state database was lost while committing: the change was not recorded (the "
                 "database rolled it back), try again later")
_UNKNOWN_OUTCOME = ("the owner's state database was lost while committing: whether the change was recorded is "
                    "unknown (nothing was released on it); repeating it is safe (a DP request with the same "
                    "request id is charged at most once)")


class CommitOutcomeUnknownError(OwnerStateUnavailableError):
    """A PostgreSQL COMMIT whose answer was lost, and whose outcome could not be looked up: the change may or
    may not be recorded. Never reported as refused (it may have been recorded) nor as done."""


class DatabaseClosedError(OwnerStateUnavailableError):
    """A use of a :class:`Database` (or of its :class:`ReaderSlot`) after ``close()``: refused, never a
    closed connection used nor a fresh one opened that nobody would close (PostgreSQL reconnected silently)."""


_CLOSED = "the owner's state database was closed (the worker is stopping): the request was refused"

# a scientist's request that needed the owner's state fails with these: they reach the client by name
for _cls in (OwnerStateUnavailableError, CommitOutcomeUnknownError, DatabaseClosedError):
    register_remote_error(_cls)

# Server-side limits, as multiples of the Database's ``timeout`` (the row-lock wait, lock_timeout): a statement
# ends on a live server by then (statement_timeout). A server that stopped answering cannot enforce them: see
# _Watchdog for the client-side deadline.
_STATEMENT_TIMEOUT_FACTOR = 2
# libpq connection parameters given when the URL does not set them: a connect attempt gives up after 10 s, and
# a peer that vanished (packets dropped) is detected by TCP keepalives and the unacknowledged-data timeout.
_CONNECT_DEFAULTS = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
                     "keepalives_count": "3", "tcp_user_timeout": "60000"}
_MAX_CONNECT_TIMEOUT = 10


class _Watchdog:
    """The client-side deadline of every PostgreSQL statement (one daemon thread for all connections).

    A frozen server (host suspended, process stopped) or a partition keeps the TCP connection open: the
    kernel may still acknowledge what is sent, so keepalives and ``tcp_user_timeout`` need not fire, and the
    server cannot enforce ``statement_timeout``. psycopg then waits forever, in a thread that holds the
    Database's lock (a DP release and every later one on that worker). So a statement still running after
    ``STALL_S`` seconds triggers a liveness check (a fresh connection, ``PROBE_S`` to answer): if the server
    does not answer, the statement's socket is shut down and psycopg raises at once. A statement on a live
    server is left to the server's own limits, up to ``hard_s`` (3 x its statement_timeout). A server is
    probed once a round however many of its statements stalled (commit lookups run beside the main
    connection's statement: probed one by one, that statement, which holds every charge's lock, waited 5 s
    more for each).
    """

    STALL_S = 10.0
    PROBE_S = 5

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.watched: "weakref.WeakSet[Database]" = weakref.WeakSet()
        self.thread: threading.Thread | None = None

    def watch(self, db: "Database") -> None:
        with self.lock:
            self.watched.add(db)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="veil-db-watchdog", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self.lock:
                stalled = [(db, db._busy) for db in list(self.watched)
                           if db._busy is not None and now >= db._busy[2]]
            answers: dict[str, bool] = {}  # (one probe per server a round: many lookups stall at once)
            for db, busy in stalled:
                conn, started, _check = busy
                if now - started < db._hard_s and db.location not in answers:
                    answers[db.location] = _server_answers(db.location, self.PROBE_S)
                dead = now - started >= db._hard_s or not answers[db.location]
                with self.lock:
                    if db._busy is not busy:  # that statement ended meanwhile
                        continue
                    if not dead:
                        busy[2] = time.monotonic() + self.STALL_S
                        continue
                    db._busy = None
                    _sever(conn)
                log.warning("owner state database %s: a statement got no answer for %.0f s: connection dropped",
                            redact(db.location), time.monotonic() - started)


_WATCHDOG = _Watchdog()


def reader_of(db: "Database") -> "Database":
    """A read-only connection of its own to ``db``'s database, for long reads (the console's Budgets and Audit
    pages sum, bucket or search a whole table): they then never hold ``db``'s lock, which every charge and audit
    row waits for. An in-memory SQLite database has only the one connection: ``db`` itself."""
    if db.dialect == "sqlite" and db.location == ":memory:":
        return db
    return Database(db.location, timeout=db._timeout, read_only=True)


class ReaderSlot:
    """``db``'s read-only connection (:func:`reader_of`), opened on first use and closed with ``db``; the
    owner (OwnerDB, BudgetLedger) calls both under its own lock."""

    def __init__(self, db: "Database") -> None:
        self._db, self._conn, self._closed = db, None, False

    def get(self) -> "Database":
        if self._closed:  # (final: a reader handed out before is closed too, and refuses likewise)
            raise DatabaseClosedError(_CLOSED)
        if self._conn is None:
            self._conn = reader_of(self._db)
        return self._conn

    def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn not in (None, self._db):
            conn.close()


def _refuse_pragmas(action: int, *_: Any) -> int:
    """SQLite authorizer of a read-only connection: no PRAGMA (``query_only = 0``), ATTACH or DETACH."""
    refused = (sqlite3.SQLITE_PRAGMA, sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH)
    return sqlite3.SQLITE_DENY if action in refused else sqlite3.SQLITE_OK


def commit_status(db: "Database", xid: int, backend_pid: int) -> str | None:
    """What became of transaction ``xid`` (``txid_current()``) whose COMMIT lost its connection: "committed",
    "aborted", or None when that cannot be told (the server does not answer, or the transaction is still
    running after ``_Watchdog.PROBE_S``). Asked on a fresh connection; the old backend is ended first if it
    still holds that very transaction (checked by its xid, so a reused process id is never touched), since
    an open transaction's outcome is not decided yet."""
    import psycopg

    try:
        check = psycopg.connect(db.location, connect_timeout=_Watchdog.PROBE_S, autocommit=True)
    except Exception:  # noqa: BLE001 - no answer: the outcome cannot be told
        return None
    try:
        def ask() -> str | None:
            check.execute(f"SET statement_timeout = {_Watchdog.PROBE_S * 1000}")
            check.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s "
                          "AND backend_xid::text = %s", (backend_pid, str(xid % 2 ** 32)))
            deadline = time.monotonic() + _Watchdog.PROBE_S
            while True:
                status = check.execute("SELECT txid_status(%s)", (xid,)).fetchone()[0]
                if status in ("committed", "aborted") or time.monotonic() > deadline:
                    return status if status in ("committed", "aborted") else None
                time.sleep(0.05)

        probe = _LookupWatch(db)  # (watched on its own: db's other statements may run meanwhile)
        return probe.guarded(check, ask)  # (a server freezing now is the watchdog's too)
    except Exception:  # noqa: BLE001 - lost again: unknown
        return None
    finally:
        try:
            check.close()
        except Exception:  # noqa: BLE001
            pass


class _LookupWatch:
    """What the watchdog watches for one commit lookup (:func:`commit_status`): it runs outside the Database's
    lock, beside that Database's own statements, so it has its own statement in flight (``_busy``)."""

    def __init__(self, db: "Database") -> None:
        self.location, self._hard_s, self._busy = db.location, db._hard_s, None
        _WATCHDOG.watch(self)

    def guarded(self, conn: Any, call: Callable[[], Any]) -> Any:
        return Database._guarded(self, conn, call)  # type: ignore[arg-type]


def _server_answers(location: str, timeout: int) -> bool:
    import psycopg

    try:  # a new session's handshake (the server forks a backend, authenticates) is the answer
        psycopg.connect(location, connect_timeout=timeout, autocommit=True).close()
        return True
    except psycopg.Error as e:  # a refusal with an SQLSTATE (e.g. too many connections) is an answer
        return getattr(e, "sqlstate", None) is not None
    except Exception:  # noqa: BLE001 - any other failure to answer counts as no answer
        return False


def _sever(conn: Any) -> None:
    """Shuts the connection's socket down: psycopg's pending wait returns and reports the connection lost."""
    try:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except Exception:  # noqa: BLE001 - already closed
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


_PG_TYPES = (
    (re.compile(r"INTEGER PRIMARY KEY AUTOINCREMENT", re.I), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bBLOB\b", re.I), "BYTEA"),
    (re.compile(r"\bREAL\b", re.I), "DOUBLE PRECISION"),
)


def postgres_schema(schema: str) -> str:
    """SQLite DDL -> the equivalent PostgreSQL DDL (only the constructs veil's schemas use)."""
    for pattern, replacement in _PG_TYPES:
        schema = pattern.sub(replacement, schema)
    return schema


def equality_filters(**columns: Any) -> tuple[list[str], list[Any]]:
    """``col = ?`` clauses and their parameters for every filter given a value (None/"" = no filter).

    Column names are the caller's keyword names (code, never user input); values are parameters.
    """
    clauses = [f"{name} = ?" for name, value in columns.items() if value not in (None, "")]
    params = [value for value in columns.values() if value not in (None, "")]
    return clauses, params


def _one_line(error: BaseException) -> str:
    """A driver error's message, redacted, on one line (psycopg's has a newline before its hint): the CLI
    prints one line per error."""
    return redact(" ".join(str(error).split())) or type(error).__name__


def _owner_only(path: str) -> None:
    """Creates the SQLite file ``path`` mode 0600 before sqlite opens it (sqlite would create it, and its -wal
    and -shm files, which take the main file's mode, from the umask: world-readable under the usual 022), and
    tightens an existing one this user owns: owner state (audit log, review queue, privacy ledger) is the
    owner's only."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PermissionError(f"state file {path} is a symbolic link: refused (owner state is a plain file)")
        return  # unreadable, a folder, no such folder: sqlite's own open reports it
    if os.stat(path).st_uid != os.geteuid():
        raise PermissionError(f"state file {path} belongs to another user: refused (they could read or swap it)")
    for name in (path, path + "-wal", path + "-shm", path + "-journal"):
        try:
            info = os.stat(name)
            if info.st_uid == os.geteuid() and info.st_mode & 0o077:
                os.chmod(name, info.st_mode & 0o700)
        except OSError:
            pass


class Database:
    """A connection shared by a worker's threads behind a lock (re-entrant, so a
    transaction can call helper queries).

    Args:
        location: SQLite file path, ``":memory:"``, or a ``postgresql://`` URL.
        timeout: seconds to wait for another process's write lock.
        read_only: every session of it refuses writes (:func:`reader_of`: long reads of the owner's pages).
    """

    def __init__(self, location: Union[str, Path], timeout: float = 30.0, synchronous: str = "NORMAL",
                 read_only: bool = False) -> None:
        self.location = str(location)
        self.read_only = read_only
        self.dialect = "postgresql" if is_database_url(self.location) else "sqlite"
        self.lock = threading.RLock()
        self._timeout = timeout
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self._synchronous = synchronous
        self._in_transaction = False
        self._closed = False
        # PostgreSQL: (connection, started, next liveness check) of the statement in flight (see _Watchdog)
        self._busy: list | None = None
        self._hard_s = 3 * _STATEMENT_TIMEOUT_FACTOR * timeout
        self._conn = self._connect()
        if self.dialect == "postgresql":
            _WATCHDOG.watch(self)

    @property
    def for_update(self) -> str:
        """Suffix that row-locks what a SELECT read, until the transaction ends (PostgreSQL only:
        SQLite's ``BEGIN IMMEDIATE`` already holds the whole file)."""
        return " FOR UPDATE" if self.dialect == "postgresql" else ""

    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            if self.location != ":memory:":
                _owner_only(self.location)
            try:
                conn = sqlite3.connect(self.location, isolation_level=None, timeout=self._timeout,
                                       check_same_thread=False)
            except sqlite3.DatabaseError as e:
                raise self._unusable(e) from None
            if self.location != ":memory:":
                try:
                    # WAL + NORMAL: a committed row survives a process crash; a power cut may lose the last
                    # few. FULL (the DP ledger) fsyncs every commit: a charge outlives the release it paid for.
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute(f"PRAGMA synchronous={self._synchronous}")
                    if self.read_only:
                        conn.execute("PRAGMA query_only = 1")
                        conn.set_authorizer(_refuse_pragmas)  # (after: query_only = 0 would undo it)
                except sqlite3.DatabaseError as e:
                    conn.close()
                    raise self._unusable(e) from None
            return conn
        try:
            import psycopg
        except ImportError:  # pragma: no cover - psycopg is a dependency
            raise RuntimeError("PostgreSQL owner state needs psycopg: pip install 'psycopg[binary]'") from None
        from psycopg.conninfo import conninfo_to_dict

        try:
            given = conninfo_to_dict(self.location)
        except psycopg.ProgrammingError:
            raise ConnectionError(f"cannot connect to {redact(self.location)}: not a valid connection URL") from None
        params = {k: v for k, v in _CONNECT_DEFAULTS.items() if k not in given}
        if "connect_timeout" not in given:
            params["connect_timeout"] = str(max(2, min(int(self._timeout), _MAX_CONNECT_TIMEOUT)))
        try:
            conn = psycopg.connect(self.location, autocommit=True, **params)
        except psycopg.OperationalError as e:
            raise ConnectionError(f"cannot connect to {redact(self.location)}: {_one_line(e)}") from None
        try:
            # Wait at most `timeout` for another worker's row lock instead of forever, and end any statement
            # on the server after twice that (a frozen server is the watchdog's: see _Watchdog).
            self._guarded(conn, lambda: conn.execute(f"SET lock_timeout = {int(self._timeout * 1000)}"))
            self._guarded(conn, lambda: conn.execute(
                f"SET statement_timeout = {int(_STATEMENT_TIMEOUT_FACTOR * self._timeout * 1000)}"))
            if self.read_only:  # (every session: a reconnect keeps it)
                self._guarded(conn, lambda: conn.execute("SET default_transaction_read_only = on"))
        except psycopg.Error as e:
            conn.close()
            raise ConnectionError(f"cannot connect to {redact(self.location)}: {_one_line(e)}") from None
        return conn

    def _guarded(self, conn: Any, call: Callable[[], Any]) -> Any:
        """``call()`` (one statement on ``conn``) under the watchdog's deadline."""
        busy = [conn, time.monotonic(), time.monotonic() + _Watchdog.STALL_S]
        with _WATCHDOG.lock:
            self._busy = busy
        try:
            return call()
        finally:
            with _WATCHDOG.lock:
                if self._busy is busy:
                    self._busy = None

    def _pg(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        """One statement on PostgreSQL; a failed or lost server raises :class:`OwnerStateUnavailableError`
        (the detail, redacted, to the owner's log only)."""
        import psycopg

        try:
            if self._conn.closed and not self._in_transaction:
                self._conn = self._connect()  # the server restarted: a fresh session is safe between transactions
            conn = self._conn
            return self._guarded(conn, lambda: conn.execute(sql, params))
        except (ConnectionError, psycopg.OperationalError, psycopg.InterfaceError, psycopg.InternalError,
                psycopg.NotSupportedError, psycopg.errors.InsufficientPrivilege) as e:
            # (a lost server, or one that takes no writes after a failover: ReadOnlySqlTransaction is an
            # InternalError; integrity errors stay for the callers that arbitrate with them)
            log.warning("owner state database %s: %s: %s", redact(self.location), type(e).__name__,
                        redact(str(e).strip()))
            raise OwnerStateUnavailableError(_UNAVAILABLE) from None

    def _unusable(self, error: sqlite3.DatabaseError) -> sqlite3.DatabaseError:
        """A damaged or truncated state file at open: one line naming the file (``veil`` prints it, exit 2)
        instead of a traceback. Nothing was written to it: it stays as it was for the owner to inspect."""
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return sqlite3.DatabaseError(f"cannot open the state file {self.location}: {reason} "
                                     "(left as it is; restore it from a backup or move it aside)")

    def _sql(self, sql: str) -> str:
        # psycopg reads % as a placeholder prefix: a literal % (e.g. in LIKE) is doubled first.
        return sql.replace("%", "%%").replace("?", "%s") if self.dialect == "postgresql" else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Runs one statement; returns a cursor (``fetchone``, ``fetchall``, iteration)."""
        with self.lock:
            if self._closed:
                raise DatabaseClosedError(_CLOSED)
            if self.read_only:
                return self._read(sql, tuple(params))
            if self.dialect == "postgresql":
                return self._pg(self._sql(sql), tuple(params))
            return self._conn.execute(sql, tuple(params))

    def _read(self, sql: str, params: tuple) -> Any:
        """A read-only connection's query. On PostgreSQL one query (``BEGIN; SET TRANSACTION READ WRITE;
        DELETE ...`` in one string got past the session's read-only default), in a ``READ ONLY`` transaction
        of its own, which it cannot turn writable (``set_config`` of the session default reaches only later
        transactions). SQLite runs one statement per call, and its authorizer refuses ``PRAGMA query_only = 0``
        (:func:`_refuse_pragmas`)."""
        if self.dialect == "sqlite":
            return self._conn.execute(sql, params)
        head = sql.strip().rstrip(";").strip()
        if ";" in head or (head.split(None, 1) or [""])[0].upper() not in ("SELECT", "WITH"):
            raise ValueError("a read-only database connection runs one SELECT at a time")
        self._pg("BEGIN READ ONLY")
        self._in_transaction = True  # (a session lost mid-query must not reconnect and go on outside it)
        try:
            rows = self._pg(self._sql(head), params)
            self._pg("COMMIT")
            return rows
        except BaseException:
            if not self._conn.closed:
                try:
                    self._guarded(self._conn, lambda: self._conn.execute("ROLLBACK"))
                except Exception:  # noqa: BLE001 - lost: the server rolled it back
                    pass
            raise
        finally:
            self._in_transaction = False

    def executescript(self, schema: str) -> None:
        """Creates the tables of ``schema`` (SQLite DDL) if absent."""
        with self.lock:
            if self._closed:
                raise DatabaseClosedError(_CLOSED)
            if self.dialect == "sqlite":
                try:
                    self._conn.executescript(schema)
                except sqlite3.DatabaseError as e:  # e.g. a file cut short that still opened
                    raise self._unusable(e) from None
                return
            if self._pg("SHOW transaction_read_only").fetchone()[0] == "on":
                return  # a hot standby (or a read-only role): its tables are the primary's; creating is refused
            # Several worker processes may start at once: CREATE TABLE IF NOT EXISTS races on
            # PostgreSQL's catalog, so creation is serialized by an advisory lock.
            with self.write_transaction():
                self._pg("SELECT pg_advisory_xact_lock(%s)", (zlib.crc32(schema.encode()),))
                self._pg(postgres_schema(schema))

    @contextmanager
    def write_transaction(self) -> Iterator["Database"]:
        """A transaction that commits on success and rolls back on any exception.

        A PostgreSQL COMMIT whose connection was lost is looked up after the lock is let go (up to ~10 s when
        the server is really gone): the worker's other charges and audit rows do not wait for it (a caller
        that holds the lock itself still does)."""
        lost = None
        with self.lock:
            self.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
            self._in_transaction = True
            xid = None
            try:
                if self.dialect == "postgresql":  # (named: a COMMIT whose answer is lost is looked up by it)
                    xid = (self._pg("SELECT txid_current()").fetchone()[0], self._conn.pgconn.backend_pid)
                yield self
            except BaseException:
                self._in_transaction = False
                try:
                    if self.dialect == "sqlite":
                        self._conn.execute("ROLLBACK")
                    elif not self._conn.closed:  # (no reconnecting here: a new session has nothing to roll back)
                        self._guarded(self._conn, lambda: self._conn.execute("ROLLBACK"))
                except Exception:  # the connection died mid-transaction: the server rolled it back
                    pass
                raise
            try:  # (still in the transaction: a connection lost before COMMIT must not reconnect and "commit")
                self._conn.execute("COMMIT") if self.dialect == "sqlite" else self._pg("COMMIT")
            except OwnerStateUnavailableError:  # PostgreSQL: the COMMIT may have been recorded before the loss
                self._in_transaction = False
                lost = xid
                try:
                    self._conn.close()  # (the next statement, of any thread, reconnects)
                except Exception:  # noqa: BLE001 - already broken
                    pass
            except BaseException:
                self._end_failed_commit()
                raise
            finally:
                self._in_transaction = False
        if lost is not None:
            self._settle_lost_commit(*lost)

    def _settle_lost_commit(self, xid: int, backend_pid: int) -> None:
        """A COMMIT whose connection was lost (its connection already closed): returns if the transaction was
        recorded (it did commit), raises OwnerStateUnavailableError if the server rolled it back,
        CommitOutcomeUnknownError if that cannot be told. A failed COMMIT used to be reported as refused ("try
        again") even when it had been recorded. Asked on a connection of its own (no lock needed)."""
        status = commit_status(self, xid, backend_pid)
        log.warning("owner state database %s: connection lost during COMMIT; transaction %s: %s",
                    redact(self.location), xid, status or "outcome unknown")
        if status == "aborted":
            raise OwnerStateUnavailableError(_NOT_RECORDED)
        if status != "committed":
            raise CommitOutcomeUnknownError(_UNKNOWN_OUTCOME)

    def _end_failed_commit(self) -> None:
        """A COMMIT that raised (disk full, an I/O error at its fsync, a lock, the watchdog severing it) ends
        the transaction here: SQLite keeps a transaction open after some failed COMMITs, and then every later
        write of this worker (the next charge's BEGIN) failed, its half-written rows stayed readable on this
        connection and its write lock held the file against the owner's other processes. Rolled back, what
        the caller did not get a COMMIT for is not recorded, and the next transaction starts clean.
        (PostgreSQL ends a transaction whose COMMIT failed itself; a severed connection is dropped.)"""
        if self.dialect != "sqlite" or not self._conn.in_transaction:
            return
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:  # already rolled back by the error itself
            pass

    def close(self) -> None:
        """Final: every later statement raises :class:`DatabaseClosedError` (PostgreSQL no longer reconnects)."""
        with self.lock:
            self._closed = True
            self._conn.close()
