"""A data owner's per-user privacy budget ledger, persisted in SQLite.

Contract: **charge before release**. A worker computes a private result, then
calls :meth:`BudgetLedger.charge` with the result's (epsilon, delta) cost, and
only if the charge succeeds hands the result out. If the charge fails the
result is discarded. Charging first means a crash between charging and
releasing can only waste budget, never leak an uncharged result.

Composition is basic (epsilons and deltas add up), which is valid for any
mix of mechanisms; tighter accounting of a training run belongs in
:class:`veil.dp.Accountant`, whose final (epsilon, delta) is then charged here.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Union

from veil.dp.errors import BudgetExceededError, PrivacyParameterError, UnknownUserError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    user TEXT PRIMARY KEY,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL REFERENCES budgets(user),
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
"""

# Float sums drift; a charge that fits up to this slack is accepted.
_SLACK = 1e-12


class BudgetLedger:
    """Per-user (epsilon, delta) budgets and the charges made against them.

    Args:
        path: SQLite file (created if absent); ``":memory:"`` for a throwaway ledger.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = str(path)
        # isolation_level=None: transactions are begun explicitly below.
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Closes the database file."""
        self._db.close()

    def __enter__(self) -> "BudgetLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _check(epsilon: float, delta: float) -> None:
        if not epsilon >= 0:
            raise PrivacyParameterError(f"epsilon must be >= 0, got {epsilon}")
        if not 0 <= delta < 1:
            raise PrivacyParameterError(f"delta must be in [0, 1), got {delta}")

    def set_budget(self, user: str, epsilon: float, delta: float) -> None:
        """Sets (or replaces) the user's total budget; past charges still count."""
        self._check(epsilon, delta)
        self._db.execute(
            "INSERT INTO budgets(user, epsilon, delta) VALUES (?, ?, ?) "
            "ON CONFLICT(user) DO UPDATE SET epsilon = excluded.epsilon, delta = excluded.delta",
            (user, float(epsilon), float(delta)),
        )

    def _spent(self, user: str) -> tuple[float, float]:
        row = self._db.execute(
            "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0) FROM charges WHERE user = ?", (user,)
        ).fetchone()
        return float(row[0]), float(row[1])

    def _budget(self, user: str) -> tuple[float, float]:
        row = self._db.execute("SELECT epsilon, delta FROM budgets WHERE user = ?", (user,)).fetchone()
        if row is None:
            raise UnknownUserError(f"no privacy budget for user {user!r}; call set_budget first")
        return float(row[0]), float(row[1])

    def charge(self, user: str, epsilon: float, delta: float, reason: str) -> tuple[float, float]:
        """Atomically records a charge, or refuses it if it would exceed the budget.

        The check and the insert run in one ``BEGIN IMMEDIATE`` transaction, so
        two processes sharing the file cannot both spend the last of a budget.

        Returns:
            The remaining ``(epsilon, delta)`` after the charge.

        Raises:
            BudgetExceededError: the charge does not fit; nothing is recorded.
            UnknownUserError: the user has no budget.
        """
        self._check(epsilon, delta)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            total_eps, total_delta = self._budget(user)
            spent_eps, spent_delta = self._spent(user)
            if spent_eps + epsilon > total_eps + _SLACK or spent_delta + delta > total_delta + _SLACK:
                raise BudgetExceededError(
                    f"charge of (epsilon={epsilon}, delta={delta}) for {reason!r} refused: user {user!r} has "
                    f"(epsilon={total_eps - spent_eps:.6g}, delta={total_delta - spent_delta:.3g}) left "
                    f"of (epsilon={total_eps}, delta={total_delta})")
            self._db.execute(
                "INSERT INTO charges(user, epsilon, delta, reason, at) VALUES (?, ?, ?, ?, ?)",
                (user, float(epsilon), float(delta), reason, time.time()),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return total_eps - spent_eps - epsilon, total_delta - spent_delta - delta

    def remaining(self, user: str) -> tuple[float, float]:
        """The user's unspent ``(epsilon, delta)``."""
        total_eps, total_delta = self._budget(user)
        spent_eps, spent_delta = self._spent(user)
        return total_eps - spent_eps, total_delta - spent_delta

    def history(self, user: str) -> list[tuple[float, float, str, float]]:
        """The user's charges, oldest first: ``(epsilon, delta, reason, unix time)``."""
        return [tuple(r) for r in self._db.execute(
            "SELECT epsilon, delta, reason, at FROM charges WHERE user = ? ORDER BY id", (user,))]
