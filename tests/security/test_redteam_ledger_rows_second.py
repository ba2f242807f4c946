"""Red team, second pass: the DP ledger's row bound, replay horizon, in-memory totals and stamps (c4ae631:
veil/dp/ledger_rows.py, charge_totals.py, budget.py; veil/workers/db_migrate.py). The property: spent is never
below the exact sum of the user's charge rows (computed here independently), a replay id is forgotten only past
the documented horizon, and nothing is released free.

Holes found (fixed):

- a replay id without a charge id (written by a worker process of an older version beside the new ones, or by an
  import) was forgotten at the user's next fold, even one charged a moment before: the horizon cut to nothing.
  Such ids are now tied to the newest charge at a fold and forgotten when it is folded.
- ``veil db migrate`` copied replay ids without their charge ids (all forgotten, or tied, at the first fold).
- SQLite ``REPLACE INTO charges`` over the user's newest row (a corrected charge upserted by hand) deletes the old
  row without firing the delete trigger: the raised charge was not counted while the total's last_id stood.
- PostgreSQL ``TRUNCATE charges`` fires no row trigger: rows restored after it with their old ids were appends,
  and a total kept from before counted the old values (a restore of the true, higher, charges was not counted).
- a user far past the row bound (an older ledger, or an older worker's appends beside the new ones) had all her
  excess rows folded in one charge, under the lock every charge waits for (a million: ~9 s, ~200 MB); one charge
  now folds at most ``ledger_rows.FOLD_AT_MOST``.

Held (guarded): two ledgers on one file folding and caching beside each other; pushing one's own replay ids out
charges the replay again (never free) and leaves another user's ids alone; the in-memory totals stay bounded.
"""

from __future__ import annotations

import sqlite3
from fractions import Fraction

import pytest

from veil.dp import BudgetLedger, ledger_rows
from veil.dp.errors import BudgetExceededError, ReplayedRequestError

from tests.scale import conftest as _postgres

pg_url, postgres_server = _postgres.pg_url, _postgres.postgres_server  # (fixtures: a real PostgreSQL)


def _exact(ledger: BudgetLedger, user: str, column: str = "epsilon") -> Fraction:
    return sum((Fraction(float(r[0])) for r in ledger._db.execute(
        f'SELECT {column} FROM charges WHERE "user" = ?', (user,))), Fraction(0))


def _requests(ledger: BudgetLedger, user: str) -> int:
    return ledger._db.execute('SELECT COUNT(*) FROM requests WHERE "user" = ?', (user,)).fetchone()[0]


@pytest.fixture
def small_window(monkeypatch):
    monkeypatch.setattr(ledger_rows, "MAX_CHARGE_ROWS", 40)
    monkeypatch.setattr(ledger_rows, "KEEP_CHARGE_ROWS", 20)


def test_an_older_processs_replay_id_survives_the_next_fold(tmp_path, small_window):
    """The HOLE: a worker of an older version (no charge id on its replay rows) charged request 'older-req-1';
    the new version's next fold deleted every replay id without a charge id, so the same frame sent again was
    charged and released a second time at once (the horizon is the newest 20 to 40 charges). The id must be
    refused after that fold, and still be forgotten in bounded time (the rows stay bounded)."""
    path = tmp_path / "ledger.sqlite3"
    with BudgetLedger(path) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        for i in range(38):
            ledger.charge("mallory", 1e-6, 0.0, "DP query", request_id=f"new-{i}")
        older = sqlite3.connect(path)  # the older version's charge: its row and its replay id, no charge id
        with older:
            older.execute('INSERT INTO charges("user", epsilon, delta, reason, at) VALUES (?, 0.01, 0, ?, 0)',
                          ("mallory", "older process"))
            older.execute('INSERT INTO requests("user", request_id) VALUES (?, ?)', ("mallory", "older-req-1"))
        older.close()
        for i in range(38, 45):  # past 40 rows: a fold
            ledger.charge("mallory", 1e-6, 0.0, "DP query", request_id=f"new-{i}")
        assert "compacted" in ledger.history("mallory")[0][2]
        with pytest.raises(ReplayedRequestError):
            ledger.charge("mallory", 0.01, 0.0, "the older process's frame again", request_id="older-req-1")
        for i in range(45, 120):
            ledger.charge("mallory", 1e-6, 0.0, "DP query", request_id=f"new-{i}")
            assert _requests(ledger, "mallory") <= 40
        before = ledger.spent("mallory")[0]
        ledger.charge("mallory", 0.01, 0.0, "past the horizon: charged again", request_id="older-req-1")
        assert ledger.spent("mallory")[0] >= before + 0.01 and Fraction(ledger.spent("mallory")[0]) >= _exact(
            ledger, "mallory")


def test_replace_raising_the_users_newest_row_counts_at_once():
    """The HOLE (SQLite): ``REPLACE INTO charges`` over the newest row (an owner upserting a corrected, higher,
    charge) deletes the old row without its delete trigger and inserts one that is not below the newest id: no
    stamp, and the total (its last_id still the newest) counted the old value: 0.5 more could be spent. A row
    moved to the user by an UPDATE of its user column counts at once too."""
    with BudgetLedger(":memory:") as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        ledger.set_budget("alice", 1.0, 1e-5)
        ledger.charge("mallory", 0.25, 0.0, "DP query")
        newest = ledger._db.execute('SELECT MAX(id) FROM charges').fetchone()[0]
        assert ledger.spent("mallory")[0] == 0.25  # (the total is known, in memory and stored)
        assert ledger_rows.edits(ledger._db, "mallory") == 0  # (a charge names no id: it stamps nothing)
        ledger._db.execute('REPLACE INTO charges(id, "user", epsilon, delta, reason, at) VALUES (?, ?, 0.75, 0, ?, 0)',
                           (newest, "mallory", "corrected by the owner"))
        assert ledger.spent("mallory")[0] == pytest.approx(0.75)
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.5, 0.0, "does not fit")
        ledger.charge("alice", 0.125, 0.0, "DP query")
        ledger.charge("mallory", 0.0625, 0.0, "DP query")
        ledger._db.execute('UPDATE charges SET "user" = ? WHERE "user" = ?', ("mallory", "alice"))
        assert ledger.spent("mallory")[0] == pytest.approx(0.9375) and ledger.spent("alice")[0] == 0
        assert Fraction(ledger.spent("mallory")[0]) >= _exact(ledger, "mallory")


def test_two_ledgers_on_one_file_folding_beside_an_older_process_never_undercount(tmp_path, small_window):
    """Held: two processes' ledgers on one file, each keeping totals it read in memory, beside a worker of an
    older version appending rows (the stored total stale, so a read sums and keeps) and the owner raising an older
    row by hand; they charge, fold and read in turn. Neither trusts a total another's fold, append or edit made
    stale: spent is never below the exact sum of what was charged (a fold rounds its row up, so the rows may
    hold a little more), and the last of the budget is spent once."""
    path = tmp_path / "ledger.sqlite3"
    charged = [Fraction(0), Fraction(0)]
    owner = sqlite3.connect(path, isolation_level=None)  # the owner's sqlite3 shell, and the older worker

    def charge(ledger: BudgetLedger, i: int) -> None:
        eps, delta = 0.001 + 1e-9 * i, 1e-6 / 3
        ledger.charge("mallory", eps, delta, "DP query", request_id=f"q-{i:04d}")
        charged[0] += Fraction(eps)
        charged[1] += Fraction(delta)

    def read(ledger: BudgetLedger) -> None:
        eps, delta = ledger.spent("mallory")
        assert Fraction(eps) >= charged[0] and Fraction(delta) >= charged[1], i

    with BudgetLedger(path) as one, BudgetLedger(path) as two:
        one.set_budget("mallory", 1.0, 1e-3)
        for i in range(120):
            ledger, other = (one, two) if i % 3 else (two, one)
            charge(ledger, i)
            owner.execute('INSERT INTO charges("user", epsilon, delta, reason, at) VALUES (?, 0.0005, 0, ?, 0)',
                          ("mallory", "older process"))
            charged[0] += Fraction(0.0005)
            read(other)  # (sums the appended row and keeps that total)
            if i % 5 == 4:  # the owner raises an older row
                row_id, old = owner.execute('SELECT id, epsilon FROM charges ORDER BY id LIMIT 1 OFFSET 3').fetchone()
                owner.execute("UPDATE charges SET epsilon = ? WHERE id = ?", (old + 0.002, row_id))
                charged[0] += Fraction(old + 0.002) - Fraction(old)
            owner.execute('INSERT INTO charges("user", epsilon, delta, reason, at) VALUES (?, 0.0005, 0, ?, 0)',
                          ("mallory", "older process"))
            charged[0] += Fraction(0.0005)
            read(other)
            read(ledger)
        owner.close()
        assert one._db.execute('SELECT COUNT(*) FROM charges').fetchone()[0] <= 42
        left = one.remaining("mallory")[0]
        assert two.remaining("mallory")[0] == pytest.approx(left)
        with pytest.raises(BudgetExceededError):
            two.charge("mallory", left + 1e-6, 0.0, "over by a little")
        one.charge("mallory", left * 0.999, 0.0, "the last of it")
        with pytest.raises(BudgetExceededError):
            two.charge("mallory", left * 0.01, 0.0, "spent twice")


def test_pushing_her_own_replay_ids_out_charges_the_replay_and_leaves_others_ids(small_window):
    """Held: many tiny charges push the scientist's own earlier request id past the horizon; the captured frame
    sent again is charged again in full (never free), and another user's replay ids are not touched."""
    with BudgetLedger(":memory:") as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        ledger.set_budget("alice", 1.0, 1e-5)
        ledger.charge("alice", 0.25, 0.0, "DP query", request_id="alice-query-1")
        ledger.charge("mallory", 0.25, 0.0, "DP query", request_id="mallory-target")
        for i in range(100):
            ledger.charge("mallory", 1e-9, 0.0, "tiny", request_id=f"push-{i:04d}")
        spent = ledger.spent("mallory")[0]
        ledger.charge("mallory", 0.25, 0.0, "DP query", request_id="mallory-target")
        assert ledger.spent("mallory")[0] >= spent + 0.25
        with pytest.raises(ReplayedRequestError):
            ledger.charge("alice", 0.25, 0.0, "DP query", request_id="alice-query-1")
        assert ledger.spent("alice")[0] == 0.25


def test_the_totals_kept_in_memory_stay_bounded_and_each_read_is_right(monkeypatch):
    """Held: reading more users than the ledger keeps totals for evicts, never grows, and never answers one
    user's total for another (names differing only in case or a trailing space are other users)."""
    from veil.dp import budget

    monkeypatch.setattr(budget, "_KNOWN_TOTALS", 8)
    names = [f"user{i}" for i in range(10)] + ["User0", "user0 "]
    with BudgetLedger(":memory:") as ledger:
        for n, name in enumerate(names):
            ledger.set_budget(name, 1.0, 1e-5)
            ledger.charge(name, (n + 1) / 64, 0.0, "DP query")
        for _ in range(3):
            for n, name in enumerate(names):
                assert ledger.spent(name)[0] == (n + 1) / 64
                assert len(ledger._known) <= 8


@pytest.mark.slow
def test_postgres_truncate_then_restore_counts_the_restored_rows(pg_url):
    """The HOLE (PostgreSQL): TRUNCATE fires no row trigger. An owner truncating the charges and restoring them
    from the audited copy (old ids, in order: appends, no stamp) where one charge was recorded too low: the kept
    total (its last_id the same) counted the old value, and 0.5 more could be spent."""
    import psycopg

    with BudgetLedger(pg_url) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        ledger.charge("mallory", 0.125, 0.0, "DP query")
        ledger.charge("mallory", 0.125, 0.0, "DP query")
        assert ledger.spent("mallory")[0] == 0.25
        rows = ledger._db.execute('SELECT id, "user", epsilon, delta, reason, at FROM charges ORDER BY id').fetchall()
        with psycopg.connect(pg_url, autocommit=True) as owner:  # the owner's psql
            with owner.transaction():
                owner.execute("TRUNCATE charges")
                for i, (cid, user, eps, delta, reason, at) in enumerate(rows):
                    owner.execute('INSERT INTO charges(id, "user", epsilon, delta, reason, at) '
                                  "VALUES (%s, %s, %s, %s, %s, %s)", (cid, user, 0.625 if i == 0 else eps, delta,
                                                                      reason, at))
        assert ledger.spent("mallory")[0] == pytest.approx(0.75)
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.5, 0.0, "does not fit")
        ledger.charge("mallory", 0.125, 0.0, "fits")
        assert Fraction(ledger.spent("mallory")[0]) >= _exact(ledger, "mallory")


@pytest.mark.slow
def test_migrate_keeps_each_replay_ids_charge_and_copies_an_older_file(tmp_path, pg_url, postgres_server):
    """The HOLE: ``veil db migrate`` copied replay ids without their charge ids. Each must keep it (so the horizon
    stays the newest charges'); a file of an older version (no charge ids, totals without stamps) still copies
    its replay ids, and its totals are summed again, not trusted."""
    from veil.workers.db_migrate import migrate

    data = tmp_path / "data"
    data.mkdir()
    with BudgetLedger(data / "veil-dp-budget.sqlite3") as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        for i in range(5):
            ledger.charge("mallory", 0.125, 0.0, "DP query", request_id=f"mallory-{i}")
        source = sorted(ledger._db.execute("SELECT request_id, charge_id FROM requests").fetchall())
    migrate(data, pg_url)
    with BudgetLedger(pg_url) as target:
        assert sorted(target._db.execute("SELECT request_id, charge_id FROM requests").fetchall()) == source
        assert target.remaining("mallory")[0] == pytest.approx(0.375)

    older = tmp_path / "older"
    older.mkdir()
    with sqlite3.connect(older / "veil-dp-budget.sqlite3") as db:  # a file of an older version
        db.executescript('''
            CREATE TABLE budgets ("user" TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL);
            CREATE TABLE charges (id INTEGER PRIMARY KEY AUTOINCREMENT, "user" TEXT NOT NULL, epsilon REAL NOT NULL,
                                  delta REAL NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
            CREATE TABLE requests ("user" TEXT NOT NULL, request_id TEXT NOT NULL, PRIMARY KEY ("user", request_id));
            CREATE TABLE charge_totals ("user" TEXT PRIMARY KEY, last_id BIGINT NOT NULL, epsilon REAL NOT NULL,
                                        epsilon_error REAL NOT NULL, delta REAL NOT NULL, delta_error REAL NOT NULL);
            INSERT INTO budgets VALUES ('mallory', 1.0, 0.00001);
            INSERT INTO charges VALUES (1, 'mallory', 0.5, 0, 'DP query', 0);
            INSERT INTO requests VALUES ('mallory', 'older-1');
            INSERT INTO charge_totals VALUES ('mallory', 1, 0.125, 0, 0, 0);
        ''')
    second = postgres_server.new_database()
    counts = migrate(older, second)
    assert counts["requests"] == 1 and counts["charges"] == 1
    with BudgetLedger(second) as target:
        assert target.remaining("mallory")[0] == pytest.approx(0.5)  # (the stale older total is not trusted)
        with pytest.raises(ReplayedRequestError):
            target.charge("mallory", 0.125, 0.0, "replayed", request_id="older-1")


def test_a_users_rows_far_past_the_bound_fold_a_bounded_number_per_charge(tmp_path, small_window, monkeypatch):
    """The HOLE: a worker of an older version (no folding) appended 600 rows for mallory (a million in the
    field); her next charge on a new worker folded all of them at once, in the transaction every user's charge
    waits for (a million: ~9 s under SQLite's file lock, ~200 MB read into memory). One charge folds at most
    FOLD_AT_MOST rows; the rows still come under the bound in a few charges, and spent never drops below the
    exact sum of what was charged."""
    monkeypatch.setattr(ledger_rows, "FOLD_AT_MOST", 100, raising=False)  # (50,000 by default)
    path = tmp_path / "ledger.sqlite3"
    with BudgetLedger(path) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        ledger.charge("mallory", 0.001, 0.0, "DP query")
        with sqlite3.connect(path) as older:
            older.executemany('INSERT INTO charges("user", epsilon, delta, reason, at) VALUES (?, ?, 0, ?, 0)',
                              [("mallory", 1e-4 + 1e-12 * i, "older process") for i in range(600)])
        charged = Fraction(0.001) + sum(Fraction(1e-4 + 1e-12 * i) for i in range(600))
        rows = 601
        for i in range(8):
            ledger.charge("mallory", 1e-6, 0.0, "DP query")
            charged += Fraction(1e-6)
            now = ledger._db.execute('SELECT COUNT(*) FROM charges').fetchone()[0]
            assert now >= rows + 1 - 99, (rows, now)  # (one charge row in, at most 100 folded into 1)
            rows = now
            assert Fraction(ledger.spent("mallory")[0]) >= charged
        assert rows <= 40
        ledger._db.execute("DELETE FROM charge_totals")  # (summed again from the folded rows)
        assert Fraction(ledger.spent("mallory")[0]) >= charged
