"""The audit log and owner state survive restarts; ``veil worker`` command-line behaviour."""

import sqlite3

import pytest
import torch

from veil.exceptions import PermissionDeniedError
from veil.workers.persistence import OwnerDB
from veil.workers.websocket_cli import parse_dataset, read_csv

from network_helpers import BOSTON, HOSPITAL, TOKEN, base_args


def test_owner_db_kv_ledger_and_audit_survive_reopen(tmp_path):
    db = OwnerDB.in_dir(tmp_path)
    db.kv_put("dp.budget", "hospital", b"\x01\x02")
    db.ledger_append("dp.epsilon", "hospital", 0.5, "query 1")
    db.ledger_append("dp.epsilon", "hospital", 0.25, "query 2")
    db.audit("alice", "get", "hospital", "session-1", [1, 2], "allowed")
    db.close()
    db = OwnerDB.in_dir(tmp_path)
    assert db.kv_get("dp.budget", "hospital") == b"\x01\x02" and db.kv_keys("dp.budget") == ["hospital"]
    assert db.ledger_total("dp.epsilon", "hospital") == 0.75
    (row,) = db.audit_entries()
    assert row["action"] == "get" and row["object_ids"] == [1, 2]
    db.kv_delete("dp.budget", "hospital")
    assert db.kv_get("dp.budget", "hospital") is None
    db.close()


def _audit(data_dir):
    db = OwnerDB.in_dir(data_dir)
    try:
        return db.audit_entries()
    finally:
        db.close()


def test_gets_and_refusals_are_audited_and_survive_restart(spawn, connect, tmp_path):
    args = base_args(["--data-dir", str(tmp_path), "--dataset", f"boston={BOSTON}:target=MEDV",
                      "--allow", "hospital=#target"])
    wp = spawn("alice", args)
    alice = connect(wp, token=TOKEN, extra_tokens=[HOSPITAL])
    data, target = alice.search(["#boston"])
    with pytest.raises(PermissionDeniedError):
        data.get()
    target.get(user="hospital")
    torch.tensor([1.0]).send(alice).get()
    with pytest.raises(PermissionDeniedError):
        connect(wp, token="wrong-token-123")
    alice.close()
    assert wp.stop() == 0
    rows = _audit(tmp_path)
    kinds = [(r["action"], r["outcome"], r["principal"]) for r in rows]
    assert ("get", "refused", "scientist") in kinds
    assert ("get", "allowed", "hospital") in kinds
    assert ("get", "allowed", "scientist") in kinds
    assert ("connect", "refused", "?") in kinds
    assert all("wrong-token" not in r["detail"] and TOKEN not in r["detail"] for r in rows)  # never log tokens
    wp2 = spawn("alice", args)  # restart: datasets reloaded from their sources, the log kept
    alice = connect(wp2)
    assert len(alice.search(["#boston"])) == 2
    with pytest.raises(PermissionDeniedError):
        alice.search(["#boston", "#data"])[0].get()
    assert len(_audit(tmp_path)) == len(rows) + 1


def test_generated_token_is_printed_once(spawn):
    wp = spawn("alice", [])
    lines = [line for line in wp.output if "access token" in line]
    assert len(lines) == 1 and len(lines[0].rsplit(" ", 1)[1]) >= 32


def test_dataset_spec_and_csv(tmp_path):
    assert parse_dataset("boston=/x/b.csv:target=MEDV")[::2] == ("boston", "MEDV")
    assert parse_dataset("d=rel.csv")[2] is None
    x, y, cols = read_csv(__import__("pathlib").Path(BOSTON), "MEDV")
    assert x.shape == (506, 13) and y.shape == (506, 1) and "MEDV" not in cols
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,x\n")
    with pytest.raises(SystemExit, match="non-numeric"):
        read_csv(bad, None)
    with pytest.raises(SystemExit, match="no column 'z'"):
        read_csv(__import__("pathlib").Path(BOSTON), "z")


def test_cli_registers_worker_and_keeps_demo():
    from veil.cli import COMMANDS

    assert "worker" in COMMANDS and "demo" in COMMANDS
