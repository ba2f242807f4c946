"""Red team: the DP ledger under a restore that puts another file at its path (``mv``, a copy renamed over it, a
copy written over it in place, its log deleted) while a worker runs, and older processes' stamp functions
(veil/dp/budget.py, ledger_file.py, ledger_rows.py). The property: a restore or a hand edit never makes a running
worker charge less than the rows at the ledger's path say, and no charge it takes after a restore is lost.

Holes found (fixed; each test failed on the code before, checked in a git worktree):

- a restore by ``mv`` (or ``cp`` to a new file renamed over) left the worker's connection on the old, unlinked
  file: its charges after the restore were checkpointed there and lost at a restart, and a second worker on the
  restored file did not see them (0.375 there, 0.625 in the first worker). A file moved away: charges went on
  into it. A restore while a charge waited for the write lock: that charge went to the old file.
- ``rm veil-dp-budget.sqlite3-wal`` (and ``-shm``) under the worker: it appended charges to the unlinked log
  (another process read 0.375 of 0.625, or failed with a disk I/O error).
- ``cp backup veil-dp-budget.sqlite3`` in place: the worker read its cached pages (0.375 where the rows held 1.0),
  accepted 0.5, and wrote its cached page back over the restored one (the owner's correction lost).
  Fix for the three: the ledger keeps its files' state (database: st_dev, st_ino, mtime, size; -wal and -shm:
  st_dev, st_ino), compares it before each charge and read and again inside each charge's transaction, takes in
  its own checkpoints, and opens the path again on a change (totals kept in memory dropped, tables and triggers
  made as at open; a charge inside its transaction is rolled back and made again). A path without a file refuses
  requests in one line and is never made again empty.
- an older worker process makes its stamp bump (count raised, nonce kept, and not 0 once a newer bump drew it)
  again at its start, on PostgreSQL (``veil_charges_changed``) and SQLite (its triggers): a total kept in memory
  came back after a restore and such a bump to the same count over other rows (0.25 read where the rows held
  0.625, 0.75 accepted on 1.0). A trigger on ``charge_stamps`` itself, a name older versions never make, draws a
  nonce for any bump that kept it.

Held (guarded): the worker's own checkpoints reopen nothing; another process's checkpoint is read.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from fractions import Fraction

import pytest

from veil.dp import BudgetLedger, ledger_file
from veil.dp.errors import BudgetExceededError
from veil.workers.database import OwnerStateUnavailableError

from ledger_files import checkpoint, ledger_with_backup, online_backup, restore_dumped_tables, spent_in_another_process
from tests.scale import conftest as _postgres

pg_url, postgres_server = _postgres.pg_url, _postgres.postgres_server  # (fixtures: a real PostgreSQL)


def _rows_sum(path, user: str) -> Fraction:
    """The exact sum of the user's rows in the file at ``path`` (its own connection: what is on disk there)."""
    conn = sqlite3.connect(path)
    try:
        return sum((Fraction(float(r[0])) for r in conn.execute(
            'SELECT epsilon FROM charges WHERE "user" = ?', (user,))), Fraction(0))
    finally:
        conn.close()


@pytest.fixture
def restored(tmp_path):
    """A served ledger (mallory: 0.375 of 1.0 spent), last night's backup of it, and the worker's log checkpointed
    (a quiet worker's: the ``-wal`` holds nothing of the file it is about to lose)."""
    yield from ledger_with_backup(tmp_path)


def test_charges_after_a_restore_by_mv_reach_the_restored_file(restored):
    """The HOLE: after ``mv backup veil-dp-budget.sqlite3`` the worker charged 0.25 into the old, unlinked file.
    A second worker on the path, and the worker itself once restarted, read 0.375: the charge was lost."""
    ledger, path, backup = restored
    os.replace(backup, path)  # (the restore)
    ledger.charge("mallory", 0.25, 0.0, "DP query after the restore")
    checkpoint(ledger)
    with BudgetLedger(path) as second:
        assert second.spent("mallory")[0] == ledger.spent("mallory")[0] == 0.625
    assert _rows_sum(path, "mallory") == Fraction(5, 8)
    ledger.close()
    with BudgetLedger(path) as restarted:
        assert restarted.spent("mallory")[0] == 0.625
        with pytest.raises(BudgetExceededError):
            restarted.charge("mallory", 0.5, 0.0, "DP query")


def test_a_copy_renamed_over_the_path_is_followed_and_totals_in_memory_are_dropped(restored):
    """The same through ``cp backup x.new && mv x.new path``, where the restored copy's own running total is
    cleared (derived: the owner may) and the worker kept one in memory: the restored rows are read, not the
    total the worker summed over the old file's."""
    ledger, path, backup = restored
    ledger._db.execute("DELETE FROM charge_totals")
    assert ledger.spent("mallory")[0] == pytest.approx(0.375)  # (kept in memory)
    fresh = str(path) + ".new"
    conn = sqlite3.connect(backup)
    conn.execute("UPDATE charges SET epsilon = 0.5 WHERE id = 1")  # (the backup's rows differ: 0.75 spent)
    conn.execute("DELETE FROM charge_totals")
    conn.commit()
    conn.close()
    os.replace(backup, fresh)
    os.replace(fresh, path)
    assert ledger.spent("mallory")[0] == pytest.approx(0.75) and ledger.spent("mallory")[0] >= 0.75
    with pytest.raises(BudgetExceededError):
        ledger.charge("mallory", 0.5, 0.0, "DP query")
    assert ledger.history("mallory")[0][0] == 0.5


def test_a_ledger_moved_away_refuses_charges_in_one_line_and_makes_no_empty_file(restored):
    """Held: the file moved away (or deleted) under the worker: a charge is refused in one line naming no path,
    nothing is made at the path (an empty ledger would read every user as unspent), and charges resume, on the
    file put back, once it is there."""
    ledger, path, backup = restored
    aside = path.parent / "aside.sqlite3"
    os.replace(path, aside)
    with pytest.raises(OwnerStateUnavailableError) as refused:
        ledger.charge("mallory", 0.25, 0.0, "DP query")
    text = str(refused.value)
    assert "\n" not in text and str(path.parent) not in text and "moved or deleted" in text
    assert not path.exists()
    with pytest.raises(OwnerStateUnavailableError):
        ledger.spent("mallory")
    os.replace(backup, path)
    ledger.charge("mallory", 0.25, 0.0, "DP query")
    assert _rows_sum(path, "mallory") == Fraction(5, 8)
    assert _rows_sum(aside, "mallory") == Fraction(3, 8)


def test_a_damaged_file_put_in_place_refuses_in_one_line_until_a_ledger_is_back(restored):
    """Held: a file that is no database moved to the path: requests are refused in one line naming no path (the
    worker keeps serving), and the ledger put back is opened at the next request."""
    ledger, path, backup = restored
    damaged = path.parent / "damaged.sqlite3"
    damaged.write_bytes(b"not a database, " * 512)
    os.replace(damaged, path)
    for _ in range(2):
        with pytest.raises(OwnerStateUnavailableError) as refused:
            ledger.charge("mallory", 0.25, 0.0, "DP query")
        assert "\n" not in str(refused.value) and str(path.parent) not in str(refused.value)
    os.replace(backup, path)
    ledger.charge("mallory", 0.25, 0.0, "DP query")
    assert spent_in_another_process(path, "mallory") == Fraction(5, 8)


def test_a_restore_while_a_charge_waits_for_the_lock_lands_the_charge_in_the_restored_file(restored, monkeypatch):
    """The HOLE (as above, in the window): the owner's shell holds the write lock; a charge waits for it (past
    the check before the lock); the restore lands meanwhile. That charge is rolled back on the old file and made
    on the restored one."""
    ledger, path, backup = restored
    shell = sqlite3.connect(path, isolation_level=None)
    shell.execute("BEGIN IMMEDIATE")
    outcome: list = []
    checked = threading.Event()
    follow = ledger._follow

    def follow_then_tell() -> None:
        follow()
        checked.set()

    monkeypatch.setattr(ledger, "_follow", follow_then_tell)

    def charge() -> None:
        try:
            outcome.append(ledger.charge("mallory", 0.25, 0.0, "DP query"))
        except Exception as e:  # noqa: BLE001 - the outcome is asserted below
            outcome.append(e)

    waiting = threading.Thread(target=charge)
    waiting.start()
    assert checked.wait(10)
    time.sleep(0.2)  # (into BEGIN IMMEDIATE's wait; the check inside the transaction comes after it either way)
    os.replace(backup, path)
    shell.execute("COMMIT")
    shell.close()
    waiting.join(10)
    assert len(outcome) == 1 and outcome[0] == pytest.approx((0.375, 1e-5)), outcome
    assert spent_in_another_process(path, "mallory") == Fraction(5, 8)
    ledger.charge("mallory", 0.25, 0.0, "DP query")
    assert spent_in_another_process(path, "mallory") == Fraction(7, 8)


def test_a_charge_whose_files_change_at_every_try_is_refused_in_one_line_with_nothing_recorded(restored, monkeypatch):
    """Held: files changing under each of a charge's tries (restores in a row) never loop: it is refused in one line,
    nothing recorded, and the next charge is made."""
    ledger, path, _backup_file = restored
    tries = []

    def always_changed() -> None:
        tries.append(1)
        raise ledger_file.FileChanged()

    monkeypatch.setattr(ledger._file, "refuse_if_changed", always_changed)
    with pytest.raises(OwnerStateUnavailableError) as refused:
        ledger.charge("mallory", 0.25, 0.0, "DP query", request_id="r-1")
    assert len(tries) == ledger_file.CHARGE_TRIES and "\n" not in str(refused.value)
    monkeypatch.undo()
    assert spent_in_another_process(path, "mallory") == Fraction(3, 8)
    ledger.charge("mallory", 0.25, 0.0, "DP query", request_id="r-1")
    assert spent_in_another_process(path, "mallory") == Fraction(5, 8)


def test_a_restored_file_without_triggers_gets_them_at_the_reopen(restored):
    """Held: the restored file's stamp triggers were dropped (a copy made by hand, an older tool): the reopen makes
    them as an open does, so the owner's raise of a row afterwards counts at once (unstamped, the restored file's
    own total was trusted: 0.375 read where the rows held 0.75)."""
    ledger, path, backup = restored
    conn = sqlite3.connect(backup)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.commit()
    conn.close()
    os.replace(backup, path)
    assert ledger.spent("mallory")[0] == 0.375
    shell = sqlite3.connect(path, isolation_level=None)
    shell.execute("UPDATE charges SET epsilon = 0.5 WHERE id = 1")
    shell.close()
    assert ledger.spent("mallory")[0] == pytest.approx(0.75) and ledger.spent("mallory")[0] >= 0.75


@pytest.mark.parametrize("removed", [("-wal", "-shm"), ("-wal",), ("-shm",)])
def test_a_log_deleted_under_the_worker_is_followed(restored, removed):
    """The HOLE: the owner's script deleted the log beside the file (``rm veil-dp-budget.sqlite3-wal -shm``, as
    an offline restore does) under the running worker: it appended its next charge to the unlinked log, where no
    other process saw it (another worker read 0.375 where the first charged up to 0.625) and a kill lost it."""
    ledger, path, _backup_file = restored
    for suffix in removed:
        os.unlink(str(path) + suffix)
    ledger.charge("mallory", 0.25, 0.0, "DP query after the log was deleted")
    assert spent_in_another_process(path, "mallory") == Fraction(5, 8)
    assert ledger.spent("mallory")[0] == 0.625


def test_a_copy_written_over_the_file_in_place_is_read(restored):
    """The HOLE: ``cp backup veil-dp-budget.sqlite3`` (the same inode) of a copy where the owner raised mallory's
    first charge to 0.75 (1.0 spent): the worker read its cached pages (0.375), accepted 0.5 more, and its write
    put the cached page back over the restored one (0.875 on disk: the owner's correction lost)."""
    ledger, path, backup = restored
    conn = sqlite3.connect(backup)
    conn.execute("UPDATE charges SET epsilon = 0.75 WHERE id = 1")
    conn.commit()
    conn.close()
    time.sleep(0.05)  # (a later modification time than the worker's own last write, on a coarse clock)
    subprocess.run(["cp", str(backup), str(path)], check=True)  # (another process: its close keeps our locks)
    assert ledger.spent("mallory")[0] >= 1.0
    with pytest.raises(BudgetExceededError):
        ledger.charge("mallory", 0.5, 0.0, "DP query")
    assert spent_in_another_process(path, "mallory") == 1


def test_many_charges_and_their_checkpoints_reopen_nothing_and_other_processes_checkpoints_are_read(restored):
    """Held: the worker's own checkpoints (one every ~1000 log pages) are taken in, not read as a change; one by
    another process opens the file again, and its rows are read."""
    ledger, path, _backup_file = restored
    opened, written = ledger._db, os.stat(path).st_mtime_ns
    for _ in range(250):  # (~200 charges fill the log to its checkpoint)
        ledger.charge("mallory", 2.0 ** -20, 0.0, "DP query")
    assert ledger._db is opened and os.stat(path).st_mtime_ns != written
    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('UPDATE charges SET epsilon = 0.25 WHERE id = 1'); c.execute('PRAGMA wal_checkpoint')")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    assert ledger.spent("mallory")[0] >= 0.5 + 250 * 2.0 ** -20
    assert ledger._db is not opened


def test_the_check_is_three_stat_calls_and_sees_a_renamed_file(restored, monkeypatch):
    """The check before each charge and read is three stat calls (the file, its -wal and -shm: microseconds;
    counted, not timed), and it does see a renamed file."""
    ledger, path, backup = restored
    followed = ledger._file
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(ledger_file.os, "stat", lambda p, *a, **k: calls.append(p) or real_stat(p, *a, **k))
    assert not followed.changed() and 1 <= len(calls) <= 3, calls
    monkeypatch.undo()
    os.replace(backup, path)
    assert followed.changed()
    assert ledger_file.FollowedFile.of(":memory:").changed() is False


def test_an_older_sqlite_triggers_bump_draws_a_nonce_across_a_restore(tmp_path):
    """The HOLE on SQLite: an older process makes its delete trigger again (its bump raises the count and keeps the
    nonce a newer bump drew). The owner's refund of 0.5 (count 2), a read (0.25 kept in memory), the backup
    restored (``.restore``: count 1), the older process's trigger made again at its restart, a refund of 0.125
    (count 2, the same nonce): the total kept in memory was trusted, 0.75 accepted where the rows held 0.625."""
    path, backup = tmp_path / "veil-dp-budget.sqlite3", tmp_path / "backup.sqlite3"
    older = ('DROP TRIGGER charges_deleted; CREATE TRIGGER charges_deleted AFTER DELETE ON charges BEGIN '
             'UPDATE charge_stamps SET edits = edits + 1 WHERE "user" = OLD."user"; END;')
    with BudgetLedger(path) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        for epsilon in (0.5, 0.125, 0.125):
            ledger.charge("mallory", epsilon, 0.0, "DP query")
        shell = sqlite3.connect(path, isolation_level=None)
        try:
            shell.execute("UPDATE charges SET epsilon = epsilon WHERE id = 3")  # (a newer bump: a nonce drawn)
            online_backup(path, backup)
            shell.executescript(older)
            shell.execute("DELETE FROM charges WHERE id = 1")
            assert ledger.spent("mallory")[0] == pytest.approx(0.25)  # (kept in memory)
            online_backup(backup, path)
            shell.executescript(older)
            shell.execute("DELETE FROM charges WHERE id = 2")
        finally:
            shell.close()
        assert ledger.spent("mallory")[0] == pytest.approx(0.625)
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.75, 0.0, "DP query")


_OLDER_BUMP = ('INSERT INTO charge_stamps("user", edits) VALUES ({row}."user", 1) '
               'ON CONFLICT("user") DO UPDATE SET edits = charge_stamps.edits + 1;')

#: veil_charges_changed as a worker of the version before the nonce makes it at its start (its stamp bump).
_OLDER_FUNCTION = f"""
CREATE OR REPLACE FUNCTION veil_charges_changed() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('veil.folding', true) = 'fold:' || OLD."user" THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        PERFORM 1 FROM budgets WHERE "user" = NEW."user" FOR UPDATE;
        IF EXISTS (SELECT 1 FROM charges WHERE "user" = NEW."user" AND id > NEW.id) THEN
            {_OLDER_BUMP.format(row="NEW")}
        END IF;
        RETURN NULL;
    END IF;
    PERFORM 1 FROM budgets WHERE "user" = OLD."user" FOR UPDATE;
    {_OLDER_BUMP.format(row="OLD")}
    IF TG_OP = 'UPDATE' THEN
        PERFORM 1 FROM budgets WHERE "user" = NEW."user" FOR UPDATE;
        {_OLDER_BUMP.format(row="NEW")}
    END IF;
    RETURN NULL;
END
$body$;
"""


@pytest.mark.slow
def test_postgres_an_older_processs_bumps_draw_a_nonce_across_a_restore(pg_url):
    """The HOLE: a newer bump drew mallory's nonce (the owner's no-op update of a row); the dump; an older worker
    started (its function bumps the count, keeping that nonce); the owner's refund of 0.5 (count 2) and a budget
    read (0.25 kept in memory at count 2); the dump restored (count 1) and a refund of 0.125 (count 2 again, the
    same nonce): the total kept in memory was trusted, 0.75 accepted where the rows held 0.625 of 1.0."""
    import psycopg

    with BudgetLedger(pg_url) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        for epsilon in (0.5, 0.125, 0.125):
            ledger.charge("mallory", epsilon, 0.0, "DP query")
        with psycopg.connect(pg_url, autocommit=True) as owner:
            owner.execute("UPDATE charges SET epsilon = epsilon WHERE id = 3")  # (a newer bump: a nonce drawn)
            for table in ("charge_stamps", "charges", "charge_totals"):  # (the dump)
                owner.execute(f"CREATE TABLE dump_{table} AS SELECT * FROM {table}")
            owner.execute(_OLDER_FUNCTION)  # (an older worker process starts)
            owner.execute("DELETE FROM charges WHERE id = 1")
            assert ledger.spent("mallory")[0] == pytest.approx(0.25)  # (kept in memory)
            restore_dumped_tables(owner)  # (the restore, as pg_restore --clean)
            owner.execute("DELETE FROM charges WHERE id = 2")
        assert ledger.spent("mallory")[0] == pytest.approx(0.625)
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.75, 0.0, "DP query")
