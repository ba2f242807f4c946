"""Red team, second pass: the writes f827eda moved out of the network worker's turn (review filings, release
marks), as a time-of-check/time-of-use opening.

While a get or move waits outside the turn for the owner's database, other requests run. f827eda took a
snapshot of the object in the turn and, back in it, compared the object's bytes with the snapshot's digest.
Holes found at the handler level, each a strict xfail on the code before its fix (checked by running this file
on that code). Each needs a second request in the same session's namespace while the first is outside the turn:
the worker's request path (``serve_bytes``, what these tests call from threads) runs one, but a connection
serves a session's requests one after another (the guard at the end), so no remote scientist reached them
today; they are closed so that the check does not depend on that:

- the check compared values, so it was an equality oracle on data under review: a write of ``w`` (derived from
  the reviewed data) into the approved object through a view (its op graph unchanged) was answered with the
  approved value when ``w`` held the same bytes, and refused when not: one bit of unapproved data per approval.
  Must hold: an object written meanwhile is refused whatever was written (the same one-line answer; the
  object's identity and version counter are compared, which a view's write bumps too);
- a get(delete=True) or a move freed the id after the value went: an object the session stored under the same
  id meanwhile (after deleting the old one) was freed instead. Must hold: only the entry released is freed.

Guards (held on the code before): a move's first pass (its refusals) also leaves the turn, and a write meanwhile
is answered alike whatever it wrote (the write changes the object's computation, and the second pass decides on
a fresh snapshot); a re-store under the id while a get is outside the turn releases the value approved (the
entry read in the turn), never the new object; a second get of the same approval meanwhile is answered
"pending" (one approval, one release); on a real connection a pipelined write waits for the get.
"""

from __future__ import annotations

import importlib
import re
import sys
import time
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import computed, open_session, request  # noqa: E402
from test_redteam_turn_lookup import SECRET, TOKENS, _HangOnce, _in_thread, _worker  # noqa: E402
from worker_processes import serve_in_thread, stop_served  # noqa: E402


def _approved(hook, prefix: str):
    """A network worker where alice's ``d * 3`` is approved. (srv, alice, the value's ref, d's ref, request id)"""
    from veil.governance.requests import ReviewQueue

    srv, did = _worker(hook, prefix)
    alice = open_session(srv, TOKENS["alice"])
    x = computed(srv, alice, "torch.mul", m.ObjectRef(did), 3.0)
    pending = request(srv, alice, m.GetObjectsMessage([x.id], False))
    rid = re.search(r"req-[0-9a-f]+", pending.message).group(0)
    ReviewQueue(srv).approve(rid)
    return srv, alice, x, m.ObjectRef(did), rid


def _while_outside(srv, hang, first, meanwhile) -> tuple[object, list]:
    """Sends ``first`` (alice's) in a thread; once ``hang`` started, runs ``meanwhile()`` (a list of replies, each
    served while ``first`` waits outside the turn); lets the hang go. (first's reply, meanwhile's replies)"""
    t, out = _in_thread(first)
    try:
        assert hang.started.wait(10), "the request never reached its database write"
        during = meanwhile()
    finally:
        hang.release()
        t.join(20)
    assert not t.is_alive()
    return out.get("reply", out.get("error")), during


def _copy_into(srv, alice, x, d, equal: bool) -> list:
    """Alice writes ``w`` into ``x`` in place, through a view of it (``x``'s op graph stays as approved):
    ``w = d * 3`` (the approved bytes) or ``d * 3 + 1``."""
    w = computed(srv, alice, "torch.mul", d, 3.0)
    if not equal:
        w = computed(srv, alice, "torch.add", w, 1.0)
    view, flat = (computed(srv, alice, "Tensor.view", t, -1) for t in (x, w))
    return [request(srv, alice, m.CommandMessage("Tensor.copy_", (view, flat), {}, [new_id()], False))]


def _one_line_refusal(reply) -> str:
    assert type(reply) is m.ErrorReply, reply
    assert "\n" not in reply.message
    for v in torch.cat([(SECRET * 3).reshape(-1), (SECRET * 3 + 1).reshape(-1)]).tolist():
        if v != int(v):  # (the integral ones would match inside ids)
            assert f"{v:g}" not in reply.message, "the refusal names a value"
    return f"{reply.error}: {re.sub(r'req-[0-9a-f]+|[0-9]+', 'N', reply.message)}"


# --------------------------------------------------------------------------- the release mark's check


def test_a_value_written_in_place_during_the_release_mark_is_not_an_equality_oracle(hook, monkeypatch):
    """Alice's get waits for its release mark; her pipelined ``x.copy_(w)`` comes in between, ``w`` equal to the
    approved bytes or not. Must hold: the two answers are the same refusal (neither releases a value)."""
    answers = []
    for equal in (True, False):
        srv, alice, x, d, rid = _approved(hook, "tl2-oracle")
        mark = _HangOnce(monkeypatch, importlib.import_module("veil.governance.release"), "use_approval")
        reply, (wrote,) = _while_outside(srv, mark, lambda: request(srv, alice, m.GetObjectsMessage([x.id], False)),
                                         lambda: _copy_into(srv, alice, x, d, equal))
        assert type(wrote) is m.OkReply, wrote  # (served meanwhile: the get was outside the turn)
        assert type(reply) is not m.ObjectsReply, f"released the value written meanwhile (equal={equal})"
        answers.append(_one_line_refusal(reply))
    assert answers[0] == answers[1], answers


def test_a_value_written_in_place_during_a_moves_first_pass_is_refused_alike(hook, monkeypatch):
    """Guard: a move's first pass (its refusals, no approval used) waits outside the turn; alice writes ``w`` into
    the object meanwhile. Must hold: the move is refused the same way whether ``w`` equals the approved bytes or
    not (the write changed the object's computation: the second pass, from a snapshot taken in the turn, asks
    the owner about the value there now), and nothing reaches the peer."""
    answers = []
    for equal in (True, False):
        srv, alice, x, d, rid = _approved(hook, "tl2-move")
        peer = sy.VirtualWorker(hook, id=f"tl2-peer-{time.monotonic_ns()}")
        srv.add_peer(peer)
        first_pass = _HangOnce(monkeypatch, importlib.import_module("veil.governance.requests").ReviewQueue,
                               "latest_for")
        reply, (wrote,) = _while_outside(
            srv, first_pass, lambda: request(srv, alice, m.MoveMessage([x.id], peer.id, [new_id()])),
            lambda: _copy_into(srv, alice, x, d, equal))
        assert type(wrote) is m.OkReply, wrote
        assert not list(peer.monitor.owner_entries()), f"moved the value written meanwhile (equal={equal})"
        answers.append(_one_line_refusal(reply))
    assert answers[0] == answers[1], answers


# --------------------------------------------------------------------------- the id freed after the release


def _restore_under(srv, alice, oid: int, value: torch.Tensor) -> list:
    """Alice deletes ``oid`` and stores ``value`` under it again."""
    return [request(srv, alice, m.DeleteMessage([oid])),
            request(srv, alice, m.ObjectMessage([m.StoredObject(oid, value)]))]


def _held(srv, oid: int):
    return next((e.obj for i, e in srv.monitor.owner_entries() if i == oid), None)


@pytest.mark.parametrize("purpose", ["get", "move"])
def test_an_object_restored_under_the_id_meanwhile_is_not_freed_by_the_release(hook, monkeypatch, purpose):
    """Alice's get(delete=True) (or move) waits for its release mark; she deletes the object and stores a new one
    under its id meanwhile. Must hold: the approved value goes (guard), and her new object is still there."""
    srv, alice, x, d, rid = _approved(hook, f"tl2-restore-{purpose}")
    mark = _HangOnce(monkeypatch, importlib.import_module("veil.governance.release"), "use_approval")
    fresh = torch.arange(4.0)
    if purpose == "get":
        send = m.GetObjectsMessage([x.id], True)
    else:
        peer = sy.VirtualWorker(hook, id=f"tl2-rpeer-{time.monotonic_ns()}")
        srv.add_peer(peer)
        send = m.MoveMessage([x.id], peer.id, [new := new_id()])
    reply, during = _while_outside(srv, mark, lambda: request(srv, alice, send),
                                   lambda: _restore_under(srv, alice, x.id, fresh))
    assert [type(r) for r in during] == [m.OkReply, m.OkReply], during
    if purpose == "get":
        assert type(reply) is m.ObjectsReply, reply
        assert torch.equal(reply.objects[0], SECRET * 3.0), "released something other than the approved value"
    else:
        assert type(reply) is m.OkReply, reply
        assert torch.equal(dict(peer.monitor.owner_entries())[new].obj, SECRET * 3.0)
    held = _held(srv, x.id)
    assert held is not None and torch.equal(held, fresh), "the release freed the object stored under its id since"


def test_a_second_get_of_one_approval_meanwhile_is_pending(hook, monkeypatch):
    """Guard: while alice's get holds the approval outside the turn, her second get of the same object (the same
    approval) does not release it again: it is answered "pending" (a fresh request), the first gets the value."""
    srv, alice, x, d, rid = _approved(hook, "tl2-twice")
    mark = _HangOnce(monkeypatch, importlib.import_module("veil.governance.release"), "use_approval")
    second: dict = {}

    def meanwhile():
        t, second_out = _in_thread(lambda: request(srv, alice, m.GetObjectsMessage([x.id], False)))
        t.join(1.0)  # (it waits for the governance lock the first holds; answered once the first is done)
        second.update(thread=t, out=second_out)
        return []

    reply, _ = _while_outside(srv, mark, lambda: request(srv, alice, m.GetObjectsMessage([x.id], False)),
                              meanwhile)
    second["thread"].join(20)
    assert type(reply) is m.ObjectsReply and torch.equal(reply.objects[0], SECRET * 3.0), reply
    again = second["out"].get("reply")
    assert type(again) is m.ErrorReply and again.error == "ReviewPendingError", second["out"]
    assert rid not in again.message


# --------------------------------------------------------------------------- a real connection


def _cmd(op: str, args: tuple, out: int) -> bytes:
    from veil.messaging.serde import serialize

    return serialize(m.CommandMessage(op, args, {}, [out], False), sender="c")


def test_a_sessions_pipelined_write_waits_for_its_get_outside_the_turn(hook, monkeypatch):
    """Guard (why the holes above need two requests of one session at once, which the worker's own request
    path can run but a connection does not): on a real connection alice pipelines ``x.copy_(w)`` (through a
    view) behind her get of ``x``, in one segment. The get leaves the turn for its release mark; the turn is
    free, but the connection's lane serves a frame only while its reader is idle. Must hold: nothing is answered
    while the get is outside; then the get has the approved value and the write comes after it."""
    import socket

    import test_redteam_lane as lane
    from veil.governance.requests import ReviewQueue
    from veil.messaging.serde import serialize

    srv, did = _worker(hook, "tl2-pipe")
    serving = serve_in_thread(srv)
    raw, mark = None, None
    try:
        raw = lane.Raw(srv, TOKENS["alice"])
        x, w, vx, vw = (new_id() for _ in range(4))
        d = m.ObjectRef(did)
        for frame in (_cmd("torch.mul", (d, 3.0), x), _cmd("torch.mul", (d, 3.0), w),
                      _cmd("Tensor.view", (m.ObjectRef(x), -1), vx), _cmd("Tensor.view", (m.ObjectRef(w), -1), vw)):
            raw.send(lane._bin(frame))
            assert type(raw.reply()) is m.OkReply
        get = serialize(m.GetObjectsMessage([x], False), sender="c")
        raw.send(lane._bin(get))
        pending = raw.reply()
        ReviewQueue(srv).approve(re.search(r"req-[0-9a-f]+", pending.message).group(0))
        mark = _HangOnce(monkeypatch, importlib.import_module("veil.governance.release"), "use_approval")
        raw.send(lane._bin(get) + lane._bin(_cmd("Tensor.copy_", (m.ObjectRef(vx), m.ObjectRef(vw)), new_id())))
        assert mark.started.wait(10)
        with pytest.raises((socket.timeout, TimeoutError)):
            raw.frame(timeout=1.0)  # (the write was not served while the get waited outside the turn)
        mark.release()
        got, wrote = raw.replies(2)
        assert type(got) is m.ObjectsReply and torch.equal(got.objects[0], SECRET * 3.0), got
        assert type(wrote) is m.OkReply, wrote
    finally:
        if mark is not None:
            mark.release()
        if raw is not None:
            raw.close()
            lane._OPEN.remove(raw)
        stop_served(srv, serving)
