"""The owner's cap on the audit log (``veil worker --audit-max-rows N``).

Refusals are written in bounded numbers (refusal_rows.py), but every allowed request that moves data out is a
row of its own: a scientist fetching a one-element result of its own in a loop still grew the owner's database
by a row per round trip, for as long as the worker served. With a cap, the oldest rows of that kind are
deleted once there are more than ``max_rows`` of them (checked on the audit log's 10 s timer and at stop).

Never deleted, and not counted against the cap: the owner's own decisions (approvals, denials, policy
changes, revocations, console log-ins), the scientists' release requests, releases of protocol outputs and
reviewed values, and DP releases (each one a charge to a privacy budget).
"""

from __future__ import annotations

import time

from veil.workers.persistence import OwnerDB, db_execute, db_update

#: the default cap: ~1 GB of SQLite at ~200 bytes a row
DEFAULT_MAX_ROWS = 5_000_000
#: actions whose rows the cap never deletes (module doc)
KEPT_ACTIONS = ("approve", "deny", "policy", "revoke", "readmit", "console_login", "request", "release",
                "dp_release")
_DROPPABLE = f"action NOT IN ({', '.join('?' * len(KEPT_ACTIONS))})"


def trim_audit(db: OwnerDB, max_rows: int) -> int:
    """Deletes the oldest deletable rows past ``max_rows`` of them; returns how many it deleted."""
    (count,), = db_execute(db, f"SELECT COUNT(*) FROM audit WHERE {_DROPPABLE}", KEPT_ACTIONS)
    excess = count - max_rows
    if excess <= 0:
        return 0
    return db_update(db, f"DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE {_DROPPABLE} "
                         "ORDER BY seq LIMIT ?)", (*KEPT_ACTIONS, excess))


class AuditRetention:
    """Keeps the audit log at most ``max_rows`` deletable rows, on the connect log's timer (a follower of
    ``websocket_auth.RefusalLog``: :meth:`flush_due` every window, :meth:`flush` at stop)."""

    def __init__(self, db: OwnerDB, max_rows: int, every: float = 10.0) -> None:
        if type(max_rows) is not int or max_rows < 1:
            raise ValueError(f"the audit log's cap must be a whole number of rows >= 1, got {max_rows!r}")
        self.db, self.max_rows, self.every = db, max_rows, every
        self._last = float("-inf")

    def flush_due(self) -> None:
        if time.monotonic() - self._last >= self.every:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        trim_audit(self.db, self.max_rows)
