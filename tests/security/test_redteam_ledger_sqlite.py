"""Red team: the DP ledger's stamps and folds on SQLite (veil/dp/ledger_rows.py, budget.py, charge_totals.py).
The property: a running total is trusted only at the stamp it was summed at, so a stamp never goes down (else a
charge the owner raised since, summed at a lower stamp, is spendable again), and a fold stamps its user a constant
number of times (it runs under the lock every charge waits for) while any other delete still stamps at once.

Who can lower a stamp: no scientist (she reaches the ledger only through charges, whose triggers only raise
stamps) and no crash (a charge is one transaction); the owner's sqlite3 shell, or an import, can.

Holes found (fixed):

- ``REPLACE INTO charge_stamps`` / ``INSERT OR REPLACE`` lowered a stamp: SQLite's REPLACE deletes the row it
  replaces without firing delete or update triggers (``charge_stamps_kept`` and ``charge_stamps_rising`` never
  saw it). A charge the owner raised was read at the older stamp, and spent again. A BEFORE INSERT trigger refuses
  a stamp below the user's (the stamps' own bumps no longer upsert, so it sees only hand-made inserts).
- a fold's deletes fired the stamp trigger once per row on SQLite (PostgreSQL stamped once): each deleted row
  wrote ``charge_stamps``. The fold drops the delete trigger and makes it again inside its transaction (no other
  connection sees it missing; a WHEN that skipped the fold's rows still ran per row); its update stamps once.
- an older file kept the older trigger bodies (``CREATE TRIGGER IF NOT EXISTS``): they are made again at open.

Held (guarded): stamps still rise for every change and may be raised by hand; a delete trigger dropped by hand is
made again at open and at a fold; a fold cut short or killed -9 with its trigger dropped commits nothing; an
older-version process beside (SQLite), or after a sequence restart (PostgreSQL, ids below the newest and replay ids
without a charge id), is counted and its replay ids kept through the fold that takes its rows.

Budgets are never under-charged: every spend checked here is compared with the exact sum of the charges' rows.
"""

from __future__ import annotations

import sqlite3
from fractions import Fraction

import pytest

from veil.dp import BudgetLedger, ledger_rows
from veil.dp.errors import BudgetExceededError, ReplayedRequestError

from tests.security.test_redteam_ledger_scale import append_as_an_older_version
from tests.scale import conftest as _postgres

pg_url, postgres_server = _postgres.pg_url, _postgres.postgres_server  # (fixtures: a real PostgreSQL)

KEPT = "charge_stamps rows are kept"


def _rows_sum(ledger: BudgetLedger, user: str) -> Fraction:
    """The exact sum of the user's charge rows (what she has spent, independently of the running total)."""
    return sum((Fraction(float(r[0])) for r in ledger._db.execute(
        'SELECT epsilon FROM charges WHERE "user" = ?', (user,))), Fraction(0))


def _stamp(ledger: BudgetLedger, user: str) -> int:
    return ledger_rows.edits(ledger._db, user)


@pytest.fixture
def owner_shell(tmp_path):
    """A ledger file and the owner's sqlite3 shell on it (its own connection, autocommit)."""
    path = tmp_path / "veil-dp-budget.sqlite3"
    ledger = BudgetLedger(path)
    shell = sqlite3.connect(path, isolation_level=None)
    yield ledger, shell, path
    shell.close()
    ledger.close()


def _raised_by_the_owner(ledger: BudgetLedger, shell) -> None:
    """mallory spends 0.375 of 1.0 (a total summed and kept at her stamp); the owner raises her first charge to
    0.75 (her stamp rises): 0.875 spent."""
    ledger.set_budget("mallory", 1.0, 1e-5)
    ledger.charge("mallory", 0.25, 0.0, "DP query", request_id="m-1")
    ledger.charge("mallory", 0.125, 0.0, "DP query", request_id="m-2")
    assert ledger.spent("mallory")[0] == 0.375
    first = ledger._db.execute('SELECT MIN(id) FROM charges WHERE "user" = ?', ("mallory",)).fetchone()[0]
    shell.execute("UPDATE charges SET epsilon = 0.75 WHERE id = ?", (first,))
    assert _stamp(ledger, "mallory") >= 1


@pytest.mark.parametrize("statement", [
    "REPLACE INTO charge_stamps(\"user\", edits) VALUES ('mallory', 0)",
    "INSERT OR REPLACE INTO charge_stamps(\"user\", edits) VALUES ('mallory', 0)",
    "INSERT INTO charge_stamps(\"user\", edits) VALUES ('mallory', 0) "
    "ON CONFLICT(\"user\") DO UPDATE SET edits = excluded.edits",
    "UPDATE OR REPLACE charge_stamps SET edits = 0 WHERE \"user\" = 'mallory'",
    "REPLACE INTO charge_stamps(\"user\", edits) VALUES ('mallory', 'zero')",
])
def test_a_stamp_replaced_lower_by_hand_is_refused_and_the_raise_counts(owner_shell, statement):
    """The HOLE: REPLACE deleted mallory's stamp row without firing a trigger and inserted 0: the total summed at 0
    (0.375) was trusted again, and she spent 0.25 more of a budget already spent to 0.875 (1.125 of 1.0)."""
    ledger, shell, _path = owner_shell
    _raised_by_the_owner(ledger, shell)
    stamp = _stamp(ledger, "mallory")
    with pytest.raises(sqlite3.DatabaseError, match=KEPT):
        shell.execute(statement)
    assert _stamp(ledger, "mallory") == stamp
    assert _rows_sum(ledger, "mallory") == Fraction(0.875)
    assert Fraction(ledger.spent("mallory")[0]) >= _rows_sum(ledger, "mallory")
    with pytest.raises(BudgetExceededError):
        ledger.charge("mallory", 0.25, 0.0, "spent twice")
    with pytest.raises(ReplayedRequestError):
        ledger.charge("mallory", 1e-9, 0.0, "replayed", request_id="m-2")
    assert _rows_sum(ledger, "mallory") == Fraction(0.875)  # (nothing charged past the budget)


def test_stamps_still_rise_and_may_be_raised_or_made_by_hand(owner_shell):
    """Held: charges of every kind still stamp (a stamp well above 1 takes more bumps: the stamps' own inserts are
    no upsert the lowering guard refuses), the owner may raise a stamp or make one for a new user, and a stamp
    equal to the user's may be written again."""
    ledger, shell, _path = owner_shell
    _raised_by_the_owner(ledger, shell)
    for _ in range(3):
        shell.execute("UPDATE charges SET reason = reason || '.' WHERE \"user\" = 'mallory'")
    stamp = _stamp(ledger, "mallory")
    assert stamp >= 4
    shell.execute("REPLACE INTO charge_stamps(\"user\", edits) VALUES ('mallory', ?)", (stamp,))
    shell.execute("REPLACE INTO charge_stamps(\"user\", edits) VALUES ('mallory', ?)", (stamp + 5,))
    shell.execute("INSERT INTO charge_stamps(\"user\", edits) VALUES ('nobody-yet', 3)")
    assert _stamp(ledger, "mallory") == stamp + 5
    newest = ledger._db.execute("SELECT MAX(id) FROM charges").fetchone()[0]
    shell.execute("DELETE FROM charges WHERE id = ?", (newest,))  # (the owner gives 0.125 back: stamped)
    assert _stamp(ledger, "mallory") == stamp + 6
    assert Fraction(ledger.spent("mallory")[0]) >= _rows_sum(ledger, "mallory") == Fraction(0.75)
    assert ledger.spent("mallory")[0] == pytest.approx(0.75)
    ledger.charge("mallory", 0.25, 0.0, "DP query")
    assert Fraction(ledger.spent("mallory")[0]) >= _rows_sum(ledger, "mallory") == Fraction(1.0)
    with pytest.raises(BudgetExceededError):
        ledger.charge("mallory", 1e-6, 0.0, "past the budget")


def test_a_sqlite_fold_stamps_the_user_once_and_other_deletes_still_stamp(owner_shell, monkeypatch):
    """The HOLE: each row a SQLite fold deleted fired the stamp trigger (a charge_stamps write per row, under the
    ledger's lock). A fold now stamps the user at most twice; a delete after it (the same connection, the owner's
    shell) still stamps and gives the budget back at once; the fold's marker is gone when it commits; the newest
    replay ids are still refused, and spent equals the exact sum of the rows."""
    monkeypatch.setattr(ledger_rows, "MAX_CHARGE_ROWS", 60)
    monkeypatch.setattr(ledger_rows, "KEEP_CHARGE_ROWS", 10)
    ledger, shell, _path = owner_shell
    ledger.set_budget("mallory", 1.0, 1e-5)
    for i in range(60):
        ledger.charge("mallory", 0.001, 0.0, "DP query", request_id=f"q-{i:04d}")
    stamp = _stamp(ledger, "mallory")
    ledger.charge("mallory", 0.001, 0.0, "DP query", request_id="q-fold")
    assert ledger._db.execute("SELECT COUNT(*) FROM charges").fetchone()[0] == 10  # (it folded 52 into 1)
    assert _stamp(ledger, "mallory") - stamp <= 2
    assert _has_delete_trigger(shell)
    assert Fraction(ledger.spent("mallory")[0]) >= _rows_sum(ledger, "mallory") >= Fraction(61) * Fraction(0.001)
    newest = ledger._db.execute("SELECT MAX(id) FROM charges").fetchone()[0]
    before = _stamp(ledger, "mallory")
    ledger._db.execute("DELETE FROM charges WHERE id = ?", (newest - 1,))  # (same connection, after the fold)
    shell.execute("DELETE FROM charges WHERE id = ?", (newest - 2,))
    assert _stamp(ledger, "mallory") == before + 2
    assert ledger.spent("mallory")[0] == pytest.approx(0.059)
    assert Fraction(ledger.spent("mallory")[0]) >= _rows_sum(ledger, "mallory")
    for rid in ["q-fold", "q-0059", "q-0052"]:
        with pytest.raises(ReplayedRequestError):
            ledger.charge("mallory", 1e-9, 0.0, "replayed", request_id=rid)


def _has_delete_trigger(db) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = 'charges_deleted'").fetchone() \
        is not None


def test_a_delete_trigger_dropped_by_hand_is_made_again_at_open_and_at_a_fold(tmp_path, monkeypatch):
    """Held: the fold drops the delete trigger for its own delete and makes it again in its transaction; dropped by
    hand, it is made again at the next open (and at the next fold): a give-back after either is stamped and counted
    at once, and spent never falls below the exact sum of the rows."""
    monkeypatch.setattr(ledger_rows, "MAX_CHARGE_ROWS", 20)
    monkeypatch.setattr(ledger_rows, "KEEP_CHARGE_ROWS", 8)
    path = tmp_path / "veil-dp-budget.sqlite3"
    with BudgetLedger(path) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        ledger.charge("mallory", 0.125, 0.0, "DP query")
        ledger._db.execute("DROP TRIGGER charges_deleted")  # (the owner's shell)
    with BudgetLedger(path) as ledger:
        assert _has_delete_trigger(ledger._db)
        ledger._db.execute("DROP TRIGGER charges_deleted")
        for i in range(20):
            ledger.charge("mallory", 0.001, 0.0, "DP query", request_id=f"q-{i}")  # (the 21st row: a fold)
        assert ledger._db.execute("SELECT COUNT(*) FROM charges").fetchone()[0] == 8
        assert _has_delete_trigger(ledger._db)
        newest = ledger._db.execute("SELECT MAX(id) FROM charges").fetchone()[0]
        stamp = _stamp(ledger, "mallory")
        ledger._db.execute("DELETE FROM charges WHERE id = ?", (newest,))
        assert _stamp(ledger, "mallory") == stamp + 1
        charged = Fraction(0.125) + 19 * Fraction(0.001)  # (the newest 0.001 given back)
        assert Fraction(ledger.spent("mallory")[0]) >= _rows_sum(ledger, "mallory") >= charged
        assert ledger.spent("mallory")[0] == pytest.approx(0.125 + 19 * 0.001)


_KILLED_MID_FOLD = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")  # (a fold's statements on the file, plain sqlite3: no torch import to wait for)
db.execute("DROP TRIGGER IF EXISTS charges_deleted")
db.execute("DELETE FROM charges WHERE id > (SELECT MIN(id) FROM charges)")
os._exit(9)  # (kill -9 between the fold's delete and the delete trigger made again)
"""


class _Interrupted(BaseException):
    pass


def test_a_fold_cut_short_or_killed_leaves_the_trigger_and_every_charge(tmp_path, monkeypatch):
    """Held (faults): a fold interrupted between its delete (its trigger dropped) and the trigger made again, in
    process or by kill -9, commits nothing: the trigger is there, the rows and the total are as before, the
    interrupted charge is not charged (its request id is new again), and a delete after it is stamped and counted."""
    import subprocess
    import sys

    monkeypatch.setattr(ledger_rows, "MAX_CHARGE_ROWS", 20)
    monkeypatch.setattr(ledger_rows, "KEEP_CHARGE_ROWS", 8)
    path = tmp_path / "veil-dp-budget.sqlite3"
    with BudgetLedger(path) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        for i in range(20):
            ledger.charge("mallory", 0.001, 0.0, "DP query", request_id=f"q-{i}")
        real = ledger_rows._make_sqlite_trigger

        def cut_short(db, name):
            raise _Interrupted()

        monkeypatch.setattr(ledger_rows, "_make_sqlite_trigger", cut_short)
        with pytest.raises(_Interrupted):
            ledger.charge("mallory", 0.001, 0.0, "DP query", request_id="q-cut")
        monkeypatch.setattr(ledger_rows, "_make_sqlite_trigger", real)
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_FOLD, str(path)], capture_output=True, timeout=60)
    assert done.returncode == 9, done.stderr.decode()[-2000:]
    with BudgetLedger(path) as ledger:
        assert _has_delete_trigger(ledger._db)
        assert ledger._db.execute("SELECT COUNT(*) FROM charges").fetchone()[0] == 20
        assert _rows_sum(ledger, "mallory") == 20 * Fraction(0.001)
        assert Fraction(ledger.spent("mallory")[0]) >= 20 * Fraction(0.001)
        stamp = _stamp(ledger, "mallory")
        oldest = ledger._db.execute("SELECT MIN(id) FROM charges").fetchone()[0]
        ledger._db.execute("DELETE FROM charges WHERE id = ?", (oldest,))
        assert _stamp(ledger, "mallory") == stamp + 1
        ledger.charge("mallory", 0.001, 0.0, "DP query", request_id="q-cut")  # (never charged: charged now)
        assert Fraction(ledger.spent("mallory")[0]) >= _rows_sum(ledger, "mallory") == 20 * Fraction(0.001)
        with pytest.raises(ReplayedRequestError):
            ledger.charge("mallory", 1e-9, 0.0, "replayed", request_id="q-19")


_OLDER_TRIGGERS = """
DROP TRIGGER IF EXISTS charges_inserted_below; DROP TRIGGER IF EXISTS charges_updated;
DROP TRIGGER IF EXISTS charges_deleted; DROP TRIGGER IF EXISTS charges_replaced;
DROP TRIGGER IF EXISTS charge_stamps_kept; DROP TRIGGER IF EXISTS charge_stamps_rising;
DROP TRIGGER IF EXISTS charge_stamps_not_lowered;
CREATE TRIGGER charges_inserted_below AFTER INSERT ON charges
WHEN EXISTS (SELECT 1 FROM charges WHERE "user" = NEW."user" AND id > NEW.id)
BEGIN INSERT INTO charge_stamps("user", edits) VALUES (NEW."user", 1)
    ON CONFLICT("user") DO UPDATE SET edits = charge_stamps.edits + 1; END;
CREATE TRIGGER charges_updated AFTER UPDATE ON charges
BEGIN INSERT INTO charge_stamps("user", edits) VALUES (OLD."user", 1)
    ON CONFLICT("user") DO UPDATE SET edits = charge_stamps.edits + 1;
INSERT INTO charge_stamps("user", edits) VALUES (NEW."user", 1)
    ON CONFLICT("user") DO UPDATE SET edits = charge_stamps.edits + 1; END;
CREATE TRIGGER charges_deleted AFTER DELETE ON charges
BEGIN INSERT INTO charge_stamps("user", edits) VALUES (OLD."user", 1)
    ON CONFLICT("user") DO UPDATE SET edits = charge_stamps.edits + 1; END;
CREATE TRIGGER charge_stamps_rising BEFORE UPDATE ON charge_stamps
WHEN NEW.edits < OLD.edits OR NEW."user" IS NOT OLD."user"
BEGIN SELECT RAISE(ABORT, 'charge_stamps rows are kept'); END;
"""


def test_an_older_files_triggers_are_made_again_at_open(tmp_path):
    """The HOLE: an older file kept the older trigger bodies at open (CREATE TRIGGER IF NOT EXISTS): stamps there
    could be lowered by REPLACE, and folds stamped every row. At open they are made again: the REPLACE is refused,
    charges and the owner's edits still stamp (a stamp above 1 too), and the raise counts."""
    path = tmp_path / "veil-dp-budget.sqlite3"
    with BudgetLedger(path) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
    older = sqlite3.connect(path, isolation_level=None)
    try:
        older.executescript(_OLDER_TRIGGERS)
    finally:
        older.close()
    with BudgetLedger(path) as ledger:
        shell = sqlite3.connect(path, isolation_level=None)
        try:
            _raised_by_the_owner(ledger, shell)
            shell.execute("UPDATE charges SET reason = reason || '.' WHERE \"user\" = 'mallory'")
            stamp = _stamp(ledger, "mallory")
            assert stamp >= 3
            with pytest.raises(sqlite3.DatabaseError, match=KEPT):
                shell.execute("REPLACE INTO charge_stamps(\"user\", edits) VALUES ('mallory', 0)")
            assert _stamp(ledger, "mallory") == stamp
        finally:
            shell.close()
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.25, 0.0, "spent twice")
        assert Fraction(ledger.spent("mallory")[0]) >= _rows_sum(ledger, "mallory") == Fraction(0.875)


def test_an_older_version_process_beside_a_fold_still_counts(tmp_path, monkeypatch):
    """Held: charges an older-version process appends beside (no running total; its fold would stamp every row, as
    before) are counted, through a fold of the new version: spent never below the exact sum of every charge."""
    monkeypatch.setattr(ledger_rows, "MAX_CHARGE_ROWS", 20)
    monkeypatch.setattr(ledger_rows, "KEEP_CHARGE_ROWS", 8)
    path = tmp_path / "veil-dp-budget.sqlite3"
    charged = Fraction(0)
    with BudgetLedger(path) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        for i in range(30):
            ledger.charge("mallory", 0.01, 0.0, "DP query", request_id=f"q-{i}")
            charged += Fraction(0.01)
            if i % 7 == 3:
                append_as_an_older_version(path, "mallory", [1 / 3 * 0.01] * 3)
                charged += 3 * Fraction(1 / 3 * 0.01)
        assert ledger._db.execute("SELECT COUNT(*) FROM charges").fetchone()[0] <= 20
        assert Fraction(ledger.spent("mallory")[0]) >= charged
        assert _rows_sum(ledger, "mallory") >= charged
        ledger._db.execute("DELETE FROM charge_totals")
        ledger._known.clear()
        assert Fraction(ledger.spent("mallory")[0]) >= charged


@pytest.mark.slow
def test_postgres_an_older_process_after_a_sequence_restart_keeps_its_replay_ids(pg_url, monkeypatch):
    """Held (PostgreSQL, the leftover beside this file's SQLite work): after the owner restarts the id sequence, a
    worker of an older version (no id catch-up, replay ids without a charge id) charges with ids below the user's
    newest. The next fold takes those rows for the oldest, but their replay ids are tied to the newest charge and
    still refused; its deletes stamp the user a constant number of times; spent never below the exact sum."""
    import psycopg

    from veil.workers.database import Database

    monkeypatch.setattr(ledger_rows, "MAX_CHARGE_ROWS", 20)
    monkeypatch.setattr(ledger_rows, "KEEP_CHARGE_ROWS", 8)
    charged = Fraction(0)
    with BudgetLedger(pg_url) as ledger:
        ledger.set_budget("mallory", 10.0, 1e-5)
        for i in range(21):  # (a fold: ids 2..13 freed)
            ledger.charge("mallory", 0.001, 0.0, "DP query", request_id=f"q-{i}")
            charged += Fraction(0.001)
        with psycopg.connect(pg_url, autocommit=True) as owner:
            owner.execute("ALTER TABLE charges ALTER COLUMN id RESTART WITH 2")
        older = Database(pg_url)  # (an older version's charge: its row, then its replay id without a charge id)
        try:
            for k in range(3):
                with older.write_transaction():
                    older.execute('INSERT INTO charges("user", epsilon, delta, reason, at) '
                                  "VALUES ('mallory', 0.01, 0, 'older process', 0)")
                    older.execute('INSERT INTO requests("user", request_id) VALUES (?, ?)', ("mallory", f"old-{k}"))
                charged += Fraction(0.01)
        finally:
            older.close()
        low = ledger._db.execute("SELECT MIN(id) FROM charges WHERE reason = 'older process'").fetchone()[0]
        assert low < ledger._db.execute("SELECT MAX(id) FROM charges").fetchone()[0]  # (below the newest)
        stamp = _stamp(ledger, "mallory")
        for i in range(21, 33):  # (past MAX again: a fold taking the older process's rows)
            ledger.charge("mallory", 0.001, 0.0, "DP query", request_id=f"q-{i}")
            charged += Fraction(0.001)
        assert ledger._db.execute("SELECT COUNT(*) FROM charges WHERE reason = 'older process'").fetchone()[0] == 0
        assert _stamp(ledger, "mallory") - stamp <= 4
        for rid in ["old-0", "old-1", "old-2", "q-32"]:
            with pytest.raises(ReplayedRequestError):
                ledger.charge("mallory", 1e-9, 0.0, "replayed", request_id=rid)
        assert Fraction(ledger.spent("mallory")[0]) >= charged
        assert _rows_sum(ledger, "mallory") >= charged
