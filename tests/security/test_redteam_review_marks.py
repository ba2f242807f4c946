"""Red team on the dp-only marks of derived values across workers and threads, and the twin read of a give-back.
Not repeated: test_redteam_review*.py, test_redteam_governance*.py, test_redteam_dp_only*.py.

Holes found:

- a value derived under review and moved (approved) to another worker of the same owner kept no mark when the
  owner later tightened its source to dp-only: it stayed releasable there un-noised, and so did what was computed
  from it there (now the tightening is stored in the owner database the workers share and each serving worker
  marks the copies it holds: moved_marks.py);
- on an in-process worker (commands run on the caller's thread, no turn) a command whose inputs' marks were read
  before a tightening on another thread, and whose result was stored after the tightening's scan, stored an
  unmarked value of dp-only data that a get then released (now a count of tightenings, read before the marks and
  checked when a result is stamped, sends a racing command's results through the marks again: provenance.stamp);
- a give-back read only the 50 newest releases of the same bytes for a twin: 50 releases of the same value by
  other computations (each approved by the owner) hid a twin released while the move held the approval, and the
  approval came back to release the value again (now 200 are read, one graph at a time, and past them the
  approval stays used);
- a copy moved out and back to its worker names its source as ``"worker:id"``, which the tightening's own marking
  (an id match) missed: releasable there until a sync (an in-process worker has none).

Seen to: the owner's audit row of a tightening counts the derived values it marked, of a loosening those that keep
their mark.

Each hole's test failed on the code before the fix (checked by running them with the fix taken out).

Decided: a copy moved to a worker of another owner (another owner database) is the scientist's: the approved move
was a release, as a get is, and the tightening does not reach it. Loosening back to review keeps the marks (fails
closed): the owner frees the marked values (or the scientist computes them again under review).
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError
from veil.ids import new_id
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, request  # noqa: E402
from review_steps import SECRET, pending_id, review_owner, uid  # noqa: E402

SCI = "rt-marks-sci-token"


def _server(hook, path, name):
    """A worker process of the owner (not listening) on the database file ``path``, with a scientist token."""
    from veil.workers.persistence import OwnerDB
    from veil.workers.websocket_server import WebsocketServerWorker

    tokens = sy.TokenTable()
    tokens.add(SCI, "sci", "scientist")
    return WebsocketServerWorker(hook, id=uid(name), port=0, tokens=tokens, db=OwnerDB(str(path)))


@pytest.fixture
def owner_workers(hook, tmp_path):
    """(a, dataset id on a, b, replica): three workers of one owner sharing its database; ``#d`` under review on
    a and on the replica (its own copy of the data, as every replica loads it)."""
    from veil.workers.persistence import OwnerDB

    path = tmp_path / OwnerDB.FILENAME
    a, b, replica = (_server(hook, path, name) for name in ("marks-a", "marks-b", "marks-replica"))
    did = a.load(SECRET.clone(), tags=("#d",), policy="review")
    replica.load(SECRET.clone(), tags=("#d",), policy="review")
    yield a, did, b, replica
    for srv in (a, b, replica):
        srv.db.close()


def _command(srv, sess, op, args, oid):
    reply = request(srv, sess, m.CommandMessage(op, args, {}, [oid], False))
    assert type(reply) is m.OkReply, reply


def _get(srv, sess, oid):
    return request(srv, sess, m.GetObjectsMessage([oid], False))


def _moved(a, oid, b, sci_b):
    """What a's move handler sends for ``oid`` (its capabilities as tags), stored on b: the new id there."""
    entry = dict(a.monitor.owner_entries())[oid]
    new = new_id()
    sent = a.monitor.outgoing(SimpleNamespace(user="sci"), new, entry)
    reply = request(b, sci_b, m.ObjectMessage([sent]))
    assert type(reply) is m.OkReply, reply
    return new


def _approved_copy_on(a, did, b):
    """``d * 3`` computed under review on a, approved, moved to b: (sessions on a and b, id on a, id on b)."""
    from veil.governance.requests import ReviewQueue

    sci_a, sci_b = open_session(a, SCI), open_session(b, SCI)
    oid = new_id()
    _command(a, sci_a, "torch.mul", (m.ObjectRef(did), 3.0), oid)
    ReviewQueue(a).approve(_get(a, sci_a, oid).message.split("release request ")[1].split()[0])
    return sci_a, sci_b, oid, _moved(a, oid, b, sci_b)


@pytest.mark.parametrize("tightened_on", ["its-worker", "a-replica"])
def test_a_copy_moved_to_another_worker_of_the_owner_is_marked_when_its_source_becomes_dp_only(owner_workers,
                                                                                               tightened_on):
    """The scientist computes ``d * 3`` under review on a, the owner approves its release and it moves to b (the
    owner's other worker, same database); b computes ``y + 1`` from it. The owner then tightens ``d`` to dp-only
    on a, or on a replica that a then syncs from. Must hold: once b has reread the owner's decisions (what its
    serving loop does every second) both are refused un-noised there, b's own values stay releasable, and b
    still serves."""
    from veil.governance.requests import ReviewQueue

    a, did, b, replica = owner_workers
    sci_a, sci_b = open_session(a, SCI), open_session(b, SCI)
    oid = new_id()
    _command(a, sci_a, "torch.mul", (m.ObjectRef(did), 3.0), oid)
    reply = _get(a, sci_a, oid)
    assert reply.error == "ReviewPendingError", reply
    ReviewQueue(a).approve(reply.message.split("release request ")[1].split()[0])
    on_b = _moved(a, oid, b, sci_b)
    plus = new_id()
    _command(b, sci_b, "torch.add", (m.ObjectRef(on_b), 1.0), plus)
    mine = new_id()
    assert type(request(b, sci_b, m.ObjectMessage([m.StoredObject(mine, torch.ones(2))]))) is m.OkReply

    if tightened_on == "its-worker":
        a.set_policy("#d", "dp-only")
    else:
        replica.set_policy("#d", "dp-only")
        a.sync_policies_now()
    b.sync_policies_now()
    for held in (on_b, plus):
        reply = _get(b, sci_b, held)
        assert type(reply) is m.ErrorReply and "differential-privacy" in reply.message, reply
    assert torch.equal(_get(b, sci_b, mine).objects[0], torch.ones(2))


def test_a_copy_on_a_worker_of_another_owner_stays_released(hook, tmp_path):
    """Guard (decided: an approved move is a release): the copy went to a worker with another owner database.
    Must hold: the owner's tightening does not mark it there; its value is plain torch's ``d * 3``."""
    a, b = _server(hook, tmp_path / "a.db", "marks-a"), _server(hook, tmp_path / "b.db", "marks-b")
    try:
        did = a.load(SECRET.clone(), tags=("#d",), policy="review")
        _, sci_b, _, on_b = _approved_copy_on(a, did, b)
        a.set_policy("#d", "dp-only")
        b.sync_policies_now()
        assert torch.equal(_get(b, sci_b, on_b).objects[0], SECRET * 3)
    finally:
        a.db.close()
        b.db.close()


@pytest.mark.slow
def test_a_tightening_reaches_a_copy_moved_between_two_network_workers(hook, spawn, connect, tmp_path):
    """Across two ``veil worker`` processes of one owner (one data dir): ``x.mean(0)`` under review is approved and
    moved from alice to bob with ``.move``; the owner makes the data dp-only through the admin message. Must
    hold: within the sync period bob refuses the copy un-noised, and still serves."""
    from veil.exceptions import ReviewPendingError
    from veil.governance.wire import AdminPolicyMessage, AdminRequestsMessage
    from veil.workers.websocket_launcher import free_port

    from worker_processes import spawn_all

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
    from network_helpers import ADMIN, PEER, base_args

    boston = str(Path(sy.__file__).parent / "datasets" / "data" / "boston_housing.csv")
    ports = {"alice": free_port(), "bob": free_port()}
    shared = str(tmp_path / "owner")
    specs = {
        "alice": (base_args(["--peer", f"bob=127.0.0.1:{ports['bob']}", "--peer-token", f"bob={PEER}",
                             "--dataset", f"d={boston}:target=MEDV", "--policy", "review", "--data-dir", shared]),
                  ports["alice"]),
        "bob": (base_args(["--accept-peer", f"alice={PEER}", "--data-dir", shared]), ports["bob"]),
    }
    wps = spawn_all(spawn, specs)
    alice, bob = connect(wps["alice"]), connect(wps["bob"])
    owner = connect(wps["alice"], token=ADMIN, id="alice")
    x = alice.search(["#d", "#data"])[0]
    y = x.mean(dim=0)
    with pytest.raises(ReviewPendingError) as info:
        y.move(bob)
    hook.local_worker.send_msg(AdminRequestsMessage("approve", info.value.request_id), owner)
    on_bob = y.move(bob)
    hook.local_worker.send_msg(AdminPolicyMessage("#d", "dp-only"), owner)
    deadline = time.monotonic() + 10
    while True:
        try:
            on_bob.copy().get()
        except PermissionDeniedError as error:
            assert "differential-privacy" in str(error), error
            break
        assert time.monotonic() < deadline, "bob still releases the copy un-noised"
        time.sleep(0.3)
    assert torch.equal(torch.ones(3).send(bob).get(), torch.ones(3))


@pytest.mark.parametrize("paused_after", ["lineage_of", "taint_writes"])
def test_a_command_racing_a_tightening_on_another_thread_stores_a_marked_result(hook, monkeypatch, paused_after):
    """In process (no turn): the scientist's ``d * 2`` reads its inputs' marks (none: review) when its lineage is
    made (or when it looks for what it wrote, just before its result is stored); then the owner's tightening to
    dp-only runs on another thread and scans the derived values (the result is not there yet). Must hold: the
    stored result carries the DP guard's mark (a get is refused), and a value computed before is marked too."""
    from veil.governance import provenance

    w = review_owner(hook, "marks-race")
    d = w.search(["#d"])[0]
    before = d + 1
    real = getattr(provenance, paused_after)
    done = []

    def tighten_meanwhile(*args, **kwargs):
        lineage = real(*args, **kwargs)
        name = args[0] if paused_after == "lineage_of" else args[2].name
        if name.endswith("mul") and not done:
            t = threading.Thread(target=lambda: done.append(w.set_policy("#d", "dp-only")), daemon=True)
            t.start()
            t.join(30)
            assert done, "the tightening did not finish while the command waited"
        return lineage

    monkeypatch.setattr(provenance, paused_after, tighten_meanwhile)
    y = d * 2
    monkeypatch.setattr(provenance, paused_after, real)
    for held in (y, before):
        with pytest.raises(PermissionDeniedError, match="differential-privacy"):
            held.get()
    assert torch.equal(torch.ones(2).send(w).get(), torch.ones(2))  # still serves


def test_results_of_commands_after_a_tightening_are_checked_once(hook):
    """Guard (no extra work, no over-marking): after a tightening has ended, a command on another dataset under
    review stores an unmarked result, pending review as before (plain torch's value once approved)."""
    w = review_owner(hook, "marks-after")
    w.load(torch.tensor([7.0, 8.0]), tags=("#e",), policy="review")
    w.set_policy("#d", "dp-only")
    e = w.search(["#e"])[0]
    y = e * 2
    sy.requests(w)
    from veil.governance.requests import ReviewQueue

    ReviewQueue(w).approve(pending_id(y.get))
    assert torch.equal(y.get(), torch.tensor([14.0, 16.0]))


# ------------------------------------------------------------------ a twin crowded out of the give-back's read


def _refused_move_with_a_twin(hook, tmp_path, crowd: int):
    """While a move holds the approval of ``d * 3``, a twin is filed, approved and released (the value went out),
    then ``crowd`` releases of the same bytes by other computations are recorded after it (the owner approved
    each). The destination refuses. Returns (queue, first request id, twin id)."""
    from veil.governance.release import releasing
    from veil.governance.requests import ReviewQueue
    from veil.workers.persistence import OwnerDB

    path = tmp_path / OwnerDB.FILENAME
    srv = _server(hook, path, "marks-twin")
    did = srv.load(SECRET.clone(), tags=("#d",), policy="review")
    queue, sci, oid = ReviewQueue(srv), open_session(srv, SCI), new_id()
    _command(srv, sci, "torch.mul", (m.ObjectRef(did), 3.0), oid)
    rid = _get(srv, sci, oid).message.split("release request ")[1].split()[0]
    queue.approve(rid)
    twin = []

    def during():
        reply = _get(srv, sci, oid)
        twin.append(reply.message.split("release request ")[1].split()[0])
        queue.approve(twin[0])
        assert torch.equal(_get(srv, sci, oid).objects[0], SECRET * 3)
        raw = sqlite3.connect(str(path))
        row = raw.execute("SELECT * FROM release_requests WHERE id = ?", (twin[0],)).fetchone()
        cols = [c[0] for c in raw.execute("SELECT * FROM release_requests LIMIT 0").description]
        for i in range(crowd):
            other = dict(zip(cols, row), id=f"req-crowd{i:04d}", ts=row[cols.index("ts")] + 1 + i,
                         graph='{"__root__": "n-other", "n-other": {"op": "torch.add", "inputs": []}}')
            raw.execute(f"INSERT INTO release_requests ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                        tuple(other[c] for c in cols))
        raw.commit()
        raw.close()
        raise PermissionDeniedError(f"object id {oid} is already in use on worker 'elsewhere'")

    entry = dict(srv.monitor.owner_entries())[oid]
    with pytest.raises(PermissionDeniedError, match="already in use"):
        with releasing(srv, [oid], [entry], "sci", sci.id, "move", lambda error: True):
            during()
    return srv, queue, rid, twin[0]


def test_releases_of_the_same_bytes_do_not_hide_a_twin_from_the_give_back(hook, tmp_path):
    """Replay: 60 releases of the same bytes by other computations after the twin's pushed it out of the 50 the
    give-back read, and the approval came back "approved" (the value released a second time). Must hold: it
    lapses, naming the twin."""
    srv, queue, rid, twin = _refused_move_with_a_twin(hook, tmp_path, 60)
    try:
        req = queue.get(rid)
        assert req.state == "lapsed" and twin in req.message, req
    finally:
        srv.db.close()


def test_past_the_twin_read_the_approval_stays_used(hook, tmp_path):
    """Bounded: more releases of the same bytes than the give-back reads. Must hold: the approval stays used
    (fails closed), not given back."""
    from veil.governance.give_backs import TWIN_READ

    srv, queue, rid, _ = _refused_move_with_a_twin(hook, tmp_path, TWIN_READ + 5)
    try:
        assert queue.get(rid).state == "released"
    finally:
        srv.db.close()


def test_the_owner_sees_the_marks_a_tightening_gives_and_a_loosening_keeps(hook):
    """Visibility (decided: a loosening keeps the marks, fails closed): two values derived under review; the owner
    tightens ``d`` to dp-only, then loosens it back. Must hold: both audit rows count the marked values, the old
    values stay refused, and the same computation done again is pending review (plain torch's value once
    approved): nothing needs clearing."""
    from veil.governance.requests import ReviewQueue
    from veil.governance.state import governance

    w = review_owner(hook, "marks-seen")
    d = w.search(["#d"])[0]
    old = [d * 3, d.sum(dim=0)]
    w.set_policy("#d", "dp-only")
    w.set_policy("#d", "review")
    rows = [r["detail"] for r in governance(w).db.audit_entries() if r["action"] == "policy"]
    assert any(r.startswith("review -> dp-only (2 values derived from it marked dp-only") for r in rows), rows
    assert any(r.startswith("dp-only -> review (2 values derived from it keep their dp-only mark") for r in rows), rows
    for held in old:
        with pytest.raises(PermissionDeniedError, match="differential-privacy"):
            held.get()
    again = d * 3
    ReviewQueue(w).approve(pending_id(again.get))
    assert torch.equal(again.get(), SECRET * 3)


def test_a_copy_moved_out_and_back_is_marked_by_the_tightening_itself(owner_workers):
    """``d * 3`` approved and moved from a to b, then from b back to a (where it names its source ``"a:id"``, as
    every moved copy does). The owner tightens ``d`` on a. Must hold: the copy back on a is refused un-noised at
    once, before any sync (the tightening's own marking knows the name)."""
    a, did, b, _ = owner_workers
    sci_a, _, _, on_b = _approved_copy_on(a, did, b)
    back = _moved(b, on_b, a, sci_a)
    a.set_policy("#d", "dp-only")
    reply = _get(a, sci_a, back)
    assert type(reply) is m.ErrorReply and "differential-privacy" in reply.message, reply
