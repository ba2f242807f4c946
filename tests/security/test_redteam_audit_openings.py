"""Red team on the allowed rows of SMPC openings and moves (veil/workers/leaving_rows.py, audit_writer.py,
inline_lane.py, peer_openings.py, handlers.py ``_handle_move``, mpc_glue/runtime.py ``_handle_open``): an honest
session's opening starved by another session flooding refusals. Each hole was a strict xfail on the code before its
fix (checked by running this file on that code):

- a star opening sent to a handler thread undecoded (the lane found the turn held) took the turn, then its allowed
  row waited there for the queued refusal rows: every session's command held while the writer caught up. Must
  hold: it never waits for the writer in the turn; another session is served meanwhile; its reply goes once its
  row is on record, after the refusal handed before it;
- an inline opening went to a handler thread whenever a refusal row was queued (and its row was a database write on
  the event loop otherwise). Must hold: the lane serves it, queues its row, and the connection's reply waits;
- a peer opening publishes its outputs to the other parties before its reply, and a move sends its objects before
  its reply: their rows waited for the whole queue in the turn. Must hold: the row is on record before anything
  is published or sent, waited for with the turn handed over (another session served meanwhile);
- guard: a peer opening whose allowed row is not written publishes nothing (one error line).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.mpc.party import OpenMessage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, quota_worker, request, send_tensor  # noqa: E402
from test_redteam_audit_turns import _rows, _watch_waits  # noqa: E402
from test_redteam_turn_lookup import _HangOnce  # noqa: E402


def _ring(*values):
    return torch.tensor(values, dtype=torch.int64)


def _opening_worker(hook, prefix: str):
    srv = quota_worker(hook, f"{prefix}-{new_id()}", f"{prefix}-scientist", None)
    honest, other = open_session(srv, f"{prefix}-scientist"), open_session(srv, f"{prefix}-scientist")
    ids = [send_tensor(srv, honest, t) for t in (_ring(10, 20), _ring(7, 9), _ring(3, 4), _ring(1, 2))]
    mine = send_tensor(srv, other, torch.tensor([1.0, 2.0]))
    assert srv.audit_rows.wait(10)
    return srv, honest, other, ids, mine


def _opening(ids) -> bytes:
    return serialize(OpenMessage("beaver_mask", tuple(m.ObjectRef(i) for i in ids), {}), sender="client")


def _flood_row(srv, monkeypatch):
    """One refusal row of another session, whose write stalls until released."""
    hang = _HangOnce(monkeypatch, srv.db, "audit", when=lambda *a, **k: a[5] == "refused")
    flood = threading.Thread(target=srv.refused_requests.refused, args=("compute", "mallory", "s-m", [1], "a probe"))
    flood.start()
    flood.join(10)
    assert hang.started.wait(10)
    return hang


def _served_meanwhile(srv, other, mine) -> None:
    served = request(srv, other, m.CommandMessage("torch.mul", (m.ObjectRef(mine), 2.0), {}, [new_id()], False))
    assert type(served) is m.OkReply, served


def test_an_undecoded_opening_does_not_wait_for_queued_rows_in_the_turn(hook, monkeypatch):
    """Attack: a hostile session's refusal row stalls in the writer; an honest star opening reaches a handler thread
    undecoded and its allowed row waited for the queue in the turn. Must hold: no wait in the turn, another session
    is served meanwhile, the reply (x - a, y - b as torch computes them) goes once its row is on record, after the
    refusal handed before it."""
    srv, honest, other, ids, mine = _opening_worker(hook, "ao-undecoded")
    hang = _flood_row(srv, monkeypatch)
    waits, waiting = _watch_waits(monkeypatch, srv, "ao-opener")
    out: dict = {}

    def opener():
        out["reply"] = deserialize(srv.serve_bytes(_opening(ids), honest))[0]
        out["allowed_then"] = len(_rows(srv, "allowed"))

    t = threading.Thread(target=opener, name="ao-opener")
    try:
        before = len(_rows(srv, "allowed"))
        t.start()
        assert waiting.wait(10)
        assert not srv._turn._held, "the opening waited for the row writer holding the turn"
        _served_meanwhile(srv, other, mine)
        assert "reply" not in out, "the opening was answered before its allowed row was on record"
    finally:
        hang.release()
    t.join(20)
    assert not any(waits), f"the opening waited for the row writer holding the turn: {waits}"
    e, f = out["reply"].objects
    assert torch.equal(e, _ring(10, 20) - _ring(3, 4)) and torch.equal(f, _ring(7, 9) - _ring(1, 2))
    assert out["allowed_then"] == before + 1
    opened = [r for r in _rows(srv, "allowed") if r[1] == "open"]
    assert len(opened) == 1 and _rows(srv, "refused")[0][0] < opened[0][0], "the log lost its order"


def test_an_inline_opening_is_served_by_the_lane_while_rows_are_queued(hook, monkeypatch):
    """Attack: with one refusal row queued an opening always took a handler thread (its row would be written on the
    event loop after the queue). Must hold: the lane serves it and queues its row; the connection's reply, awaited
    off the loop, carries the opened values once the row is on record."""
    from veil.workers.loop_rows import AfterRows, released

    srv, honest, _, ids, _ = _opening_worker(hook, "ao-inline")
    hang = _flood_row(srv, monkeypatch)
    try:
        out: dict = {}
        lane = threading.Thread(target=lambda: out.update(r=srv.lane_request(_opening(ids), honest)), name="ao-loop")
        lane.start()
        lane.join(10)
        reply, decoded = out["r"]
        assert decoded is None and type(reply) is AfterRows, "the lane handed the opening to a handler thread"
    finally:
        hang.release()
    e, f = deserialize(asyncio.run(released(srv.audit_rows, reply)))[0].objects
    assert torch.equal(e, _ring(7, 16)) and torch.equal(f, _ring(6, 7))
    assert [r[1] for r in _rows(srv, "allowed")].count("open") == 1


def _peer_open(ids):
    from veil.workers.peer_openings import PeerOpenMessage

    return PeerOpenMessage("beaver_mask", tuple(m.ObjectRef(i) for i in ids), {}, str(new_id()).rjust(16, "0"),
                           ["ao-self", "ao-peer"], [new_id(), new_id()])


def _with_peer(monkeypatch, srv) -> None:
    """A peer link the round would publish to (never reached: the publish is stopped, nothing is posted)."""
    monkeypatch.setattr(srv, "id", "ao-self")
    monkeypatch.setitem(srv.peers, "ao-peer", object())


class _Published(Exception):
    pass


def _watch_publish(monkeypatch, srv, seen: list):
    """Records, at a peer opening's publish, whether its allowed row was on record; then stops the round there."""
    from veil.workers.peer_rounds import PeerRounds

    def publish(self, rnd, outputs):
        seen.append(any(r[1] == "open" for r in _rows(srv, "allowed")))
        raise _Published("stopped at the publish")

    monkeypatch.setattr(PeerRounds, "publish", publish)


def test_a_peer_opening_publishes_only_once_its_row_is_on_record_off_the_turn(hook, monkeypatch):
    """Attack: a peer opening's outputs leave to the other parties before its reply; its allowed row waited for the
    flood's queue in the turn. Must hold: it waits with the turn handed over (another session is served meanwhile)
    and publishes only once its row is on record."""
    srv, honest, other, ids, mine = _opening_worker(hook, "ao-peer")
    seen: list = []
    _with_peer(monkeypatch, srv)
    _watch_publish(monkeypatch, srv, seen)
    hang = _flood_row(srv, monkeypatch)
    waits, waiting = _watch_waits(monkeypatch, srv, "ao-peer-opener")
    out: dict = {}
    data = serialize(_peer_open(ids), sender="client")
    t = threading.Thread(target=lambda: out.update(r=deserialize(srv.serve_bytes(data, honest))[0]),
                         name="ao-peer-opener")
    try:
        t.start()
        assert waiting.wait(10)
        assert not srv._turn._held, "the peer opening waited for the row writer holding the turn"
        _served_meanwhile(srv, other, mine)
        assert not seen, "published before its allowed row was on record"
    finally:
        hang.release()
    t.join(20)
    assert not any(waits), f"the peer opening waited for the row writer holding the turn: {waits}"
    assert seen == [True], (seen, out)
    assert type(out["r"]) is m.ErrorReply and "stopped at the publish" in out["r"].message, out


def test_a_peer_opening_whose_row_fails_publishes_nothing(hook, monkeypatch):
    """Guard. Attack: the owner's database refuses the allowed row (a full disk), hoping the outputs go to the
    peers unlogged. Must hold: nothing is published, one error line, the worker serves the next request."""
    from test_redteam_audit_turns import _failing_allowed

    srv, honest, other, ids, mine = _opening_worker(hook, "ao-peer-fail")
    seen: list = []
    _with_peer(monkeypatch, srv)
    _watch_publish(monkeypatch, srv, seen)
    _failing_allowed(monkeypatch, srv)
    got = request(srv, honest, _peer_open(ids))
    assert not seen, "a peer opening published outputs whose allowed row was not written"
    assert type(got) is m.ErrorReply and "\n" not in got.message, got
    _served_meanwhile(srv, other, mine)


def test_a_move_sends_only_once_its_rows_are_on_record_off_the_turn(hook, monkeypatch):
    """Attack: a move's objects leave to the destination before its reply; its allowed row waited for the flood's
    queue in the turn. Must hold: it waits with the turn handed over (another session is served meanwhile), sends
    only once its row is on record, the tensor it sends is the stored one, and it is no longer held here."""
    srv, honest, other, ids, mine = _opening_worker(hook, "ao-move")
    monkeypatch.setitem(srv.peers, "ao-dest", object())
    sent: list = []

    def send_msg(msg, location):
        sent.append(([r[1] for r in _rows(srv, "allowed")].count("move"), msg.objects[0].obj.clone()))
        return m.OkReply()

    monkeypatch.setattr(srv, "send_msg", send_msg)
    hang = _flood_row(srv, monkeypatch)
    waits, waiting = _watch_waits(monkeypatch, srv, "ao-mover")
    out: dict = {}
    data = serialize(m.MoveMessage([ids[0]], "ao-dest", [new_id()]), sender="client")
    t = threading.Thread(target=lambda: out.update(r=deserialize(srv.serve_bytes(data, honest))[0]), name="ao-mover")
    try:
        t.start()
        assert waiting.wait(10)
        assert not srv._turn._held, "the move waited for the row writer holding the turn"
        _served_meanwhile(srv, other, mine)
        assert not sent, "sent before its allowed row was on record"
    finally:
        hang.release()
    t.join(20)
    assert not any(waits), f"the move waited for the row writer holding the turn: {waits}"
    assert type(out["r"]) is m.OkReply, out
    assert len(sent) == 1 and sent[0][0] == 1 and torch.equal(sent[0][1], _ring(10, 20)), sent
    gone = request(srv, honest, m.GetObjectsMessage([ids[0]], False))
    assert type(gone) is m.ErrorReply, gone


def test_a_second_move_of_an_object_in_flight_is_refused(hook, monkeypatch):
    """Guard. Attack: while a move waits (turn handed over) for its row, a second request of the session moves the
    same object, hoping it leaves twice (a dealt mask moved twice opens twice). Must hold: the second is refused
    in one line, the object is sent once."""
    srv, honest, other, ids, mine = _opening_worker(hook, "ao-twice")
    monkeypatch.setitem(srv.peers, "ao-dest", object())
    sent: list = []
    monkeypatch.setattr(srv, "send_msg", lambda msg, location: sent.append(msg) or m.OkReply())
    hang = _flood_row(srv, monkeypatch)
    _, waiting = _watch_waits(monkeypatch, srv, "ao-first-mover")
    out: dict = {}
    data = serialize(m.MoveMessage([ids[0]], "ao-dest", [new_id()]), sender="client")
    t = threading.Thread(target=lambda: out.update(r=deserialize(srv.serve_bytes(data, honest))[0]),
                         name="ao-first-mover")
    try:
        t.start()
        assert waiting.wait(10)
        # (its reply waits, off the turn, for its own rows, behind the stalled one: answered once that is released)
        data2 = serialize(m.MoveMessage([ids[0]], "ao-dest", [new_id()]), sender="client")
        t2 = threading.Thread(target=lambda: out.update(second=deserialize(srv.serve_bytes(data2, honest))[0]))
        t2.start()
        t2.join(0.5)
        assert not sent, "sent before its allowed row was on record"
    finally:
        hang.release()
    t.join(20)
    t2.join(20)
    second = out["second"]
    assert type(out["r"]) is m.OkReply, out
    assert type(second) is m.ErrorReply and "\n" not in second.message, second
    assert len(sent) == 1, sent


def test_a_release_filing_does_not_wait_for_queued_rows_in_the_turn(hook, monkeypatch):
    """Attack: a release request's filing (a governance message: its object resolved as a get's, one allowed row)
    reached a handler thread while a flood's refusal row stalled; the row waited for the queue in the turn. Must
    hold: no wait in the turn, another session served meanwhile, the reply goes once its row is on record."""
    from veil.governance.wire import RequestReleaseMessage

    srv, honest, other, ids, mine = _opening_worker(hook, "ao-filing")
    hang = _flood_row(srv, monkeypatch)
    waits, waiting = _watch_waits(monkeypatch, srv, "ao-filer")
    out: dict = {}
    data = serialize(RequestReleaseMessage(ids[0], "column means"), sender="client")

    def filer():
        out["r"] = deserialize(srv.serve_bytes(data, honest))[0]
        out["allowed_then"] = [r[1] for r in _rows(srv, "allowed")].count("get")

    t = threading.Thread(target=filer, name="ao-filer")
    try:
        t.start()
        assert waiting.wait(10)
        assert not srv._turn._held, "the filing waited for the row writer holding the turn"
        _served_meanwhile(srv, other, mine)
        assert "r" not in out, "answered before its allowed row was on record"
    finally:
        hang.release()
    t.join(20)
    assert not any(waits), f"the filing waited for the row writer holding the turn: {waits}"
    assert out["r"].objects[0]["state"] == "not needed" and out["allowed_then"] == 1, out
