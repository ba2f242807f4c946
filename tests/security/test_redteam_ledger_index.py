"""Red team: the DP ledger's row folding (veil/dp/ledger_rows.py, budget.py) on SQLite and PostgreSQL. The property:
a fold replaces the rows it takes by their exact sum rounded up (never less, never more than one rounding), it
takes the oldest charges (the newest keep their replay ids), it costs little under the lock every charge waits
for, and a scientist cannot make it bigger or more frequent than one per MAX - KEEP charges.

Holes found (fixed):

- PostgreSQL: a fold's DELETE fired the stamp trigger once per row (each taking the user's row lock and writing
  ``charge_stamps``): a fold of 5,001 rows took ~1 s (bench/bench_db_ledger.py) under the ledger lock. The fold
  marks its own deletes (``veil.folding``, local to its transaction) and stamps the user once, by its update.
- PostgreSQL: an id sequence behind the table's newest id (restarted, or rows restored without it) gave charges
  ids already in use (the charge failed) or below the user's newest: the next fold took those, the newest
  charges, for the oldest and forgot their replay ids at once. The sequence is brought above the newest id before
  each charge's insert (SQLite's AUTOINCREMENT never goes below the table's largest id).
- rows summing past the largest float (an owner's unlimited budget, charges of 1e308): the fold's fsum raised
  OverflowError, and every later charge of that user failed. Their sum rounded up is infinity.
- a ``charge_stamps`` row deleted (or lowered) by hand read as the stamp a total was summed at before: a row the
  owner raised since was not counted, and the scientist spent it again. Triggers refuse deleting the row of a user
  with charges or a running total, lowering one, and (PostgreSQL) truncating the table.
- no index on ``requests("user", charge_id)``: each fold read all the user's replay ids to find the folded ones.
  Made at every open (a fresh ledger, an older file, a PostgreSQL ledger, and the target of ``veil db migrate``).

Held (guarded): folds at most one per MAX - KEEP charges, each deleting at most MAX - KEEP + 1 rows; spent never below
the exact sum of what was charged, summed again from the folded rows too.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from veil.dp import BudgetLedger, ledger_rows
from veil.dp.errors import BudgetExceededError, ReplayedRequestError

from tests.scale import conftest as _postgres

pg_url, postgres_server = _postgres.pg_url, _postgres.postgres_server  # (fixtures: a real PostgreSQL)

MAX, KEEP = 20, 8


@pytest.fixture
def small_window(monkeypatch):
    monkeypatch.setattr(ledger_rows, "MAX_CHARGE_ROWS", MAX)
    monkeypatch.setattr(ledger_rows, "KEEP_CHARGE_ROWS", KEEP)


def _up(exact: Fraction) -> float:
    """The least float at or above ``exact`` (independently of the ledger's fsum: Fraction's float is correctly
    rounded)."""
    try:
        f = float(exact)
    except OverflowError:
        return math.inf
    return math.nextafter(f, math.inf) if Fraction(f) < exact else f


def _rows(ledger: BudgetLedger, user: str) -> dict[int, tuple[float, float]]:
    return {int(r[0]): (float(r[1]), float(r[2])) for r in ledger._db.execute(
        'SELECT id, epsilon, delta FROM charges WHERE "user" = ?', (user,))}


def _charge_and_check_fold(ledger: BudgetLedger, user: str, eps: float, delta: float, rid: str) -> bool:
    """Charges; if that folded, checks the folded row is the exact sum of the rows it replaced, rounded up, and
    that it took the oldest charges (the lowest ids before this one). Returns whether it folded."""
    before = _rows(ledger, user)
    ledger.charge(user, eps, delta, "DP query", request_id=rid)
    after = _rows(ledger, user)
    gone = set(before) - set(after)
    if not gone:
        return False
    kept = min(before)
    assert kept in after and len(gone) <= MAX - KEEP + 1, (len(gone), kept)  # (rows past KEEP, into one)
    taken = sorted(gone | {kept})
    assert taken == sorted(before)[:len(taken)]  # (the oldest, in charge order)
    assert after[kept] == (_up(sum(Fraction(before[i][0]) for i in taken)),
                           _up(sum(Fraction(before[i][1]) for i in taken)))
    return True


def _replays_refused(ledger: BudgetLedger, user: str, rids: list[str]) -> None:
    for rid in rids:
        with pytest.raises(ReplayedRequestError):
            ledger.charge(user, 1e-9, 0.0, "replayed", request_id=rid)


def test_a_fold_is_the_exact_sum_of_its_rows_rounded_up_and_folds_stay_rare_and_bounded(small_window):
    """Held: 300 charges of awkward sizes (1e-300 to 0.001, values whose sum rounds down) fold at most once per
    MAX - KEEP charges, each fold the exact sum of the oldest rows rounded up; spent, running and summed again
    from the folded rows, is never below the exact sum of what was charged."""
    rng = random.Random(11)
    sizes = [1e-300, 2.0 ** -60, 1e-9, 1 / 3, 1e-6 / 7, 0.001, 3e-17]
    charged = [Fraction(0), Fraction(0)]
    folds = 0
    with BudgetLedger(":memory:") as ledger:
        ledger.set_budget("mallory", 1e6, 0.5)
        for i in range(300):
            eps, delta = rng.choice(sizes), rng.choice([0.0, 1e-12 / 3, 2.0 ** -70])
            folds += _charge_and_check_fold(ledger, "mallory", eps, delta, f"q-{i:04d}")
            charged[0] += Fraction(eps)
            charged[1] += Fraction(delta)
        assert 1 <= folds <= 300 // (MAX - KEEP) + 1
        spent = ledger.spent("mallory")
        assert Fraction(spent[0]) >= charged[0] and Fraction(spent[1]) >= charged[1]
        assert Fraction(spent[0]) <= charged[0] * (1 + Fraction(1, 10 ** 12))
        ledger._db.execute("DELETE FROM charge_totals")
        ledger._known.clear()
        spent = ledger.spent("mallory")
        assert Fraction(spent[0]) >= charged[0] and Fraction(spent[1]) >= charged[1]
        _replays_refused(ledger, "mallory", [f"q-{i:04d}" for i in range(300 - KEEP, 300)])


def test_rows_summing_past_the_largest_float_fold_to_infinity(small_window):
    """The HOLE: an owner's unlimited budget (epsilon inf) took charges of 1e308; the fold's fsum of them raised
    OverflowError, so every later charge of the user failed. Their sum, rounded up, is infinity."""
    with BudgetLedger(":memory:") as ledger:
        ledger.set_budget("mallory", math.inf, 0.5)
        for i in range(MAX + 3):
            _charge_and_check_fold(ledger, "mallory", 1e308, 0.0, f"q-{i:04d}")
        assert ledger.spent("mallory")[0] == math.inf
        assert ledger._db.execute('SELECT COUNT(*) FROM charges').fetchone()[0] <= MAX


def _has_requests_index(db) -> bool:
    if db.dialect == "sqlite":
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'requests_by_user_charge'"
    else:
        sql = "SELECT 1 FROM pg_indexes WHERE indexname = 'requests_by_user_charge'"
    return db.execute(sql).fetchone() is not None


def test_the_requests_index_is_made_for_a_fresh_and_an_older_sqlite_ledger(tmp_path):
    """The HOLE: no index on requests("user", charge_id): each fold read every replay id of the user to find the
    folded charges' ones. A fresh ledger has it, an older file (no charge_id column) gets it when opened, and the
    fold's delete uses it."""
    import sqlite3

    with BudgetLedger(tmp_path / "fresh.sqlite3") as ledger:
        assert _has_requests_index(ledger._db)
    older = tmp_path / "older.sqlite3"
    with sqlite3.connect(older) as db:
        db.executescript('''
            CREATE TABLE budgets ("user" TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL);
            CREATE TABLE charges (id INTEGER PRIMARY KEY AUTOINCREMENT, "user" TEXT NOT NULL, epsilon REAL NOT NULL,
                                  delta REAL NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
            CREATE TABLE requests ("user" TEXT NOT NULL, request_id TEXT NOT NULL, PRIMARY KEY ("user", request_id));
            INSERT INTO budgets VALUES ('mallory', 1.0, 0.00001);
            INSERT INTO charges VALUES (1, 'mallory', 0.5, 0, 'DP query', 0);
            INSERT INTO requests VALUES ('mallory', 'older-1');
        ''')
    db.close()
    with BudgetLedger(older) as ledger:
        assert _has_requests_index(ledger._db)
        plan = " ".join(str(r) for r in ledger._db.execute(
            'EXPLAIN QUERY PLAN DELETE FROM requests WHERE "user" = ? AND charge_id <= ?', ("mallory", 5)))
        assert "requests_by_user_charge" in plan, plan
        assert ledger.remaining("mallory")[0] == pytest.approx(0.5)
        _replays_refused(ledger, "mallory", ["older-1"])


@pytest.mark.slow
def test_postgres_a_restarted_sequence_still_folds_the_oldest_charges(pg_url, small_window):
    """The HOLE (PostgreSQL): the owner's restore left the charges' id sequence behind (here: restarted at 2,
    inside ids a fold freed; restarted at 1, an id in use). Charges took ids below the user's newest, or failed
    on one in use; the next fold took those newest charges for the oldest (lowest ids) and forgot their replay
    ids: the last request sent again was charged and released again. Must hold: every charge lands, each fold is
    the exact sum of the oldest charges rounded up, and the newest KEEP request ids are refused."""
    import psycopg

    charged = Fraction(0)
    with BudgetLedger(pg_url) as ledger:
        ledger.set_budget("mallory", 10.0, 1e-5)
        ledger.set_budget("alice", 10.0, 1e-5)
        n = 0
        for restart in (2, 1):
            for _ in range(MAX + 10):
                eps = 0.001 * (1 + n % 7) / 3
                _charge_and_check_fold(ledger, "mallory", eps, 0.0, f"q-{n:04d}")
                charged += Fraction(eps)
                n += 1
            ledger.charge("alice", 0.25, 0.0, "another user's charge")
            with psycopg.connect(pg_url, autocommit=True) as owner:  # the owner's psql
                owner.execute(f"ALTER TABLE charges ALTER COLUMN id RESTART WITH {restart}")
        for _ in range(MAX + 10):
            _charge_and_check_fold(ledger, "mallory", 0.001, 0.0, f"q-{n:04d}")
            charged += Fraction(0.001)
            n += 1
        _replays_refused(ledger, "mallory", [f"q-{i:04d}" for i in range(n - KEEP, n)])
        assert Fraction(ledger.spent("mallory")[0]) >= charged
        assert ledger.spent("alice")[0] == 0.5


@pytest.mark.slow
def test_postgres_a_fold_stamps_the_user_once_and_other_deletes_still_stamp(pg_url, monkeypatch):
    """The HOLE (PostgreSQL): each row a fold deleted fired the stamp trigger (the user's row lock and a
    charge_stamps write per row: ~1 s for a fold of 5,001 rows under the ledger lock). A fold now stamps the user
    a constant number of times; a delete outside a fold (the same session after it, the owner's psql) still
    stamps and gives the budget back at once; the requests index is there, and made again at open."""
    import psycopg

    monkeypatch.setattr(ledger_rows, "MAX_CHARGE_ROWS", 60)
    monkeypatch.setattr(ledger_rows, "KEEP_CHARGE_ROWS", 10)
    with BudgetLedger(pg_url) as ledger:
        assert _has_requests_index(ledger._db)
        ledger.set_budget("mallory", 1.0, 1e-5)
        for i in range(60):
            ledger.charge("mallory", 0.001, 0.0, "DP query", request_id=f"q-{i:04d}")
        stamp = ledger_rows.edits(ledger._db, "mallory")
        ledger.charge("mallory", 0.001, 0.0, "DP query", request_id="q-fold")
        assert ledger._db.execute("SELECT COUNT(*) FROM charges").fetchone()[0] == 10  # (it folded 52 into 1)
        assert ledger_rows.edits(ledger._db, "mallory") - stamp <= 2
        newest = ledger._db.execute("SELECT MAX(id) FROM charges").fetchone()[0]
        ledger._db.execute("DELETE FROM charges WHERE id = ?", (newest - 1,))  # (same session, after the fold)
        assert ledger.spent("mallory")[0] == pytest.approx(0.060)
        with psycopg.connect(pg_url, autocommit=True) as owner:
            owner.execute("DELETE FROM charges WHERE id = %s", (newest - 2,))
        assert ledger.spent("mallory")[0] == pytest.approx(0.059)
        ledger._db.execute("DROP INDEX requests_by_user_charge")  # (a ledger of the version before)
    with BudgetLedger(pg_url) as ledger:
        assert _has_requests_index(ledger._db)
        _replays_refused(ledger, "mallory", ["q-fold", "q-0059"])


@pytest.mark.slow
def test_migrate_target_gets_the_requests_index(tmp_path, pg_url):
    """``veil db migrate`` into an empty PostgreSQL database: the target has the requests index, and the copied
    replay ids are refused."""
    from veil.workers.db_migrate import migrate

    data = tmp_path / "data"
    data.mkdir()
    with BudgetLedger(data / "veil-dp-budget.sqlite3") as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        ledger.charge("mallory", 0.125, 0.0, "DP query", request_id="mallory-1")
    migrate(data, pg_url)
    with BudgetLedger(pg_url) as target:
        assert _has_requests_index(target._db)
        _replays_refused(target, "mallory", ["mallory-1"])


def _raise_then_reset_the_stamp(ledger: BudgetLedger, owner_execute, refused) -> None:
    """The owner raises mallory's older charge by 0.5, then tries to delete, lower and (PostgreSQL) truncate her
    stamp: each is refused, and the raise counts."""
    ledger.set_budget("mallory", 1.0, 1e-5)
    ledger.charge("mallory", 0.25, 0.0, "DP query")
    ledger.charge("mallory", 0.125, 0.0, "DP query")
    assert ledger.spent("mallory")[0] == 0.375  # (a total summed at stamp 0, stored and kept in memory)
    first = ledger._db.execute('SELECT MIN(id) FROM charges WHERE "user" = ?', ("mallory",)).fetchone()[0]
    owner_execute("UPDATE charges SET epsilon = 0.75 WHERE id = %d" % first)
    for statement in ("DELETE FROM charge_stamps WHERE \"user\" = 'mallory'",
                      "UPDATE charge_stamps SET edits = 0 WHERE \"user\" = 'mallory'"):
        with pytest.raises(refused, match="charge_stamps rows are kept"):
            owner_execute(statement)
    assert ledger.spent("mallory")[0] == pytest.approx(0.875)
    with pytest.raises(BudgetExceededError):
        ledger.charge("mallory", 0.25, 0.0, "spent twice")


def test_a_stamp_deleted_or_lowered_by_hand_is_refused(tmp_path):
    """The HOLE: the owner raised an older charge (stamp 0 -> 1), then deleted the user's charge_stamps row: the
    stamp read 0 again, the total summed at 0 was trusted, and the raise was spendable. A user without charges or
    total may still have her row removed; a bump still raises it."""
    import sqlite3

    path = tmp_path / "ledger.sqlite3"
    owner = sqlite3.connect(path, isolation_level=None)  # the owner's sqlite3 shell
    try:
        with BudgetLedger(path) as ledger:
            _raise_then_reset_the_stamp(ledger, owner.execute, sqlite3.DatabaseError)
            ledger.set_budget("bob", 1.0, 1e-5)
            ledger.charge("bob", 0.25, 0.0, "DP query")
            owner.execute("UPDATE charges SET epsilon = 0.5 WHERE \"user\" = 'bob'")
            owner.execute("DELETE FROM charges WHERE \"user\" = 'bob'")
            owner.execute("DELETE FROM charge_totals WHERE \"user\" = 'bob'")
            owner.execute("DELETE FROM charge_stamps WHERE \"user\" = 'bob'")  # (nothing left a stamp guards)
            assert ledger.spent("bob")[0] == 0
    finally:
        owner.close()


@pytest.mark.slow
def test_postgres_a_stamp_deleted_lowered_or_truncated_by_hand_is_refused(pg_url):
    """PostgreSQL: as on SQLite, and TRUNCATE charge_stamps is refused while charges are kept."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as owner, BudgetLedger(pg_url) as ledger:
        _raise_then_reset_the_stamp(ledger, owner.execute, psycopg.Error)
        with pytest.raises(psycopg.Error, match="charge_stamps rows are kept"):
            owner.execute("TRUNCATE charge_stamps")
        assert ledger.spent("mallory")[0] == pytest.approx(0.875)
