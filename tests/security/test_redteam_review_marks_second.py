"""Second red team on the dp-only marks of moved and racing values (moved_marks.py, the tightening count).
Not repeated: test_redteam_review_marks.py (moved copies, the in-process race on a torch op, the twin read).

Holes found (each test failed on the code before its fix; checked by running them on HEAD's governance files):

- a source set keeps at most 256 strings (the first in sorted order, then a summary): a scientist adds a value
  claiming 256 sources that sort first to a moved copy, and the sum no longer names the copy's source: no
  tightening marked it, and it released the copy's value un-noised (now a summarized set is marked whenever a
  tightening is stored, on the sync, in the tightening's own scan and in the race's recheck);
- an encrypted product (veil.he.op, a worker function) racing a tightening on an in-process worker: its result
  was stored before the tightening marked its input, and its lineage read the input's mark without the count,
  so Enc(d * 3) was released and decrypted (now the command's marks, read after the count, reach a worker
  function's outputs that have their own graph: provenance.stamp_unrecorded);
- the race's recheck matched only integer sources: a result computed from a copy moved out and back
  (``"worker:id"``) stayed unmarked (now the tightening's moved name is known to it: Governance.moved_names);
- every one-second sync read every held value twice (the datasets for the stored decisions, and the values
  for marks): 20000 tiny values of a scientist made it most of the worker's time (now each read waits ten
  times as long as it took unless the stored decisions or names changed);
- ids are new at every start: a copy moved out of a worker before it restarted names the old id, which no
  tightening stored, and stayed releasable (now every load stores the dataset's name with its tags, and a
  stored dp-only decision covers every name its dataset was loaded under).

Held (guards): a scientist's forged source names mark only its own values and never add a stored name; a copy
moved twice is marked on the second worker; two tightenings between the count and the check still mark; a
tightening and a loosening between them leave the result under review.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.tensors.pointer import PointerTensor
from veil.workers.capabilities import CAP_PREFIX

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, request  # noqa: E402
from review_steps import SECRET, review_owner, send, uid  # noqa: E402
from test_redteam_review_marks import SCI, _approved_copy_on, _command, _get, _moved, _server  # noqa: E402


@pytest.fixture
def owner_workers(hook, tmp_path):
    """(a, dataset id on a, b, c): three workers of one owner sharing its database; ``#d`` under review on a."""
    from veil.workers.persistence import OwnerDB

    path = tmp_path / OwnerDB.FILENAME
    a, b, c = (_server(hook, path, name) for name in ("marks2-a", "marks2-b", "marks2-c"))
    did = a.load(SECRET.clone(), tags=("#d",), policy="review")
    yield a, did, b, c
    for srv in (a, b, c):
        srv.db.close()


def _refused_dp(reply):
    return type(reply) is m.ErrorReply and "differential-privacy" in reply.message


def _claimed(srv, sess, t, names):
    """The scientist sends ``t`` claiming it derives from the sources ``names`` (any strings): its id."""
    oid = new_id()
    tag = CAP_PREFIX + "provenance=" + __import__("json").dumps(list(names))
    reply = request(srv, sess, m.ObjectMessage([m.StoredObject(oid, t, (tag,))]))
    assert type(reply) is m.OkReply, reply
    return oid


# ----------------------------------------------------------------- the name pushed out of a bounded source set


def test_forged_sources_do_not_push_a_tightened_name_out_of_a_derived_value(owner_workers):
    """The approved copy of ``d * 3`` on b names ``"a:id"``. Before any tightening the scientist adds to it a value
    of zeros claiming 256 sources that sort before that name: the sum's source set keeps at most 256 strings
    (the first ones in sorted order, then a summary), so ``"a:id"`` is dropped from it. The owner then tightens
    ``d`` to dp-only. Must hold: after b's sync the sum (plain torch's ``d * 3``) is refused un-noised, as the
    copy is; b still serves."""
    a, did, b, _ = owner_workers
    _, sci_b, _, on_b = _approved_copy_on(a, did, b)
    decoy = _claimed(b, sci_b, torch.zeros_like(SECRET), [f"0:{i:04d}" for i in range(256)])
    hidden = new_id()
    _command(b, sci_b, "torch.add", (m.ObjectRef(on_b), m.ObjectRef(decoy)), hidden)
    a.set_policy("#d", "dp-only")
    b.sync_policies_now()
    assert _refused_dp(_get(b, sci_b, on_b))
    reply = _get(b, sci_b, hidden)
    leaked = reply.objects[0] if type(reply) is m.ObjectsReply else None
    assert leaked is None or not torch.equal(leaked, SECRET * 3), "the sum released d * 3 un-noised"
    assert _refused_dp(reply), reply
    mine = _claimed(b, sci_b, torch.ones(2), [])
    assert torch.equal(_get(b, sci_b, mine).objects[0], torch.ones(2))


# ----------------------------------------------------------------- commands racing a tightening (in process)


def _paused_tightening(monkeypatch, w):
    """The owner's tightening of ``#d`` on another thread, paused inside its scan: the values it scans are
    listed, then it waits for ``go`` before marking them. (thread, listed, go)"""
    from veil.governance import policy

    real = policy._mark_derived_dp_only
    listed, go = threading.Event(), threading.Event()

    def paused(worker, source):
        snapshot = list(worker.monitor.owner_entries())
        listed.set()
        go.wait(30)
        entries = worker.monitor.owner_entries
        worker.monitor.owner_entries = lambda: iter(snapshot)
        try:
            return real(worker, source)
        finally:
            worker.monitor.owner_entries = entries

    monkeypatch.setattr(policy, "_mark_derived_dp_only", paused)
    t = threading.Thread(target=w.set_policy, args=("#d", "dp-only"), daemon=True)
    t.start()
    assert listed.wait(30), "the tightening did not start its scan"
    return t, go


def test_an_encrypted_product_racing_a_tightening_is_marked(hook, monkeypatch):
    """In process: ``y = d * 3`` under review; the owner's tightening lists the values to mark (y among them) on
    another thread; meanwhile the scientist's ``Enc(1) * y`` (a worker function, veil.he.op) stores its result and
    reads y's mark (not set yet) for its lineage; then the tightening marks y. Must hold: the ciphertext is
    refused un-noised (decrypted it is plain torch's ``d * 3``)."""
    from veil.he.remote import send_encrypted

    w = review_owner(hook, "marks2-he")
    y = w.search(["#d"])[0] * 3
    pub, priv = sy.he.paillier.keygen(n_length=512)
    enc = send_encrypted(sy.he.paillier.encrypt(torch.ones_like(SECRET), pub), w)
    t, go = _paused_tightening(monkeypatch, w)
    try:
        product = enc * y
    finally:
        go.set()
        t.join(30)
    leaked = None
    try:
        leaked = product.get().decrypt(priv)
    except PermissionDeniedError as error:
        assert "differential-privacy" in str(error), error
    assert leaked is None or not torch.allclose(leaked, SECRET * 3), "Enc(d * 3) released un-noised"
    assert leaked is None


def test_a_torch_result_racing_a_tightening_from_a_copy_moved_back_is_marked(hook, monkeypatch):
    """In process: a copy of ``d * 3`` that left and came back names its source ``"w:id"`` (a string). The
    tightening lists the values to mark on another thread; meanwhile ``copy + 1`` runs and stores its result;
    then the tightening marks the copy (it knows the name). Must hold: ``copy + 1`` is refused un-noised (the
    race's recheck knows the moved name too)."""
    w = review_owner(hook, "marks2-back")
    did = w.search(["#d"])[0].id_at_location
    back = new_id()
    tag = CAP_PREFIX + f'provenance=["{w.id}:{did}"]'
    send(hook, w, m.ObjectMessage([m.StoredObject(back, SECRET * 3, (tag,))]))
    copy = PointerTensor(w, back, hook.local_worker, SECRET.shape, SECRET.dtype)
    t, go = _paused_tightening(monkeypatch, w)
    try:
        plus = copy + 1
    finally:
        go.set()
        t.join(30)
    with pytest.raises(PermissionDeniedError, match="differential-privacy"):
        copy.copy().get()
    with pytest.raises(PermissionDeniedError, match="differential-privacy"):
        plus.get()


# ----------------------------------------------------------------- the sync's cost


def test_the_moved_marks_scan_takes_a_bounded_share_of_the_worker(owner_workers, monkeypatch):
    """Resources: once the owner has tightened anything, every sync read every value the worker holds; a scientist
    holding many tiny values (each claiming some other source) made each one-second sync scan them all (10^5:
    0.2 s of every second on a handler thread; 10^6: never resting). Must hold: over back-to-back syncs the reads of
    every held value (for marks, and for the datasets the owner's decisions name) take a bounded share of the
    time (here: a fifth, the first reads aside), a new tightening is read at once, and the marks still come."""
    from veil.governance import moved_marks, policy
    from veil.workers.websocket_server import WebsocketServerWorker

    a, did, b, _ = owner_workers
    _, sci_b, _, on_b = _approved_copy_on(a, did, b)
    principal = WebsocketServerWorker.principal_of(sci_b)
    tag = CAP_PREFIX + 'provenance=["elsewhere:1"]'
    b.monitor.store_objects(principal, [m.StoredObject(new_id(), torch.zeros(1), (tag,)) for _ in range(20000)])
    a.load(torch.ones(2), tags=("#other",), policy="review")
    a.set_policy("#other", "dp-only")  # (a name stored: b's syncs now scan)
    scans = []

    def timed(real):
        def run(*args):
            started = time.monotonic()
            try:
                return real(*args)
            finally:
                scans.append(time.monotonic() - started)
        return run

    monkeypatch.setattr(moved_marks, "_unmarked", timed(moved_marks._unmarked))
    monkeypatch.setattr(policy, "owner_sources", timed(policy.owner_sources))
    started = time.monotonic()
    for _ in range(30):
        b.sync_policies_now()
    wall = time.monotonic() - started
    assert sum(scans) - max(scans) * 2 <= 0.2 * wall, \
        f"{len(scans)} reads of the 20000 values took {sum(scans):.2f} s of {wall:.2f} s"
    scans.clear()
    a.set_policy("#d", "dp-only")
    b.sync_policies_now()
    assert scans, "a new tightening waited for the bound"
    assert _refused_dp(_get(b, sci_b, on_b))


# ----------------------------------------------------------------- guards: forged names, hops, counts


def test_a_forged_source_name_marks_only_the_forgers_value_and_the_sync_goes_on(owner_workers):
    """A scientist sends values claiming to derive from the tightened source's name, from a source never
    tightened, and from odd names (empty, a summary-looking one, 200 characters). Must hold: only the value
    naming the tightened source (and the summary, fails closed) is marked; the owner's copy elsewhere is
    unchanged; the other values keep plain torch's values; b keeps syncing and serving; the owner database's
    names are the owner's only."""
    a, did, b, _ = owner_workers
    _, sci_b, _, on_b = _approved_copy_on(a, did, b)
    a.set_policy("#d", "dp-only")
    b.sync_policies_now()
    tightened = _claimed(b, sci_b, torch.ones(2), [f"{a.id}:{did}"])
    other = _claimed(b, sci_b, torch.full((2,), 2.0), [f"{a.id}:{did + 1}", "", "x" * 200])
    summary = _claimed(b, sci_b, torch.full((2,), 3.0), [f"0:{i:04d}" for i in range(300)])
    b.sync_policies_now()
    assert _refused_dp(_get(b, sci_b, tightened))
    assert _refused_dp(_get(b, sci_b, summary))
    assert torch.equal(_get(b, sci_b, other).objects[0], torch.full((2,), 2.0))
    assert _refused_dp(_get(b, sci_b, on_b))
    assert torch.equal(_get(b, sci_b, _claimed(b, sci_b, torch.ones(3), [])).objects[0], torch.ones(3))
    from veil.governance import moved_marks

    # (the owner's names only: a scientist's claims never add a stored one)
    assert {k for k, _ in b.db.kv_items(moved_marks.NAMESPACE)} == {f"{a.id}:{did}"}
    assert {k for k, _ in b.db.kv_items(moved_marks.LOADED)} == {f"{a.id}:{did}"}


def test_a_copy_moved_twice_is_marked_on_the_second_worker(owner_workers):
    """Two hops: the approved copy of ``d * 3`` goes a -> b -> c (c another worker of the owner), and c computes
    ``copy - 1`` from it. Must hold: after the tightening on a and c's sync, both are refused un-noised on c."""
    a, did, b, c = owner_workers
    _, sci_b, _, on_b = _approved_copy_on(a, did, b)
    sci_c = open_session(c, SCI)
    on_c = _moved(b, on_b, c, sci_c)
    minus = new_id()
    _command(c, sci_c, "torch.sub", (m.ObjectRef(on_c), 1.0), minus)
    assert torch.equal(_get(c, sci_c, minus).objects[0], SECRET * 3 - 1)  # (released before: an approved move)
    a.set_policy("#d", "dp-only")
    c.sync_policies_now()
    assert _refused_dp(_get(c, sci_c, on_c))
    assert _refused_dp(_get(c, sci_c, minus))


def test_two_tightenings_between_the_count_and_the_check_still_mark(hook, monkeypatch):
    """ABA: the scientist's ``d * 2`` reads the count (even), then the owner tightens ``#e`` and ``#d`` on another
    thread (the count moves by 4: even again, and the scan of ``#d`` ran before the result was stored). Must
    hold: the result is refused un-noised (the count differs; its sources are dp-only)."""
    from veil.governance import provenance

    w = review_owner(hook, "marks2-aba")
    w.load(torch.tensor([7.0]), tags=("#e",), policy="review")
    d = w.search(["#d"])[0]  # (a pointer to the owner's data: the command runs at once, never deferred)
    real = provenance.taint_writes
    done = []

    def tighten_twice(worker, lineage, op, *args, **kwargs):
        out = real(worker, lineage, op, *args, **kwargs)
        if op.name.endswith("mul") and not done:
            t = threading.Thread(target=lambda: done.append([w.set_policy(tag, "dp-only") for tag in ("#e", "#d")]),
                                 daemon=True)
            t.start()
            t.join(30)
            assert lineage.tightenings % 2 == 0 and lineage.state.tightenings == lineage.tightenings + 4
        return out

    monkeypatch.setattr(provenance, "taint_writes", tighten_twice)
    z = d * 2
    monkeypatch.setattr(provenance, "taint_writes", real)
    assert done
    with pytest.raises(PermissionDeniedError, match="differential-privacy"):
        z.get()


def test_a_copy_moved_from_a_worker_before_its_restart_is_marked(hook, tmp_path):
    """Replica catching up: the approved copy of ``d * 3`` moved from worker r to b names ``"r:id"``; r restarts
    (a new process: the dataset loaded again under a new id, the same tags), then the owner tightens ``#d`` to
    dp-only on r. Must hold: b's sync marks the copy (the name it carries is the dataset's from before the
    restart)."""
    from veil.workers.persistence import OwnerDB
    from veil.workers.websocket_server import WebsocketServerWorker

    path = tmp_path / OwnerDB.FILENAME
    tokens = sy.TokenTable()
    tokens.add(SCI, "sci", "scientist")
    rid = uid("marks2-r")
    r = WebsocketServerWorker(hook, id=rid, port=0, tokens=tokens, db=OwnerDB(str(path)))
    b = _server(hook, path, "marks2-b")
    try:
        did = r.load(SECRET.clone(), tags=("#d",), policy="review")
        _, sci_b, _, on_b = _approved_copy_on(r, did, b)
        r.db.close()
        r = WebsocketServerWorker(hook, id=rid, port=0, tokens=tokens, db=OwnerDB(str(path)))  # (restarted)
        assert r.load(SECRET.clone(), tags=("#d",), policy="review") != did
        r.set_policy("#d", "dp-only")
        b.sync_policies_now()
        assert _refused_dp(_get(b, sci_b, on_b))
    finally:
        r.db.close()
        b.db.close()


def test_a_tightening_and_a_loosening_between_the_count_and_the_check_leave_review(hook, monkeypatch):
    """The scientist's ``d * 2`` reads the count, then the owner tightens ``#d`` to dp-only and loosens it back to
    review on another thread before the result is stamped. Must hold: the result is not released without the
    owner's approval (pending review, or refused un-noised); once approved it is plain torch's ``d * 2``."""
    from veil.exceptions import ReviewPendingError
    from veil.governance import provenance

    w = review_owner(hook, "marks2-loosen")
    d = w.search(["#d"])[0]
    real = provenance.taint_writes
    done = []

    def tighten_and_loosen(worker, lineage, op, *args, **kwargs):
        out = real(worker, lineage, op, *args, **kwargs)
        if op.name.endswith("mul") and not done:
            t = threading.Thread(target=lambda: done.append([w.set_policy("#d", p) for p in ("dp-only", "review")]),
                                 daemon=True)
            t.start()
            t.join(30)
        return out

    monkeypatch.setattr(provenance, "taint_writes", tighten_and_loosen)
    z = d * 2
    monkeypatch.setattr(provenance, "taint_writes", real)
    assert done
    with pytest.raises((ReviewPendingError, PermissionDeniedError)) as info:
        z.get()
    if isinstance(info.value, ReviewPendingError):
        from veil.governance.requests import ReviewQueue

        ReviewQueue(w).approve(info.value.request_id)
        assert torch.equal(z.get(), SECRET * 2)
    else:
        assert "differential-privacy" in str(info.value)
