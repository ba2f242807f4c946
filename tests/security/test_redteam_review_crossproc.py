"""Red team on review before release across the owner's processes (two workers on one owner database, each with
its own governance lock and its own revocation count, as two ``veil worker`` processes are), the state a lapsed
approval shows, databases written by older versions, and destinations that store part of a move. Not repeated:
test_redteam_review_*.py, test_redteam_revocation*.py, test_redteam_governance_*.py.

Holes found:

- revoke + readmit done by another process of the owner while a move held the approval: the move read only its
  own process's revocation count, so the refused move gave the approval back "approved" and it released the
  value recomputed after readmission;
- an approval given back once, then held by a second move through the user's revocation, showed "released"
  although the revocation voided it;
- a twin approval used (by another process or the same) while a move held the first approval: the refused move
  gave the first one back "approved" (the use's lapse had found it used, not open), and it released the same
  value a second time;
- the twin's use read which requests to lapse before its transaction: a give-back in another process between
  that read and its commit restored the first approval, and both releases stood (now the read, the use and the
  give-back's checks run in one transaction per user, serialized across processes);
- approvals an older version left "approved" after the owner denied the same value showed "approved" (refused
  by ``approved_for``, shown wrong): opening the database now lapses them.

Each hole's test failed on the code before the fix (run on a git archive of ff72850); the racing test also fails
with only the twin read moved back out of the use's transaction.

Decided (no hole to fix): a destination's refusal is its word. A peer that stores part of a move and refuses (an
older version without all-or-none stores, or a hostile one) gets the approvals given back once and every send
on record, as a destination that keeps the value and claims a refusal does.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError
from veil.ids import new_id
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, request  # noqa: E402
from review_steps import SECRET, uid as _uid, release_rows as _release_rows  # noqa: E402

from tests.scale import conftest as _scale  # noqa: E402

pg_url, postgres_server = _scale.pg_url, _scale.postgres_server  # (fixtures: a real PostgreSQL)

SCI = "rt-xproc-sci-token"


def _owner_process(hook, path):
    """One worker process of the owner on the database file ``path``, with ``SECRET`` under review: (worker,
    dataset id, queue). Two of them on one file are two processes: their own lock, revocation count, sync."""
    from veil.governance.requests import ReviewQueue
    from veil.workers.persistence import OwnerDB
    from veil.workers.websocket_server import WebsocketServerWorker

    tokens = sy.TokenTable()
    tokens.add(SCI, "sci", "scientist")
    srv = WebsocketServerWorker(hook, id=_uid("xproc"), port=0, tokens=tokens, db=OwnerDB(str(path)))
    return srv, srv.load(SECRET.clone(), tags=("#d",), policy="review"), ReviewQueue(srv)


@pytest.fixture
def owner(hook, tmp_path):
    """(first process, second process): the first holds the scientist's objects, the second shares its database."""
    from veil.workers.persistence import OwnerDB

    path = tmp_path / OwnerDB.FILENAME
    first, second = _owner_process(hook, path), _owner_process(hook, path)
    yield first, second
    for srv, _, _ in (first, second):
        srv.db.close()


def _times_three(srv, sess, did, oid):
    reply = request(srv, sess, m.CommandMessage("torch.mul", (m.ObjectRef(did), 3.0), {}, [oid], False))
    assert type(reply) is m.OkReply, reply


def _get(srv, sess, oid):
    return request(srv, sess, m.GetObjectsMessage([oid], False))


def _pending(reply):
    assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
    return reply.message.split("release request ")[1].split()[0]


def _approved(srv, did, queue):
    """The scientist's ``d * 3`` under a fresh id, approved: (session, object id, request id)."""
    sci, oid = open_session(srv, SCI), new_id()
    _times_three(srv, sci, did, oid)
    rid = _pending(_get(srv, sci, oid))
    queue.approve(rid)
    return sci, oid, rid


def _refused_move(srv, sci, oid, during=lambda: None):
    """A move of ``oid`` that takes its approval, runs ``during()`` while the value is on its way, and is refused
    by the destination ("already in use": it says it stored nothing, so the approval may be given back)."""
    from veil.governance.release import releasing

    entry = dict(srv.monitor.owner_entries())[oid]
    with pytest.raises(PermissionDeniedError, match="already in use"):
        with releasing(srv, [oid], [entry], "sci", sci.id, "move", lambda error: True):
            during()
            raise PermissionDeniedError(f"object id {oid} is already in use on worker 'elsewhere'")


# ------------------------------------------------------------------ revocation in another process


def test_revoke_and_readmit_in_another_process_during_a_move_lapse_its_approval(owner):
    """Race across processes: a move in the first process holds the approval of ``d * 3``; the owner revokes the
    scientist and readmits them through the second process (same database) before the first one syncs; the
    destination refuses. The first process's own revocation count had not moved, so the approval came back
    "approved" and released ``d * 3`` recomputed after readmission. Must hold: it lapses (the access was revoked),
    the audit row says it stays used, and the recomputed value is pending a new request."""
    (srv, did, queue), (other, _, _) = owner
    sci, oid, rid = _approved(srv, did, queue)
    _refused_move(srv, sci, oid, lambda: (other.revoke("sci"), other.readmit("sci")))
    req = queue.get(rid)
    assert req.state == "lapsed" and "revoked" in req.message, req
    (refused,) = _release_rows(srv, rid, "refused")
    assert "stays used" in refused["detail"]
    again = open_session(srv, SCI)
    _times_three(srv, again, did, oid)
    assert _pending(_get(srv, again, oid)) != rid


def test_a_revocation_stored_by_another_process_during_a_move_lapses_its_approval(owner):
    """Race across processes: the second process revokes the scientist while the first one's move holds the
    approval (the first process has not synced: its sessions still run). Must hold: the refused move gives nothing
    back, and once readmitted the recomputed value is pending a new request."""
    (srv, did, queue), (other, _, _) = owner
    sci, oid, rid = _approved(srv, did, queue)
    _refused_move(srv, sci, oid, lambda: other.revoke("sci"))
    assert queue.get(rid).state == "lapsed"
    other.readmit("sci")
    again = open_session(srv, SCI)
    _times_three(srv, again, did, oid)
    assert _pending(_get(srv, again, oid)) != rid


def test_a_revocation_before_the_move_does_not_stop_later_give_backs(owner):
    """Guard (the stored mark is read per move, not once): the scientist was revoked and readmitted through the
    second process before the move began. Must hold: a move the destination refuses gives its approval back, and
    a get then releases plain torch's value once."""
    (srv, did, queue), (other, _, _) = owner
    other.revoke("sci")
    other.readmit("sci")
    sci, oid, rid = _approved(srv, did, queue)
    _refused_move(srv, sci, oid)
    assert queue.get(rid).state == "approved"
    assert torch.equal(_get(srv, sci, oid).objects[0], SECRET * 3)
    assert queue.get(rid).state == "released"


@pytest.mark.slow
def test_revocations_and_twins_across_processes_on_postgres(hook, pg_url, monkeypatch):
    """The same on PostgreSQL (the record read, the checks and the restore in one transaction under the user's
    advisory lock): a revoke + readmit through the second process while a move in the first holds the approval
    lapses it; a twin used through the second process while a move holds a fresh approval lapses that one, also
    when the give-back runs while that use is under way."""
    first, second = _owner_process(hook, pg_url), _owner_process(hook, pg_url)
    (srv, did, queue), (other, _, _) = first, second
    try:
        sci, oid, rid = _approved(srv, did, queue)
        _refused_move(srv, sci, oid, lambda: (other.revoke("sci"), other.readmit("sci")))
        req = queue.get(rid)
        assert req.state == "lapsed" and "revoked" in req.message, req
        (srv, did, queue), sci, oid, rid, got = _twin_used_during_a_move((first, second), 1)
        assert torch.equal(got, SECRET * 3)
        req = queue.get(rid)
        assert req.state == "lapsed" and "released under request" in req.message, req
        _race_a_give_back_and_a_twins_use((first, second), monkeypatch)
    finally:
        srv.db.close()
        other.db.close()


# ------------------------------------------------------------------ what a lapsed approval shows


def test_an_approval_given_back_once_then_voided_by_revocation_shows_lapsed(owner):
    """Display: the approval of ``d * 3`` is given back by a first refused move; a second move holds it through
    the scientist's revocation and is refused too. It showed "released" (the give-back mark stopped the lapse).
    Must hold: it shows ``lapsed`` (revoked), in the owner's list of lapsed requests, and the record keeps both
    sends (two ``release`` rows allowed, two refused)."""
    (srv, did, queue), _ = owner
    sci, oid, rid = _approved(srv, did, queue)
    _refused_move(srv, sci, oid)
    assert queue.get(rid).state == "approved"
    _refused_move(srv, sci, oid, lambda: srv.revoke("sci"))
    req = queue.get(rid)
    assert req.state == "lapsed" and "revoked" in req.message, req
    assert rid in [r.id for r in queue.list("lapsed", "sci")]
    assert len(_release_rows(srv, rid)) == 2 and len(_release_rows(srv, rid, "refused")) == 2


# ------------------------------------------------------------------ a twin used while a move holds the approval


def _twin_used_during_a_move(owner, twin_process):
    """While a move in the first process holds the approval of ``d * 3``, the scientist asks again through
    ``twin_process`` (a twin request), the owner approves it and a get there uses it. Returns (first process's
    parts, session, object id, first request id, what the twin's get returned)."""
    (srv, did, queue) = owner[0]
    there = owner[twin_process]
    sci, oid, rid = _approved(srv, did, queue)
    got = []

    def twin():
        tsrv, tdid, tqueue = there
        tsess = sci if tsrv is srv else open_session(tsrv, SCI)
        if tsrv is not srv:
            _times_three(tsrv, tsess, tdid, oid)
        tqueue.approve(_pending(_get(tsrv, tsess, oid)))
        got.append(_get(tsrv, tsess, oid).objects[0])

    _refused_move(srv, sci, oid, twin)
    return (srv, did, queue), sci, oid, rid, got[0]


@pytest.mark.parametrize("twin_process", [0, 1], ids=["same-process", "other-process"])
def test_an_approval_whose_twin_was_used_while_a_move_held_it_does_not_come_back(owner, twin_process):
    """Replay: the twin's get released plain torch's ``d * 3``; then the move was refused and gave the first
    approval back "approved" (the twin's use had found it used, not open): a second get released the same value
    again. Must hold: the first approval lapses, naming the twin, and the next get is pending a new request."""
    (srv, did, queue), sci, oid, rid, got = _twin_used_during_a_move(owner, twin_process)
    assert torch.equal(got, SECRET * 3)
    req = queue.get(rid)
    assert req.state == "lapsed" and "released under request" in req.message, req
    assert _pending(_get(srv, sci, oid)) != rid


def test_a_give_back_racing_a_twins_use_in_another_process_releases_the_value_once(owner, monkeypatch):
    """Race across processes: while a move in the first process holds the approval of ``d * 3``, a twin is filed
    and approved through the second; a get there uses the twin, and the refused move's give-back runs right after
    that use has read which requests to lapse (the first approval: used, not open). Unserialized, the give-back
    found no twin released yet and restored the approval, the use then released the twin, and both stood: the
    value went out twice. Must hold: the twin's get and a later get of the first process release plain torch's
    value once between them."""
    _race_a_give_back_and_a_twins_use(owner, monkeypatch)


def _race_a_give_back_and_a_twins_use(owner, monkeypatch):
    from veil.governance import lapses

    (srv, did, queue), (other, odid, oqueue) = owner
    sci, oid, rid = _approved(srv, did, queue)
    there = open_session(other, SCI)
    _times_three(other, there, odid, oid)
    twin_approved, give_back_now, errors = threading.Event(), threading.Event(), []

    def move():
        try:
            _refused_move(srv, sci, oid, lambda: (twin_approved.set(), give_back_now.wait(30)))
        except BaseException as error:  # (reported below)
            errors.append(error)

    mover = threading.Thread(target=move)
    mover.start()
    assert twin_approved.wait(30)
    oqueue.approve(_pending(_get(other, there, oid)))
    read_twins = lapses._same_value

    def read_then_let_the_give_back_run(*args):
        found = read_twins(*args)
        if threading.current_thread() is threading.main_thread() and not give_back_now.is_set():
            give_back_now.set()
            mover.join(0.5)  # (serialized: it waits for this use's transaction, so it is still running here)
        return found

    monkeypatch.setattr(lapses, "_same_value", read_then_let_the_give_back_run)
    got = _get(other, there, oid)
    mover.join(30)
    monkeypatch.undo()
    assert not errors and not mover.is_alive(), errors
    later = _get(srv, sci, oid)
    values = [r.objects[0] for r in (got, later) if type(r) is not m.ErrorReply]
    assert len(values) == 1 and torch.equal(values[0], SECRET * 3), (got, later, queue.get(rid))
    req = queue.get(rid)
    assert req.state == "lapsed" and "released under request" in req.message, req


# ------------------------------------------------------------------ a database an older version wrote


def test_opening_an_old_database_lapses_approvals_a_later_denial_voided(hook, tmp_path):
    """Old database: an older version left an approval "approved" after the owner denied a request for the same
    value (its give-back did not lapse it). ``approved_for`` refuses it, but the owner's lists showed it approved.
    Must hold: the next process to open the database shows it ``lapsed`` (naming the denial) in the owner's list
    of lapsed requests, the denial and an approval of another object unchanged."""
    from veil.workers.persistence import OwnerDB

    path = tmp_path / OwnerDB.FILENAME
    srv, did, queue = _owner_process(hook, path)
    sci, oid, rid = _approved(srv, did, queue)
    _, other_oid, unrelated = _approved(srv, did, queue)  # (another object id: not the denied value)
    srv.db.close()
    # what the older version left: the denial of the same value later than the approval, the approval untouched
    with sqlite3.connect(path) as db:
        columns = [c[1] for c in db.execute("PRAGMA table_info(release_requests)")]
        row = dict(zip(columns, db.execute("SELECT * FROM release_requests WHERE id = ?", (rid,)).fetchone()))
        row.update(id="req-olddenial", state="denied", message="not this", decided_ts=row["decided_ts"] + 1,
                   ts=row["ts"] + 1)
        db.execute(f"INSERT INTO release_requests ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                   tuple(row.values()))
    db.close()
    again, _, queue = _owner_process(hook, path)
    try:
        req = queue.get(rid)
        assert req.state == "lapsed" and "req-olddenial" in req.message, req
        assert queue.get("req-olddenial").state == "denied"
        assert queue.get(unrelated).state == "approved"
        assert [r.id for r in queue.list("lapsed")] == [rid]
    finally:
        again.db.close()


# ------------------------------------------------------------------ a destination that stores part of a move


class _StoresHalf(sy.VirtualWorker):
    """A destination of an older protocol (no all-or-none store): it keeps the first object of a move and refuses
    the rest as "already in use"."""

    def _handle(self, msg, sender):
        if type(msg) is m.ObjectMessage and len(msg.objects) > 1:
            super()._handle(m.ObjectMessage(msg.objects[:1]), sender)
            raise PermissionDeniedError(f"object id {msg.objects[1].id} is already in use on worker {self.id!r}")
        return super()._handle(msg, sender)


def test_a_destination_storing_half_a_move_gets_each_approval_given_back_once(hook):
    """Decided: a refusal is the destination's word. A peer that stores half a two-object move and refuses gets
    both approvals back once, each send on record ("the value was sent"); a second such move leaves both used,
    and the part it kept is plain torch's value (nothing else left the owner)."""
    from veil.governance.requests import ReviewQueue

    w = sy.VirtualWorker(hook, id=_uid("xproc-half-own"))
    w.load(SECRET.clone(), tags=("#d",), policy="review")
    dest = _StoresHalf(hook, id=_uid("xproc-half-dst"))
    me, queue = hook.local_worker, ReviewQueue(w)
    d = w.search(["#d"])[0].id_at_location
    ids = [new_id(), new_id()]
    rids = []
    for oid, factor in zip(ids, (3.0, 5.0)):
        me.send_msg(m.CommandMessage("torch.mul", (m.ObjectRef(d), factor), {}, [oid], False), w)
        try:
            me.send_msg(m.GetObjectsMessage([oid]), w)
        except sy.exceptions.ReviewPendingError as e:
            rids.append(e.request_id)
    for rid in rids:
        queue.approve(rid)
    for attempt in range(2):
        new_ids = [new_id(), new_id()]
        with pytest.raises(PermissionDeniedError, match="already in use"):
            me.send_msg(m.MoveMessage(ids, dest.id, new_ids), w)
        states = {queue.get(rid).state for rid in rids}
        assert states == ({"approved"} if attempt == 0 else {"released"}), states
        kept = dict(dest.monitor.owner_entries())
        assert torch.equal(kept[new_ids[0]].obj, SECRET * 3) and new_ids[1] not in kept
    for rid in rids:
        assert len(_release_rows(w, rid)) == 2
        assert all("was sent" in r["detail"] for r in _release_rows(w, rid, "refused"))
