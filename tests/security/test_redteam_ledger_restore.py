"""Red team: the DP ledger's running totals kept in memory across a restore of the ledger (veil/dp/budget.py,
charge_totals.py, ledger_rows.py) on SQLite and PostgreSQL. The property: a total a worker keeps in memory is
trusted only for the very rows it summed, so restoring a backup (a copy of the SQLite file, a PostgreSQL dump)
under a running worker never makes it under-charge.

Holes found (fixed):

- a total kept in memory was trusted while the user's stamp (a count of her rows' changes) was the one it was
  summed at. A restore brings an older, lower stamp back; the owner's next change of her rows (a refund) raises it
  to the same count with different rows, and the worker trusted its total of rows the restore had put back
  differently: a refund the restore undid stayed refunded in memory (0.25 spent where the rows held 0.625, a
  0.75 charge accepted on a budget of 1.0). The same on PostgreSQL (a dump restored), and through ``veil db
  migrate`` into a served database emptied first. Each bump of a stamp now also draws a random
  ``charge_stamps.nonce``: a total kept in memory is trusted only at the same count and nonce (read in the same
  look-up as before).
- a user never changed has stamp 0 in every ledger: a total kept in memory where the database's own was stale
  (an older file, its totals cleared) was trusted for another ledger's rows put in the file's place. Her nonce is
  now the ledger's generation, drawn when the database is made and again by ``veil db migrate``.

Held (guarded): charges alone after a restore never reach a total kept in memory (each charge writes the
database's own total, which is preferred on a tie); a stamp's count still rises by one per change.

Left (documented): a restore to a copy at the same stamp (count and nonce), followed by appends of a worker
process of an older version (rows without the running total) beside this one, past the ids the kept total summed.
"""

from __future__ import annotations

import sqlite3
from fractions import Fraction

import pytest

from veil.dp import BudgetLedger, ledger_rows
from veil.dp.errors import BudgetExceededError

from ledger_files import online_backup, restore_dumped_tables
from tests.scale import conftest as _postgres

pg_url, postgres_server = _postgres.pg_url, _postgres.postgres_server  # (fixtures: a real PostgreSQL)


def _rows_sum(ledger: BudgetLedger, user: str) -> Fraction:
    return sum((Fraction(float(r[0])) for r in ledger._db.execute(
        'SELECT epsilon FROM charges WHERE "user" = ?', (user,))), Fraction(0))


def _three_charges(ledger: BudgetLedger) -> None:
    ledger.set_budget("mallory", 1.0, 1e-5)
    ledger.charge("mallory", 0.5, 0.0, "DP query")
    ledger.charge("mallory", 0.125, 0.0, "DP query")
    ledger.charge("mallory", 0.125, 0.0, "DP query")


def test_a_restored_file_is_not_read_through_a_total_kept_in_memory(tmp_path):
    """The HOLE: the owner refunds mallory's first charge (0.5), the worker reads her budget (a total of 0.25 kept
    in memory at stamp 1), then the owner restores last night's copy (the refund undone, stamp 0) and refunds her
    second charge instead (stamp 1 again). Her rows hold 0.625; the worker read 0.25 and accepted 0.75 more."""
    path, backup = tmp_path / "veil-dp-budget.sqlite3", tmp_path / "backup.sqlite3"
    with BudgetLedger(path) as ledger:
        _three_charges(ledger)
        online_backup(path, backup)
        owner = sqlite3.connect(path, isolation_level=None)
        try:
            owner.execute("DELETE FROM charges WHERE id = 1")
            assert ledger.spent("mallory")[0] == pytest.approx(0.25)  # (kept in memory)
            online_backup(backup, path)
            owner.execute("DELETE FROM charges WHERE id = 2")
        finally:
            owner.close()
        assert _rows_sum(ledger, "mallory") == Fraction(5, 8)
        assert ledger.spent("mallory")[0] >= 0.625
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.75, 0.0, "DP query")
        assert ledger.spent("mallory")[0] == pytest.approx(0.625)


def test_another_ledger_put_in_place_is_not_read_through_a_total_kept_in_memory(tmp_path):
    """The HOLE: a user whose rows were never changed has stamp 0 in every ledger. The worker kept a total summed
    where the database held none (an older file's user, or its derived totals cleared); the owner put another
    ledger in place (a file of the same user, older, without running totals): the total kept for the first was
    trusted for the other's rows."""
    path, other = tmp_path / "veil-dp-budget.sqlite3", tmp_path / "other.sqlite3"
    with BudgetLedger(other) as second:
        second.set_budget("mallory", 1.0, 1e-5)
        for _ in range(3):
            second.charge("mallory", 0.25, 0.0, "DP query")
        second._db.execute("DELETE FROM charge_totals")
    with BudgetLedger(path) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        for _ in range(3):
            ledger.charge("mallory", 0.0625, 0.0, "DP query")
        ledger._db.execute("DELETE FROM charge_totals")  # (derived: the owner may clear it)
        assert ledger.spent("mallory")[0] == pytest.approx(0.1875)  # (kept in memory)
        online_backup(other, path)
        assert ledger.spent("mallory")[0] >= 0.75
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.5, 0.0, "DP query")


def test_charges_after_a_restore_are_counted_from_the_restored_rows(tmp_path):
    """Held: after a restore, charges alone (folds included: each stamps the user) never reach a total kept in
    memory before the restore: spent is always the restored rows' sum plus the new charges."""
    path, backup = tmp_path / "veil-dp-budget.sqlite3", tmp_path / "backup.sqlite3"
    with BudgetLedger(path) as ledger:
        _three_charges(ledger)
        online_backup(path, backup)
        ledger._db.execute("DELETE FROM charges WHERE id = 1")
        for _ in range(4):
            ledger.charge("mallory", 0.03125, 0.0, "DP query")
        assert ledger.spent("mallory")[0] == pytest.approx(0.375)  # (kept in memory)
        online_backup(backup, path)
        for _ in range(4):
            ledger.charge("mallory", 0.0625, 0.0, "DP query")
            assert ledger.spent("mallory")[0] >= float(_rows_sum(ledger, "mallory"))
        assert _rows_sum(ledger, "mallory") == 1
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.015625, 0.0, "DP query")


def test_every_stamp_bump_draws_a_new_value(tmp_path):
    """Held: two changes that bring a stamp to the same count from the same restored file leave different values,
    and the count still rises by one per change (the stamps' other guards are unchanged)."""
    path, backup = tmp_path / "veil-dp-budget.sqlite3", tmp_path / "backup.sqlite3"
    with BudgetLedger(path) as ledger:
        _three_charges(ledger)
        online_backup(path, backup)
        ledger._db.execute("DELETE FROM charges WHERE id = 1")
        first = ledger_rows.stamp(ledger._db, "mallory")
        online_backup(backup, path)
        assert ledger_rows.stamp(ledger._db, "mallory")[0] == 0
        ledger._db.execute("DELETE FROM charges WHERE id = 2")
        second = ledger_rows.stamp(ledger._db, "mallory")
        assert first[0] == second[0] == 1 and first[1] != second[1] and 0 not in (first[1], second[1])


@pytest.mark.slow
def test_postgres_a_restored_dump_is_not_read_through_a_total_kept_in_memory(pg_url):
    """The HOLE on PostgreSQL: the owner's restore of a dump (the ledger's tables dropped and made again with the
    dump's rows, stamps included) then a refund: the total kept in memory at the same count was trusted."""
    import psycopg

    tables = ("budgets", "charge_stamps", "charges", "charge_totals")
    with BudgetLedger(pg_url) as ledger:
        _three_charges(ledger)
        with psycopg.connect(pg_url, autocommit=True) as owner:
            for table in tables:  # (the dump)
                owner.execute(f"CREATE TABLE dump_{table} AS SELECT * FROM {table}")
            owner.execute("DELETE FROM charges WHERE id = 1")
            assert ledger.spent("mallory")[0] == pytest.approx(0.25)  # (kept in memory)
            restore_dumped_tables(owner)  # (the restore: a stamp is never lowered in place, so as pg_restore --clean)
            owner.execute("DELETE FROM charges WHERE id = 2")
        assert ledger.spent("mallory")[0] == pytest.approx(0.625)
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.75, 0.0, "DP query")


@pytest.mark.slow
def test_migrate_into_a_served_database_is_not_read_through_a_total_kept_in_memory(tmp_path, pg_url):
    """The HOLE through ``veil db migrate``: a worker serving a PostgreSQL ledger kept mallory's total (a refund
    stamped her once) and bob's (never changed, stamp 0, his stored total cleared); the owner emptied the database
    and migrated another history into it, where a refund also stamped mallory once after her last charge and bob's
    totals are stale too: the worker trusted its totals for the copied rows. The copied stamps keep their source's
    nonces (the same history as the file's); the import draws a new generation."""
    import psycopg

    from veil.workers.db_migrate import migrate

    def bobs_charges(ledger: BudgetLedger, epsilon: float) -> None:
        ledger.set_budget("bob", 1.0, 1e-5)
        for _ in range(3):
            ledger.charge("bob", epsilon, 0.0, "DP query")
        ledger._db.execute("DELETE FROM charge_totals WHERE \"user\" = 'bob'")  # (derived: the owner may clear it)

    data = tmp_path / "data"
    data.mkdir()
    with BudgetLedger(data / "veil-dp-budget.sqlite3") as source:
        _three_charges(source)
        bobs_charges(source, 0.25)
        source._db.execute("DELETE FROM charges WHERE id = 2")
        source_stamp = ledger_rows.stamp(source._db, "mallory")
    with BudgetLedger(pg_url) as ledger:
        _three_charges(ledger)
        bobs_charges(ledger, 0.0625)
        generation = ledger_rows.stamp(ledger._db, "bob")
        with psycopg.connect(pg_url, autocommit=True) as owner:
            owner.execute("DELETE FROM charges WHERE id = 1")
            assert ledger.spent("mallory")[0] == pytest.approx(0.25)  # (kept in memory)
            assert ledger.spent("bob")[0] == pytest.approx(0.1875)
            for table in ("charges", "charge_totals", "requests", "training", "charge_stamps", "budgets"):
                owner.execute(f"DELETE FROM {table}")
        migrate(data, pg_url)
        assert ledger_rows.stamp(ledger._db, "mallory") == source_stamp
        assert ledger_rows.stamp(ledger._db, "bob")[1] not in (0, generation[1])
        assert ledger.spent("mallory")[0] == pytest.approx(0.625)
        assert ledger.spent("bob")[0] == pytest.approx(0.75)
        for user in ("mallory", "bob"):
            with pytest.raises(BudgetExceededError):
                ledger.charge(user, 0.5, 0.0, "DP query")
