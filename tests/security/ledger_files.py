"""What the DP ledger restore red teams share (test_redteam_ledger_mv.py, its second pass, and
test_redteam_ledger_restore.py): the owner's online backup of a live SQLite file, a served ledger with a backup
of it, the worker's own checkpoint, a fresh process's reading of the rows, and a PostgreSQL restore of dumped
tables as ``pg_restore --clean`` makes it."""

from __future__ import annotations

import ast
import sqlite3
import subprocess
import sys
from fractions import Fraction
from typing import Iterator

from veil.dp import BudgetLedger


def online_backup(source, target) -> None:
    """The owner's backup (or restore) of a live file: SQLite's online backup, as the sqlite3 shell's ``.backup``
    / ``.restore`` (a running worker's connection sees the restored pages)."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def checkpoint(ledger: BudgetLedger) -> None:
    """The worker's own checkpoint (its autocheckpoint runs one every ~1000 pages): the log into its file, taken in
    as the ledger's own write."""
    ledger._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ledger._file.settle()


def ledger_with_backup(tmp_path, others: tuple = ()) -> Iterator[tuple]:
    """For a fixture: ``(ledger, path, backup path)``, a served ledger (mallory: 0.375 of 1.0 spent; each of
    ``others`` a budget of 1.0), a backup of it, and the worker's log checkpointed (a quiet worker's: the ``-wal``
    holds nothing of the file it is about to lose); closed after the test."""
    path, copy = tmp_path / "veil-dp-budget.sqlite3", tmp_path / "backup.sqlite3"
    ledger = BudgetLedger(path)
    for user in ("mallory",) + tuple(others):
        ledger.set_budget(user, 1.0, 1e-5)
    for _ in range(3):
        ledger.charge("mallory", 0.125, 0.0, "DP query")
    online_backup(path, copy)
    checkpoint(ledger)
    yield ledger, path, copy
    ledger.close()


def rows_in_another_process(path, user: str) -> list:
    """The user's (epsilon, request id) rows as a process started now reads them (a second worker, a restarted
    one): one of this process would share the worker's open log (SQLite shares it per file within a process)."""
    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(repr(c.execute("
            "'SELECT c.epsilon, r.request_id FROM charges c LEFT JOIN requests r ON r.charge_id = c.id "
            "WHERE c.\"user\" = ? ORDER BY c.id', (sys.argv[2],)).fetchall()))")
    out = subprocess.run([sys.executable, "-c", code, str(path), user], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout)


def spent_in_another_process(path, user: str) -> Fraction:
    """The exact sum of the user's rows as a process started now reads them."""
    return sum((Fraction(e) for e, _r in rows_in_another_process(path, user)), Fraction(0))


def restore_dumped_tables(owner) -> None:
    """On PostgreSQL connection ``owner``: the ledger's stamps, charges and totals replaced by the ``dump_*``
    tables' rows in one transaction, triggers off, as ``pg_restore --clean`` does (a stamp is never lowered in
    place)."""
    with owner.transaction():
        owner.execute("ALTER TABLE charge_stamps DISABLE TRIGGER USER")
        owner.execute("ALTER TABLE charges DISABLE TRIGGER USER")
        for table in ("charge_totals", "charges", "charge_stamps"):
            owner.execute(f"DELETE FROM {table}")
        for table in ("charge_stamps", "charges", "charge_totals"):
            owner.execute(f"INSERT INTO {table} SELECT * FROM dump_{table}")
        owner.execute("ALTER TABLE charge_stamps ENABLE TRIGGER USER")
        owner.execute("ALTER TABLE charges ENABLE TRIGGER USER")
