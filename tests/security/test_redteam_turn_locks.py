"""Red team, third pass on the network worker's turn: the governance lock, and audit rows on the event loop.

f827eda and 39d2844 moved release decisions out of the turn: ``_decide_all`` now holds the governance lock
across the owner's database (a lost COMMIT's lookup, ~10 s) while no turn is held. Simulated as the existing
turn red teams do: a database call that hangs (``_HangOnce``) until the test lets it go. Holes found, each a
strict xfail on the code before its fix (checked by running this file on that code):

- lock order: code in the turn that waited for the governance lock held every other client meanwhile: the
  owner's admin policy change (AdminPolicyMessage), an admin decision (AdminRequestsMessage approve), and the
  server's sync of a stricter policy stored by another replica (every second; a scientist cannot trigger it,
  the owner's tightening on any replica does). Must hold: another client is served within a bound while a
  release decision holds the lock; the change/decision then completes (no deadlock: every thread ends);
- a review request's filing read the shape of the live object outside the turn while its digest came from the
  snapshot: an in-place ``t_()`` meanwhile filed the shape of another value. Must hold: the request shows the
  shape of the value whose digest it carries;
- refusal audit rows were written on the calling thread: the event loop for an inline request (an over-quota
  ObjectMessage, a command naming an unknown id) and for a refused handshake (anyone reaching the port), the
  turn for a get under review naming an unknown id. A stalled database statement held every connection. Must
  hold: the loop (the turn) goes on while the row's write hangs, the row is written once the database answers,
  with the same content, in order, within the rate limits.

Guard: the policy sync waits for the turn (a long command) holding no governance lock, so an owner's decision
goes on meanwhile (a fix that took the lock before the turn would hold it there).
"""

from __future__ import annotations

import importlib
import re
import sys
import time
from pathlib import Path

import torch

from veil.ids import new_id
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import computed, open_session, request  # noqa: E402
from test_redteam_turn_lookup import (BOUND_S, HOLD_S, SECRET, TOKENS, _bob_is_served_meanwhile,  # noqa: E402,F401
                                      _HangOnce, _in_thread, _worker)  # (one review worker and hang harness)


def _rid(reply) -> str:
    return re.search(r"req-[0-9a-f]+", reply.message).group(0)


def _lock_held_by_a_release(hook, monkeypatch, prefix: str, setup=lambda srv, did: None):
    """A network worker where alice's get of her approved ``d * 3`` holds the governance lock outside the turn
    (its approval's use hangs), once ``setup(srv, dataset id)`` ran. (srv, setup's result, the get's thread, its
    reply, the hang)"""
    from veil.governance.requests import ReviewQueue

    srv, did = _worker(hook, prefix)
    alice = open_session(srv, TOKENS["alice"])
    x = computed(srv, alice, "torch.mul", m.ObjectRef(did), 3.0)
    ReviewQueue(srv).approve(_rid(request(srv, alice, m.GetObjectsMessage([x.id], False))))
    prepared = setup(srv, did)
    mark = _HangOnce(monkeypatch, importlib.import_module("veil.governance.release"), "use_approval", hold=HOLD_S)
    getting, got = _in_thread(lambda: request(srv, alice, m.GetObjectsMessage([x.id], False)))
    assert mark.started.wait(10), "the approval was never used up"
    return srv, prepared, getting, got, mark


def _while_the_lock_is_held(srv, mark, getting, got, action) -> dict:
    """Runs ``action`` in a thread while the release holds the lock; bob must be served meanwhile; then every
    thread must end (no deadlock) and the release must have answered plain torch's value."""
    acting, out = _in_thread(action)
    try:
        time.sleep(0.3)  # (the action is waiting for the lock by now)
        _bob_is_served_meanwhile(srv, mark)
    finally:
        mark.release()
        getting.join(20)
        acting.join(20)
    assert not getting.is_alive() and not acting.is_alive(), "a thread never ended (a deadlock)"
    assert type(got.get("reply")) is m.ObjectsReply and torch.equal(got["reply"].objects[0], SECRET * 3.0), got
    return out


# --------------------------------------------------------------------------- the governance lock in the turn


def test_an_admin_policy_change_waits_for_the_governance_lock_outside_the_turn(hook, monkeypatch):
    from veil.governance.state import policy_of
    from veil.governance.wire import AdminPolicyMessage

    srv, other, getting, got, mark = _lock_held_by_a_release(
        hook, monkeypatch, "tk-policy", lambda srv, did: srv.load(torch.ones(4), tags=("#e",)))
    owner = open_session(srv, TOKENS["owner"])
    out = _while_the_lock_is_held(srv, mark, getting, got,
                                  lambda: request(srv, owner, AdminPolicyMessage("#e", "dp-only")))
    assert type(out.get("reply")) is m.ObjectsReply and out["reply"].objects == [other], out
    assert policy_of(srv, other) == "dp-only"


def test_an_admin_decision_waits_for_the_governance_lock_outside_the_turn(hook, monkeypatch):
    from veil.governance.requests import ReviewQueue
    from veil.governance.wire import AdminRequestsMessage

    def bobs_pending_request(srv, did):
        bob = open_session(srv, TOKENS["bob"])
        y = computed(srv, bob, "torch.mul", m.ObjectRef(did), 5.0)
        return _rid(request(srv, bob, m.GetObjectsMessage([y.id], False)))

    srv, rid, getting, got, mark = _lock_held_by_a_release(hook, monkeypatch, "tk-decide", bobs_pending_request)
    owner = open_session(srv, TOKENS["owner"])
    out = _while_the_lock_is_held(srv, mark, getting, got,
                                  lambda: request(srv, owner, AdminRequestsMessage("approve", rid, "ok")))
    assert type(out.get("reply")) is m.ObjectsReply and out["reply"].objects[0]["state"] == "approved", out
    assert ReviewQueue(srv).get(rid).state == "approved"


def test_a_synced_stricter_policy_waits_for_the_governance_lock_outside_the_turn(hook, monkeypatch):
    from veil.governance import policy
    from veil.governance.state import policy_of

    def stored_on_another_replica(srv, did):
        other = srv.load(torch.ones(4), tags=("#e",))
        # (as the owner's change on another replica of the same database stores it)
        policy._store_policy(srv, dict(srv.monitor.owner_entries())[other], "dp-only", "owner")
        return other

    srv, other, getting, got, mark = _lock_held_by_a_release(hook, monkeypatch, "tk-sync", stored_on_another_replica)
    out = _while_the_lock_is_held(srv, mark, getting, got, srv.sync_policies_now)
    assert out.get("reply") == [other], out
    assert policy_of(srv, other) == "dp-only"
    rows = [r for r in srv.db.audit_entries() if r["action"] == "policy" and "another replica" in r["detail"]]
    assert len(rows) == 1, rows


def test_a_sync_waiting_for_a_long_command_holds_no_governance_lock(hook):
    """Guard for the lock order (held by the fix's design): the sync waits for the turn, held by a long command,
    holding no governance lock meanwhile, so the owner's decision (the console's, outside any turn) goes on;
    the sync then completes."""
    from veil.governance import policy
    from veil.governance.requests import ReviewQueue
    from veil.governance.state import policy_of

    srv, did = _worker(hook, "tk-order")
    alice = open_session(srv, TOKENS["alice"])
    x = computed(srv, alice, "torch.mul", m.ObjectRef(did), 3.0)
    rid = _rid(request(srv, alice, m.GetObjectsMessage([x.id], False)))
    other = srv.load(torch.ones(4), tags=("#e",))
    policy._store_policy(srv, dict(srv.monitor.owner_entries())[other], "dp-only", "owner")
    srv._turn.acquire()  # (a long command)
    try:
        syncing, synced = _in_thread(srv.sync_policies_now)
        deadline = time.monotonic() + 10
        while not srv._turn._waiters and time.monotonic() < deadline:  # (the sync waits for the turn)
            time.sleep(0.01)
        assert srv._turn._waiters, "the sync never waited for the turn"
        deciding, decided = _in_thread(lambda: ReviewQueue(srv).approve(rid))
        deciding.join(HOLD_S)  # (the turn is held until the finally below: a decision waiting for it waits it out)
        assert not deciding.is_alive(), "the owner's decision waited for a sync waiting for a long command"
        assert decided["reply"].state == "approved", decided
    finally:
        srv._turn.release()
    syncing.join(20)
    assert synced.get("reply") == [other] and policy_of(srv, other) == "dp-only", synced


# --------------------------------------------------------------------------- what a filing reads of the object


def test_a_filed_request_shows_the_shape_of_the_value_it_was_filed_for(hook, monkeypatch):
    """Alice's get files a request outside the turn (its pending count hangs); her in-place ``t_()`` on the same
    object comes in between (two requests of one session at once: the worker's request path runs them, a
    connection does not). Must hold: the request says [2, 3], the shape of the value its digest is of."""
    from veil.governance.requests import ReviewQueue, digest

    srv, did = _worker(hook, "tk-shape")
    alice = open_session(srv, TOKENS["alice"])
    x = computed(srv, alice, "torch.mul", m.ObjectRef(did), 3.0)
    counting = _HangOnce(monkeypatch, ReviewQueue, "count", when=lambda self, state, *a, **k: state == "pending")
    getting, got = _in_thread(lambda: request(srv, alice, m.GetObjectsMessage([x.id], False)))
    try:
        assert counting.started.wait(10), "the request was never filed"
        flipped = request(srv, alice, m.CommandMessage("Tensor.t_", (m.ObjectRef(x.id),), {}, [new_id()], False))
        assert type(flipped) is m.OkReply, flipped
    finally:
        counting.release()
        getting.join(20)
    reply = got.get("reply")
    assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", got
    filed = ReviewQueue(srv).get(_rid(reply))
    assert filed.digest == digest(SECRET * 3.0)
    assert filed.shape == [2, 3] and filed.dtype == "float32", (filed.shape, filed.dtype)


# --------------------------------------------------------------------------- refusal rows off the loop and the turn


def _inline(srv, session, msg):
    """``try_inline`` (what the event loop runs for a connection's request) on a thread: (thread, its result)."""
    from veil.messaging.serde import serialize

    return _in_thread(lambda: srv.try_inline(serialize(msg, sender="client"), session))


def _refused_rows(srv, action: str) -> list:
    srv.audit_rows.wait(10)
    return [e for e in srv.db.audit_entries() if e["action"] == action and e["outcome"] == "refused"]


def test_an_inline_over_quota_store_does_not_write_its_row_on_the_event_loop(hook, monkeypatch):
    from veil.messaging.serde import deserialize

    srv, _ = _worker(hook, "tk-quota")
    srv.monitor.max_session_bytes = 4096
    alice = open_session(srv, TOKENS["alice"])
    audit = _HangOnce(monkeypatch, srv.db, "audit", when=lambda *a, **k: a[1] == "store" and a[5] == "refused",
                      hold=HOLD_S)
    first, second = new_id(), new_id()
    batch = m.ObjectMessage([m.StoredObject(first, torch.zeros(8)), m.StoredObject(second, torch.zeros(4096))])
    try:
        loop, out = _inline(srv, alice, batch)
        loop.join(HOLD_S)
        # (answered while the row's write is still held: a loop waiting for it is answered only after it)
        assert not loop.is_alive() and not audit.ended(), "the event loop waited for a refusal's audit row"
        reply, decoded = out["reply"]
        assert decoded is None and deserialize(reply)[0].error == "QuotaExceededError", out
        assert audit.started.wait(10), "the refusal was never audited"
        _bob_is_served_meanwhile(srv, audit)
    finally:
        audit.release()
    held = {oid for oid, _ in srv.monitor.owner_entries()}
    assert first not in held and second not in held, "the refused batch left an object stored"
    rows = _refused_rows(srv, "store")
    assert len(rows) == 1 and "quota" in rows[0]["detail"] and rows[0]["principal"] == "alice", rows


def test_inline_commands_naming_unknown_ids_keep_their_rows_order_and_rate_limit_off_the_loop(hook, monkeypatch):
    """22 refused inline commands while the first row's write hangs: each is answered at once; then the first 20
    (the burst) are on record in full, in the order sent, and the 2 past it in the window's summary row."""
    from veil.messaging.serde import deserialize

    srv, _ = _worker(hook, "tk-unknown")
    alice = open_session(srv, TOKENS["alice"])
    audit = _HangOnce(monkeypatch, srv.db, "audit", when=lambda *a, **k: a[1] == "compute" and a[5] == "refused",
                      hold=HOLD_S)
    unknown = [new_id() for _ in range(22)]
    try:
        for oid in unknown:
            loop, out = _inline(srv, alice, m.CommandMessage("torch.add", (m.ObjectRef(oid), 1.0), {},
                                                             [new_id()], False))
            loop.join(HOLD_S)
            # (answered while the first row's write is still held: a loop waiting for it is answered only after)
            assert not loop.is_alive() and not audit.ended(), "the event loop waited for a refusal's audit row"
            reply, decoded = out["reply"]
            assert decoded is None and deserialize(reply)[0].error == "ObjectNotFoundError", out
        assert audit.started.wait(10)
    finally:
        audit.release()
    rows = _refused_rows(srv, "compute")
    assert [r["object_ids"] for r in rows] == [[oid] for oid in unknown[:20]], rows
    assert all(r["detail"] == f"object {oid} not found on worker {srv.id!r}" for r, oid in zip(rows, unknown))
    srv.refused_requests.flush()  # (the window's end)
    summary = _refused_rows(srv, "compute")[20:]
    assert len(summary) == 1 and summary[0]["detail"].startswith("2 more refused compute requests"), summary
    assert summary[0]["object_ids"] == unknown[20:]


def test_a_get_under_review_naming_an_unknown_id_does_not_write_its_row_in_the_turn(hook, monkeypatch):
    srv, _ = _worker(hook, "tk-get")
    alice = open_session(srv, TOKENS["alice"])
    audit = _HangOnce(monkeypatch, srv.db, "audit", when=lambda *a, **k: a[1] == "get" and a[5] == "refused",
                      hold=HOLD_S)
    unknown = new_id()
    getting, got = _in_thread(lambda: request(srv, alice, m.GetObjectsMessage([unknown], False)))
    try:
        assert audit.started.wait(10), "the refusal was never audited"
        _bob_is_served_meanwhile(srv, audit)
    finally:
        audit.release()
        getting.join(20)
    reply = got.get("reply")
    assert type(reply) is m.ErrorReply and reply.error == "ObjectNotFoundError", got
    rows = [e for e in srv.db.audit_entries() if e["action"] == "get" and e["outcome"] == "refused"]
    assert len(rows) == 1 and rows[0]["object_ids"] == [unknown], rows  # (on record before the reply went)


def test_a_refused_handshake_does_not_write_its_row_on_the_event_loop(hook, monkeypatch):
    """Anyone who reaches the port (no token) gets a row per refused handshake, in bounded numbers; the check
    runs on the event loop (``process_request``). Must hold: it answers 401 while the row's write hangs, and the
    row is written once the database answers."""
    from types import SimpleNamespace

    from websockets.datastructures import Headers

    srv, _ = _worker(hook, "tk-connect")
    audit = _HangOnce(monkeypatch, srv.db, "audit", when=lambda *a, **k: a[1] == "connect" and a[5] == "refused",
                      hold=HOLD_S)
    connection = SimpleNamespace(remote_address=("10.9.8.7", 4321),
                                 respond=lambda status, text: SimpleNamespace(status=status, headers={}))
    handshake = SimpleNamespace(headers=Headers({"Authorization": "Bearer not-a-token-of-this-worker"}))
    try:
        loop, out = _in_thread(lambda: srv._check_handshake(connection, handshake))
        loop.join(HOLD_S)
        # (answered while the row's write is still held: a loop waiting for it is answered only after it)
        assert not loop.is_alive() and not audit.ended(), \
            "the event loop waited for a refused handshake's audit row"
        assert out["reply"].status == 401, out
        assert audit.started.wait(10)
    finally:
        audit.release()
    rows = _refused_rows(srv, "connect")
    assert len(rows) == 1 and rows[0]["detail"].startswith("from 10.9.8.7: "), rows
