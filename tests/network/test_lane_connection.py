"""Requests served from the connection's read callback (``veil.workers.lane_connection``).

Over real sockets: requests pipelined into one segment are answered in order with torch's values
whichever path serves each (read callback, reader task, handler thread); a reply the callback cannot
write goes out through the reader without the request running twice; a failing lane leaves the
request to the reader; a client that floods requests and never reads its replies cannot make the
worker buffer them (flow control still holds) and others keep being served.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch

from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers.inline_lane import INLINE_MAX_BYTES
from veil.workers.lane_connection import LaneConnection
from veil.workers.reply_frames import ONE_WRITE
from veil.workers.websocket_auth import handshake_headers
from veil.workers.websocket_transport import BlockingConnection

from network_helpers import TOKEN, base_args, listening_server


@pytest.fixture
def listening(hook):
    """An in-process worker serving on loopback from a thread (so a test can spy on its lane)."""
    yield from listening_server(hook, "lane")


def _connect(port: int) -> BlockingConnection:
    return BlockingConnection(f"ws://127.0.0.1:{port}", handshake_headers(TOKEN), max_size=2**30)


def _store(oid, tensor) -> bytes:
    return serialize(m.ObjectMessage([m.StoredObject(oid, tensor)]), sender="c")


def _op(op, ids_in, out) -> bytes:
    return serialize(m.CommandMessage(op, tuple(m.ObjectRef(i) for i in ids_in), {}, [out], False), sender="c")


def _get(oid) -> bytes:
    return serialize(m.GetObjectsMessage([oid], False), sender="c")


def _one_segment(conn: BlockingConnection, frames: list) -> None:
    """All ``frames`` in one write: the server reads them in one callback, back to back."""
    for frame in frames:
        conn.protocol.send_binary(frame)
    conn.sock.sendall(b"".join(conn.protocol.data_to_send()))


def _reply(conn: BlockingConnection):
    return deserialize(conn.recv(20))[0]


def test_requests_pipelined_in_one_segment_are_answered_in_order_with_torch_values(listening):
    x, big = torch.randn(8, 13), torch.randn(INLINE_MAX_BYTES // 4 + 100)  # big: too large for the lane
    conn = _connect(listening.bound_port)
    frames = [_store(1, x), _op("Tensor.add", [1, 1], 2), _store(3, big), _op("Tensor.sum", [3], 4), _get(2),
              b"\xc1", _op("torch.mul", [2, 1], 5), _get(4), _get(5), _get(1)]
    _one_segment(conn, frames)
    replies = [_reply(conn) for _ in frames]
    ok = m.OkReply()
    assert replies[:4] == [ok] * 4
    assert torch.equal(replies[4].objects[0], x + x)
    assert type(replies[5]) is m.ErrorReply  # the malformed frame, answered in its place
    assert replies[6] == ok
    assert torch.allclose(replies[7].objects[0], big.sum())
    assert torch.equal(replies[8].objects[0], (x + x) * x)
    assert torch.equal(replies[9].objects[0], x)
    conn.close()


def _spy(listening, monkeypatch, fail_first: bool = False) -> list:
    """Records what each try_inline call of the server returned; ``fail_first``: the first raises."""
    calls = []
    inner = type(listening).try_inline

    def spy(self, data, session):
        if fail_first and not calls:
            calls.append("raised")
            raise RuntimeError("a defect in the lane")
        out = inner(self, data, session)
        calls.append("reply" if out[0] is not None else "declined")
        return out

    monkeypatch.setattr(type(listening), "try_inline", spy)
    return calls


def test_a_reply_the_callback_cannot_write_goes_out_through_the_reader_and_nothing_runs_twice(listening, monkeypatch):
    x = torch.randn(ONE_WRITE // 4 + 1000)  # its reply is larger than one write
    calls = _spy(listening, monkeypatch)  # (before connecting: the connection's lane is bound then)
    conn = _connect(listening.bound_port)
    conn.send(_store(1, x))
    assert _reply(conn) == m.OkReply()
    conn.send(_op("Tensor.add_", [1, 1], 2))  # in place: run twice, it would be x * 4
    assert _reply(conn) == m.OkReply()
    conn.send(_get(1))
    assert torch.equal(_reply(conn).objects[0], x + x)
    assert calls == ["reply"] * 3  # each request once, all by the lane (the get's reply sent by the reader)
    conn.close()


def test_a_failing_lane_answers_with_an_error_and_the_worker_keeps_serving(listening, monkeypatch):
    x = torch.randn(5)
    calls = _spy(listening, monkeypatch, fail_first=True)
    conn = _connect(listening.bound_port)
    conn.send(_store(1, x))
    failed = _reply(conn)  # (not handed to the reader: had it failed after running, it would run twice)
    assert type(failed) is m.ErrorReply and "defect in the lane" in failed.message
    conn.send(_store(1, x))
    assert _reply(conn) == m.OkReply()
    conn.send(_op("Tensor.add_", [1, 1], 2))
    assert _reply(conn) == m.OkReply()
    conn.send(_get(1))
    assert torch.equal(_reply(conn).objects[0], x + x)
    assert calls == ["raised"] + ["reply"] * 3
    conn.close()


def test_connections_are_lane_connections(listening):
    conn = _connect(listening.bound_port)
    conn.send(_store(1, torch.ones(2)))
    assert _reply(conn) == m.OkReply()
    (ws,) = (entry[0] for entry in listening._connections.values())
    assert isinstance(ws, LaneConnection) and ws.lane is not None
    conn.close()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_never_reads_its_replies_cannot_make_the_worker_buffer_them(spawn, connect):
    wp = spawn("alice", base_args())
    bystander = connect(wp)
    q = torch.arange(4.0).send(bystander)
    flood = _connect(wp.port)
    flood.send(_store(1, torch.randn(15_000)))  # 60 KB: each reply is one write of the read callback
    assert _reply(flood) == m.OkReply()
    before = _rss_mb(wp.pid)
    n = 3000  # ~180 MB of replies if the worker kept them
    for _ in range(n):
        flood.protocol.send_binary(_get(1))
    flood.sock.settimeout(3)
    try:
        flood.sock.sendall(b"".join(flood.protocol.data_to_send()))
    except (socket.timeout, TimeoutError):
        pass  # the worker stopped reading: what it has not answered stays in the socket buffers
    time.sleep(1)
    grown = _rss_mb(wp.pid) - before
    assert grown < 60, f"the worker buffered {grown:.0f} MB of replies"
    assert torch.equal((q + 1).get(), torch.arange(4.0) + 1)  # others are served meanwhile
    flood.sock.close()
    assert torch.equal((q * 2).get(), torch.arange(4.0) * 2)
