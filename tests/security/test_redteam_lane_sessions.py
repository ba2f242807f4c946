"""Red team of the read-callback lane (``veil.workers.lane_connection.LaneConnection``), second file: the
monitor, roles and sessions through the lane, flow control and memory, TLS, fairness (the first file,
test_redteam_lane.py, holds the raw-frame helpers, order, exactly-once delivery and protocol errors)."""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
import time

import pytest
import torch

from veil.messaging import messages as m
from veil.messaging.serde import serialize
from veil.workers.peer_openings import PeerFetchMessage
from veil.workers.reply_frames import ONE_WRITE
from veil.workers.websocket_server import WebsocketServerWorker

from network_helpers import HOSPITAL, OTHER, PEER, TOKEN, self_signed_cert
from test_redteam_lane import (  # the raw-frame helpers; serve: a fixture
    CLIENT, TEXT, BINARY, CONT, CLOSE, PING, Raw, _bin, _block_loop, _bystander_ok, _delete, _frame, _get, _op,
    _quiet, _runs_of, _spy_runs, _store, serve)


# ------------------------------------------------------------------ the monitor, roles and sessions

def _role_segment(private_id: int) -> list:
    return [
        _store(1, torch.ones(3)), _op("torch.add", [1, 1], 2), _get(2), _get(private_id),
        _op("Tensor.neg", [private_id], 3), _get(3), _op("Tensor.add_", [private_id, private_id], 0),
        _delete(private_id), _get(private_id), serialize(m.ListObjectsMessage(), sender="c"),
        serialize(PeerFetchMessage(round="r" * 16, name="x"), sender="c"), _get(1),
    ]


def _summary(reply):
    if type(reply) is m.ErrorReply:
        return ("error", reply.error)
    if type(reply) is m.ObjectsReply:
        return ("objects", tuple(o.tolist() if torch.is_tensor(o) else repr(o) for o in reply.objects))
    return (type(reply).__name__,)


@pytest.mark.parametrize("token", [TOKEN, HOSPITAL, CLIENT, PEER], ids=["scientist", "named user", "client", "peer"])
def test_each_role_gets_the_same_answers_and_refusals_through_the_lane_as_through_the_reader(serve, token):
    server = serve()
    server.refused_requests.burst = 10**6  # one row per refusal and session, compared (refusal_rows.py)
    secret = torch.tensor([3.25, -7.5, 11.0])
    private = server.load(secret.clone(), private=True, allowed_users=("hospital",))
    answers, refusals = {}, {}
    for path in ("lane", "reader"):
        c = Raw(server, token=token)
        if path == "reader":
            c.ws.lane = None
        segment = _role_segment(private)
        c.send(b"".join(_bin(r) for r in segment))
        replies = c.replies(len(segment), timeout=20)
        answers[path] = [_summary(r) for r in replies]
        refusals[path] = sorted(r["action"] for r in server.db.audit_entries()
                                if r["outcome"] == "refused" and r["session"] == c.session_id)
        for r in replies:  # the private value itself never leaves, except to the user it is released to (results
            if type(r) is m.ObjectsReply and token != HOSPITAL:  # computed from it are the requester's: a known limit)
                for o in r.objects:
                    assert not (torch.is_tensor(o) and o.shape == secret.shape and torch.equal(o, secret))
            if type(r) is m.ErrorReply:
                assert "3.25" not in r.message and "11.0" not in r.message
        c.close()
    assert answers["lane"] == answers["reader"]
    assert refusals["lane"] == refusals["reader"]  # each refused request refused (and audited) once
    assert torch.equal(server.monitor.owner_objects()[private], secret)  # never written, never deleted
    summary = answers["lane"]
    if token in (CLIENT, PEER):
        assert summary[1][0] == "error" and summary[1][1] == "PermissionDeniedError"  # no torch op
        assert summary[3] == ("error", "PermissionDeniedError") or summary[3][1] == "ObjectNotFoundError"
    if token == HOSPITAL:
        assert summary[3] == ("objects", (secret.tolist(),))
    if token == TOKEN:
        assert summary[3][0] == "error"


def test_another_sessions_objects_stay_out_of_reach_of_pipelined_requests(serve):
    server = serve()
    owner = Raw(server)
    secret = torch.randn(4)
    owner.send(_bin(_store(7, secret)))
    assert owner.reply() == m.OkReply()
    thief = Raw(server, token=OTHER)
    thief.send(b"".join(_bin(r) for r in [
        _get(7), _op("Tensor.add_", [7, 7], 0), _op("Tensor.neg", [7], 8), _delete(7), _store(7, torch.zeros(4)),
        _op("Tensor.add_", [7, 7], 0), _get(7),
    ]))
    replies = thief.replies(7)
    assert type(replies[0]) is m.ErrorReply and type(replies[1]) is m.ErrorReply and type(replies[2]) is m.ErrorReply
    assert torch.equal(replies[-1].objects[0], torch.zeros(4))  # its own fresh id 7
    owner.send(_bin(_get(7)))
    assert torch.equal(owner.reply().objects[0], secret)


def test_a_peer_fetch_parked_by_the_reader_keeps_the_requests_behind_it_waiting(serve, monkeypatch):
    """A peer's fetch for a round not published waits (~0.25 s) in the reader; the frames after it in the same
    segment must not be answered by the read callback meanwhile (their replies would come first)."""
    server = serve()
    runs = _spy_runs(monkeypatch)
    peer = Raw(server, token=PEER)
    fetch = serialize(PeerFetchMessage(round="a" * 16, name="x"), sender="c")
    segment = [fetch, _get(1), _store(1, torch.ones(2)), fetch, _op("torch.add", [1, 1], 2), _get(1)]
    peer.send(b"".join(_bin(r) for r in segment))
    replies = [_summary(r) for r in peer.replies(len(segment))]
    assert replies[0] == ("OkReply",) and replies[1][0] == "error" and replies[2] == ("OkReply",)
    assert replies[3] == ("OkReply",) and replies[4] == ("error", "PermissionDeniedError")
    assert replies[5][0] == "error"  # a peer hands objects over; it does not read them
    assert _runs_of(runs, peer.session_id, segment[4]) == 1
    _quiet(peer.ws)
    _bystander_ok(server)


@pytest.mark.parametrize("slow", ["plain requests", "plain requests and openings"])
def test_a_session_sent_to_handler_threads_runs_each_pipelined_request_once(serve, monkeypatch, slow):
    """A session past its inline CPU budget: the callback only decodes its requests (or declines them) and the
    handler thread runs each with what was decoded, once, in order."""
    server = serve()
    runs = _spy_runs(monkeypatch)
    c = Raw(server)
    x = torch.randn(4)
    c.send(_bin(_store(1, x)) + _bin(_store(2, torch.ones(4))))
    assert c.replies(2) == [m.OkReply()] * 2
    server._slow_sessions.add(c.session_id)  # (what INLINE_STRIKES over-budget requests lead to)
    if slow.endswith("openings"):
        server._slow_protocol.add(c.session_id)
    inc = _op("Tensor.add_", [1, 2], 0)
    n = 30
    c.send((_bin(inc) + _frame(PING, b"s")) * n + _bin(_get(1)) + _bin(_delete(2)) + _bin(inc))
    replies = c.replies(n + 3)
    expected = x.clone()
    for _ in range(n):
        expected.add_(torch.ones(4))
    assert replies[:n] == [m.OkReply()] * n and torch.equal(replies[n].objects[0], expected)
    assert replies[n + 1] == m.OkReply() and type(replies[n + 2]) is m.ErrorReply  # 2 was deleted before it
    assert _runs_of(runs, c.session_id, inc) == n + 1  # (the last request has inc's bytes: it ran, and failed)
    assert all(how == "thread" for sid, d, how in runs if sid == c.session_id and d == inc)
    _quiet(c.ws)


def test_after_the_owner_closes_a_session_no_reply_follows_the_close_frame(serve):
    """The owner disconnects a session while it keeps pipelining: requests still read during the closing
    handshake may run (as through the reader), but nothing is written after the close frame."""
    server = serve()
    c = Raw(server)
    c.send(_bin(_store(1, torch.ones(2))))
    assert c.reply() == m.OkReply()
    ws = c.ws
    closer = threading.Thread(target=server.disconnect, args=(c.session_id,))
    segment = _bin(_get(1)) * 200
    c.send(segment)
    closer.start()
    try:
        for _ in range(30):
            c.send(segment)
            time.sleep(0.005)
    except OSError:
        pass
    frames = []
    while True:
        fin, opcode, payload = c.frame(timeout=10)
        frames.append(opcode)
        if opcode == CLOSE:
            assert int.from_bytes(payload[:2], "big") == 4000
            break
    c.send(_frame(CLOSE, (1000).to_bytes(2, "big")))
    trailing = []
    try:
        while True:
            trailing.append(c.frame(timeout=5)[1])
    except (EOFError, OSError):
        pass
    assert not [op for op in trailing if op in (BINARY, TEXT, CONT)], "data frames after the close frame"
    assert all(op == BINARY for op in frames[:-1])
    closer.join(10)
    end = time.monotonic() + 5
    while ws.lane is not None and time.monotonic() < end:
        time.sleep(0.01)
    assert ws.lane is None  # the session's lane is gone with its reader
    _bystander_ok(server)


# ------------------------------------------------------------------ flow control and memory

@pytest.mark.parametrize("kind", ["binary frames (read callback)", "binary and text frames (reader)"])
def test_a_client_that_never_reads_small_replies_is_stopped_by_flow_control(serve, kind):
    """Tiny requests with ~4 KB replies (each one the callback writes at once while the transport is not
    paused), never read: the worker stops writing, then reading; what it holds stays bounded."""
    server = serve()
    c = Raw(server)
    c.send(_bin(_store(1, torch.randn(1000))))
    assert c.reply() == m.OkReply()
    text = _frame(TEXT, b"t") if kind.startswith("binary and text") else b""
    segment = (_bin(_get(1)) + _bin(b"\xc1") + text) * 4000  # ~100 KB of requests, ~16 MB of replies
    c.sock.settimeout(3)
    try:
        for _ in range(4):
            c.sock.sendall(segment)
    except (socket.timeout, TimeoutError):
        pass  # the worker stopped reading this client
    ws, end = c.ws, time.monotonic() + 15
    while not (ws.paused and ws.recv_messages.paused) and time.monotonic() < end:
        time.sleep(0.05)
    assert ws.paused and ws.recv_messages.paused, "the worker kept reading a client that reads nothing"
    time.sleep(0.2)
    assert ws.transport.get_write_buffer_size() <= ws.write_limit_high + 2 * ONE_WRITE
    assert len(ws.recv_messages.frames) < 20_000  # at most what one read held
    _bystander_ok(server)
    c.close()
    _bystander_ok(server)


def test_a_client_that_sends_pings_and_never_reads_cannot_make_the_worker_buffer_pongs(serve):
    """websockets answers every ping with a pong whatever the write buffer holds, and pings never enter the
    queue whose backlog pauses reading: before LaneConnection paused reading while its writes are paused,
    12.6 MB of pings left 11.4 MiB of pongs in the worker."""
    server = serve()
    c = Raw(server)
    # small socket buffers on both sides: what the worker holds is in its transport, where it can be seen
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    c.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    segment = _frame(PING, b"p" * 125) * 2000  # 262 KB
    c.sock.settimeout(3)
    try:
        for _ in range(48):  # 12.6 MB of pings
            c.sock.sendall(segment)
    except (socket.timeout, TimeoutError):
        pass  # (the worker stopped reading: what the fix would do)
    held, end = 0, time.monotonic() + 5
    while held <= 4 << 20 and time.monotonic() < end:
        time.sleep(0.05)
        held = c.ws.transport.get_write_buffer_size()
    _bystander_ok(server)
    assert held <= 4 << 20, f"the worker holds {held / 2**20:.0f} MiB of pongs for a client that reads nothing"


# ------------------------------------------------------------------ TLS

@pytest.fixture
def tls(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = self_signed_cert(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(cert), str(key))
    return server_ctx, ssl.create_default_context(cafile=str(cert))


def test_over_tls_pipelined_requests_are_answered_in_order_and_a_non_reader_is_stopped(serve, tls, monkeypatch):
    server_ctx, client_ctx = tls
    server = serve(ssl_context=server_ctx)
    runs = _spy_runs(monkeypatch)
    c = Raw(server, ssl_context=client_ctx)
    x, wide = torch.randn(9), torch.randn(ONE_WRITE // 4 + 10)
    inc = _op("Tensor.add_", [1, 2], 0)
    requests = [_store(1, x), _store(2, torch.ones(9)), inc, _store(3, wide), _get(3), inc, b"\xc1", _get(1)]
    segment = b"".join(_bin(r) for r in requests[:4]) + _frame(PING, b"tls") + _frame(TEXT, b"t") \
        + b"".join(_bin(r) for r in requests[4:])
    c.send(segment)
    replies = c.replies(len(requests) + 1)
    assert replies[:4] == [m.OkReply()] * 4 and type(replies[4]) is m.ErrorReply
    assert torch.equal(replies[5].objects[0], wide) and replies[6] == m.OkReply() and type(replies[7]) is m.ErrorReply
    assert torch.equal(replies[8].objects[0], x + 1 + 1)
    assert _runs_of(runs, c.session_id, inc) == 2
    # a non-reader over TLS: replies of ~60 KB each, nothing read
    flood = _bin(_get(3)) * 200
    c.sock.settimeout(3)
    try:
        for _ in range(10):
            c.sock.sendall(flood)
    except (socket.timeout, TimeoutError, ssl.SSLError):
        pass
    time.sleep(0.5)
    held = c.ws.transport.get_write_buffer_size()
    assert held <= c.ws.write_limit_high + 4 * ONE_WRITE + (256 << 10), f"{held} bytes held over TLS"
    other = Raw(server, token=OTHER, ssl_context=client_ctx)
    other.send(_bin(_store(1, x)) + _bin(_op("torch.mul", [1, 1], 2)) + _bin(_get(2)))
    assert torch.equal(other.replies(3, timeout=10)[2].objects[0], x * x)
    c.close()
    other.close()


# ------------------------------------------------------------------ fairness

@pytest.mark.parametrize("path", ["read callback", "reader task"])
def test_a_pipelined_segment_does_not_keep_another_session_waiting_behind_all_of_it(serve, monkeypatch, path):
    """Before LANE_BURST and the reader's yield between queued requests, one read's frames (up to 256 KiB of
    them) were all served before any other connection's callback ran, on both paths: one client delayed
    every other session by seconds (7 s for 3,846 requests of ~2 ms each)."""
    server = serve()
    order = []
    inner = WebsocketServerWorker.try_inline

    def spy(self, data, session):
        order.append(session.id)
        return inner(self, data, session)

    monkeypatch.setattr(WebsocketServerWorker, "try_inline", spy)
    attacker, bystander = Raw(server), Raw(server, token=OTHER)
    x = torch.randn(3)
    attacker.send(_bin(_store(1, torch.ones(3))))
    bystander.send(_bin(_store(1, x)))
    assert attacker.reply() == bystander.reply() == m.OkReply()
    if path == "reader task":  # as before the change: every connection served by its reader task
        attacker.ws.lane = bystander.ws.lane = None
    n = 3000
    segment = _bin(_op("torch.add", [1, 1])) * n  # cheap requests, 8-byte replies (no flow control involved)
    _block_loop(server, 0.5)  # both arrive while the loop is held: the attacker's segment first, then one request
    del order[:]
    attacker.send(segment)
    time.sleep(0.05)
    started = time.perf_counter()
    bystander.send(_bin(_get(1)))
    answer = bystander.reply(timeout=60)
    waited = time.perf_counter() - started
    assert torch.equal(answer.objects[0], x)
    assert attacker.replies(n, timeout=60) == [m.OkReply()] * n
    ahead = order.index(bystander.session_id)
    assert ahead < n // 2, (f"{path}: the other session's request was served after {ahead} of the {n} pipelined "
                            f"requests ({waited:.2f} s)")
