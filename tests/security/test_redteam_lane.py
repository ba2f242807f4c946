"""Red team of the read-callback lane (``veil.workers.lane_connection.LaneConnection``).

A hostile scientist (or any authenticated sender of raw frames) drives an in-process worker with
hand-made websocket frames, many per TCP segment: requests answered from websockets' read callback,
handed over to the reader task (busy worker, flow control, large replies), mixed with text, ping,
pong, close and fragmented frames, protocol errors, frames pipelined with the opening handshake,
restricted roles (client, peer, a data owner's named user) and TLS. Every test checks replies
arrive in request order with torch's values, that each request ran exactly once (an in-place op
run twice shows in the value; a spy counts executions per request), that no handoff is left
behind, and that other sessions are still served. The lane's result is compared with the reader
task's (``ws.lane = None``) where the two must agree.

The two availability defects this red team found (a pipelined segment starving other sessions, pongs
buffered for a client that never reads) are fixed in LaneConnection; their tests say what they were.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time

import msgpack
import pytest
import torch
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode, apply_mask
from websockets.uri import parse_uri

import veil as sy
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers.inline_lane import INLINE_MAX_BYTES
from veil.workers.lane_connection import LaneConnection
from veil.workers.reply_frames import ONE_WRITE
from veil.workers.websocket_auth import handshake_headers
from veil.workers.websocket_server import WebsocketServerWorker
from veil.workers.websocket_transport import BlockingConnection, frame_head
from veil.messaging.serde import WIRE_VERSION

from network_helpers import HOSPITAL, OTHER, PEER, TOKEN
from worker_processes import serve_in_thread, stop_served

CLIENT = "redlane-client-token"
TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


# ------------------------------------------------------------------ servers and raw clients

def _tokens() -> sy.TokenTable:
    tokens = sy.TokenTable()
    tokens.add(TOKEN, "scientist")
    tokens.add(OTHER, "other")
    tokens.add(HOSPITAL, "hospital")  # a user the data owner names in its rules (scientist role)
    tokens.add(CLIENT, "shop", role="client")
    tokens.add(PEER, "bob", role="peer")
    return tokens


@pytest.fixture
def serve(hook):
    """``serve(**kw) -> server``: an in-process worker on loopback (served from a thread), stopped after."""
    started = []

    def start(**kw):
        server = WebsocketServerWorker(hook, id=f"redlane-{os.getpid()}-{time.monotonic_ns()}", port=0,
                                       tokens=_tokens(), **kw)
        started.append((server, serve_in_thread(server)))
        return server

    yield start
    while _OPEN:  # (a client left open would make the stop wait for its close handshake)
        _OPEN.pop().close()
    for server, thread in started:
        stop_served(server, thread)


def _frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 5.2), written by hand so anything can be put in a segment."""
    mask = os.urandom(4)
    return frame_head((0x80 if fin else 0) | opcode, len(payload), masked=True) + mask + apply_mask(payload, mask)


def _bin(payload: bytes) -> bytes:
    return _frame(BINARY, payload)


_OPEN: list = []


class Raw:
    """An authenticated connection whose socket the test writes frames to and reads frames from."""

    def __init__(self, server, token: str = TOKEN, ssl_context=None) -> None:
        scheme = "wss" if ssl_context is not None else "ws"
        before = set(server._connections)
        self.conn = BlockingConnection(f"{scheme}://127.0.0.1:{server.bound_port}", handshake_headers(token),
                                       ssl_context=ssl_context, max_size=2**30)
        self.sock = self.conn.sock
        _OPEN.append(self)
        self.buf = bytearray(self.conn._rbuf)
        self.controls: list = []  # (opcode, payload) of control frames received
        self.send(_bin(b"\xc1"))  # a malformed request: any role gets an error reply, and the session is registered
        assert type(self.reply()) is m.ErrorReply
        (sid,) = set(server._connections) - before
        self.session_id = sid
        self.ws = server._connections[sid][0]
        assert isinstance(self.ws, LaneConnection)

    def send(self, data: bytes) -> None:
        self.sock.settimeout(30)
        self.sock.sendall(data)

    def _fill(self, k: int) -> None:
        while len(self.buf) < k:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("the worker closed the connection")
            self.buf += data

    def frame(self, timeout: float = 20) -> tuple:
        self.sock.settimeout(timeout)
        self._fill(2)
        b0, b1 = self.buf[0], self.buf[1]
        n, head = b1 & 0x7F, 2
        if n == 126:
            self._fill(4)
            n, head = int.from_bytes(self.buf[2:4], "big"), 4
        elif n == 127:
            self._fill(10)
            n, head = int.from_bytes(self.buf[2:10], "big"), 10
        assert not b1 & 0x80, "a server frame must not be masked"
        self._fill(head + n)
        payload = bytes(self.buf[head: head + n])
        del self.buf[: head + n]
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def message(self, timeout: float = 20):
        """The next data message (bytes; a text one as str); a close frame as ("close", code)."""
        parts, first = [], None
        while True:
            fin, opcode, payload = self.frame(timeout)
            if opcode >= 0x8:
                self.controls.append((opcode, payload))
                if opcode == CLOSE:
                    return ("close", int.from_bytes(payload[:2], "big") if payload else None)
                continue
            if first is None:
                assert opcode in (TEXT, BINARY), f"a message starts with opcode {opcode}"
                first = opcode
            else:
                assert opcode == CONT, "the worker interleaved two messages"
            parts.append(payload)
            if fin:
                data = b"".join(parts)
                return data.decode() if first == TEXT else data

    def reply(self, timeout: float = 20):
        msg = self.message(timeout)
        return msg if type(msg) is tuple else deserialize(msg)[0]

    def replies(self, n: int, timeout: float = 20) -> list:
        return [self.reply(timeout) for _ in range(n)]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _store(oid, tensor) -> bytes:
    return serialize(m.ObjectMessage([m.StoredObject(oid, tensor)]), sender="c")


def _op(op, ids, out=None, **kwargs) -> bytes:
    """A command; ``out``: its result id, None: the result is not kept, 0: in place (aliases an input)."""
    return serialize(m.CommandMessage(op, tuple(m.ObjectRef(i) for i in ids), kwargs, [] if out is None else [out],
                                      False), sender="c")


def _get(oid) -> bytes:
    return serialize(m.GetObjectsMessage([oid], False), sender="c")


def _delete(oid) -> bytes:
    return serialize(m.DeleteMessage([oid]), sender="c")


def _spy_runs(monkeypatch) -> list:
    """Each execution of a request by the server, as ``(session id, request bytes, "inline"|"thread")``:
    a try_inline call that answered it, or a handler thread's serve_bytes. (A try_inline that declined, or
    only decoded it for the handler thread, did not run it.) Install before connecting (the lane binds
    the server's try_inline when the session starts)."""
    runs = []
    cls = WebsocketServerWorker
    inner_try, inner_serve = cls.try_inline, cls.serve_bytes

    def try_inline(self, data, session):
        out = inner_try(self, data, session)
        if out[0] is not None:
            runs.append((session.id, bytes(data), "inline"))
        return out

    def serve_bytes(self, data, session, *args, **kwargs):
        runs.append((session.id, bytes(data), "thread"))
        return inner_serve(self, data, session, *args, **kwargs)

    monkeypatch.setattr(cls, "try_inline", try_inline)
    monkeypatch.setattr(cls, "serve_bytes", serve_bytes)
    return runs


def _runs_of(runs: list, session_id: str, data: bytes) -> int:
    return sum(1 for sid, d, _ in runs if sid == session_id and d == data)


def _quiet(ws, timeout: float = 5) -> None:
    """The reader took every handoff: none is left for a later request to pick up."""
    end = time.monotonic() + timeout
    while ws.handoff is not None and time.monotonic() < end:
        time.sleep(0.01)
    assert ws.handoff is None, f"a handoff was left behind: {ws.handoff!r:.200}"


def _bystander_ok(server, value=None) -> None:
    """Another session is served, with torch's values, on the lane and through the reader."""
    x = torch.randn(6) if value is None else value
    other = Raw(server, token=OTHER)
    other.send(_bin(_store(1, x)) + _bin(_op("torch.mul", [1, 1], 2)) + _bin(_get(2)))
    replies = other.replies(3, timeout=10)
    assert replies[:2] == [m.OkReply(), m.OkReply()]
    assert torch.equal(replies[2].objects[0], x * x)
    other.close()


def _block_loop(server, seconds: float) -> None:
    """Holds the worker's event loop for ``seconds`` (returns once it is held): what a test sends meanwhile is
    read afterwards, a whole segment in one read callback, in the order the sockets became readable."""
    held = threading.Event()

    def hold() -> None:
        held.set()
        time.sleep(seconds)

    server._loop.call_soon_threadsafe(hold)
    assert held.wait(5)


# ------------------------------------------------------------------ order, exactly once, no misdelivery

def test_a_segment_mixing_every_frame_kind_is_answered_in_order_and_each_request_runs_once(serve, monkeypatch):
    server = serve()
    runs = _spy_runs(monkeypatch)
    c = Raw(server)
    x, one, big = torch.randn(7), torch.ones(7), torch.randn(INLINE_MAX_BYTES // 4 + 50)  # big: a handler thread
    add1 = _op("Tensor.add_", [1, 2], 0)  # in place: x += 1, whoever serves it
    wide = torch.randn(ONE_WRITE // 4 + 100)  # its get's reply is too large for the read callback's write
    frag = _op("Tensor.add_", [1, 2], 0)
    requests = [
        _store(1, x), _store(2, one), add1,  # x + 1
        None,  # a text frame: an error reply in its place
        _get(1),
        _store(3, big),  # the handler thread: what follows waits for it
        add1,  # x + 2 (the same bytes as an earlier request: still a request of its own)
        _store(4, wide), _get(4),  # a reply the callback cannot write: the reader sends it
        _op("Tensor.add_", [1, 2], 0, alpha=2.0),  # x + 4
        frag,  # fragmented, a ping between its fragments: x + 5
        b"\xc1\xc1",  # malformed
        _op("Tensor.sum", [3], 5), _get(5), _get(1),
    ]
    segment = []
    for r in requests:
        if r is None:
            segment.append(_frame(TEXT, b"not a request"))
        elif r is frag:
            segment += [_frame(BINARY, r[:5], fin=False), _frame(PING, b"between"), _frame(CONT, r[5:])]
        else:
            segment.append(_bin(r))
        segment.append(_frame(PONG, b"unsolicited"))  # (ignored by the worker)
    segment.insert(3, _frame(PING, b"early"))
    c.send(b"".join(segment))
    replies = c.replies(len(requests))
    ok = m.OkReply()
    assert replies[:3] == [ok] * 3
    assert type(replies[3]) is m.ErrorReply and "text frames" in replies[3].message
    assert torch.equal(replies[4].objects[0], x + 1)
    assert replies[5:8] == [ok] * 3
    assert torch.equal(replies[8].objects[0], wide)
    assert replies[9:11] == [ok, ok]
    assert type(replies[11]) is m.ErrorReply
    assert replies[12] == ok and torch.allclose(replies[13].objects[0], big.sum())
    assert torch.equal(replies[14].objects[0], x + 1 + 1 + 2 + 1)  # no in-place op ran twice or was skipped
    assert sorted(p for op, p in c.controls if op == PONG) == [b"between", b"early"]
    sent = [bytes(r) for r in requests if r is not None]
    for r in set(sent):  # (the fragmented request has add1's bytes: add1 is sent three times)
        assert _runs_of(runs, c.session_id, r) == sent.count(r), deserialize(r)[0] if r[:1] != b"\xc1" else r
    _quiet(c.ws)
    _bystander_ok(server)


def test_under_backpressure_each_reply_goes_to_its_own_request(serve, monkeypatch):
    """The client pipelines requests with ~60 KB replies (the callback writes until the transport pauses, then
    hands over), in-place ops between them, reads nothing for a while, then reads in bursts while it sends more:
    the callback and the reader take turns many times."""
    server = serve()
    runs = _spy_runs(monkeypatch)
    c = Raw(server)
    x, y = torch.randn(15_000), torch.zeros(3)
    c.send(_bin(_store(1, x)) + _bin(_store(2, y)) + _bin(_store(3, torch.ones(3))))
    assert c.replies(3) == [m.OkReply()] * 3
    rounds, waves = 150, 3  # ~9 MB of replies a wave: more than the socket buffers hold
    inc = _op("Tensor.add_", [2, 3], 0)
    segment = b"".join(_bin(_get(1)) + _bin(inc) + _bin(_get(2)) for _ in range(rounds))
    c.send(segment)
    time.sleep(0.3)  # the worker fills the socket buffers and stops
    buffered = c.ws.transport.get_write_buffer_size()
    assert buffered <= c.ws.write_limit_high + 2 * ONE_WRITE + 1024, f"{buffered} bytes held for a non-reader"
    k = 0
    for wave in range(waves):
        for i in range(rounds):
            if wave + 1 < waves and i == rounds // 2:
                c.send(segment)  # the next wave, while half of this one's replies are unread
            big, ack, small = c.replies(3)
            k += 1
            assert torch.equal(big.objects[0], x)
            assert ack == m.OkReply()
            assert torch.equal(small.objects[0], torch.full((3,), float(k)))  # each increment once, in order
            if i % 7 == 0:
                time.sleep(0.002)  # a slow reader: the transport pauses and resumes
    assert _runs_of(runs, c.session_id, inc) == rounds * waves
    _quiet(c.ws)
    _bystander_ok(server)


def test_requests_handed_over_while_the_worker_is_busy_run_once_in_order(serve, monkeypatch):
    """The worker lock is held (another session's long request): the lane declines every frame of a segment of
    identical in-place requests (the handoff's data compared by value) and the reader runs each once."""
    server = serve()
    runs = _spy_runs(monkeypatch)
    c = Raw(server)
    c.send(_bin(_store(1, torch.zeros(2))) + _bin(_store(2, torch.ones(2))))
    assert c.replies(2) == [m.OkReply()] * 2
    inc = _op("Tensor.add_", [1, 2], 0)
    n = 40
    server._turn.acquire()
    try:
        c.send(_bin(inc) * n + _bin(_get(1)))
        time.sleep(0.3)
        assert c.ws.handoff is None or c.ws.handoff[1] is None  # nothing was computed while the lock was held
    finally:
        server._turn.release()
    replies = c.replies(n + 1)
    assert replies[:n] == [m.OkReply()] * n
    assert torch.equal(replies[n].objects[0], torch.full((2,), float(n)))
    assert _runs_of(runs, c.session_id, inc) == n
    _quiet(c.ws)


def test_two_connections_pipelining_at_once_never_get_each_others_replies(serve):
    server = serve()
    a, b = Raw(server), Raw(server, token=OTHER)
    xa, xb = torch.randn(5), torch.randn(5) + 100
    rounds = 300
    segments = {}
    for conn, x in ((a, xa), (b, xb)):
        conn.send(_bin(_store(1, x)) + _bin(_store(2, torch.ones(5))))
        assert conn.replies(2) == [m.OkReply()] * 2
        segments[conn] = b"".join(_bin(_op("Tensor.add_", [1, 2], 0)) + _bin(_get(1)) for _ in range(rounds))
    results = {}

    def drive(conn, x):
        conn.send(segments[conn])
        got, expected = [], x.clone()
        for _ in range(rounds):
            ack, value = conn.replies(2)
            expected.add_(torch.ones(5))
            got.append(ack == m.OkReply() and torch.equal(value.objects[0], expected))
        results[conn] = got

    threads = [threading.Thread(target=drive, args=(conn, x)) for conn, x in ((a, xa), (b, xb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(results[a]) and all(results[b]) and len(results[a]) == len(results[b]) == rounds
    _quiet(a.ws)
    _quiet(b.ws)


def test_frames_pipelined_with_the_opening_handshake_are_answered_in_order(serve, monkeypatch):
    """Frames sent in the handshake's own segment reach the worker before the session's reader starts."""
    server = serve()
    runs = _spy_runs(monkeypatch)
    protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{server.bound_port}"), max_size=2**30)
    request = protocol.connect()
    request.headers.update(handshake_headers(TOKEN))
    protocol.send_request(request)
    x = torch.randn(4)
    requests = [_store(1, x), _store(2, torch.ones(4)), _op("Tensor.add_", [1, 2], 0), _get(1)]
    sock = socket.create_connection(("127.0.0.1", server.bound_port), timeout=20)
    try:
        sock.sendall(b"".join(protocol.data_to_send()) + b"".join(_bin(r) for r in requests))
        messages = []
        while len(messages) < len(requests):
            data = sock.recv(1 << 16)
            assert data, "the worker closed the connection"
            protocol.receive_data(data)
            messages += [e.data for e in protocol.events_received()
                         if isinstance(e, Frame) and e.opcode is Opcode.BINARY]
        replies = [deserialize(bytes(d))[0] for d in messages]
        assert replies[:3] == [m.OkReply()] * 3 and torch.equal(replies[3].objects[0], x + 1)
        assert sum(1 for _, d, _ in runs if d == requests[2]) == 1
    finally:
        sock.close()


# ------------------------------------------------------------------ closing, protocol errors, malformed input

def test_a_close_frame_in_the_segment_stops_the_requests_after_it_and_none_runs_twice(serve, monkeypatch):
    server = serve()
    runs = _spy_runs(monkeypatch)
    c = Raw(server)
    wide = torch.randn(ONE_WRITE // 4 + 100)
    c.send(_bin(_store(1, wide)) + _bin(_store(2, torch.ones(1))))
    assert c.replies(2) == [m.OkReply()] * 2
    before_close = [_op("Tensor.add_", [1, 2], 0), _get(1), _op("Tensor.mul", [1, 1], 3)]
    after_close = [_op("Tensor.add_", [1, 1], 0), _store(9, torch.zeros(1))]
    c.send(b"".join(_bin(r) for r in before_close) + _frame(CLOSE, (1000).to_bytes(2, "big"))
           + b"".join(_bin(r) for r in after_close))
    got = []
    try:
        while True:
            msg = c.message(timeout=10)
            got.append(msg)
            if type(msg) is tuple:
                break
    except EOFError:
        pass
    assert got and got[-1] == ("close", 1000)
    for data in got[:-1]:  # whatever was answered is the right answer for its request, in order
        assert not isinstance(data, str)
    for r in before_close:
        assert _runs_of(runs, c.session_id, r) <= 1
    for r in after_close:
        assert _runs_of(runs, c.session_id, r) == 0
    c.close()
    _bystander_ok(server)


@pytest.mark.parametrize("violation", ["data frame inside a fragmented message", "continuation without a start",
                                       "reserved bits", "oversized frame"])
def test_a_protocol_violation_mid_segment_never_reaches_the_lane(serve, monkeypatch, violation):
    server = serve(max_message=1 << 20)
    runs = _spy_runs(monkeypatch)
    c = Raw(server)
    x = torch.randn(3)
    inc = _op("Tensor.add_", [1, 2], 0)
    c.send(_bin(_store(1, x)) + _bin(_store(2, torch.ones(3))) + _bin(inc) + _bin(_get(1)))
    replies = c.replies(4)
    assert replies[:3] == [m.OkReply()] * 3 and torch.equal(replies[3].objects[0], x + 1)
    before, bad_request = _op("Tensor.mul", [1, 2], 5), _op("Tensor.mul", [1, 1], 7)
    after = _op("Tensor.add_", [1, 1], 0)
    if violation == "data frame inside a fragmented message":
        bad = _frame(BINARY, inc[:4], fin=False) + _frame(PING, b"p") + _bin(bad_request)
    elif violation == "continuation without a start":
        bad = _frame(CONT, bad_request)
    elif violation == "reserved bits":
        frame = bytearray(_bin(bad_request))
        frame[0] |= 0x40  # RSV1 without an extension that defines it
        bad = bytes(frame)
    else:
        bad = _bin(_store(8, torch.zeros((1 << 20) // 4 + 16)))  # over the worker's max_message
    c.send(_bin(before) + bad + _bin(after))
    # the worker fails the connection as soon as it parses the violation: the request before it in the same
    # segment may run (once: as through the reader) but its reply is not sent after the close frame
    end = c.message(timeout=10)
    assert type(end) is tuple and end[0] == "close" and end[1] in (1002, 1009)
    with pytest.raises((EOFError, OSError)):
        c.frame(timeout=10)
    assert _runs_of(runs, c.session_id, inc) == 1 and _runs_of(runs, c.session_id, before) <= 1
    assert not [d for _, d, _ in runs if d in (bad_request, after, inc[:4])]
    c.close()
    _bystander_ok(server)


def test_hostile_payloads_pipelined_get_error_replies_in_place_and_never_fail_the_lane(serve, caplog):
    server = serve()
    c = Raw(server)
    x = torch.randn(3)
    c.send(_bin(_store(1, x)))
    assert c.reply() == m.OkReply()
    rng = random.Random(1234)
    valid = _op("Tensor.add", [1, 1], 2)
    hostile = [
        b"", b"\x00", b"\xc1" * 100,
        b"\x91" * 5000 + b"\x00",  # nesting bomb
        b"\xdd\xff\xff\xff\xff",  # an array of 4G elements, no data
        b"\xc6\x7f\xff\xff\xff",  # a 2 GB bin, no data
        msgpack.packb([WIRE_VERSION, 1, "c", [], ["Tensor.add", [{"__ref__": 1}], {}, [3], False]]),
        valid[: len(valid) // 2], valid + b"\x00", bytes([valid[0] ^ 0xFF]) + valid[1:],
        serialize(m.CommandMessage("builtins.eval", ("1",), {}, [4], False), sender="c"),
        serialize(m.CommandMessage("Tensor.add", (m.ObjectRef(2**62),), {}, [5], False), sender="c"),
        serialize(m.GetObjectsMessage([-1, "x", None, 1.5], False), sender="c"),
    ] + [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))) for _ in range(200)]
    caplog.set_level(logging.ERROR, logger="veil.workers.websocket_server")
    c.send(b"".join(_bin(h) for h in hostile) + _bin(_get(1)))
    replies = c.replies(len(hostile) + 1)
    assert all(type(r) is not tuple for r in replies)  # the connection stayed open
    assert all(type(r) in (m.ErrorReply, m.OkReply) for r in replies[:-1])
    assert torch.equal(replies[-1].objects[0], x)
    assert not [r for r in caplog.records if "inline lane failed" in r.getMessage()]
    _quiet(c.ws)
    _bystander_ok(server)
