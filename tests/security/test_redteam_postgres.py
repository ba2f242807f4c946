"""Red team: the owner state on PostgreSQL (replicas sharing one database, ``veil db migrate``).

What differs from the SQLite path (tests/security/test_redteam_faults_replay.py covers that one): PostgreSQL's
SQL dialect (reserved words, NUL-free text), several worker processes on one database, the server going away
and coming back, connection URLs that carry a password, and ``veil db migrate`` reading a state directory whose
text columns a scientist filled in.

Every test asserts the safe behaviour; six of them were holes found by this review, fixed since (the budgets
page's unquoted ``user``, ``?password=`` printed, ``veil db migrate`` on a ``#`` path and on a NUL byte, the
outage error naming the database, a frozen database holding a release forever).
"""

from __future__ import annotations


import psycopg
import pytest
import torch

import veil as sy
from veil.dp import BudgetLedger
from veil.dp.worker_owner import LEDGER_FILENAME, enable_dp
from veil.exceptions import PermissionDeniedError
from veil.workers.database import Database, redact
from veil.workers.persistence import OwnerDB

from tests.scale.conftest import pg_url, postgres_server  # noqa: F401  (fixtures: a real PostgreSQL)


# ------------------------------------------------------------------ dialect: what a scientist's text becomes


HOSTILE = ["'); DROP TABLE audit; --", "x' OR '1'='1", "?", "%s", "%(x)s", "100%", "\\", "$$; SELECT 1; $$",
           '"user"', "é☃\U0001f600"]


def test_scientist_text_with_sql_metacharacters_round_trips_verbatim_on_postgres(pg_url):
    """Attack: quotes, ``?`` and ``%s`` placeholders, ``%`` and dollar quotes in every text a scientist controls
    (audit detail and session, kv key, ledger note, DP charge reason, replay request id) against the adapter
    that rewrites ``?`` to ``%s`` and doubles ``%``. Must hold: every value is a parameter, stored and read back
    byte for byte; no statement is altered (the tables are intact and hold exactly the rows written)."""
    db = OwnerDB(pg_url)
    try:
        for i, text in enumerate(HOSTILE):
            db.audit("alice-1", "get", "ana", text, [i], "refused", text)
            db.kv_put("ns", text, text.encode())
            db.ledger_append("dp", "ana", 0.125, text)
        details = [(a["session"], a["detail"]) for a in db.audit_entries()]
        assert details == [(t, t) for t in HOSTILE]
        assert sorted(db.kv_keys("ns")) == sorted(HOSTILE)
        assert all(db.kv_get("ns", t) == t.encode() for t in HOSTILE)
        assert db.ledger_total("dp", "ana") == 0.125 * len(HOSTILE)
    finally:
        db.close()
    with BudgetLedger(pg_url) as ledger:
        ledger.set_budget("ana", 10.0, 0.0)
        for i, text in enumerate(HOSTILE):
            ledger.charge("ana", 0.5, 0.0, text, request_id=f"{text}-{i:08d}")
        assert [h[2] for h in ledger.history("ana")] == HOSTILE
        assert ledger.remaining("ana")[0] == pytest.approx(10.0 - 0.5 * len(HOSTILE))


def test_console_budgets_page_names_the_scientists_and_their_spending_on_postgres(hook, pg_url):
    """Attack: none needed: a scientist spends budget on a replica whose ledger is on PostgreSQL; the owner reads
    the console's budgets page to decide whether to stop them. Must hold: the page lists each scientist by name
    with what they spent (as on SQLite), not PostgreSQL's ``user`` keyword (the database role) with nothing
    spent: the owner must see the budget going."""
    from veil.governance.console import views

    w = sy.VirtualWorker(hook, id="pg-console-budgets")
    settings = enable_dp(w, budgets={"ana": (1.0, 1e-5), "ben": (2.0, 1e-5)}, ledger_path=pg_url)
    try:
        settings.ledger.charge("ana", 0.75, 0.0, "DP count")
        rows = {r["user"]: r for r in views.budgets(w)}
        assert set(rows) == {"ana", "ben"}
        assert rows["ana"]["spent_epsilon"] == pytest.approx(0.75)
        assert rows["ana"]["left_epsilon"] == pytest.approx(0.25)
    finally:
        settings.ledger.close()


# ------------------------------------------------------------------ secrets in connection URLs


def test_a_password_given_as_a_url_parameter_is_never_printed():
    """Attack: the owner passes the password the other way libpq URLs allow (``?password=...``, documented by
    PostgreSQL) and a local user reads the worker's log, the ``veil db migrate`` output or an error line. Must
    hold: ``redact`` (what every printed location goes through) hides the password in every URL form libpq
    accepts, as it does for ``user:password@host``, and so does the error line of an unreachable database."""
    assert "s3cret" not in redact("postgresql://alice:s3cret@db.internal/alice_state")  # the form it handles
    for url in ("postgresql://alice@db.internal/alice_state?password=s3cret",
                "postgresql://db.internal/alice_state?user=alice&password=s3cret&sslmode=require",
                "postgres://alice@db.internal:5432/alice_state?sslmode=require&password=s3cret"):
        assert "s3cret" not in redact(url), redact(url)
    # the error line of an unreachable database (a worker's or `veil db migrate`'s start) goes through it too
    with pytest.raises(ConnectionError) as info:
        Database("postgresql://veil@127.0.0.1:1/nowhere?password=s3cret&connect_timeout=2", timeout=2)
    assert "cannot connect" in str(info.value) and "s3cret" not in str(info.value), str(info.value)


# ------------------------------------------------------------------ veil db migrate: a state a scientist wrote into


def _sqlite_state_with_scientist_text(hook, folder, text: str) -> None:
    """What a SQLite worker stores for a scientist: the release request they filed with their own reason
    (``sy.request(ptr, reason=...)``), its audit row, and a DP charge. A reason holding NUL is refused today
    (one line to the scientist): the state of an older worker, which took it and SQLite kept, is written
    here by giving the stored request that reason."""
    from veil.governance.client import request

    w = sy.VirtualWorker(hook, id="alice-sqlite-state")
    w.db = OwnerDB.in_dir(folder)
    w.load(torch.ones(4, 3), tags=("#a",), policy="review")
    (data,) = w.search(["#a"])
    if "\x00" in text:
        with pytest.raises(PermissionDeniedError, match="NUL"):
            request(data.mean(dim=0), reason=text)
        assert request(data.mean(dim=0), reason="older worker")["state"] == "pending"
        w.db._db.execute("UPDATE release_requests SET reason = ?", (text,))  # what an older worker stored
    else:
        assert request(data.mean(dim=0), reason=text)["state"] == "pending"
    w.db.close()
    with BudgetLedger(folder / LEDGER_FILENAME) as ledger:
        ledger.set_budget("ana", 1.0, 1e-5)
        ledger.charge("ana", 0.25, 0.0, "DP count")


def test_migrate_of_a_state_holding_a_scientists_nul_byte_is_not_a_traceback(hook, pg_url, tmp_path):
    """Attack: on the owner's SQLite worker, a scientist files a release request whose reason holds a NUL byte
    (SQLite stores it; the reason is theirs to type). Later the owner runs ``veil db migrate`` to move to
    PostgreSQL, whose text cannot hold NUL. Must hold: the worker refuses such a reason in one line (the
    helper checks it); a state an older worker stored with one does not make the command die with a
    traceback: it either migrates (every row, the charge included, the NUL as U+FFFD) or refuses in one
    ``veil db migrate:`` / ``error:`` line, leaving the target empty."""
    from veil.cli import main

    _sqlite_state_with_scientist_text(hook, tmp_path, "please\x00release")
    try:
        rc = main(["db", "migrate", "--from", str(tmp_path), "--to", pg_url])
    except SystemExit as e:  # the command's own one-line refusal
        rc = e.code
    if rc == 0:
        with BudgetLedger(pg_url) as ledger:
            assert ledger.spent("ana")[0] == pytest.approx(0.25)
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT reason FROM release_requests").fetchall() == [("please\ufffdrelease",)]
    else:
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == 0


def test_migrate_from_a_data_dir_whose_name_holds_a_hash_copies_the_ledger_or_refuses(pg_url, tmp_path):
    """Attack (data loss): the owner's ``--data-dir`` is named ``alice#2`` (or holds ``?``, legal in a path).
    ``veil db migrate --from`` that directory must copy its privacy ledger, or refuse. Must hold: never a
    "migrated" success with the charges left behind (the workers restarted on ``--db`` would hand every
    scientist their full budget again), and nothing created outside the source directory. (The path is given
    to SQLite percent-encoded: the ledger is copied.)"""
    from veil.cli import main

    folder = tmp_path / "alice#2"
    folder.mkdir()
    db = OwnerDB.in_dir(folder)
    db.audit("alice", "get", "ana", "s1", [7], "allowed")
    db.close()
    with BudgetLedger(folder / LEDGER_FILENAME) as ledger:
        ledger.set_budget("ana", 1.0, 1e-5)
        ledger.charge("ana", 0.75, 0.0, "DP count")
    try:
        rc = main(["db", "migrate", "--from", str(folder), "--to", pg_url])
    except SystemExit as e:
        rc = e.code
    assert rc == 0
    with BudgetLedger(pg_url) as ledger:
        ledger.set_budget("ana", 1.0, 1e-5)  # what a worker started with --budget ana=1.0,1e-5 does
        assert ledger.spent("ana")[0] == pytest.approx(0.75)
        assert ledger.remaining("ana")[0] == pytest.approx(0.25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice#2"]  # no stray database next to it


def test_migrate_refuses_a_state_file_without_its_tables_instead_of_copying_zero_rows(pg_url, tmp_path, capsys):
    """Attack (data loss): ``veil db migrate --from`` a directory whose ``veil-dp-budget.sqlite3`` is not a
    ledger (an empty SQLite file: a wrong path, a file re-created by a tool). Must hold: the command refuses in
    one ``veil db: error:`` line naming the missing tables, and the target stays empty, instead of reporting
    "migrated ... budgets 0, charges 0" (workers restarted on it would give every scientist a fresh budget)."""
    import sqlite3

    from veil.cli import main

    sqlite3.connect(tmp_path / LEDGER_FILENAME).close()
    with pytest.raises(SystemExit) as info:
        main(["db", "migrate", "--from", str(tmp_path), "--to", pg_url])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("veil db: error:") and "budgets" in err, err
    assert err.count("\n") == 1
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM charges").fetchone()[0] == 0


# ------------------------------------------------------------------ the training accountant a scientist feeds


def test_training_steps_of_ever_new_sigma_and_q_are_refused_beyond_the_cap(pg_url):
    """Attack (resources): a scientist sends DP-SGD steps each with a new huge noise multiplier and a tiny sample
    rate (each costs ~0 epsilon), or alternates two of them, so that the accountant history of their training
    grows and every later charge recomputes epsilon over all of it while holding their ledger's locks. Must
    hold: beyond ``MAX_TRAINING_EVENTS`` distinct (sigma, q) pairs a new pair is refused in one line before
    anything is recorded (no charge, no request id used up); a pair already used is still accepted; and
    alternating pairs keeps the stored history at one run per pair."""
    import json

    import veil.dp.budget
    from veil.dp.errors import PrivacyParameterError

    MAX_TRAINING_EVENTS = getattr(veil.dp.budget, "MAX_TRAINING_EVENTS", 16)  # (the code without a cap: 16)

    with BudgetLedger(pg_url) as ledger:
        ledger.set_budget("ana", 10.0, 1e-3)
        for i in range(MAX_TRAINING_EVENTS):
            ledger.charge_training_step("ana", 1000.0 + i, 1e-4, 1e-5, request_id=f"sgd-{i:04d}")
        with pytest.raises(PrivacyParameterError, match="distinct"):
            ledger.charge_training_step("ana", 5000.0, 1e-4, 1e-5, request_id="sgd-new-pair")
        assert len(ledger.history("ana")) == MAX_TRAINING_EVENTS
        for j in range(6):  # alternating two pairs already used
            ledger.charge_training_step("ana", 1000.0 + j % 2, 1e-4, 1e-5, request_id=f"sgd-alt-{j:04d}")
        assert len(ledger.history("ana")) == MAX_TRAINING_EVENTS + 6
        ledger.charge_training_step("ana", 1000.0, 1e-4, 1e-5, request_id="sgd-new-pair")  # id not used up
    with psycopg.connect(pg_url) as conn:
        (state,) = conn.execute("SELECT state FROM training").fetchone()
    history = json.loads(state)["history"]
    assert len(history) == MAX_TRAINING_EVENTS, history
    assert sum(c for _s, _q, c in history) == MAX_TRAINING_EVENTS + 7
