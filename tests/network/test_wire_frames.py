"""The fast wire over real workers: framed tensors, directly framed large sends, the inline path.

Large tensors of every dtype cross in both directions (client-framed sends >= 64 KiB,
out-of-band frames both ways), hostile frames from a raw connection get error
replies while the worker keeps serving, and only short requests take the server's
inline fast path.
"""

import msgpack
import pytest
import torch

from veil.messaging import messages as m
from veil.messaging.serde import DTYPES, EXT_CODES, FRAME_MAGIC, deserialize, serialize
from veil.workers.websocket_auth import authenticate, handshake_headers
from veil.workers.inline_lane import INLINE_BUDGET_SECONDS, INLINE_MAX_COMMANDS, _inline_ok
from veil.workers.websocket_transport import BlockingConnection
from veil.messaging.serde import WIRE_VERSION

from network_helpers import TOKEN, base_args, in_process_server, self_signed_cert


def _sample(name: str, n: int) -> torch.Tensor:
    dtype = DTYPES[name]
    if dtype == torch.bool:
        return torch.arange(n) % 3 == 0
    if dtype.is_complex:
        return torch.randn(n, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(n).to(dtype)
    return (torch.arange(n) % 100 - 50).to(dtype) if dtype != torch.uint8 else (torch.arange(n) % 256).to(dtype)


def test_large_and_small_tensors_of_every_dtype_cross_both_ways(plain_worker, connect):
    wp = plain_worker
    alice = connect(wp)
    for name in sorted(DTYPES):
        for n in (3, 70_000):  # inline-sized, and past the client's direct framing threshold
            t = _sample(name, n).reshape(-1, 1) if n > 3 else _sample(name, n)
            back = t.send(alice).get()
            assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t), (name, n)
    p = torch.nn.Parameter(torch.randn(300, 300)).send(alice)  # computed on the worker, fetched: a framed reply
    assert torch.allclose((p * 2).get(), p.get() * 2)


def test_hostile_frames_get_error_replies_and_the_worker_serves(plain_worker, connect):
    wp = plain_worker
    conn = BlockingConnection(f"ws://127.0.0.1:{wp.port}", handshake_headers(TOKEN))
    good = serialize(m.ObjectMessage([m.StoredObject(77, torch.arange(4.0))]), sender="me")
    assert good[:1] == FRAME_MAGIC
    header = msgpack.packb([WIRE_VERSION, m.ObjectsReply.TYPE, "x", [],
                            [msgpack.ExtType(EXT_CODES.TENSOR_OOB, msgpack.packb(["float32", [2**30], False, 2**32]))]])
    junk = [
        FRAME_MAGIC, FRAME_MAGIC + b"\xff\xff\xff\x7f", good[:-1], good + b"\x00", good[:12],
        FRAME_MAGIC + len(header).to_bytes(4, "little") + header + b"\x00" * 64,  # claims 4 GB, holds 64 B
        msgpack.packb([WIRE_VERSION, 1, "x", [], "torch.add",  # an out-of-band tensor in an unframed command
                       [msgpack.ExtType(EXT_CODES.TENSOR_OOB, msgpack.packb(["float32", [1], False, 4]))], {}, [5], False]),
    ]
    for frame in junk:
        conn.send(frame)
        reply, _, _ = deserialize(conn.recv(10))
        assert isinstance(reply, m.ErrorReply) and reply.error == "SerializationError", frame[:20]
    conn.send(good)
    assert isinstance(deserialize(conn.recv(10))[0], m.OkReply)
    conn.close()
    alice = connect(wp)
    assert torch.equal((torch.ones(3).send(alice) + 1).get(), torch.full((3,), 2.0))


def test_move_of_a_large_tensor_between_workers_skips_the_client(spawn, connect, hook, tmp_path):
    from veil.workers.websocket_launcher import free_port

    from network_helpers import PEER
    from worker_processes import spawn_all

    ports = {"alice": free_port(), "bob": free_port()}
    procs = spawn_all(spawn, {name: (base_args(["--peer", f"{other}=127.0.0.1:{ports[other]}", "--peer-token",
                                                f"{other}={PEER}", "--accept-peer", f"{other}={PEER}"]), ports[name])
                              for name, other in (("alice", "bob"), ("bob", "alice"))})
    alice, bob = connect(procs["alice"]), connect(procs["bob"])
    x = torch.randn(500_000)  # 2 MB: out of band and directly framed on the peer connection
    p = x.send(alice)
    stats = hook.local_worker.stats
    sent, received = stats.bytes_sent, stats.bytes_received
    q = p.move(bob)
    assert stats.bytes_sent - sent < 1000 and stats.bytes_received - received < 1000
    assert torch.equal(q.get(), x)


@pytest.mark.skipif(__import__("shutil").which("openssl") is None, reason="needs the openssl command")
def test_large_transfers_and_inline_ops_over_tls(spawn, connect, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    wp = spawn("alice", base_args(["--cert", str(cert), "--key", str(key)]))
    alice = connect(wp, secure=True, cafile=str(cert))
    x = torch.randn(600_000)  # 2.4 MB: directly framed in chunks through TLS, out of band both ways
    p = x.send(alice)
    assert torch.equal(p.get(), x)
    small = torch.arange(6.0).send(alice)
    assert torch.equal((small * 2 + small).get(), torch.arange(6.0) * 3)


# ----------------------------------------------------------- inline fast path (in-process)


def _command(op: str, prelude: list | None = None) -> bytes:
    return serialize(m.CommandMessage(op, (m.ObjectRef(1), m.ObjectRef(2)), {}, [3], False), sender="c",
                     prelude=prelude)


def _short(data: bytes) -> bool:
    msg, _, prelude = deserialize(data)
    return _inline_ok(msg, prelude)


def test_only_short_requests_take_the_inline_path(hook):
    assert _short(_command("torch.add"))
    assert _short(serialize(m.GetObjectsMessage([1]), sender="c"))
    assert _short(serialize(m.ObjectMessage([m.StoredObject(1, torch.ones(3))]), sender="c"))
    assert not _short(_command("veil.plan.fit"))  # worker functions: cancellable, may call peers
    assert not _short(_command("torch.add", prelude=[7, ["veil.plan.run", [], {}, [], False]]))
    assert not _short(serialize(m.MoveMessage([1], "bob", [2]), sender="c"))  # talks to a peer
    batch = [["torch.add", [], {}, [], False]] * (INLINE_MAX_COMMANDS + 1)
    assert not _short(_command("torch.add", prelude=batch))  # a long batch yields to other sessions
    server, _, session = in_process_server(hook, "inline-ok-srv")
    big = serialize(m.ObjectMessage([m.StoredObject(1, torch.ones(2**17))]), sender="c")
    assert server.try_inline(big, session) == (None, None)  # big: decoded on its handler thread
    fit = server.try_inline(_command("veil.plan.fit"), session)
    assert fit[0] is None and type(fit[1][0]) is m.CommandMessage  # decoded once, runs on its thread
    assert deserialize(server.serve_bytes(b"", session, decoded=fit[1]))[0].error  # (no such objects)
    for garbage in (b"\x95garbage", FRAME_MAGIC + b"\x00"):  # malformed: the same error reply, inline
        reply = deserialize(server.serve_inline(garbage, session))[0]
        assert type(reply) is m.ErrorReply and reply.error == "SerializationError"
        assert deserialize(server.serve_bytes(garbage, session))[0] == reply


def test_a_session_whose_inline_request_ran_long_goes_back_to_handler_threads(hook, monkeypatch):
    # (the conv's estimated work would send it to a handler thread before it runs: inline_work.py; this test is of
    # what happens to a request the estimate let through that ran long all the same)
    monkeypatch.setattr("veil.workers.inline_work.INLINE_MAX_WORK", float("inf"))
    server, tokens, session = in_process_server(hook, "inline-srv")
    big, kernel = torch.randn(1, 1, 300, 300), torch.randn(1, 1, 150, 150)  # (operands under INLINE_MAX_OPERAND_BYTES)
    assert server.serve_bytes(serialize(m.ObjectMessage([m.StoredObject(1, big), m.StoredObject(3, kernel)]),
                                        sender="c"), session)
    fast = serialize(m.GetObjectsMessage([1], False), sender="c")
    reply = server.serve_inline(fast, session)
    assert torch.equal(deserialize(reply)[0].objects[0], big) and session.id not in server._slow_sessions
    slow = serialize(m.CommandMessage("torch.conv2d", (m.ObjectRef(1), m.ObjectRef(3)), {}, [2], False), sender="c")
    for _ in range(20):  # a 300^2 image by a 150^2 kernel (1 GFLOP) takes well over the budget on any machine
        assert deserialize(server.serve_inline(slow, session))[0] == m.OkReply()
        server.serve_bytes(serialize(m.DeleteMessage([2]), sender="c"), session)
        if session.id in server._slow_sessions:
            break
    assert session.id in server._slow_sessions and INLINE_BUDGET_SECONDS < 1
    assert server.serve_inline(fast, session) is None  # from now on: its handler thread
    server._turn.acquire()  # another request holds the worker: nobody runs inline
    try:
        other = authenticate(tokens, [TOKEN])
        server.sessions[other.id] = other
        assert server.serve_inline(fast, other) is None
    finally:
        server._turn.release()
    server.end_session(session)
    assert session.id not in server._slow_sessions


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, (1 << 18) + 3, 3 << 18])
def test_client_frames_are_what_websockets_parses(n):
    """BlockingConnection.send writes frames itself: the library's own parser must read them back."""
    from websockets.client import ClientProtocol
    from websockets.frames import Frame, Opcode
    from websockets.protocol import State
    from websockets.streams import StreamReader
    from websockets.uri import parse_uri

    class Wire:
        out = bytearray()

        def sendall(self, chunk):
            self.out += chunk

    conn = BlockingConnection.__new__(BlockingConnection)
    conn.protocol = ClientProtocol(parse_uri("ws://127.0.0.1:1"))
    conn.protocol.state = State.OPEN
    conn.sock = Wire()
    conn.sock.out = bytearray()
    data = (bytes(range(256)) * (n // 256 + 1))[:n]
    conn.send(data)
    reader = StreamReader()
    reader.feed_data(bytes(conn.sock.out))
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=True)
    with pytest.raises(StopIteration) as done:
        next(parser)
    frame = done.value.value
    assert frame.opcode is Opcode.BINARY and frame.fin and bytes(frame.data) == data and not reader.buffer
