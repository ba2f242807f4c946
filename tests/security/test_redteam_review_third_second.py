"""Red team, second pass on the review third pass (lapsed requests, veil/governance/lapses.py): ways around the
lapses that keep an approval alive for a second release. Not repeated: test_redteam_review_third.py.

Holes found, each a strict xfail on the code before its fix:

- revoke then readmit while a move holds the approval: the refused move gave it back "approved" (the user was no
  longer revoked when it came back, and the revocation had found it used, not open), so it released the value
  recomputed after readmission;
- a give-back's lapse that failed (the database) was logged and the approval stood "approved" over the
  revocation it should have lapsed for (fail open);
- a revocation whose lapse failed (the database) left the user's approvals standing, and readmitting the user
  dropped the retry: an approval from before the revocation released the value recomputed after readmission;
- a release's lapse of its twins ran after the release was recorded, and a failure was only logged: an approved
  twin (asked for and approved while a move held the first approval, which the refused move gave back) released
  the same value a second time (now one transaction with the release: a failure uses nothing);
- (display) a give-back whose denial check failed left the voided approval showing "approved".

Each test marked strict xfail and failing on the code before the fix (also checked on a git archive of HEAD).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError
from veil.ids import new_id
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, request  # noqa: E402
from review_steps import uid as _uid, release_rows as _release_rows  # noqa: E402

SECRET = torch.tensor([[1.5, -2.25, 3.0], [4.0, 5.5, -6.75]])
SCI = "rt-rt3s-sci-token"


SCI2 = "rt-rt3s-other-token"


def _review_server(hook, tmp_path):
    """A network worker (owner database in ``tmp_path``) with review data: (worker, dataset id, queue)."""
    from veil.governance.requests import ReviewQueue
    from veil.workers.persistence import OwnerDB
    from veil.workers.websocket_server import WebsocketServerWorker

    tokens = sy.TokenTable()
    tokens.add(SCI, "sci", "scientist")
    tokens.add(SCI2, "other", "scientist")
    srv = WebsocketServerWorker(hook, id=_uid("rt3s-rev"), port=0, tokens=tokens,
                                db=OwnerDB(str(tmp_path / OwnerDB.FILENAME)))
    return srv, srv.load(SECRET.clone(), tags=("#d",), policy="review"), ReviewQueue(srv)


def _compute(srv, sess, did, oid, factor=3.0):
    reply = request(srv, sess, m.CommandMessage("torch.mul", (m.ObjectRef(did), factor), {}, [oid], False))
    assert type(reply) is m.OkReply, reply


def _get(srv, sess, oid):
    return request(srv, sess, m.GetObjectsMessage([oid], False))


def _approved(srv, did, queue):
    """The scientist's ``d * 3`` under a fresh id, approved: (session, object id, request id)."""
    sci, oid = open_session(srv, SCI), new_id()
    _compute(srv, sci, did, oid)
    reply = _get(srv, sci, oid)
    assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
    rid = reply.message.split("release request ")[1].split()[0]
    queue.approve(rid)
    return sci, oid, rid


def _refused_move(srv, sci, oid, during):
    """A move of ``oid`` that takes its approval, runs ``during()`` while the value is on its way, and is
    refused by the destination ("already in use": it says it stored nothing, so the approval is given back)."""
    from veil.governance.release import releasing

    entry = dict(srv.monitor.owner_entries())[oid]
    with pytest.raises(PermissionDeniedError, match="already in use"):
        with releasing(srv, [oid], [entry], "sci", sci.id, "move", lambda error: True):
            during()
            raise PermissionDeniedError(f"object id {oid} is already in use on worker 'elsewhere'")


def _recomputed_get(srv, did, oid):
    """After readmission: ``d * 3`` computed again under the same id in a new session, and asked for."""
    again = open_session(srv, SCI)
    _compute(srv, again, did, oid)
    return _get(srv, again, oid)


def test_revoke_and_readmit_during_a_move_lapse_the_approval_it_gives_back(hook, tmp_path):
    """Race (revoke + readmit while a move holds the approval): the revocation finds the approval used, not open;
    the owner readmits the user; the destination refuses and the approval comes back. It came back "approved"
    (the user was no longer revoked) and released ``d * 3`` recomputed after readmission. Must hold: it lapses
    (saying the access was revoked), the audit row says it stays used, and the recomputed value is pending a new
    request."""
    srv, did, queue = _review_server(hook, tmp_path)
    sci, oid, rid = _approved(srv, did, queue)
    try:
        _refused_move(srv, sci, oid, lambda: (srv.revoke("sci"), srv.readmit("sci")))
        req = queue.get(rid)
        assert req.state == "lapsed" and "revoked" in req.message, req
        (refused,) = _release_rows(srv, rid, "refused")
        assert "stays used" in refused["detail"]
        reply = _recomputed_get(srv, did, oid)
        assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
        assert rid not in reply.message
    finally:
        srv.db.close()


def test_a_give_back_whose_lapse_fails_does_not_stand_approved(hook, tmp_path, monkeypatch, caplog):
    """Fault (fail open): the owner revokes the user while a move holds the approval, and the database fails as
    the given-back approval lapses. The failure was logged and the approval stood "approved": after readmission it
    released the recomputed value. Must hold: the approval is not ``approved`` (it stays used), the audit row
    says so, one log line names the failure, and after readmission the recomputed value is pending."""
    from veil.governance import lapses

    srv, did, queue = _review_server(hook, tmp_path)
    sci, oid, rid = _approved(srv, did, queue)

    def revoke_then_fail():
        srv.revoke("sci")

        def fails(*args):
            raise OSError("disk I/O error")

        monkeypatch.setattr(lapses, "db_update", fails)

    try:
        _refused_move(srv, sci, oid, revoke_then_fail)
        monkeypatch.undo()
        assert queue.get(rid).state != "approved"
        (refused,) = _release_rows(srv, rid, "refused")
        assert "stays used" in refused["detail"]
        assert [r for r in caplog.records if "OSError" in r.getMessage()]
        srv.readmit("sci")
        reply = _recomputed_get(srv, did, oid)
        assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
    finally:
        srv.db.close()


def test_a_revocation_whose_lapse_failed_lapses_at_readmission(hook, tmp_path, monkeypatch):
    """Fault: the database fails as the revocation lapses the user's open requests (the revocation is in force
    and stored; the lapse is left for a retry), then the owner readmits the user, which dropped the retry: the
    approval from before the revocation released ``d * 3`` recomputed after readmission. Must hold: readmission
    lapses it first (or refuses), and the recomputed value is pending a new request."""
    from veil.governance import lapses

    srv, did, queue = _review_server(hook, tmp_path)
    sci, oid, rid = _approved(srv, did, queue)
    real = lapses.after_revocation

    def fails(*args):
        raise OSError("disk I/O error")

    try:
        monkeypatch.setattr(lapses, "after_revocation", fails)
        try:
            srv.revoke("sci")
        except OSError:
            pass  # (the revocation is in force either way)
        assert "sci" in srv.tokens.revoked
        monkeypatch.setattr(lapses, "after_revocation", real)
        srv.readmit("sci")
        req = queue.get(rid)
        assert req.state == "lapsed" and "revoked" in req.message, req
        reply = _recomputed_get(srv, did, oid)
        assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
        assert rid not in reply.message
    finally:
        srv.db.close()


def test_a_give_back_whose_denial_check_fails_takes_the_approval_back(hook, tmp_path, monkeypatch, caplog):
    """Fault: while a move holds the approval the scientist asks again (a request for the same value) and the
    owner denies it; the database fails as the given-back approval is checked against that denial. Must hold:
    the approval is not ``approved`` (taken back: a check that failed voids no denial), one log line names the
    failure, and the get is denied."""
    from veil.governance import lapses

    srv, did, queue = _review_server(hook, tmp_path)
    sci, oid, rid = _approved(srv, did, queue)

    def ask_deny_then_fail():
        reply = _get(srv, sci, oid)
        assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
        queue.deny(reply.message.split("release request ")[1].split()[0], "not this value")

        def fails(*args):
            raise OSError("disk I/O error")

        monkeypatch.setattr(lapses, "_same_value", fails)

    try:
        _refused_move(srv, sci, oid, ask_deny_then_fail)
        monkeypatch.undo()
        assert queue.get(rid).state == "released"
        assert [r for r in caplog.records if "OSError" in r.getMessage()]
        reply = _get(srv, sci, oid)
        assert type(reply) is m.ErrorReply and reply.error == "RequestDeniedError", reply
    finally:
        srv.db.close()


def test_an_approved_twin_cannot_release_again_when_its_lapse_fails(hook, tmp_path, monkeypatch):
    """Fault (fail open): while a move holds the approval the scientist asks again (a twin request for the same
    value) and the owner approves it; the move is refused and gives the first approval back: two approvals of one
    value. A get uses one; the database fails as the other lapses (logged, the release stood), and a second get
    released the same value again. Must hold: plain torch's value goes exactly once (the failing get either
    returns it and the twin is lapsed, or fails with nothing used); every later get is pending a new request."""
    from veil.governance import lapses

    srv, did, queue = _review_server(hook, tmp_path)
    sci, oid, rid = _approved(srv, did, queue)

    def ask_and_approve():
        reply = _get(srv, sci, oid)
        assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
        queue.approve(reply.message.split("release request ")[1].split()[0])

    def fails(*args):
        raise OSError("disk I/O error")

    try:
        _refused_move(srv, sci, oid, ask_and_approve)
        assert queue.get(rid).state == "approved"
        monkeypatch.setattr(lapses, "_same_value", fails)
        released = 0
        for _ in range(2):
            reply = _get(srv, sci, oid)
            if type(reply) is not m.ErrorReply:
                assert torch.equal(reply.objects[0], SECRET * 3)
                released += 1
            monkeypatch.undo()
        assert released == 1
        reply = _get(srv, sci, oid)
        assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
        assert len(queue.list("approved", "sci")) == 0
    finally:
        srv.db.close()


def test_lapses_never_reach_another_users_requests(hook, tmp_path):
    """Guard (cross-user lapse): two scientists compute ``d * 3`` under the same object id (same bytes and
    computation). The other user's approval and pending request stay open when the first user's approval is
    used, when the owner denies the first user's request for the value, and when the first user is revoked;
    the other's approval then releases plain torch's value."""
    srv, did, queue = _review_server(hook, tmp_path)
    sci, oid, rid = _approved(srv, did, queue)
    other = open_session(srv, SCI2)
    _compute(srv, other, did, oid)
    reply = _get(srv, other, oid)
    assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
    theirs = reply.message.split("release request ")[1].split()[0]
    try:
        queue.approve(theirs)
        assert torch.equal(_get(srv, sci, oid).objects[0], SECRET * 3)
        reply = _get(srv, sci, oid)
        queue.deny(reply.message.split("release request ")[1].split()[0], "no more")
        srv.revoke("sci")
        assert queue.get(rid).state == "released"
        assert queue.get(theirs).state == "approved"
        assert torch.equal(_get(srv, other, oid).objects[0], SECRET * 3)
    finally:
        srv.db.close()


def test_a_lapsed_approval_cannot_be_revived(hook, tmp_path):
    """Guard: an approval lapsed by a revocation is neither approved, denied nor given back again (the owner's
    decisions and a refused move's give-back each need the state they change from)."""
    srv, did, queue = _review_server(hook, tmp_path)
    sci, oid, rid = _approved(srv, did, queue)
    try:
        srv.revoke("sci")
        assert queue.get(rid).state == "lapsed"
        for decide in (queue.approve, queue.deny):
            with pytest.raises(PermissionDeniedError, match="already lapsed"):
                decide(rid)
        assert queue.restore_approval(rid) is False
        assert queue.get(rid).state == "lapsed"
    finally:
        srv.db.close()
