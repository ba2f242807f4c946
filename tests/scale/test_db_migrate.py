"""`veil db migrate`: a worker's SQLite --data-dir state copied into PostgreSQL, ids and balances intact."""

from __future__ import annotations

import pytest

from veil.cli import main
from veil.dp import BudgetExceededError, BudgetLedger
from veil.dp.worker_owner import LEDGER_FILENAME
from veil.workers.persistence import OwnerDB


def _make_state(folder):
    db = OwnerDB.in_dir(folder)
    db.audit("alice", "get", "scientist", "s1", [7], "allowed")
    db.audit("alice", "get", "hospital", "s2", [8], "refused", "private")
    db.kv_put("ns", "k", b"\x00binary\xff")
    db.ledger_append("dp", "scientist", 0.5, "old")
    db.close()
    with BudgetLedger(folder / LEDGER_FILENAME) as ledger:
        ledger.set_budget("scientist", 1.0, 1e-5)
        ledger.charge("scientist", 0.3, 0.0, "count")
        ledger.charge_training_step("scientist", 2.0, 0.01, 1e-6)
        return ledger.remaining("scientist"), ledger.history("scientist")


def test_migrate_copies_everything_and_charges_continue(pg_url, tmp_path, capsys):
    remaining, history = _make_state(tmp_path)
    assert main(["db", "migrate", "--from", str(tmp_path), "--to", pg_url]) == 0
    assert "audit 2" in capsys.readouterr().out
    db = OwnerDB(pg_url)
    try:
        audit = db.audit_entries()
        assert [(a["seq"], a["principal"], a["outcome"], a["object_ids"]) for a in audit] == \
            [(1, "scientist", "allowed", [7]), (2, "hospital", "refused", [8])]
        assert db.kv_get("ns", "k") == b"\x00binary\xff" and db.ledger_total("dp", "scientist") == 0.5
        db.audit("alice", "get", "scientist", "s3")  # new rows continue after the copied ids
        assert db.audit_entries()[-1]["seq"] == 3
    finally:
        db.close()
    with BudgetLedger(pg_url) as ledger:
        assert ledger.remaining("scientist") == remaining and ledger.history("scientist") == history
        ledger.charge_training_step("scientist", 2.0, 0.01, 1e-6)  # the accountant's state came along
        assert ledger.history("scientist")[-1][1] == 0.0  # delta charged once, with the first step
        with pytest.raises(BudgetExceededError):
            ledger.charge("scientist", 0.9, 0.0, "too much")
    # a second migration would merge two histories: refused, nothing changed
    with pytest.raises(SystemExit, match="already holds rows"):
        main(["db", "migrate", "--from", str(tmp_path), "--to", pg_url])
    with BudgetLedger(pg_url) as ledger:
        assert len(ledger.history("scientist")) == len(history) + 1


def test_migrate_refuses_bad_arguments(tmp_path, pg_url):
    with pytest.raises(SystemExit, match="postgresql:// URL"):
        main(["db", "migrate", "--from", str(tmp_path), "--to", str(tmp_path / "x.sqlite3")])
    with pytest.raises(SystemExit, match="no veil worker state"):
        main(["db", "migrate", "--from", str(tmp_path), "--to", pg_url])
