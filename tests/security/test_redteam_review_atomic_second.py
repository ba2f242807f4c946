"""Red team, second pass on the review atomic pass (9b916a4): a destination stores an ObjectMessage all or none
(``ObjectStore.all_or_none``), an approval is given back once, ``decide`` prefers a matching approved request over a
newer pending one, and the pending cap is counted and filed in one transaction.

Follows ``test_redteam_review_atomic.py`` (not repeated here). Holes found, each a strict xfail on the code before
its fix (checked by running this file on that code):

- the destination's work on an ObjectMessage did not end with the store: its governance record of each received
  value (``record_received``: a digest that copies the tensor, twice for floats) ran after the all-or-none scope,
  so a failure there (a MemoryError on a large value) answered an error while every object stayed stored; the
  sender read that answer as "stored nothing" and gave the approvals back: an honest destination held the value
  and the scientist held the approval again;
- an older approval given back by a refused move outlived the owner's later denial of the very same request
  (same object, bytes and computation: the one a get racing the move filed): the scientist asked for other bytes
  under the id (a newer request, so the denied one was no longer the latest), computed the value again, and the
  fallback to "an approval of exactly this value" released it over the denial.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.exceptions import ObjectNotFoundError, PermissionDeniedError, RemoteExecutionError, RequestDeniedError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.workers.quota import QuotaExceededError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, quota_worker, request  # noqa: E402
from review_steps import (  # noqa: E402
    CallsBack, SECRET, review_owner, send as _send,
    uid as _uid, pending_id as _pending, release_rows as _release_rows,
)

from tests.scale import conftest as _scale  # noqa: E402

pg_url, postgres_server = _scale.pg_url, _scale.postgres_server  # (fixtures: a real PostgreSQL)

SCI = "rt-ras-sci-token"


@pytest.fixture
def owner(hook):
    return review_owner(hook, "ras-own")


def _held(worker, oid: int) -> bool:
    return oid in dict(worker.monitor.owner_entries())


# ------------------------------------------------------------------ the destination's work after storing


def test_a_destination_failing_after_the_store_keeps_nothing_of_a_refused_move(hook, owner, monkeypatch):
    """Failure (an honest destination): ``d * 3`` approved and moved to a worker that tracks governance; its record
    of the received value fails (MemoryError: the digest copies the tensor). The objects stayed stored, the answer
    was an error, and the sender gave the approval back: the value held there and the approval standing again.
    Must hold: the destination holds nothing of the move, the approval stands again, and a move to it then
    delivers plain torch's value."""
    from veil.governance import received

    dest = sy.VirtualWorker(hook, id=_uid("ras-rec"))
    dest.load(torch.zeros(1), tags=("#own",), policy="review")  # (tracks governance: records what it receives)
    x = owner.search(["#d"])[0] * 3.0
    rid = _pending(x.get)
    owner.release_requests.approve(rid)
    record = received.record_received

    def fails_at_dest(worker, principal, stored):
        if worker is dest:
            raise MemoryError("no memory for the digest of a received value")
        return record(worker, principal, stored)

    monkeypatch.setattr(received, "record_received", fails_at_dest)
    target = new_id()
    with pytest.raises(RemoteExecutionError, match="MemoryError"):  # (the destination's answer)
        _send(hook, owner, m.MoveMessage([x.id_at_location], dest.id, [target]))
    assert not _held(dest, target)
    assert not [e for _, e in dest.monitor.owner_entries() if torch.equal(e.obj, SECRET * 3)]
    assert owner.release_requests.get(rid).state == "approved"
    monkeypatch.setattr(received, "record_received", record)
    _send(hook, owner, m.MoveMessage([x.id_at_location], dest.id, [target]))
    assert torch.equal(dict(dest.monitor.owner_entries())[target].obj, SECRET * 3)
    assert owner.release_requests.get(rid).state == "released" and len(_release_rows(owner, rid)) == 2


# ------------------------------------------------------------------ a claim racing a refused batch


def test_a_claim_racing_a_peers_refused_hand_off_gets_nothing(hook, monkeypatch):
    """Race (the read window of all_or_none): a peer hands off two tensors for one requester account, the second
    past the account's quota; while the batch is being stored (the first already in), the scientist names the
    first id (a claim). Must hold: the claim waits for the batch and then finds nothing (the batch was removed),
    the account holds nothing, and the scientist's session is charged nothing."""
    import secrets

    from veil.messaging.serde import deserialize, serialize
    from veil.workers.monitor import ReferenceMonitor
    from veil.workers.principals import Purpose
    from veil.workers.websocket_auth import authenticate

    srv = quota_worker(hook, _uid("ras-claim"), SCI, 3000)
    srv.tokens.add("rt-ras-peer-token", "dave", "peer")
    peer = authenticate(srv.tokens, ["rt-ras-peer-token"])
    srv.sessions[peer.id] = peer
    sci = open_session(srv, SCI)
    account, ids = secrets.token_hex(8), [new_id(), new_id()]
    check, claims, threads = ReferenceMonitor._check_account, [], []

    def claim():
        try:
            claims.append(srv.monitor.resolve(srv.principal_of(sci), ids[0], Purpose.REVEAL).obj)
        except ObjectNotFoundError as e:
            claims.append(e)

    def claim_then_check(self, principal, oid, nbytes):
        if oid == ids[1]:  # the first is stored: the scientist names it now, from a thread outside the server's
            # turn (as the inline lane or a dealer's thread reads the store): it waits on the store's lock
            t = threading.Thread(target=claim)
            t.start()
            t.join(0.3)
            threads.append(t)
        return check(self, principal, oid, nbytes)

    monkeypatch.setattr(ReferenceMonitor, "_check_account", claim_then_check)
    frame = serialize(m.ObjectMessage([m.StoredObject(i, torch.zeros(500)) for i in ids]), sender=f"dave#{account}")
    reply = deserialize(srv.serve_bytes(frame, peer))[0]
    for t in threads:
        t.join(10)
    assert type(reply) is m.ErrorReply and reply.error == QuotaExceededError.__name__, reply
    (got,) = claims
    assert isinstance(got, ObjectNotFoundError), got
    assert request(srv, sci, m.GetObjectsMessage([ids[0]])).error == "ObjectNotFoundError"
    assert srv.monitor._account_state(peer.id, account)[:2] == (False, 0)
    assert srv.monitor.session_bytes(sci.id) == 0


# ------------------------------------------------------------------ a given-back approval and a later denial


def _racing_denial(hook, owner):
    """``d * 3`` under an id the scientist picked, approved; a move of it to an id in use on the destination, with a
    get racing it (the approval taken: the get files a new request for the same value); the owner denies that
    request. Returns (compute(factor): the value under the same id, get(), the approval's id, the denied one's)."""
    did, oid = owner.search(["#d"])[0].id_at_location, new_id()

    def compute(factor: float) -> None:
        _send(hook, owner, m.DeleteMessage([oid]))
        reply = _send(hook, owner, m.CommandMessage("torch.mul", (m.ObjectRef(did), factor), {}, [oid], False))
        assert type(reply) is m.OkReply, reply

    def get():
        return _send(hook, owner, m.GetObjectsMessage([oid], False)).objects[0]

    compute(3.0)
    rid = _pending(get)
    owner.release_requests.approve(rid)
    dest = CallsBack(hook, id=_uid("ras-race"))
    taken = torch.ones(1).send(dest)
    racing = []
    dest.on_arrival = lambda: racing.append(_pending(get))
    with pytest.raises(PermissionDeniedError, match="already in use"):
        _send(hook, owner, m.MoveMessage([oid], dest.id, [taken.id_at_location]))
    (denied,) = racing
    assert owner.release_requests.get(rid).state == "approved"  # (given back by the refusal)
    owner.release_requests.deny(denied, "not this value")
    return compute, get, rid, denied


def test_a_later_denial_of_the_same_request_voids_a_given_back_approval(hook, owner):
    """Attack (stale approval): after the owner denied the racing request (same object, bytes and computation as
    the given-back approval), the scientist computes other bytes under the id and asks for them (a newer request,
    so the denial is no longer the latest), then computes ``d * 3`` again: the fallback to "an approval of exactly
    this value" released plain torch's ``d * 3`` over the owner's denial. Must hold: the denial answers while it
    is the latest; afterwards the value needs a new request (no release, no release row for the old approval)."""
    _assert_denial_holds(hook, owner)


@pytest.mark.slow
def test_a_later_denial_voids_a_given_back_approval_on_postgres(hook, pg_url):
    """The same on PostgreSQL (the approved and denied rows read in one query)."""
    from veil.workers.persistence import OwnerDB

    w = sy.VirtualWorker(hook, id=_uid("ras-pg"))
    w.db = OwnerDB(pg_url)
    w.load(SECRET.clone(), tags=("#d",), policy="review")
    try:
        _assert_denial_holds(hook, w)
    finally:
        w.db.close()


def _assert_denial_holds(hook, owner):
    """The denial holds past a newer request (see the test above)."""
    compute, get, rid, denied = _racing_denial(hook, owner)
    with pytest.raises(RequestDeniedError, match="not this value"):
        get()
    compute(5.0)
    _pending(get)
    compute(3.0)
    again = _pending(get)
    assert again not in (rid, denied)
    assert len(_release_rows(owner, rid)) == 1  # (the refused move's send only)


def test_an_approval_decided_after_a_denial_still_releases(hook, owner):
    """Guard (the void's other side): ``d * 2`` denied, then the scientist asks again for ``d * 2`` under the id
    and the owner approves that request (the owner changed their mind). Must hold: the get returns plain torch's
    value (only a denial decided after an approval voids it)."""
    did, oid = owner.search(["#d"])[0].id_at_location, new_id()
    reply = _send(hook, owner, m.CommandMessage("torch.mul", (m.ObjectRef(did), 2.0), {}, [oid], False))
    assert type(reply) is m.OkReply
    get = lambda: _send(hook, owner, m.GetObjectsMessage([oid], False)).objects[0]  # noqa: E731
    first = _pending(get)
    owner.release_requests.deny(first, "no")
    _send(hook, owner, m.DeleteMessage([oid]))
    _send(hook, owner, m.CommandMessage("torch.mul", (m.ObjectRef(did), 7.0), {}, [oid], False))
    _pending(get)  # (other bytes: a newer request, so the denial is no longer the latest)
    _send(hook, owner, m.DeleteMessage([oid]))
    _send(hook, owner, m.CommandMessage("torch.mul", (m.ObjectRef(did), 2.0), {}, [oid], False))
    second = _pending(get)
    assert second != first
    owner.release_requests.approve(second)
    assert torch.equal(get(), SECRET * 2)


# ------------------------------------------------------------------ the given-back mark across `veil db migrate`


@pytest.mark.slow
def test_the_given_back_mark_survives_db_migrate(hook, tmp_path, pg_url):
    """Guard (replay across a migration): an approval given back once on SQLite, the state migrated to PostgreSQL
    (``veil db migrate``). Must hold: the approval is still approved there, and once used it is not given back a
    second time (the mark travelled with the key-value table: without it each migration reset the bound)."""
    from veil.governance.requests import ReviewQueue
    from veil.workers.db_migrate import migrate
    from veil.workers.persistence import OwnerDB

    before = sy.VirtualWorker(hook, id=_uid("ras-mig"))
    before.db = OwnerDB(str(tmp_path / "veil-worker.sqlite3"))
    before.load(SECRET.clone(), tags=("#d",), policy="review")
    x = before.search(["#d"])[0] * 3.0
    rid = _pending(x.get)
    before.release_requests.approve(rid)
    dest = sy.VirtualWorker(hook, id=_uid("ras-mig-dst"))
    with pytest.raises(PermissionDeniedError, match="already in use"):
        _send(hook, before, m.MoveMessage([x.id_at_location], dest.id, [torch.ones(1).send(dest).id_at_location]))
    assert before.release_requests.get(rid).state == "approved"
    before.db.close()
    migrate(tmp_path, pg_url)
    after = sy.VirtualWorker(hook, id=_uid("ras-mig-pg"))
    after.db = OwnerDB(pg_url)
    after.load(SECRET.clone(), tags=("#d",), policy="review")
    try:
        queue = ReviewQueue(after)
        assert queue.get(rid).state == "approved"
        queue.mark_released(rid)
        assert queue.restore_approval(rid) is False and queue.get(rid).state == "released"
    finally:
        after.db.close()
