"""Red team: the DP budget ledger's rows (veil/dp/budget.py, charge_totals.py, ledger_rows.py) on SQLite and
PostgreSQL. The property: a scientist never spends more than her budget (spent is never below the exact sum of
her charges, computed here independently), the owner's database does not grow without bound on her account,
and a read of her budget writes nothing.

Holes found (fixed):

- rows without bound: every charge left a ``charges`` row and a ``requests`` (replay id) row. DP-SGD steps of a
  tiny sample rate, or queries at epsilon 1e-9, cost ~0, so a scientist inside her budget grew the owner's
  database without limit. A user's oldest charges are now folded into one row (their sum rounded up) past
  ``ledger_rows.MAX_CHARGE_ROWS``, and their replay ids forgotten with them (the replay horizon).
- ``remaining()`` wrote the caught-up total: on a read-only connection (a standby, a read-only file) the
  budget query failed. A read computes without writing now (and keeps what it summed in memory).
- the running total was trusted while its ``last_id`` was the user's newest id: a row put back below it (a
  restore, an explicit id on PostgreSQL) or an older row raised by hand was not counted, so the scientist
  could spend it again. Triggers on ``charges`` count every change but an append (``charge_stamps``).

Regression guarded: replicas upgrading an older ledger at once (adding the new columns) deadlocked on PostgreSQL
until serialized.
"""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from veil.dp import BudgetLedger
from veil.dp.errors import BudgetExceededError, ReplayedRequestError

from tests.scale import conftest as _postgres
from tests.security.test_redteam_ledger_scale import _steps_of, append_as_an_older_version

pg_url, postgres_server = _postgres.pg_url, _postgres.postgres_server  # (fixtures: a real PostgreSQL)


def _count(ledger: BudgetLedger, table: str, user: str) -> int:
    return ledger._db.execute(f'SELECT COUNT(*) FROM {table} WHERE "user" = ?', (user,)).fetchone()[0]


def _rows_exact(ledger: BudgetLedger, user: str) -> Fraction:
    return sum((Fraction(float(r[0])) for r in ledger._db.execute(
        'SELECT epsilon FROM charges WHERE "user" = ?', (user,))), Fraction(0))


def test_tiny_charges_keep_a_users_rows_bounded_and_her_spent_exact(monkeypatch):
    """The HOLE: 600 charges of ~0 epsilon, each with its replay id, left 600 rows of each. With a window of 40
    rows the user keeps at most 40 charge rows and 40 replay ids, and spent stays at or above the exact sum of
    what was charged (running, and summed again from the folded rows)."""
    from veil.dp import ledger_rows

    monkeypatch.setattr(ledger_rows, "MAX_CHARGE_ROWS", 40)
    monkeypatch.setattr(ledger_rows, "KEEP_CHARGE_ROWS", 20)
    rng = random.Random(7)
    charged = [rng.choice([1e-9, 2.0 ** -40, 1e-6, 0.001, 0.0007, 3e-4]) for _ in range(600)]
    with BudgetLedger(":memory:") as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        ledger.set_budget("alice", 1.0, 1e-5)
        ledger.charge("alice", 0.5, 0.0, "another user's charge")
        for i, eps in enumerate(charged):
            ledger.charge("mallory", eps, 0.0, "DP query", request_id=f"mallory-{i}")
            assert _count(ledger, "charges", "mallory") <= 40
            assert _count(ledger, "requests", "mallory") <= 40
        exact = sum(Fraction(e) for e in charged)
        spent = Fraction(ledger.spent("mallory")[0])
        assert exact <= spent <= exact * (1 + Fraction(1, 10 ** 12)), (float(spent), float(exact))
        assert Fraction(ledger.remaining("mallory")[0]) <= 1 - exact
        assert _rows_exact(ledger, "mallory") >= exact  # (the folded row is its rows' sum rounded up)
        history = ledger.history("mallory")
        assert "compacted" in history[0][2] and len(history) <= 40
        with pytest.raises(ReplayedRequestError):  # the newest replay ids are still known
            ledger.charge("mallory", 1e-9, 0.0, "DP query", request_id="mallory-599")
        ledger._db.execute("DELETE FROM charge_totals WHERE \"user\" = 'mallory'")  # summed again from the rows
        assert Fraction(ledger.spent("mallory")[0]) >= exact
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", float(1 - exact) + 1e-6, 0.0, "over")
        assert ledger.spent("alice")[0] == 0.5 and _count(ledger, "charges", "alice") == 1


def test_dp_sgd_steps_of_a_tiny_sample_rate_keep_the_rows_bounded(monkeypatch):
    """Training steps of q = 1e-6 cost ~0 each: their charge rows are folded like any others, and the ledger
    still charges the training delta once and the accountant's epsilon in total."""
    from veil.dp import ledger_rows

    monkeypatch.setattr(ledger_rows, "MAX_CHARGE_ROWS", 30)
    monkeypatch.setattr(ledger_rows, "KEEP_CHARGE_ROWS", 10)
    with BudgetLedger(":memory:") as ledger:
        ledger.set_budget("mallory", 10.0, 1e-5)
        for i in range(70):
            ledger.charge_training_step("mallory", 1.0, 1e-6, 1e-6, request_id=f"step-{i}")
        assert _count(ledger, "charges", "mallory") <= 30 and _count(ledger, "requests", "mallory") <= 30
        spent_eps, spent_delta = ledger.spent("mallory")
        trained = ledger._db.execute("SELECT epsilon FROM training").fetchone()[0]
        assert spent_eps >= trained > 0 and spent_delta >= 1e-6


def test_a_read_on_a_read_only_sqlite_connection_writes_nothing(tmp_path):
    """The HOLE: on a stale total (rows an older process appended) ``remaining()`` wrote the caught-up total, and
    failed on a read-only connection. It must answer from the rows, write nothing, and not sum them again on
    the next ask."""
    path = tmp_path / "ledger.sqlite3"
    with BudgetLedger(path) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        ledger.charge("mallory", 0.25, 0.0, "new process")
        append_as_an_older_version(path, "mallory", [0.5] + [1e-7] * 3000)
        stored = ledger._db.execute("SELECT * FROM charge_totals").fetchall()
        ledger._db._conn.execute("PRAGMA query_only = 1")  # (a read-only standby's file)
        first = _steps_of(ledger, lambda: ledger.remaining("mallory"))
        again = _steps_of(ledger, lambda: ledger.remaining_and_spent("mallory"))
        assert again * 20 < first, (first, again)
        (left, _), (spent, _) = ledger.remaining_and_spent("mallory")
        assert Fraction(spent) >= _rows_exact(ledger, "mallory") and left == pytest.approx(0.25 - 3e-4)
        assert ledger._db.execute("SELECT * FROM charge_totals").fetchall() == stored


def test_a_row_put_back_below_the_newest_id_counts_at_once():
    """The HOLE: rows restored with their old ids (below the user's newest) were not counted while the running
    total's last_id was the newest id: the scientist spent them again."""
    with BudgetLedger(":memory:") as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        ledger.charge("mallory", 0.5, 0.0, "DP query")
        ledger.charge("mallory", 0.1, 0.0, "DP query")
        ledger._db.execute('INSERT INTO charges(id, "user", epsilon, delta, reason, at) VALUES (-1, ?, 0.3, 0, ?, 0)',
                           ("mallory", "restored from a backup"))
        assert ledger.spent("mallory")[0] == pytest.approx(0.9)
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.2, 0.0, "does not fit")
        ledger.charge("mallory", 0.1, 0.0, "fits")
        assert Fraction(ledger.spent("mallory")[0]) >= _rows_exact(ledger, "mallory")


def test_an_older_row_raised_or_deleted_by_hand_counts_at_once():
    """An owner correcting an older charge upward: counted before the next charge (it was not: the total kept
    its last_id). An owner deleting one to give budget back: given back without deleting the total by hand."""
    with BudgetLedger(":memory:") as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        for _ in range(3):
            ledger.charge("mallory", 0.2, 0.0, "DP query")
        first = ledger._db.execute('SELECT MIN(id) FROM charges WHERE "user" = ?', ("mallory",)).fetchone()[0]
        ledger._db.execute("UPDATE charges SET epsilon = 0.5 WHERE id = ?", (first,))
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.2, 0.0, "does not fit")
        ledger._db.execute("DELETE FROM charges WHERE id = ?", (first,))
        ledger.charge("mallory", 0.55, 0.0, "fits again")
        assert ledger.remaining("mallory")[0] == pytest.approx(0.05)


@pytest.mark.slow
def test_postgres_reads_on_a_read_only_session_and_counts_rows_put_back(pg_url):
    """PostgreSQL: the budget query on a read-only session (a standby) answers without writing; a row given an
    explicit id below the newest (the identity column takes one) and a hand-deleted older row count at once."""
    import psycopg

    with BudgetLedger(pg_url) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        ledger.charge("mallory", 0.25, 0.0, "DP query")
        ledger.charge("mallory", 0.25, 0.0, "DP query")
        append_as_an_older_version(pg_url, "mallory", [0.125])
        with psycopg.connect(pg_url, autocommit=True) as owner:  # the owner's psql
            owner.execute('INSERT INTO charges(id, "user", epsilon, delta, reason, at) '
                          "VALUES (-5, 'mallory', 0.25, 0, 'restored', 0)")
        ledger._db.execute("SET default_transaction_read_only = on")
        assert ledger.remaining("mallory")[0] == pytest.approx(0.125)
        ledger._db.execute("SET default_transaction_read_only = off")
        # a ledger opened on a read-only session (as on a hot standby) opens and answers
        standby_url = pg_url + ("&" if "?" in pg_url else "?") + "options=-c%20default_transaction_read_only%3Don"
        with BudgetLedger(standby_url) as standby:
            assert standby.remaining_and_spent("mallory")[0][0] == pytest.approx(0.125)
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.2, 0.0, "does not fit")
        with psycopg.connect(pg_url, autocommit=True) as owner:
            owner.execute("DELETE FROM charges WHERE id = -5")
        ledger.charge("mallory", 0.2, 0.0, "fits again")
        assert Fraction(ledger.spent("mallory")[0]) >= _rows_exact(ledger, "mallory")
        assert ledger.remaining("mallory")[0] == pytest.approx(0.175)


@pytest.mark.slow
def test_postgres_folds_old_rows_and_forgets_their_replay_ids(pg_url, monkeypatch):
    """PostgreSQL: the same window as on SQLite (rows folded, replay ids kept for the newest charges only)."""
    from veil.dp import ledger_rows

    monkeypatch.setattr(ledger_rows, "MAX_CHARGE_ROWS", 20)
    monkeypatch.setattr(ledger_rows, "KEEP_CHARGE_ROWS", 8)
    charged = [0.001 * (1 + i % 7) for i in range(80)]
    with BudgetLedger(pg_url) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        for i, eps in enumerate(charged):
            ledger.charge("mallory", eps, 0.0, "DP query", request_id=f"q-{i}")
        assert _count(ledger, "charges", "mallory") <= 20 and _count(ledger, "requests", "mallory") <= 20
        exact = sum(Fraction(e) for e in charged)
        assert Fraction(ledger.spent("mallory")[0]) >= exact and _rows_exact(ledger, "mallory") >= exact
        with pytest.raises(ReplayedRequestError):
            ledger.charge("mallory", 0.001, 0.0, "DP query", request_id="q-79")


@pytest.mark.slow
def test_postgres_replicas_upgrading_an_older_ledger_at_once_all_start(pg_url, monkeypatch):
    """Replicas of the new version started at once on a ledger of an older version (no stamps, totals without
    their stamp column) each add the columns if missing: read, then alter. Unserialized, two of them each held
    the read's lock while waiting to alter, and PostgreSQL ended one as a deadlock (that worker did not start).
    Must hold: both start, and the older total is summed again, not trusted."""
    import threading

    from veil.dp import ledger_rows
    from veil.dp.budget import _SCHEMA as LEDGER_SCHEMA
    from veil.workers.database import Database

    both_read = threading.Barrier(2, timeout=2)  # (the two replicas' reads in the altering transaction meet)
    missing_columns = ledger_rows._missing_columns

    def read_then_meet(db):
        out = missing_columns(db)
        if db._in_transaction:
            try:
                both_read.wait()
            except threading.BrokenBarrierError:  # serialized: the other waits outside, as it should
                pass
        return out

    monkeypatch.setattr(ledger_rows, "_missing_columns", read_then_meet)

    older = Database(pg_url)
    older.executescript(LEDGER_SCHEMA)
    older.executescript('CREATE TABLE charge_totals ("user" TEXT PRIMARY KEY, last_id BIGINT NOT NULL, '
                        "epsilon REAL NOT NULL, epsilon_error REAL NOT NULL, delta REAL NOT NULL, "
                        "delta_error REAL NOT NULL)")
    older.execute('INSERT INTO budgets("user", epsilon, delta) VALUES (?, 1.0, 0.00001)', ("mallory",))
    charge_id = older.execute('INSERT INTO charges("user", epsilon, delta, reason, at) VALUES (?, 0.5, 0, ?, 0) '
                              "RETURNING id", ("mallory", "older version")).fetchone()[0]
    older.execute("INSERT INTO charge_totals VALUES (?, ?, 0.125, 0, 0, 0)", ("mallory", charge_id))  # (stale)
    older.close()
    errors: list[BaseException] = []
    opened: list[BudgetLedger] = []
    gate = threading.Barrier(2)

    def start() -> None:
        gate.wait()
        try:
            opened.append(BudgetLedger(pg_url))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not errors, errors
        assert len(opened) == 2
        assert opened[0].remaining("mallory")[0] == pytest.approx(0.5)
    finally:
        for ledger in opened:
            ledger.close()
