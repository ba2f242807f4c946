"""Third red team on the dp-only marks of derived values (the leftovers of the second pass).
Not repeated: test_redteam_review_marks.py, test_redteam_review_marks_second.py (moved copies, the race on torch
ops and encrypted products, bounded source sets, the sync's cost, names from before a restart).

Holes found (each test failed on the code before its fix; checked by running them on HEAD's files):

- compat ``share_own`` read its value's mark without the tightening count: a tightening whose scan listed the
  values after the share used its approval and before it stored the share it keeps left that share unmarked,
  released un-noised once the data was dp-only (bob's share plus it is the encoded value); now the count is read
  before the mark, a tightening since refuses the share (approval kept) or marks what it stores and sends
  (provenance.tightening_count / marked_if_tightened);
- a copy that reached a worker of the owner after that worker's last scan (moved on from a worker not synced yet)
  waited for the next scan, which the scan's bound puts off ten times as long as the last took (a scientist
  holding many values makes that seconds), and a worker object no serving loop runs never synced: both released
  the copy un-noised; now every release checks the values it lets out that name another worker's source against
  the stored names (moved_marks.refuse_tightened, from release.enforce_all);
- every owner action (a load, which restores stored decisions; a load with a policy; a policy change; the sync)
  built a dict of the whole store, the scientists' values included: 20000 tiny values made each of them read
  20000 entries; now they read the owner's loaded data only (policy._OWNER_VIEW);
- ``governance.source_names`` gained a row per dataset at every start, read by every worker every second, never
  pruned; now at most MAX_NAMES_PER_DATASET per dataset and worker, the older ones folded into one wildcard row
  that still marks copies under a forgotten name (fails closed); a load reads the rows once per worker;
- in process (no turn), a get of a value under review, never approved, passed the monitor's check of its mark,
  then the owner's tightening to dp-only ran on another thread, and the review check read dp-only (not review):
  the value went out unapproved and un-noised; now the release checks the mark again, and a source being marked
  (moved_marks.refuse_tightened).

Held (guards): encrypt_state racing a tightening is marked (the handler's count reaches worker-function outputs);
a move racing a tightening carries the mark (its capabilities are read after the review check);
a forged source on an encrypted state marks only the forger's value. Only the owner's loads and tightenings add
stored names: no scientist can push a real name out of the bounded rows.
"""

from __future__ import annotations

import sys
import threading
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
from test_redteam_review_marks import SCI, _approved_copy_on, _command, _get, _moved, _server  # noqa: E402
from test_redteam_review_marks_second import _claimed, _paused_tightening, _refused_dp  # noqa: E402


@pytest.fixture
def owner_workers(hook, tmp_path):
    """(a, dataset id on a, b, c): three workers of one owner sharing its database; ``#d`` under review on a."""
    from veil.workers.persistence import OwnerDB

    path = tmp_path / OwnerDB.FILENAME
    a, b, c = (_server(hook, path, name) for name in ("marks3-a", "marks3-b", "marks3-c"))
    did = a.load(SECRET.clone(), tags=("#d",), policy="review")
    yield a, did, b, c
    for srv in (a, b, c):
        srv.db.close()


# ----------------------------------------------------------------- races with a tightening (in process)


def test_a_share_racing_a_tightening_is_refused_or_marked(hook, monkeypatch):
    """In process: the owner approved sharing ``fix_precision(d * 3)`` (bob, a worker of no owner, and the data's
    worker). The share passes its checks and uses the approval; then, before it draws the shares, the owner's
    tightening of ``#d`` starts on another thread and lists the values to mark (the kept share is not stored yet);
    the share stores its kept share, reading the value's mark (none yet), sends bob his; then the tightening marks
    the value. Must hold: the kept share is refused un-noised (bob's, the scientist's, plus it is the encoded
    ``d * 3``), and the worker still serves."""
    from veil.mpc import ring

    w = review_owner(hook, "marks3-share")
    bob, cp = sy.VirtualWorker(hook, id=uid("marks3-bob")), sy.VirtualWorker(hook, id=uid("marks3-cp"))
    fp = (w.search(["#d"])[0] * 3).fix_precision()
    with pytest.raises(ReviewPendingError) as info:
        fp.share(bob, w, crypto_provider=cp)
    w.release_requests.approve(info.value.request_id)
    real, paused = ring.random_ring, []

    def tighten_first(*args, **kwargs):  # (the share's checks are done: it draws its shares)
        if not paused:
            paused.append(_paused_tightening(monkeypatch, w))
        return real(*args, **kwargs)

    monkeypatch.setattr(ring, "random_ring", tighten_first)
    shared = None
    try:
        shared = fp.share(bob, w, crypto_provider=cp)
    except PermissionDeniedError as error:
        assert "differential-privacy" in str(error), error
    finally:
        monkeypatch.setattr(ring, "random_ring", real)
        for t, go in paused:
            go.set()
            t.join(30)
    assert paused, "the share drew no shares"
    if shared is not None:
        pointers = shared.child.child.child
        with pytest.raises(PermissionDeniedError, match="differential-privacy"):
            pointers[w.id].get()
    assert torch.equal(torch.ones(2).send(w).get(), torch.ones(2))  # still serves


def test_an_encrypted_state_racing_a_tightening_is_marked(hook, monkeypatch):
    """Guard (he_agg._record_lineage reads its inputs' marks without the count): in process, ``y = d * 3`` under
    review; the tightening lists the values to mark on another thread; meanwhile the scientist's
    ``veil.fl.encrypt_state([y], 1.0, my_key, out)`` stores Enc(y) and its commitment; then y is marked. Must
    hold: the ciphertext is refused un-noised (decrypted it is plain torch's ``d * 3``), the commitment too."""
    from veil.messaging.allowlist import ALLOWLIST
    from veil.tensors import remote_ops

    w = review_owner(hook, "marks3-agg")
    y = w.search(["#d"])[0] * 3
    pub, priv = sy.he.paillier.keygen(n_length=512)
    out, digest = new_id(), new_id()
    t, go = _paused_tightening(monkeypatch, w)
    try:
        remote_ops.call(ALLOWLIST.by_name("veil.fl.encrypt_state"), ([y], 1.0, pub, out, ["r", "c", digest]), {},
                        location=w)
    finally:
        go.set()
        t.join(30)
    from veil.tensors.pointer import PointerTensor

    for oid in (out, digest):
        ptr = PointerTensor(w, oid, hook.local_worker, (1,), torch.float32)
        with pytest.raises(PermissionDeniedError, match="differential-privacy"):
            ptr.get()


def test_an_encrypted_state_of_a_forged_source_marks_only_the_forgers_value(owner_workers):
    """Guard: on b (the owner's other worker) the scientist sends a value claiming the tightened source's name and
    one claiming none, and encrypts each (``veil.fl.encrypt_state``). Must hold: after the tightening and b's sync
    only the ciphertext of the forged claim is refused; the other decrypts to plain torch's value."""
    from server_sessions import request

    a, did, b, _ = owner_workers
    pub, priv = sy.he.paillier.keygen(n_length=512)
    sci_b = open_session(b, SCI)
    forged = _claimed(b, sci_b, torch.ones(2), [f"{a.id}:{did}"])
    plain = _claimed(b, sci_b, torch.full((2,), 2.0), [])
    a.set_policy("#d", "dp-only")
    b.sync_policies_now()
    outs = {}
    for name, oid in (("forged", forged), ("plain", plain)):
        outs[name] = new_id()
        reply = request(b, sci_b, m.CommandMessage("veil.fl.encrypt_state", ([m.ObjectRef(oid)], 1.0, pub,
                                                                             outs[name]), {}, [], False))
        assert type(reply) in (m.OkReply, m.ErrorReply), reply
        if name == "forged":
            assert _refused_dp(reply) or _refused_dp(_get(b, sci_b, outs[name])), reply
    released = _get(b, sci_b, outs["plain"]).objects[0]
    assert torch.allclose(released.decrypt(priv).double(), torch.full((2,), 2.0, dtype=torch.float64))


# ----------------------------------------------------------------- copies the scan has not reached yet


def test_a_copy_arriving_after_the_scan_is_refused_at_once(owner_workers, monkeypatch):
    """The approved copy of ``d * 3`` sits on c; the owner tightens ``#d`` on a; b scans (a scan of many values: the
    next one waits ten times as long as it took, here for ever); the scientist then moves c's copy (c has not
    synced yet) to b, and computes ``copy + 1`` there. Must hold: on b both are refused un-noised at once, though
    b's syncs are put off; b's own values stay releasable."""
    from veil.governance import moved_marks

    a, did, b, c = owner_workers
    _, sci_c, _, on_c = _approved_copy_on(a, did, c)
    sci_b = open_session(b, SCI)
    monkeypatch.setattr(moved_marks, "SCAN_SHARE", 1e-12)  # (every scan as if it had read 10^6 values)
    a.set_policy("#d", "dp-only")
    b.sync_policies_now()  # (names new to b: it scans now, finds nothing)
    on_b = _moved(c, on_c, b, sci_b)
    plus = new_id()
    _command(b, sci_b, "torch.add", (m.ObjectRef(on_b), 1.0), plus)
    b.sync_policies_now()  # (put off: the names are those of its last scan)
    for held in (on_b, plus):
        reply = _get(b, sci_b, held)
        leaked = reply.objects[0] if type(reply) is m.ObjectsReply else None
        assert leaked is None, f"b released {leaked} un-noised"
        assert _refused_dp(reply), reply
    mine = _claimed(b, sci_b, torch.ones(2), [])
    assert torch.equal(_get(b, sci_b, mine).objects[0], torch.ones(2))


def test_a_copy_on_a_worker_that_does_not_serve_is_refused_without_a_sync(owner_workers):
    """In process: b is a worker object of the owner (its database) that no serving loop runs, so it never syncs.
    The approved copy of ``d * 3`` was moved to it; the owner tightens ``#d`` on a. Must hold: b refuses the copy
    un-noised without any sync_policies_now (and moving it on is refused too)."""
    a, did, b, c = owner_workers
    _, sci_b, _, on_b = _approved_copy_on(a, did, b)
    a.set_policy("#d", "dp-only")
    assert _refused_dp(_get(b, sci_b, on_b))
    from server_sessions import request

    moved = request(b, sci_b, m.MoveMessage([on_b], c.id, [new_id()]))
    assert _refused_dp(moved), moved


# ----------------------------------------------------------------- the owner's actions and the scientist's values


def test_owner_actions_do_not_read_every_value_the_sessions_hold(owner_workers, monkeypatch):
    """Starvation: a scientist holds 20000 tiny values on a; every owner action (a load, which restores the stored
    decisions, a load with a policy, a change of policy, a sync) read every one of them (a dict of the whole
    store). Must hold: none of these reads the whole store; the policies are in force as asked."""
    from veil.governance.state import policy_of
    from veil.workers.websocket_server import WebsocketServerWorker

    a, did, _, _ = owner_workers
    sci = open_session(a, SCI)
    a.monitor.store_objects(WebsocketServerWorker.principal_of(sci),
                            [m.StoredObject(new_id(), torch.zeros(1)) for _ in range(20000)])
    store = a.monitor._store
    real, whole = store.entries, []

    def counted(key, ns):
        if ns is None:
            whole.append(1)
        return real(key, ns)

    monkeypatch.setattr(store, "entries", counted)
    x = a.load(torch.ones(2), tags=("#x",))
    y = a.load(torch.ones(2), tags=("#y",), policy="open")
    a.set_policy("#x", "review")
    a.set_policy(y, "review")
    a.sync_policies_now()
    assert not whole, f"{len(whole)} owner actions read every held value"
    assert policy_of(a, x) == policy_of(a, y) == policy_of(a, did) == "review"


# ----------------------------------------------------------------- the stored names stay bounded


def test_the_names_of_a_restarted_worker_stay_bounded_and_fail_closed(hook, tmp_path, monkeypatch):
    """Resources: every start of a worker loads its datasets under new ids, and each load stored one more name
    (``governance.source_names``) that every worker of the owner read every second, for ever (a worker restarted
    in a loop grew it without bound). Here the bound is 2 names per dataset and worker. The approved copy of
    ``d * 3`` left r in its first start, for b; r restarts 4 times (``#d`` under review, ``#e`` open); in its last
    start a copy of ``e * 2`` is moved to b. Then the owner tightens ``#d`` to dp-only. Must hold: r's rows stay
    bounded, b refuses the first copy un-noised (its name was forgotten: fails closed), and releases the copy of
    the open dataset from the last start (plain torch's ``e * 2``)."""
    from veil.governance import moved_marks
    from veil.workers.persistence import OwnerDB
    from veil.workers.websocket_server import WebsocketServerWorker

    monkeypatch.setattr(moved_marks, "MAX_NAMES_PER_DATASET", 2, raising=False)
    path = tmp_path / OwnerDB.FILENAME
    tokens = sy.TokenTable()
    tokens.add(SCI, "sci", "scientist")
    rid, e = uid("marks3-r"), torch.tensor([7.0, 8.0])
    b = _server(hook, path, "marks3-b")
    r = None
    try:
        for start in range(5):
            if r is not None:
                r.db.close()
            r = WebsocketServerWorker(hook, id=rid, port=0, tokens=tokens, db=OwnerDB(str(path)))
            did = r.load(SECRET.clone(), tags=("#d",), policy="review")
            eid = r.load(e.clone(), tags=("#e",), policy="open")
            if start == 0:
                _, sci_b, _, first = _approved_copy_on(r, did, b)
        sci_r, doubled = open_session(r, SCI), new_id()
        _command(r, sci_r, "torch.mul", (m.ObjectRef(eid), 2.0), doubled)
        last = _moved(r, doubled, b, sci_b)
        rows = [n for n, _ in b.db.kv_items(moved_marks.LOADED) if n.startswith(f"{rid}:")]
        assert len(rows) <= 2 * (2 + 1), rows
        r.set_policy("#d", "dp-only")
        b.sync_policies_now()
        assert _refused_dp(_get(b, sci_b, first))
        assert torch.equal(_get(b, sci_b, last).objects[0], e * 2)
    finally:
        r.db.close()
        b.db.close()


def test_loads_do_not_read_every_stored_name(owner_workers, monkeypatch):
    """Guard (bounded time): an owner loading many datasets. Must hold: 200 loads read the stored names of loaded
    datasets at most once (each load reading every row is quadratic in the datasets); each name is stored."""
    from veil.governance import moved_marks

    a, _, _, _ = owner_workers
    real, reads = a.db.kv_items, []

    def counted(namespace):
        reads.append(namespace)
        return real(namespace)

    monkeypatch.setattr(a.db, "kv_items", counted)
    ids = [a.load(torch.ones(1), tags=(f"#many{i}",)) for i in range(200)]
    assert reads.count(moved_marks.LOADED) <= 1, reads.count(moved_marks.LOADED)
    monkeypatch.setattr(a.db, "kv_items", real)
    assert {f"{a.id}:{i}" for i in ids} <= {k for k, _ in a.db.kv_items(moved_marks.LOADED)}


# ----------------------------------------------------------------- a release racing a tightening (in process)


def tighten_before(monkeypatch, module, name: str, tighten, when=lambda *args, **kwargs: True):
    """Makes ``module.name`` run ``tighten()`` to its end on another thread the first time it is called (with
    arguments ``when`` accepts): an owner's tightening landing between two steps of a release. Returns the list
    the tightening's result is appended to, and the real function (to put back)."""
    real, done = getattr(module, name), []

    def tighten_first(*args, **kwargs):
        if not done and when(*args, **kwargs):
            t = threading.Thread(target=lambda: done.append(tighten()), daemon=True)
            t.start()
            t.join(30)
            assert done, "the tightening did not finish"
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, tighten_first)
    return done, real



@pytest.mark.parametrize("action", ["get", "move"])
def test_a_release_racing_a_tightening_lets_nothing_out(hook, monkeypatch, action):
    """In process (no turn): the scientist's get (or move to bob) of ``y = d * 3``, never approved, passes the
    reference monitor's checks (y unmarked, ``#d`` under review); then the owner's tightening of ``#d`` to dp-only
    runs on another thread, marks y and puts dp-only in force; then the release's review check reads the policy
    (no longer review). Must hold: nothing leaves (refused un-noised or pending), the worker still serves."""
    from veil.governance import release

    w = review_owner(hook, "marks3-get")
    bob = sy.VirtualWorker(hook, id=uid("marks3-getbob"))
    y = w.search(["#d"])[0] * 3
    done, real = tighten_before(monkeypatch, release, "enforce_all", lambda: w.set_policy("#d", "dp-only"))
    leaked = None
    try:
        leaked = y.get() if action == "get" else y.move(bob).get()
    except (PermissionDeniedError, ReviewPendingError) as error:
        assert isinstance(error, ReviewPendingError) or "differential-privacy" in str(error), error
    finally:
        monkeypatch.setattr(release, "enforce_all", real)
    assert leaked is None, f"{action} released {leaked} un-noised and unapproved"
    assert torch.equal(torch.ones(2).send(w).get(), torch.ones(2))
