"""Fourth red team on the dp-only marks of derived values: the third pass's new code (every release checks the stored
names, the wildcard row, the owner's view, the re-check of the marks after the monitor's).
Not repeated: test_redteam_review_marks.py, _second.py, _third.py.

Holes found (each test failed on the code before its fix; checked by running them with the fix taken out):

- cost: a worker no serving loop syncs (in process, a worker object of the owner) read the stored names, three
  whole ``kv`` namespaces under the database lock audit rows and the ledger wait for, at every release of a value
  naming a string source, which any scientist can claim: 200 gets, 200 reads (with 500 datasets loaded a get took
  7.8 ms, 0.35 ms without the read); now the names a release reads stand NAMES_FRESH_S, as a sync's do, and a write
  of names or decisions by this process makes them stale at once (moved_marks._names_now, names_written);
- the re-check of the marks ran before the review check read the policies: a tightening between the two (in
  process, on another thread) made the review check read dp-only, not review, and the value went out unapproved,
  un-noised; and a network worker decides out of its turn, where the owner's tightening (which takes the turn) ran
  before the decisions, which read dp-only and allowed it; now the marks are read again after the review check
  and under the governance lock before the decisions (moved_marks.refuse_marked, release.enforce_all).

Held (guards): a tightening on another worker of this process reaches a copy whose names a release just read; a
decision another process stores is in force within NAMES_FRESH_S; the owner's actions still find every dataset it
loaded (only owner_load makes protected entries, in the shared namespace _OWNER_VIEW reads); a scientist's claimed
names mark only its own values (the wildcard row stands for names the owner's own rows no longer list).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError, ReviewPendingError
from veil.ids import new_id
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session  # noqa: E402
from review_steps import SECRET, review_owner, uid  # noqa: E402
from test_redteam_review_marks import SCI, _approved_copy_on, _command, _get, _server  # noqa: E402
from test_redteam_review_marks_second import _claimed, _refused_dp  # noqa: E402
from test_redteam_review_marks_third import tighten_before  # noqa: E402


@pytest.fixture
def owner_workers(hook, tmp_path):
    """(a, dataset id on a, b, the database file): two workers of one owner; ``#d`` under review on a."""
    from veil.workers.persistence import OwnerDB

    path = tmp_path / OwnerDB.FILENAME
    a, b = (_server(hook, path, name) for name in ("marks4-a", "marks4-b"))
    did = a.load(SECRET.clone(), tags=("#d",), policy="review")
    yield a, did, b, path
    for srv in (a, b):
        srv.db.close()


def _counted_reads(monkeypatch, db, namespace):
    """The reads of ``namespace`` through ``db.kv_items`` from now on (a list that grows)."""
    real, reads = db.kv_items, []

    def counted(ns):
        if ns == namespace:
            reads.append(ns)
        return real(ns)

    monkeypatch.setattr(db, "kv_items", counted)
    return reads


# ----------------------------------------------------------------- the cost of the check at every release


def test_releases_of_named_values_do_not_read_the_database_each_time(owner_workers, monkeypatch):
    """Starvation: the owner has a dp-only decision stored (``#e`` on a), so the names of its loaded datasets are read
    and parsed at each read of the stored names. On b (no serving loop) the scientist claims a string source for a
    value of its own, and gets it 200 times. Must hold: the stored names are read at most twice for the 200 (each
    read holds the lock every audit row and ledger entry waits for); every get returns plain torch's value."""
    from veil.governance import moved_marks

    a, _, b, _ = owner_workers
    a.load(torch.ones(2), tags=("#e",))
    a.set_policy("#e", "dp-only")
    sci_b = open_session(b, SCI)
    value = torch.tensor([1.5, -2.0, 3.25])
    named = _claimed(b, sci_b, value.clone(), ["z:1"])
    reads = _counted_reads(monkeypatch, b.db, moved_marks.NAMESPACE)
    for _ in range(200):
        reply = _get(b, sci_b, named)
        assert type(reply) is m.ObjectsReply, reply
        assert torch.equal(reply.objects[0], value)
    assert len(reads) <= 2, f"200 gets read the stored names {len(reads)} times"


def test_a_tightening_in_this_process_reaches_a_copy_whose_names_were_just_read(owner_workers):
    """Guard (the names a release keeps): the approved copy of ``d * 3`` on b (no serving loop) is released once (the
    names read then, none dp-only); the owner tightens ``#d`` on a, in this process, at once. Must hold: b's next
    get of the copy is refused un-noised, with no sync, though the names b read are not a second old."""
    a, did, b, _ = owner_workers
    _, sci_b, _, on_b = _approved_copy_on(a, did, b)
    first = _get(b, sci_b, on_b)
    assert type(first) is m.ObjectsReply and torch.equal(first.objects[0], SECRET * 3), first
    a.set_policy("#d", "dp-only")
    assert _refused_dp(_get(b, sci_b, on_b))


def test_a_decision_another_process_stores_is_in_force_within_the_bound(owner_workers, monkeypatch):
    """Guard (the bound on the kept names): the approved copy of ``d * 3`` on b is released once; then another
    process of the owner (its own connection to the database, nothing of this process's) stores the dp-only
    decision for ``#d``. Must hold: once NAMES_FRESH_S has passed (here 0.05 s), b refuses the copy un-noised."""
    from veil.governance import moved_marks
    from veil.workers.persistence import OwnerDB

    a, did, b, path = owner_workers
    monkeypatch.setattr(moved_marks, "NAMES_FRESH_S", 0.05)
    _, sci_b, _, on_b = _approved_copy_on(a, did, b)
    assert type(_get(b, sci_b, on_b)) is m.ObjectsReply
    other = OwnerDB(str(path))
    try:
        other.kv_put("governance.policy", json.dumps(["#d"]), json.dumps({"policy": "dp-only", "by": "owner",
                                                                          "ts": time.time()}).encode())
    finally:
        other.close()
    time.sleep(0.1)
    assert _refused_dp(_get(b, sci_b, on_b))


# ----------------------------------------------------------------- a tightening after the re-check of the marks


def test_a_tightening_between_the_recheck_and_the_review_check_lets_nothing_out(hook, monkeypatch):
    """In process (no turn): the scientist's get of ``y = d * 3``, never approved, passes the monitor's checks and
    the re-check of its marks (moved_marks.refuse_tightened); then the owner's tightening of ``#d`` to dp-only runs
    on another thread (marks y, puts dp-only in force); then the review check reads the policy: dp-only, not
    review. Must hold: nothing leaves (refused un-noised or pending); the worker still serves."""
    from veil.governance import release

    w = review_owner(hook, "marks4-get")
    y = w.search(["#d"])[0] * 3
    done, real = tighten_before(monkeypatch, release, "needs_review", lambda: w.set_policy("#d", "dp-only"))
    leaked = None
    try:
        leaked = y.get()
    except (PermissionDeniedError, ReviewPendingError) as error:
        assert isinstance(error, ReviewPendingError) or "differential-privacy" in str(error), error
    finally:
        monkeypatch.setattr(release, "needs_review", real)
    assert done, "the release made no review check"
    assert leaked is None, f"the get released {leaked} un-noised and unapproved"
    assert torch.equal(torch.ones(2).send(w).get(), torch.ones(2))


def test_a_tightening_while_the_decision_is_out_of_the_turn_lets_nothing_out(owner_workers, monkeypatch):
    """A worker of the owner (its turn): the scientist computes ``y = d * 3`` (``#d`` under review) and gets it, never
    approved. The review check finds y under review; the decision runs out of the turn (database work), and there
    the owner's tightening of ``#d`` to dp-only (the console: it takes the turn, free now) runs to its end; then the
    decisions read the policy: dp-only, not review. Must hold: the get is refused (un-noised or pending), nothing
    of ``d * 3`` in the reply; the worker still serves the scientist's own values."""
    from veil.governance import release

    a, did, _, _ = owner_workers
    sci = open_session(a, SCI)
    y = new_id()
    _command(a, sci, "torch.mul", (m.ObjectRef(did), 3.0), y)
    done, real = tighten_before(monkeypatch, release, "_decide_all", lambda: a.set_policy("#d", "dp-only"))
    reply = _get(a, sci, y)
    monkeypatch.setattr(release, "_decide_all", real)
    assert done, "the get made no decision"
    assert type(reply) is m.ErrorReply, f"the get released {getattr(reply, 'objects', reply)} unapproved"
    assert _refused_dp(reply) or "release request" in reply.message, reply
    mine = _claimed(a, sci, torch.ones(2), [])
    assert torch.equal(_get(a, sci, mine).objects[0], torch.ones(2))


def test_a_tightening_while_the_names_are_read_out_of_the_turn_lets_nothing_out(owner_workers, monkeypatch):
    """A worker of the owner (its turn): ``y = d * 3 + c`` where ``c`` is the scientist's zeros claiming a string
    source, so the release reads the stored names out of the turn (a database read). There the owner's tightening
    of ``#d`` to dp-only (it takes the turn, free then) runs to its end; then the review check reads dp-only, not
    review. Must hold: the get is refused (un-noised or pending), nothing of ``d * 3`` in the reply."""
    from veil.governance import moved_marks

    a, did, _, _ = owner_workers
    sci = open_session(a, SCI)
    zeros = _claimed(a, sci, torch.zeros_like(SECRET), ["z:1"])
    d3, y = new_id(), new_id()
    _command(a, sci, "torch.mul", (m.ObjectRef(did), 3.0), d3)
    _command(a, sci, "torch.add", (m.ObjectRef(d3), m.ObjectRef(zeros)), y)
    monkeypatch.setattr(moved_marks, "_KNOWN", type(moved_marks._KNOWN)())  # (no names kept: they are read)
    done, real = tighten_before(monkeypatch, moved_marks, "_stored_names", lambda: a.set_policy("#d", "dp-only"),
                                when=lambda worker: worker is a)
    reply = _get(a, sci, y)
    monkeypatch.setattr(moved_marks, "_stored_names", real)
    assert done, "the get read no names"
    assert type(reply) is m.ErrorReply, f"the get released {getattr(reply, 'objects', reply)} unapproved"
    assert _refused_dp(reply) or "release request" in reply.message, reply


def test_a_value_written_while_the_names_are_read_is_not_released_as_written(owner_workers, monkeypatch):
    """A worker of the owner (its turn): the scientist's value ``v`` claims a string source, so its get reads the
    stored names out of the turn, after the monitor's checks (dealer material, reveal_to, allowed_users, the DP
    mark: all read of the value as it was). There another request of the scientist (the turn is free) writes ``v``
    in place (``v.mul_(0)``, standing for any write of what those checks refuse). Must hold: the get is refused in
    one line, or releases the value the checks read (plain torch's ``v``), never the one written meanwhile; the
    worker still serves ``v`` as written at the next get."""
    from server_sessions import request

    from veil.governance import moved_marks

    a, _, _, _ = owner_workers
    sci = open_session(a, SCI)
    value = torch.tensor([1.5, -2.0, 3.25])
    v = _claimed(a, sci, value.clone(), ["z:1"])
    real, written = moved_marks._stored_names, []

    def write_first(worker):
        if not written and worker is a:
            def write():
                written.append(request(a, sci, m.CommandMessage("Tensor.mul_", (m.ObjectRef(v), 0.0), {}, [0],
                                                                False)))
            t = threading.Thread(target=write, daemon=True)
            t.start()
            t.join(30)
            assert written and type(written[0]) is m.OkReply, written
        return real(worker)

    monkeypatch.setattr(moved_marks, "_KNOWN", type(moved_marks._KNOWN)())  # (no names kept: they are read)
    monkeypatch.setattr(moved_marks, "_stored_names", write_first)
    reply = _get(a, sci, v)
    monkeypatch.setattr(moved_marks, "_stored_names", real)
    assert written, "the get read no names"
    if type(reply) is m.ObjectsReply:
        assert torch.equal(reply.objects[0], value), f"the get released {reply.objects[0]}, written after its checks"
    else:
        assert type(reply) is m.ErrorReply and "\n" not in reply.message and "changed" in reply.message, reply
    again = _get(a, sci, v)
    assert type(again) is m.ObjectsReply and torch.equal(again.objects[0], value * 0), again


# ----------------------------------------------------------------- the owner's view and the wildcard row


def test_owner_actions_find_every_dataset_beside_many_session_values(hook, owner_workers):
    """Guard (policy._OWNER_VIEW reads the shared namespace only): a scientist holds values on a; the owner loads
    datasets under its own name and under an allowed-users grant, then changes their policies by id and by tag, and
    a new worker object on the same database restores them. Must hold: each change is in force, and the restarted
    worker's loads restore the stricter stored decisions."""
    from veil.governance.state import policy_of

    a, did, _, path = owner_workers
    sci = open_session(a, SCI)
    for _ in range(50):
        _claimed(a, sci, torch.zeros(1), [])
    x = a.load(torch.ones(2), tags=("#x",), allowed_users=["sci"])
    y = a.load(torch.ones(2), tags=("#y",), policy="open")
    a.set_policy(x, "dp-only")
    a.set_policy("#y", "review")
    assert (policy_of(a, x), policy_of(a, y), policy_of(a, did)) == ("dp-only", "review", "review")
    again = _server(hook, path, "marks4-again")
    try:
        x2 = again.load(torch.ones(2), tags=("#x",))
        y2 = again.load(torch.ones(2), tags=("#y",), policy="open")
        assert (policy_of(again, x2), policy_of(again, y2)) == ("dp-only", "review")
    finally:
        again.db.close()


def test_claimed_names_of_a_folded_worker_mark_only_the_claimers_values(hook, tmp_path, monkeypatch):
    """Guard (the wildcard row, denial of service): r's names of ``#d`` are folded into its wildcard row (bound 2,
    four loads); the owner tightens ``#d``. On b a scientist claims names r never listed (``r:<random>``, the
    wildcard's own name), hoping the owner's honest values are refused with them. Must hold: the claimer's values
    are refused, the owner's open dataset copied from r's current start is released as plain torch's ``e * 2``."""
    from veil.governance import moved_marks
    from veil.workers.persistence import OwnerDB
    from veil.workers.websocket_server import WebsocketServerWorker
    from test_redteam_review_marks import _moved

    monkeypatch.setattr(moved_marks, "MAX_NAMES_PER_DATASET", 2)
    path = tmp_path / OwnerDB.FILENAME
    tokens = sy.TokenTable()
    tokens.add(SCI, "sci", "scientist")
    r = WebsocketServerWorker(hook, id=uid("marks4-r"), port=0, tokens=tokens, db=OwnerDB(str(path)))
    b = _server(hook, path, "marks4-fold-b")
    try:
        for _ in range(4):
            r.load(SECRET.clone(), tags=("#d",), policy="review")
        e = torch.tensor([7.0, 8.0])
        eid = r.load(e.clone(), tags=("#e",), policy="open")
        wild = [n for n, _ in b.db.kv_items(moved_marks.LOADED) if n.startswith(f"{r.id}:{moved_marks.WILDCARD}")]
        assert wild, "no wildcard row was written"
        sci_r, sci_b, doubled = open_session(r, SCI), open_session(b, SCI), new_id()
        _command(r, sci_r, "torch.mul", (m.ObjectRef(eid), 2.0), doubled)
        honest = _moved(r, doubled, b, sci_b)
        forged = [_claimed(b, sci_b, torch.ones(2), [f"{r.id}:{new_id()}"]),
                  _claimed(b, sci_b, torch.ones(2), wild)]
        r.set_policy("#d", "dp-only")
        b.sync_policies_now()
        for oid in forged:
            assert _refused_dp(_get(b, sci_b, oid))
        assert torch.equal(_get(b, sci_b, honest).objects[0], e * 2)
    finally:
        r.db.close()
        b.db.close()
