"""The owner's cap on the audit log (``veil worker --audit-max-rows N``).

Refusals are written in bounded numbers (refusal_rows.py), but every allowed request that moves data out is a
row of its own: a scientist fetching a one-element result of its own in a loop still grew the owner's database
by a row per round trip, for as long as the worker served. With a cap, the oldest rows of that kind are
deleted once they are older than the latest ``max_rows`` rows (checked on the audit log's 10 s timer and at
stop): at most ``max_rows`` of them are kept.

Never deleted: the owner's own decisions (approvals, denials, policy
changes, revocations, console log-ins), the scientists' release requests, releases of protocol outputs and
reviewed values, and DP releases (each one a charge to a privacy budget).
"""

from __future__ import annotations

import logging
import threading
import time

from veil.workers.persistence import OwnerDB, db_execute, db_update

log = logging.getLogger(__name__)

#: how long the stop waits for a trim under way (past a lost COMMIT's lookup, ~15 s)
STOP_JOIN_S = 20.0

#: the default cap: ~1 GB of SQLite at ~200 bytes a row
DEFAULT_MAX_ROWS = 5_000_000
#: actions whose rows the cap never deletes (module doc)
KEPT_ACTIONS = ("approve", "deny", "policy", "revoke", "readmit", "console_login", "request", "release",
                "dp_release")
_DROPPABLE = f"action NOT IN ({', '.join('?' * len(KEPT_ACTIONS))})"


def trim_audit(db: OwnerDB, max_rows: int) -> int:
    """Deletes the deletable rows older than the latest ``max_rows`` rows (by sequence number: no count of
    the log, which took time in proportion to it on every tick); returns how many it deleted. The range
    read is the rows kept before it (few) and those going now."""
    (newest,), = db_execute(db, "SELECT MAX(seq) FROM audit")
    if newest is None or newest <= max_rows:
        return 0
    return db_update(db, f"DELETE FROM audit WHERE seq <= ? AND {_DROPPABLE}", (newest - max_rows, *KEPT_ACTIONS))


class AuditRetention:
    """Keeps at most ``max_rows`` deletable rows in the audit log, on the connect log's timer (a follower of
    ``websocket_auth.RefusalLog``: :meth:`flush_due` every window, :meth:`flush` at stop)."""

    def __init__(self, db: OwnerDB, max_rows: int, every: float = 10.0) -> None:
        if type(max_rows) is not int or max_rows < 1:
            raise ValueError(f"the audit log's cap must be a whole number of rows >= 1, got {max_rows!r}")
        self.db, self.max_rows, self.every = db, max_rows, every
        self._last = float("-inf")
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None  # the trim under way (flush_due), if any

    def flush_due(self) -> None:
        """(the connect log's timer and each refused handshake: on the event loop, which never waits for the
        database) the trim, if due, on a thread of its own, one at a time: a DELETE in a write transaction,
        behind the lock a stalled row write holds, held every connection and ping there."""
        with self._guard:
            if time.monotonic() - self._last < self.every or (self._thread is not None and self._thread.is_alive()):
                return
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._trim, name="veil-audit-trim", daemon=True)
            self._thread.start()

    def _trim(self) -> None:
        try:
            trim_audit(self.db, self.max_rows)
        except Exception:  # noqa: BLE001 - the next tick tries again
            log.exception("could not trim the audit log to its cap")

    def flush(self) -> None:
        """(the stop, before the database closes) after the trim under way, if any: the trim, done here."""
        thread = self._thread
        if thread is not None:
            thread.join(STOP_JOIN_S)
        self._last = time.monotonic()
        trim_audit(self.db, self.max_rows)
