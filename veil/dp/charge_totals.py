"""Each user's running spent total in the budget ledger: a charge costs the same at a user's millionth row as at
the first.

Summing a user's ``charges`` rows on every charge (under the lock every other user's charge waits for) made one
charge take time in proportion to that user's rows: a scientist making many tiny charges (DP queries at
epsilon 1e-6, DP-SGD steps that cost ~0) slowed every charge of the owner's DP service, without bound.

``charge_totals`` keeps, per user, the id of the last charge counted and the compensated (Neumaier) sums of
epsilon and delta up to it, written in the same transaction as each charge, with the user's stamp it was summed
at (:mod:`veil.dp.ledger_rows`: bumped by triggers on every change of her rows but an append) and her row count.
It is derived data, trusted only while its ``last_id`` is the user's newest charge id and its stamp hers (two
index look-ups); otherwise it is brought up to date from the rows: the charges after its ``last_id`` are added
when rows were only appended since (a process of an older version charging the same file), else (an older
ledger, ``veil db migrate`` of one, a row deleted, changed or put back below the newest by hand) all the user's
rows are summed again. Compensated sums keep float drift from dropping tiny charges (plain summation adds a
1e-16 charge to a spent 1.0 as nothing); sums the database recomputes carry their rounding error bound, so drift
never favours the spender.

A read (:func:`current`) writes nothing (a read-only standby answers too): what it summed is kept by the caller
(``BudgetLedger`` keeps it in memory), trusted only at the same stamp count and the same nonce the stamp's last
bump drew: a count alone came back over other rows after a restore (the restored stamp lower, the owner's next
change raising it to the same count). A user never changed has stamp 0 in any ledger: her nonce is the ledger's
generation (:mod:`veil.dp.ledger_generation`), so another ledger put in this one's place is not read through it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from veil.dp import ledger_rows
from veil.workers.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS charge_totals (
    "user" TEXT PRIMARY KEY,
    last_id BIGINT NOT NULL,
    epsilon REAL NOT NULL,
    epsilon_error REAL NOT NULL,
    delta REAL NOT NULL,
    delta_error REAL NOT NULL
);
-- (later columns, added to older files too: veil.dp.ledger_rows)
CREATE INDEX IF NOT EXISTS charges_by_user_id ON charges ("user", id);
"""


def _add(total: float, error: float, x: float) -> tuple[float, float]:
    """Neumaier's compensated summation step: ``total + error`` is the running sum, ``error`` what rounding lost."""
    t = total + x
    if math.isinf(t):  # (an owner's infinite budget: inf - inf would turn the error, and the sum, into NaN)
        return t, 0.0
    error += (total - t) + x if abs(total) >= abs(x) else (x - t) + total
    return t, error


def _upward(total: float, error: float) -> float:
    """``total + error``, never below the exact sum of what was added: a compensated sum ends within a few ulps
    of it, on either side (Higham, Accuracy and Stability of Numerical Algorithms, 2002, sec. 4.3), so a rounded
    one is raised by 2**-50 of itself (4 ulps; far under the ledger's 1e-9 slack). An error of 0: every addition
    was exact, and so is the total (an owner's 2.0 stays 2.0)."""
    s = total + error
    return s if error == 0 or math.isinf(s) else s + abs(s) * 2.0 ** -50


@dataclass(frozen=True)
class Total:
    """A user's charges up to ``last_id`` (None: no charges), summed with their rounding errors, at her stamp
    ``edits`` (-1: none) whose last bump drew ``nonce`` (0: none, or not read: a stored total), over ``row_count``
    rows."""

    last_id: Optional[int] = None
    epsilon: float = 0.0
    epsilon_error: float = 0.0
    delta: float = 0.0
    delta_error: float = 0.0
    edits: int = -1
    row_count: int = 0
    nonce: int = 0
    #: Its newest row (``last_id``'s epsilon, delta and time) as read when it was summed; None: not read (a stored
    #: total, one a charge made). A total in memory is used only while that row is still there as it was.
    newest: Optional[tuple] = None

    @property
    def spent(self) -> tuple[float, float]:
        return _upward(self.epsilon, self.epsilon_error), _upward(self.delta, self.delta_error)

    def plus(self, charge_id: int, epsilon: float, delta: float) -> "Total":
        """With one more charge (its id may be below ``last_id``: a row put back above the ids handed out)."""
        last = charge_id if self.last_id is None else max(self.last_id, charge_id)
        return Total(last, *_add(self.epsilon, self.epsilon_error, epsilon),
                     *_add(self.delta, self.delta_error, delta), self.edits, self.row_count + 1, self.nonce)


def _from_rows(db: Database, user: str, last_id: int, start: Total = Total()) -> Total:
    """``start`` plus the user's charges after ``start.last_id`` up to ``last_id``, summed by the database (a
    first charge on a big ledger of an older version waits for this: summing in Python took ten times longer).
    The database's plain sum may round each of the n additions down: the sum's error bound (n * 2**-52 of it,
    twice the textbook bound) is added, so a recomputed total is never below the exact one. The bound is of the
    sum of magnitudes: negative rows (an older version's) cancel in the sum but not in its rounding error (rows
    1, 1000 x 2**-53, -1 sum to 0 where 1.1e-13 was spent, and a bound of the signed sum was 0, or negative)."""
    n, eps, dlt, eps_abs, dlt_abs = db.execute(
        'SELECT COUNT(*), COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0), COALESCE(SUM(ABS(epsilon)), 0), '
        'COALESCE(SUM(ABS(delta)), 0) FROM charges WHERE "user" = ? AND id > ? AND id <= ?',
        # (a full sum has no lower bound: rows an import numbered from 0, or below, count too)
        (user, -2 ** 63 if start.last_id is None else start.last_id, last_id)).fetchone()
    total = start.plus(last_id, float(eps), float(dlt))
    rounding = int(n) * 2.0 ** -52
    return Total(last_id, total.epsilon, total.epsilon_error + float(eps_abs) * rounding,
                 total.delta, total.delta_error + float(dlt_abs) * rounding, start.edits, start.row_count + int(n),
                 start.nonce)


def current(db: Database, user: str, known: Optional[Total] = None) -> Total:
    """The user's total over all their charges, without writing: the stored one (or ``known``, one a read summed
    before) if it is up to date; the newest of them plus the charges after it if rows were only appended since
    (a process of an older version); else summed from all the rows. ``known`` is used only where the stored total
    is stale or behind, and only at the stamp's count and nonce it was summed at (see the module's doc)."""
    newest = db.execute('SELECT id, epsilon, delta, at FROM charges WHERE "user" = ? ORDER BY id DESC LIMIT 1',
                        (user,)).fetchone()
    # (read after the newest id, before any sum: a sum sees every change it counts)
    stamp, nonce = ledger_rows.stamp(db, user)
    if newest is None:
        return Total(edits=stamp, nonce=nonce)
    last_id, newest = newest[0], _row(newest[1:])
    row = db.execute('SELECT last_id, epsilon, epsilon_error, delta, delta_error, edits, row_count '
                     'FROM charge_totals WHERE "user" = ?', (user,)).fetchone()
    stored = None if row is None else Total(int(row[0]), *(float(v) for v in row[1:5]), int(row[5]), int(row[6]))
    if stored is not None:  # (the database's own, restored with its rows: its stamp's count is enough)
        stored = dataclasses.replace(stored, nonce=nonce)
    if known is not None and (nonce == 0 or known.nonce != nonce):
        known = None
    usable = [t for t in (stored, known) if t is not None and t.last_id is not None and t.edits == stamp
              and t.last_id <= last_id]
    start = max(usable, key=lambda t: t.last_id, default=Total(edits=stamp, nonce=nonce))  # (stored on a tie)
    if start is known and not _still_there(db, user, known, int(last_id), newest):
        start = max((t for t in usable if t is not known), key=lambda t: t.last_id,
                    default=Total(edits=stamp, nonce=nonce))
    if start.last_id == int(last_id):
        return dataclasses.replace(start, newest=newest)
    return dataclasses.replace(_from_rows(db, user, int(last_id), start), newest=newest)


def _row(values) -> tuple:
    return tuple(float(v) for v in values)


def _still_there(db: Database, user: str, known: Total, last_id: int, newest: tuple) -> bool:
    """Whether the newest row ``known`` summed is still in the database as it was. A PostgreSQL restore
    (``pg_restore --clean``) under a running worker brings older rows back at the same stamp (appends leave it)
    and the id sequence back with them: rows appended after it (an older worker's, no running total) took the
    ids of the rows ``known`` summed, and it was trusted (0.25 read where the rows held 0.875). A row's time
    tells the two apart (one look-up, only when ``known`` is the total to start from)."""
    if known.newest is None:
        return False
    if known.last_id == last_id:
        return known.newest == newest
    row = db.execute('SELECT epsilon, delta, at FROM charges WHERE id = ? AND "user" = ?',
                     (known.last_id, user)).fetchone()
    return row is not None and _row(row) == known.newest


def record(db: Database, user: str, total: Total) -> None:
    """Stores ``total`` (in the transaction of the charge ``total.last_id``)."""
    db.execute('INSERT INTO charge_totals("user", last_id, epsilon, epsilon_error, delta, delta_error, edits, '
               'row_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT("user") DO UPDATE SET '
               'last_id = excluded.last_id, epsilon = excluded.epsilon, epsilon_error = excluded.epsilon_error, '
               'delta = excluded.delta, delta_error = excluded.delta_error, edits = excluded.edits, '
               'row_count = excluded.row_count',
               (user, total.last_id, total.epsilon, total.epsilon_error, total.delta, total.delta_error,
                total.edits, total.row_count))
