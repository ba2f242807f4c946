"""Red team: the privacy budget ledger under a scientist who makes very many tiny charges (ATTACKS.md: resource
exhaustion, and accounting that must never favour the spender).

Hole found (fixed, veil/dp/charge_totals.py): every charge summed all the user's ``charges`` rows under the
ledger's write lock. A scientist making many tiny charges (DP queries at epsilon 1e-6, DP-SGD steps that cost ~0)
grew that sum without bound: at 5e5 rows one charge held the lock ~160-360 ms and every other user's charge
waited (quadratic total cost). The ledger now keeps a running total per user, checked against the user's newest
charge id and brought up to date from the rows when stale (older files, rows of older processes, migrations).

The cost of a charge is measured in SQLite virtual machine steps (a progress handler), not wall time: exact on a
busy machine, and a scan over the user's rows (of charges, or of the replay table) shows as steps in proportion.
"""

from __future__ import annotations

import math
import sqlite3

import pytest

from veil.dp import BudgetLedger
from veil.dp.budget import _SCHEMA as LEDGER_SCHEMA
from veil.dp.errors import BudgetExceededError
from veil.workers.database import Database

from tests.scale import conftest as _postgres

pg_url, postgres_server = _postgres.pg_url, _postgres.postgres_server  # (fixtures: a real PostgreSQL)


def _bulk_charges(ledger: BudgetLedger, user: str, n: int, epsilon: float = 1e-6) -> None:
    """``n`` charges and replay ids of ``user`` written straight into the file (what n requests would leave)."""
    with ledger._db.write_transaction():
        ledger._db._conn.executemany('INSERT INTO charges("user", epsilon, delta, reason, at) VALUES (?, ?, 0, ?, 0)',
                                     [(user, epsilon, "DP query")] * n)
        ledger._db._conn.executemany('INSERT INTO requests("user", request_id) VALUES (?, ?)',
                                     [(user, f"old-{i}") for i in range(n)])


def _steps_of(ledger: BudgetLedger, call) -> int:
    """SQLite virtual machine steps (in tens) that ``call()`` runs on the ledger's connection."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    ledger._db._conn.set_progress_handler(count, 10)
    try:
        call()
    finally:
        ledger._db._conn.set_progress_handler(None, 0)
    return steps[0]


def _steps_of_one_charge(ledger: BudgetLedger, user: str, request_id: str) -> int:
    return _steps_of(ledger, lambda: ledger.charge(user, 1e-6, 0.0, "DP query", request_id=request_id))


def append_as_an_older_version(location, user: str, epsilons, reason: str = "older process") -> None:
    """Charges of ``epsilon`` each that a worker process of an older version appends to the shared ledger at
    ``location`` in one transaction: rows only, without the running total."""
    older = Database(location)
    try:
        with older.write_transaction():
            for epsilon in epsilons:
                older.execute('INSERT INTO charges("user", epsilon, delta, reason, at) VALUES (?, ?, 0, ?, 0)',
                              (user, epsilon, reason))
    finally:
        older.close()


def _ledger_with_rows(n: int) -> BudgetLedger:
    ledger = BudgetLedger(":memory:")
    ledger.set_budget("mallory", 1.0, 1e-6)
    ledger.set_budget("alice", 1.0, 1e-6)
    _bulk_charges(ledger, "mallory", n)
    ledger.charge("mallory", 1e-6, 0.0, "first charge after the bulk rows")  # (brings the running total up to date)
    return ledger


def test_a_charge_costs_the_same_whatever_the_users_number_of_past_charges():
    """The HOLE: 20 times the rows made one charge (the lock every user waits for) ~20 times as long."""
    few, many = _ledger_with_rows(2_000), _ledger_with_rows(40_000)
    try:
        cost_few = _steps_of_one_charge(few, "mallory", "new-1")
        cost_many = _steps_of_one_charge(many, "mallory", "new-1")
        assert cost_many < 1.5 * cost_few, (cost_few, cost_many)
        # and another user's charge does not pay for mallory's rows either
        assert _steps_of_one_charge(many, "alice", "a-1") < 1.5 * _steps_of_one_charge(few, "alice", "a-1")
        # the running total is the rows' (2 charges after the 40000 bulk ones)
        assert many.spent("mallory")[0] == pytest.approx(40_002e-6, rel=1e-12)
        assert many.remaining("mallory")[0] == pytest.approx(1.0 - 40_002e-6, rel=1e-12)
    finally:
        few.close()
        many.close()


def test_tiny_charges_are_not_lost_to_float_drift():
    """Plain summation (SQLite's SUM before 3.43, PostgreSQL's float8 SUM) adds 1e-16 to 1.0 as nothing: a
    scientist's tiny charges after a big one were free. Spent is never below the exact sum, running or
    recomputed from the rows."""
    ledger = BudgetLedger(":memory:")
    try:
        ledger.set_budget("mallory", 2.0, 0.5)
        charges = [1.0] + [1e-16] * 2_000
        for eps in charges:
            ledger.charge("mallory", eps, 0.0, "DP query")
        exact = math.fsum(charges)
        assert exact > 1.0 and ledger.spent("mallory")[0] >= exact
        ledger._db.execute("DELETE FROM charge_totals")  # an older ledger: summed again from the rows
        assert ledger.spent("mallory")[0] >= exact
        assert ledger.remaining("mallory")[0] <= 2.0 - exact
    finally:
        ledger.close()


def test_a_ledger_file_of_an_older_version_counts_all_its_charges(tmp_path):
    """A file written before the running totals existed: its charges count at once, and the last of the
    budget cannot be spent twice."""
    path = tmp_path / "ledger.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(LEDGER_SCHEMA)
    old.execute('INSERT INTO budgets("user", epsilon, delta) VALUES (?, ?, ?)', ("mallory", 1.0, 1e-5))
    old.executemany('INSERT INTO charges("user", epsilon, delta, reason, at) VALUES (?, ?, ?, ?, 0)',
                    [("mallory", 0.01, 0.0, "old query")] * 90)
    old.commit()
    old.close()
    with BudgetLedger(path) as ledger:
        assert ledger.remaining("mallory")[0] == pytest.approx(0.1)
        ledger.charge("mallory", 0.05, 0.0, "fits")
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.06, 0.0, "does not fit")
        assert ledger.remaining("mallory")[0] == pytest.approx(0.05)


def test_asking_for_the_budget_again_and_again_does_not_sum_the_rows_each_time():
    """``veil.dp.budget`` (a scientist's remaining budget, uncharged) reads the spent total under the ledger's
    lock: on a ledger whose running total is not up to date yet (an older file), the total summed once is
    kept, so asking again costs a look-up, not another pass over the scientist's rows."""
    ledger = BudgetLedger(":memory:")
    try:
        ledger.set_budget("mallory", 1.0, 1e-6)
        _bulk_charges(ledger, "mallory", 40_000)
        first = _steps_of(ledger, lambda: ledger.remaining("mallory"))
        again = _steps_of(ledger, lambda: ledger.remaining("mallory"))
        assert again * 20 < first, (first, again)
        assert ledger.remaining("mallory")[0] == pytest.approx(1.0 - 0.04, rel=1e-12)
    finally:
        ledger.close()


def test_charges_an_older_process_appends_to_a_shared_file_are_counted(tmp_path):
    """Two worker processes of one owner on one file, one of an older version (inserting charges without the
    running total): the newer one counts them before its next charge, and refuses what no longer fits."""
    path = tmp_path / "ledger.sqlite3"
    with BudgetLedger(path) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        ledger.charge("mallory", 0.25, 0.0, "new process")
        append_as_an_older_version(path, "mallory", [0.5])
        assert ledger.remaining("mallory")[0] == pytest.approx(0.25)
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.3, 0.0, "does not fit any more")
        ledger.charge("mallory", 0.2, 0.0, "fits")
        assert ledger.spent("mallory")[0] == pytest.approx(0.95)
        # the stored running total is the rows' sum again
        row = ledger._db.execute('SELECT last_id, epsilon + epsilon_error FROM charge_totals WHERE "user" = ?',
                                 ("mallory",)).fetchone()
        assert row[0] == ledger._db.execute("SELECT MAX(id) FROM charges").fetchone()[0]
        assert row[1] == pytest.approx(0.95)


def test_a_training_runs_accountant_state_does_not_grow_with_its_steps():
    """Each DP-SGD step reads and rewrites the user's accountant state under the lock: it holds one entry per
    (sigma, q) pair, not one per step."""
    ledger = BudgetLedger(":memory:")
    try:
        ledger.set_budget("mallory", 100.0, 1e-3)
        sizes = []
        for i in range(30):
            ledger.charge_training_step("mallory", 5.0, 1e-4, 1e-5)
            if i in (9, 29):
                sizes.append(len(ledger._db.execute("SELECT state FROM training").fetchone()[0]))
        assert sizes[1] <= sizes[0] + 2  # (the step count's digits)
    finally:
        ledger.close()


@pytest.mark.slow
def test_postgres_ledger_counts_appended_rows_and_migrates_running_totals(pg_url, tmp_path):
    """PostgreSQL: the running total is checked against the user's newest charge id; ``veil db migrate`` copies
    the totals with the charges (ids kept), and the migrated ledger refuses what no longer fits."""
    from veil.cli import main
    from veil.dp.worker_owner import LEDGER_FILENAME

    with BudgetLedger(tmp_path / LEDGER_FILENAME) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        for _ in range(40):
            ledger.charge("mallory", 0.02, 0.0, "DP query")
        ledger.charge("mallory", 1e-17, 0.0, "tiny")
    assert main(["db", "migrate", "--from", str(tmp_path), "--to", pg_url]) == 0
    with BudgetLedger(pg_url) as ledger:
        assert ledger._db.execute("SELECT COUNT(*) FROM charge_totals").fetchone()[0] == 1
        assert ledger.remaining("mallory")[0] == pytest.approx(0.2)
        append_as_an_older_version(pg_url, "mallory", [0.15])
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.1, 0.0, "does not fit any more")
        ledger.charge("mallory", 0.05, 0.0, "fits")
        assert ledger.remaining("mallory")[0] == pytest.approx(0.0, abs=1e-12)
