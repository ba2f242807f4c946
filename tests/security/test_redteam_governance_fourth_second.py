"""Red team, second pass on the fourth pass of review and policies: the turn, the decision lock, the governance lock.

Acquisition orders (each path, what it holds while it waits):

- admin message (in the turn): decision lock (waited for outside the turn) -> governance lock (waited for outside
  the turn, lock_order.py) -> stores with neither the turn nor the governance lock, holding the decision lock;
- console / owner's Python ``worker.set_policy`` (no turn): decision lock -> turn -> governance lock; stores
  holding only the decision lock;
- the sync thread (no turn): reads the database, then decision lock -> reread -> turn -> governance lock;
- release decisions and revocation lapses: the governance lock outside the turn, never the decision lock.

Holes found, each a strict xfail on the code before its fix (checked by running this file on that code):

- owner code run in a command's turn (a worker function or hook calling ``worker.set_policy``) took the turn it
  already held (``set_policy(turn=worker._turn)``, a FairLock is not re-entrant): the thread waited for itself and
  every session's command after it waited for ever. Must hold: the change is put in force in the turn it holds;
- owner code loading a dataset in a command's turn (``worker.load(policy=)``) waited for the governance lock in
  it (``_set_policy``'s ``with state.lock``): a release decision holding it across the owner's database held every
  session's command. Must hold: waited for outside the turn (lock_order.governance_lock).
- a fit of a plan on data under review hands the turn over between batches; the owner tightened the data to
  dp-only there: the marking ran before the fit's state (and losses) gained the data's sources, the DP guard had
  passed under review, and the review check no longer applied: the state (the data's column sums) went out
  un-noised. Must hold: what a command computed or wrote is marked when an input is dp-only when it ends
  (provenance.Lineage.dp_only).

Attacks that hold (guards): every path above ends, and other sessions are served, while a decision is stored on a
frozen database; a revocation between a move's record read (outside the turn) and its decision still voids the
approval; values derived from two datasets, their views and values derived from them are marked when one of the
datasets becomes dp-only, and keep the mark when it is loosened back to review (fails closed).
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
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, request  # noqa: E402
from test_redteam_governance_fourth import TOKENS as FOURTH, _approved_times_three  # noqa: E402

SECRET = torch.tensor([[1.5, -2.25, 3.0], [4.0, 5.5, -6.75]])
OTHER = torch.tensor([[0.5, 1.0, -1.0], [2.0, -3.0, 0.25]])
TOKENS = {"alice": "gov-fourth-second-alice-token", "owner": "gov-fourth-second-owner-token"}
#: how long a thread may take at most, and how long the test's blockers (a frozen store, a held lock) hold: whether a
#: command waited for one is told by event order (answered while it still held), not by the wait's length
BOUND_S = 120.0


def _server(hook, prefix: str):
    from veil.workers.websocket_server import WebsocketServerWorker

    tokens = sy.TokenTable()
    tokens.add(TOKENS["alice"], "alice", "scientist")
    tokens.add(TOKENS["owner"], "owner", "admin")
    tokens.add(FOURTH["alice"], "alice", "scientist")  # (the fourth pass's helpers open sessions with its token)
    srv = WebsocketServerWorker(hook, id=f"{prefix}-{time.monotonic_ns()}", port=0, tokens=tokens)
    return srv, srv.load(SECRET.clone(), tags=("#d",), policy="review")


def _in_a_commands_turn(srv, fn):
    """Runs ``fn`` on a thread as the server runs a command: holding the turn, it current on the thread."""
    from veil.workers import cancellation

    out: dict = {}

    def command():
        srv._turn.acquire()
        try:
            with cancellation.running(None, srv._turn.yield_turn, srv._turn):
                out["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            out["error"] = error
        finally:
            srv._turn.release()

    t = threading.Thread(target=command, daemon=True)
    t.start()
    return t, out


def test_owner_code_in_a_commands_turn_changes_a_policy_without_waiting_for_itself(hook):
    """A worker function (owner code) run by a command calls ``worker.set_policy``: it holds the turn already."""
    from veil.governance.state import policy_of

    srv, did = _server(hook, "gov4b-hook")
    t, out = _in_a_commands_turn(srv, lambda: srv.set_policy("#d", "dp-only"))
    t.join(BOUND_S)
    assert not t.is_alive(), "worker.set_policy in a command's turn waited for the turn it held"
    assert "error" not in out, out
    assert out["value"] == [did] and policy_of(srv, did) == "dp-only"
    from veil.governance.policy import stored_decisions

    assert ({"#d"}, "dp-only") in stored_decisions(srv)
    alice = open_session(srv, TOKENS["alice"])  # (the worker still serves)
    reply = request(srv, alice, m.GetObjectsMessage([did], False))
    assert type(reply) is m.ErrorReply and "differential-privacy" in reply.message, reply


def _served_while(srv, session, holding=lambda: True) -> bool:
    """Whether a command of ``session`` (another session, an open dataset) is answered (within BOUND_S) while
    ``holding()`` (a blocker the test holds until after this, up to BOUND_S, is still held): one waiting for the
    blocker is answered only once it let go, however loaded the machine."""
    out: dict = {}

    def command():
        out["reply"] = request(srv, session, m.CommandMessage("torch.add", (m.ObjectRef(session.other), 1.0), {},
                                                              [session.next_id()], False))

    t = threading.Thread(target=command, daemon=True)
    t.start()
    t.join(BOUND_S)
    return not t.is_alive() and holding() and type(out.get("reply")) is m.OkReply


def test_every_path_ends_while_a_decision_is_stored_on_a_frozen_database(hook, monkeypatch):
    """The owner's ``worker.set_policy`` stores its decision on a frozen database (holding the decision lock); an
    admin message's change (in a turn), the sync and another session's commands come meanwhile. Must hold: the
    commands are served, nothing waits holding the turn, and every thread ends once the database answers."""
    from veil.governance.policy import stored_decisions
    from veil.governance.state import governance, policy_of
    from veil.governance.wire import AdminPolicyMessage
    from veil.ids import new_id

    srv, did = _server(hook, "gov4b-frozen")
    eid = srv.load(OTHER.clone(), tags=("#e",), policy="open")
    db, frozen, storing, thawed = governance(srv).db, threading.Event(), threading.Event(), threading.Event()
    real = db.kv_put

    def kv_put(ns, *args):
        if ns == "governance.policy" and not frozen.is_set():
            storing.set()
            frozen.wait(BOUND_S)
            thawed.set()  # (let go, or past its hold)
        return real(ns, *args)

    def still_frozen() -> bool:
        return storing.is_set() and not thawed.is_set()

    monkeypatch.setattr(db, "kv_put", kv_put)
    alice = open_session(srv, TOKENS["alice"])
    alice.other, alice.next_id = eid, new_id
    assert _served_while(srv, alice)  # (warm: the first command's imports)
    owner_code = threading.Thread(target=srv.set_policy, args=("#d", "dp-only"), daemon=True)
    owner_code.start()
    assert storing.wait(BOUND_S)
    assert policy_of(srv, did) == "dp-only"  # (in force before it is stored)
    assert _served_while(srv, alice, still_frozen), "a command waited while a decision was stored"
    admin_reply: dict = {}
    owner = open_session(srv, TOKENS["owner"])
    admin = threading.Thread(target=lambda: admin_reply.update(r=request(srv, owner, AdminPolicyMessage(
        "#e", "review"))), daemon=True)
    sync = threading.Thread(target=srv.sync_policies_now, daemon=True)
    admin.start()
    sync.start()
    time.sleep(0.2)
    assert admin.is_alive() and policy_of(srv, eid) == "open", "two decisions were made at once"
    assert _served_while(srv, alice, still_frozen), "a command waited behind the admin change or the sync"
    frozen.set()
    for t in (owner_code, admin, sync):
        t.join(BOUND_S)
        assert not t.is_alive(), f"{t} never ended"
    assert type(admin_reply["r"]) is m.ObjectsReply and admin_reply["r"].objects == [eid], admin_reply
    assert policy_of(srv, did) == "dp-only" and policy_of(srv, eid) == "review"
    stored = stored_decisions(srv)
    assert ({"#d"}, "dp-only") in stored and ({"#e"}, "review") in stored, stored


def test_a_revocation_between_the_record_read_and_the_decision_voids_the_approval(hook, monkeypatch):
    """A move reads alice's revocation record outside the turn, then decides; the owner revokes and readmits her
    between the two (another thread, no turn needed). Must hold: the approval is not used (nothing moves) and
    shows lapsed, never given back as open."""
    import veil.governance.release as release
    from veil.governance.requests import ReviewQueue

    srv, did = _server(hook, "gov4b-between")
    alice, oid, rid = _approved_times_three(srv, did)
    entry = dict(srv.monitor.owner_entries())[oid]
    real = release.revocations

    def read_then_revoked(worker, name):
        mark = real(worker, name)
        srv.revoke("alice")
        srv.readmit("alice")
        return mark

    monkeypatch.setattr(release, "revocations", read_then_revoked)
    moved = []
    with pytest.raises(Exception) as refused:
        with release.releasing(srv, [oid], [entry], "alice", alice.id, "move", lambda error: True):
            moved.append(oid)
    assert not moved, "the move went ahead on an approval a revocation voided"
    assert "ReviewPending" in type(refused.value).__name__ or isinstance(refused.value, PermissionDeniedError)
    req = ReviewQueue(srv).get(rid)
    assert req.state == "lapsed" and "revoked" in req.message, req


def test_owner_code_loading_a_dataset_in_a_commands_turn_waits_for_the_governance_lock_outside_it(hook):
    """A worker function (owner code, in a command's turn) loads a dataset under review while a release decision
    holds the governance lock (outside the turn, across the owner's database). Must hold: another session's
    command is served meanwhile; the load ends, under review, once the lock is free."""
    from veil.governance.state import governance, policy_of
    from veil.ids import new_id

    srv, did = _server(hook, "gov4b-load")
    eid = srv.load(OTHER.clone(), tags=("#e",), policy="open")
    alice = open_session(srv, TOKENS["alice"])
    alice.other, alice.next_id = eid, new_id
    assert _served_while(srv, alice)  # (warm: the first command's imports)
    held, free = threading.Event(), threading.Event()

    def a_release_decision():
        with governance(srv).lock:
            held.set()
            free.wait(BOUND_S)

    decision = threading.Thread(target=a_release_decision, daemon=True)
    decision.start()
    assert held.wait(BOUND_S)
    t, out = _in_a_commands_turn(srv, lambda: srv.load(SECRET.clone() + 1, tags=("#f",), policy="review"))
    try:
        time.sleep(0.2)
        assert _served_while(srv, alice, lambda: decision.is_alive() and not free.is_set()), \
            "a command waited while owner code in a turn waited for the lock"
    finally:
        free.set()
    t.join(BOUND_S)
    assert not t.is_alive() and "error" not in out, out
    assert policy_of(srv, out["value"]) == "review"


def test_values_derived_from_two_datasets_and_their_views_are_marked_when_one_becomes_dp_only(hook):
    """Under review: ``y = d + e``, a view of it, and ``z = y * 2``; the owner tightens only ``e`` to dp-only, then
    loosens it back to review. Must hold: none of them is released after the tightening, nor after the loosening
    (the marks stay: fails closed); a value of ``d`` alone is still only pending review."""
    from veil.exceptions import ReviewPendingError

    w = sy.VirtualWorker(hook, id=f"gov4b-two-{time.monotonic_ns()}")
    w.load(SECRET.clone(), tags=("#d",), policy="review")
    w.load(OTHER.clone(), tags=("#e",), policy="review")
    d, e = w.search(["#d"])[0], w.search(["#e"])[0]
    y = d + e
    view, z, only_d = y.view(-1), y * 2, d * 2
    w.set_policy("#e", "dp-only")
    for value in (y, view, z):
        with pytest.raises(PermissionDeniedError, match="differential-privacy"):
            value.get()
    with pytest.raises(ReviewPendingError):
        only_d.get()
    w.set_policy("#e", "review")
    with pytest.raises(PermissionDeniedError, match="differential-privacy"):
        z.get()


def test_a_fit_running_across_the_tightening_leaves_its_state_marked(hook, monkeypatch):
    """alice fits a plan (``w += x`` per batch) on data under review; between two batches (the fit's checkpoint,
    where other commands and the owner's change run) the owner tightens the data to dp-only. The fit passed the DP
    guard under review and goes on; ``w`` gains the data's sources only when it ends, after the marking. Must hold:
    ``w`` is refused un-noised, as a value computed under review is once its data is dp-only."""
    from veil.messaging.allowlist import ALLOWLIST
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef
    from veil.workers import cancellation
    from server_sessions import run_command, send_tensor

    srv, did = _server(hook, "gov4b-fit")
    tid = srv.load(torch.zeros(2, 1), tags=("#t",), policy="open")
    alice = open_session(srv, TOKENS["alice"])
    add_, total = ALLOWLIST.by_func(torch.Tensor.add_).name, ALLOWLIST.by_func(torch.Tensor.sum).name
    spec = PlanSpec("acc", 2, 1, 5, [PlanOp(add_, (SlotRef(2), SlotRef(0)), {}, [3], False),
                                     PlanOp(total, (SlotRef(3),), {}, [4], False)], SlotRef(4))
    pid = send_tensor(srv, alice, spec)
    w = send_tensor(srv, alice, torch.zeros(1, 3))
    real, changed = cancellation.checkpoint, []

    def the_owner_tightens_between_batches():
        real()
        if not changed:  # (as a change waiting for the turn runs when the fit hands it over)
            changed.append(srv.set_policy("#d", "dp-only"))

    monkeypatch.setattr(cancellation, "checkpoint", the_owner_tightens_between_batches)
    reply, _ = run_command(srv, alice, "veil.plan.fit", m.ObjectRef(pid), m.ObjectRef(did), m.ObjectRef(tid),
                           [m.ObjectRef(w)], 1, 1)
    assert changed == [[did]] and type(reply) is m.OkReply, reply
    got = request(srv, alice, m.GetObjectsMessage([w], False))
    if type(got) is m.ObjectsReply:  # (what went out: the data's column sums, un-noised)
        assert not torch.equal(got.objects[0], SECRET.sum(0, keepdim=True)), "the fit's state went out un-noised"
    assert type(got) is m.ErrorReply and "differential-privacy" in got.message, got
