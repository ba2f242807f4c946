"""Second pass on review before release across the owner's processes: attacks on 0cc2061 (give_backs.py, the
stored revocation mark, ``serialized_write``, the twin check, the migration of voided approvals) and on how it
composes with f827eda (release marks and give-backs outside the worker's turn). Not repeated:
test_redteam_review_crossproc.py and the other test_redteam_review_* / revocation / governance files.

Holes found:

- the refused move's audit row said "the approval stays used (given back once already)" whatever the reason: a
  revocation, a twin's release or a later denial read to the owner as a second refusal;
- an approval the owner's later denial of the same value voided, left ``approved`` (an older version, a lapse
  that failed, or past the migration's 1,000 per opening), released the value when it was the newest request of
  its id: the decision used it without the denial check ``approved_for`` makes;
- the twin check compared a twin's filing time with the approval's decision time, each from the clock of the
  host that wrote it: a replica whose clock runs behind filed a twin that looked older than the approval, and the
  refused move gave the approval back after the twin had released the value (PostgreSQL: the times now come
  from the server's clock, ``persistence.db_clock``);
- a give-back whose transaction failed (the database) raised out of the refused move: the destination's refusal
  was lost to the scientist and the send had no "refused" audit row; the other approvals of the move were left
  unchecked;
- ``serialized_write`` nested in another write transaction on PostgreSQL: ``BEGIN`` there only warns, and its
  ``COMMIT`` committed the outer transaction's first half (its rollback then undid nothing);
- a revocation stored by another process before the move read the record, its lapse run after the move took
  the approval: the record had not changed, so the approval came back (the give-back now also refuses a record
  that says revoked);
- a release's lapse of the user's other open requests for the value read the 50 newest requests of those bytes:
  50 newer ones by other computations, which the scientist files at will, hid a twin, left pending for the owner
  to approve the same value again (it reads ids first, up to the pending cap and more, then one graph at a time);
- a batch (move) holding one such voided approval used up the others before its use refused it: they were lost
  without any release (the decision now reads the newest approved request through ``approved_for`` too).

Each hole's test failed on the code before the fix (a git archive of HEAD with this file copied in, 0cc2061's
tree; the last three before their own fixes); the SQLite nesting test is a guard (SQLite refused it already).

Checked, held: the revocation record's nonce comes from ``secrets`` (no scientist input reaches it); the give-
back's transaction takes one advisory key per transaction and none is taken inside another, so a crc32
collision of two users' keys only serializes them; a use's transaction holds the file well under a second per
approval used (~3 ms per 512 KiB graph of the same bytes read, up to the pending cap's 100 and the approvals),
and each use needs an owner's approval.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import SECRET, release_rows as _release_rows  # noqa: E402
from server_sessions import open_session, request  # noqa: E402
from test_redteam_review_crossproc import (  # noqa: E402
    SCI, _approved, _get, _owner_process, _pending, _refused_move, _times_three, owner,
)

from tests.scale import conftest as _scale  # noqa: E402

pg_url, postgres_server = _scale.pg_url, _scale.postgres_server  # (fixtures: a real PostgreSQL)
owner = owner  # (the fixture: two processes of the owner on one database file)


def _refused_detail(srv, rid):
    (row,) = _release_rows(srv, rid, "refused")
    return row["detail"]


# ------------------------------------------------------------------ what the owner's audit row says


def test_the_refused_rows_audit_says_why_the_approval_stays_used(owner):
    """Audit: a move is refused after a revocation (through the second process) voided its approval, another
    after a twin released the value meanwhile. Each row said "(given back once already)", which neither was.
    Must hold: each says what voided it (revoked; the twin's id), and only a second give-back says "once"."""
    from test_redteam_review_crossproc import _twin_used_during_a_move

    (srv, did, queue), (other, _, _) = owner
    sci, oid, rid = _approved(srv, did, queue)
    _refused_move(srv, sci, oid, lambda: (other.revoke("sci"), other.readmit("sci")))
    detail = _refused_detail(srv, rid)
    assert "stays used" in detail and "revoked" in detail and "once already" not in detail, detail

    (srv, did, queue), sci, oid, rid, _ = _twin_used_during_a_move(owner, 1)
    twin = queue.get(rid).message.split("released under request ")[1].rstrip(")")
    detail = _refused_detail(srv, rid)
    assert "stays used" in detail and twin in detail and "once already" not in detail, detail

    sci, oid, rid = _approved(srv, did, queue)
    _refused_move(srv, sci, oid)
    _refused_move(srv, sci, oid)
    first, second = (r["detail"] for r in _release_rows(srv, rid, "refused"))
    assert "stands again" in first and "once already" in second, (first, second)


# ------------------------------------------------------------------ approvals a later denial voided


def _voided_by_a_later_denial(path, rid, denial_id):
    """What an older version left (or a lapse that failed): a denial of the value of ``rid`` filed before it and
    decided after it, ``rid`` still approved and the newest request of its id."""
    with sqlite3.connect(path) as db:
        columns = [c[1] for c in db.execute("PRAGMA table_info(release_requests)")]
        row = dict(zip(columns, db.execute("SELECT * FROM release_requests WHERE id = ?", (rid,)).fetchone()))
        row.update(id=denial_id, state="denied", message="not this", ts=row["ts"] - 100,
                   decided_ts=row["decided_ts"] + 1)
        db.execute(f"INSERT INTO release_requests ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                   tuple(row.values()))
    db.close()


def test_an_approval_past_the_migrations_batch_releases_nothing_the_owner_denied(hook, tmp_path, monkeypatch):
    """Migration bound: the database holds more voided approvals than one opening lapses (1,000; here 1). The
    one left ``approved`` is the newest request of its id, so a get used it without the denial check: the value
    the owner denied went out. Must hold: neither releases anything (each shows lapsed, naming its denial), a get
    files a new request, and the audit log has no release of either."""
    from veil.governance import lapse_migration
    from veil.workers.persistence import OwnerDB

    path = tmp_path / OwnerDB.FILENAME
    srv, did, queue = _owner_process(hook, path)
    approvals = [_approved(srv, did, queue) for _ in range(2)]
    srv.db.close()
    for i, (_, _, rid) in enumerate(approvals):
        _voided_by_a_later_denial(path, rid, f"req-olddenial{i}")
    monkeypatch.setattr(lapse_migration, "CHECK_AT_MOST", 1)
    monkeypatch.setattr(lapse_migration, "PAGE", 1)
    again, did, queue = _owner_process(hook, path)
    try:
        assert sorted(queue.get(rid).state for _, _, rid in approvals) == ["approved", "lapsed"]
        for _, oid, rid in approvals:
            sci = open_session(again, SCI)
            _times_three(again, sci, did, oid)
            reply = _get(again, sci, oid)
            assert type(reply) is m.ErrorReply, reply
            assert "\n" not in reply.message and not _release_rows(again, rid)
            req = queue.get(rid)
            assert req.state == "lapsed" and "req-olddenial" in req.message, req
            assert _pending(_get(again, sci, oid)) != rid
    finally:
        again.db.close()


# ------------------------------------------------------------------ a replica whose clock runs behind


def _twin_filed_by_a_slow_clock(owner, monkeypatch, behind_s=3600.0):
    """While a move in the first process holds the approval of ``d * 3``, the scientist asks again through the
    second process, whose host clock runs ``behind_s`` behind; the owner approves the twin and a get there uses
    it. Returns (first process's queue, session, object id, request id, the twin get's reply)."""
    requests = sys.modules["veil.governance.requests"]

    (srv, did, queue), (other, odid, oqueue) = owner
    sci, oid, rid = _approved(srv, did, queue)
    got = []
    slow = SimpleNamespace(time=lambda: time.time() - behind_s)

    def twin():
        there = open_session(other, SCI)
        _times_three(other, there, odid, oid)
        with monkeypatch.context() as patch:
            patch.setattr(requests, "time", slow)
            twin_id = _pending(_get(other, there, oid))
        oqueue.approve(twin_id)
        got.append(_get(other, there, oid))

    _refused_move(srv, sci, oid, twin)
    return queue, sci, oid, rid, got[0]


@pytest.mark.slow
def test_a_twin_filed_by_a_slow_clock_on_postgres_is_still_a_twin(hook, pg_url, monkeypatch):
    """Clock skew (replicas on several hosts, one PostgreSQL): the twin's filing time came from the second
    host's clock, an hour behind the host that approved the first request, so it looked filed before that
    approval and the refused move gave the approval back after the twin had released the value: a second get
    released it again. Must hold: the twin's get releases plain torch's value and the first approval lapses
    naming the twin (the times now come from the server's one clock; a SQLite file has one host's)."""
    first, second = _owner_process(hook, pg_url), _owner_process(hook, pg_url)
    try:
        queue, sci, oid, rid, got = _twin_filed_by_a_slow_clock((first, second), monkeypatch)
        assert torch.equal(got.objects[0], SECRET * 3)
        req = queue.get(rid)
        assert req.state == "lapsed" and "released under request" in req.message, req
    finally:
        first[0].db.close()
        second[0].db.close()


# ------------------------------------------------------------------ a give-back the database fails


def test_a_give_back_the_database_fails_keeps_the_refusal_and_its_audit_row(owner, monkeypatch):
    """Fault: the give-back's transaction fails (the database went away for that moment). The error replaced the
    destination's refusal and the send had no "refused" row. Must hold: the scientist gets the destination's
    refusal, the approval stays used (fails closed), and the row says the give-back could not be recorded."""
    from veil.governance import give_backs
    from veil.workers.database import OwnerStateUnavailableError

    (srv, did, queue), _ = owner
    sci, oid, rid = _approved(srv, did, queue)

    def unavailable(*_args):
        raise OwnerStateUnavailableError("the owner's state database is unavailable")

    monkeypatch.setattr(give_backs, "serialized_write", unavailable)
    _refused_move(srv, sci, oid)  # (raises the destination's "already in use")
    monkeypatch.undo()
    assert queue.get(rid).state == "released"
    detail = _refused_detail(srv, rid)
    assert "stays used" in detail and "could not" in detail, detail
    assert _pending(_get(srv, sci, oid)) != rid


# ------------------------------------------------------------------ serialized_write itself


def test_serialized_write_refuses_to_nest_in_another_transaction(tmp_path):
    """Guard (SQLite refused the nested ``BEGIN IMMEDIATE`` itself; PostgreSQL did not, below): a serialized
    write inside another write transaction of the same connection is refused at once, and the outer transaction
    rolls back whole."""
    from veil.workers.persistence import OwnerDB, serialized_write

    db = OwnerDB(str(tmp_path / OwnerDB.FILENAME))
    try:
        with pytest.raises(RuntimeError, match="inside another"):
            with serialized_write(db, "outer") as tx:
                tx.execute("INSERT INTO kv (namespace, key, value, updated) VALUES ('t', 'a', x'00', 0)")
                with serialized_write(db, "inner"):
                    pass
        assert db.kv_get("t", "a") is None
    finally:
        db.close()


@pytest.mark.slow
def test_serialized_write_refuses_to_nest_on_postgres(pg_url):
    """The same on PostgreSQL, where nesting committed the outer transaction's first half."""
    from veil.workers.persistence import OwnerDB, serialized_write

    db = OwnerDB(pg_url)
    try:
        with pytest.raises(RuntimeError, match="inside another"):
            with serialized_write(db, "outer") as tx:
                tx.execute("INSERT INTO kv (namespace, key, value, updated) VALUES ('t', 'a', ?, 0)", (b"1",))
                with serialized_write(db, "inner"):
                    pass
        assert db.kv_get("t", "a") is None
    finally:
        db.close()


def test_an_approval_no_denial_voided_still_releases_once(owner):
    """Guard for the denial check in a release's use: an approval with no denial of its value releases plain
    torch's ``d * 3`` once, the next get is pending a new request."""
    (srv, did, queue), _ = owner
    sci, oid, rid = _approved(srv, did, queue)
    assert torch.equal(_get(srv, sci, oid).objects[0], SECRET * 3)
    assert queue.get(rid).state == "released"
    assert _pending(_get(srv, sci, oid)) != rid


# ------------------------------------------------------------------ a revocation stored before the move began


def test_a_revocation_stored_before_the_move_but_lapsed_during_it_voids_the_approval(owner):
    """Race across processes: the second process has stored the scientist's revocation but not yet lapsed the
    requests (its lapse waits for the user's transaction, or failed and is retried) when a move in the first
    process, not synced yet, reads the record and takes the approval; the lapse then finds it used. The record
    had not changed since the move read it, so the refused move gave the approval back "approved", and the
    first process's session released the value again before its sync. Must hold: it lapses (the stored record
    says revoked), and a get there is pending a new request."""
    from veil.governance import lapses, revocation

    (srv, did, queue), (other, _, _) = owner
    sci, oid, rid = _approved(srv, did, queue)
    revocation._store(other, "sci", True, "owner")
    _refused_move(srv, sci, oid, lambda: lapses.after_revocation(other, "sci"))
    req = queue.get(rid)
    assert req.state == "lapsed" and "revoked" in req.message, req
    assert "revoked" in _refused_detail(srv, rid)
    assert _pending(_get(srv, sci, oid)) != rid


# ------------------------------------------------------------------ a twin hidden behind newer requests


def test_newer_requests_of_the_same_bytes_do_not_hide_a_twin_from_the_lapse(owner):
    """Lapse starvation: a move holds the approval of ``d * 3``; a get racing it files a twin request (same
    value); the move is refused and gives the approval back, the twin still pending. The scientist then files
    60 newer requests for the same bytes under the same id by other computations (``d * 3 + 0``, ``+ 0`` again,
    ...) and uses the approval: the use read only the 50 newest requests of those bytes, so the twin stayed
    pending, for the owner to approve the same value again. Must hold: the use lapses the twin (it names the
    approval used) and releases plain torch's value once."""
    from veil.governance.requests import MAX_PENDING_PER_USER

    (srv, did, queue), _ = owner
    sci, oid, rid = _approved(srv, did, queue)
    twin = []
    _refused_move(srv, sci, oid, lambda: twin.append(_pending(_get(srv, sci, oid))))
    assert queue.get(rid).state == "approved" and queue.get(twin[0]).state == "pending"
    for k in range(1, min(60, MAX_PENDING_PER_USER - 2) + 1):  # (d * 3 + 0 * k: same bytes, other computation)
        assert type(request(srv, sci, m.DeleteMessage([oid]))) is m.OkReply
        tmp = new_id()
        _times_three(srv, sci, did, tmp)
        reply = request(srv, sci, m.CommandMessage("torch.add", (m.ObjectRef(tmp), 0.0), {"alpha": float(k)},
                                                   [oid], False))
        assert type(reply) is m.OkReply, reply
        _pending(_get(srv, sci, oid))
    assert queue.count("pending", "sci") >= 60
    assert type(request(srv, sci, m.DeleteMessage([oid]))) is m.OkReply
    _times_three(srv, sci, did, oid)
    assert torch.equal(_get(srv, sci, oid).objects[0], SECRET * 3)
    assert queue.get(rid).state == "released"
    lapsed = queue.get(twin[0])
    assert lapsed.state == "lapsed" and rid in lapsed.message, lapsed


def test_a_batch_with_a_voided_approval_uses_up_none_of_its_approvals(owner):
    """Batch: a move of two objects, each approved, the second's approval voided by a later denial of its value
    (left approved). The check that voided it ran only as each approval was used, after the first was used up:
    the move failed and the first approval was lost without any release. Must hold: the move is refused pending
    a new request for the second, the first approval still stands (approved, no release on record), and a get
    then releases plain torch's value under it."""
    from veil.exceptions import ReviewPendingError
    from veil.governance.release import releasing

    (srv, did, queue), _ = owner
    sci = open_session(srv, SCI)
    first, second = new_id(), new_id()
    rids = []
    for oid in (first, second):
        _times_three(srv, sci, did, oid)
        rids.append(_pending(_get(srv, sci, oid)))
        queue.approve(rids[-1])
    _voided_by_a_later_denial(Path(srv.db.path), rids[1], "req-olddenial-batch")
    entries = dict(srv.monitor.owner_entries())
    with pytest.raises(ReviewPendingError):
        with releasing(srv, [first, second], [entries[first], entries[second]], "sci", sci.id, "move",
                       lambda error: True):
            pass
    assert queue.get(rids[0]).state == "approved" and not _release_rows(srv, rids[0])
    assert queue.get(rids[1]).state == "lapsed"
    assert torch.equal(_get(srv, sci, first).objects[0], SECRET * 3)
