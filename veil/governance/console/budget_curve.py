"""A user's cumulative-epsilon curve for the Budgets page, computed in the ledger's database.

A scientist's charges are unbounded in number (a budget of 1 allows a million charges of 1e-6): the page
must not read them all into the console's memory. The database counts and sums them per time slice, in
one pass; at most ``buckets`` points come back, those ``svg._downsample`` picks from the whole history:
the last charge of each equal time slice, with the total spent up to it and, for a merged slice, how many
charges it stands for.
"""

from __future__ import annotations

from typing import Any

#: the most points a budget curve draws (svg.MAX_CURVE_POINTS)
CURVE_POINTS = 300


def _slice_sql(dialect: str) -> str:
    """Which time slice a charge falls in: ``int((at - t0) / span * buckets)``, as Python computes it (the
    operand is never negative, so truncation is the floor); past the last slice (a charge at t1) the last.
    Compared before any cast: a charge stamped far past now (a replica whose clock runs ahead) has a slice
    number beyond PostgreSQL's integer range, and casting it failed the whole page."""
    ratio = "(at - ?) / ? * ?"
    index = f"CAST(FLOOR({ratio}) AS INTEGER)" if dialect == "postgresql" else f"CAST({ratio} AS INTEGER)"
    return f"CASE WHEN {ratio} >= ? THEN ? ELSE {index} END"


def curve(ledger: Any, user: str, now: float, buckets: int = CURVE_POINTS) -> tuple[float, float, list]:
    """``(t0, t1, points)``: the curve's time span (first charge to now, at least a second) and its points
    ``(time, epsilon spent up to then, label)``, oldest first."""
    db = ledger.reader()  # (its own connection: summing a big ledger never holds up a charge)
    with db.lock:
        count, first = db.execute('SELECT COUNT(*), MIN(at) FROM charges WHERE "user" = ?', (user,)).fetchone()
        t0 = now if first is None else float(first)
        t1 = max(now, t0 + 1)
        if not count:
            return t0, t1, []
        if count <= buckets:  # every charge is a point of its own
            rows = db.execute('SELECT at, epsilon, reason FROM charges WHERE "user" = ? ORDER BY id',
                              (user,)).fetchall()
            slices = [(1, float(eps), at, reason) for at, eps, reason in rows]
        else:
            index = (t0, t1 - t0, buckets)
            grouped = db.execute(
                f'SELECT slice, COUNT(*), SUM(epsilon), MAX(id) FROM (SELECT id, epsilon, {_slice_sql(db.dialect)} '
                'AS slice FROM charges WHERE "user" = ?) AS s GROUP BY slice ORDER BY slice',
                (*index, buckets - 1, buckets - 1, *index, user)).fetchall()
            last_ids = [row[3] for row in grouped]
            marks = ", ".join("?" * len(last_ids))
            last = {i: (at, reason) for i, at, reason in
                    db.execute(f"SELECT id, at, reason FROM charges WHERE id IN ({marks})", last_ids).fetchall()}
            slices = [(n, float(eps), *last[i]) for _, n, eps, i in grouped]
    points, total = [], 0.0
    for n, eps, at, reason in slices:
        total += eps
        points.append((float(at), total, reason if n == 1 else f"{n} charges, the last {reason}"))
    return t0, t1, points
