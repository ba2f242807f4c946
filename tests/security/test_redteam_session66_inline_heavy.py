"""Red team, session 66: torch ops that are heavy for their operands' size, on the inline lane.

Holes found: session 65 kept a torch op off the event loop while its stored operands passed 1 MiB, but the
work of many ops is not bounded by their operands' bytes. ``outer`` of two 4096-vectors (32 KiB) makes 16 M
elements; so does ``add`` of a (4096, 1) and a (1, 4096) tensor (a loss over them too); ``mm`` of a
(1024, 64) and a (64, 1024) matrix is 67 M multiply-adds on 512 KiB; a ``conv2d`` with a 31 x 31 kernel, a pool
with a large kernel, ``pad`` or an adaptive pool with large public sizes, ``zeros(n)`` (no operand at all),
``unbind`` of 2^18 elements (2^18 tensors, ~0.5 s), indexing by a long list, ``sort``; and an expanded view
counted its storage (4 bytes) where it showed 64 MiB. Each ran on the loop thread, holding every connection,
ping, handshake, peer fetch and revocation for its whole run, three times per session before the CPU strikes
sent the session to handler threads, and the strikes were keyed by session id: a reconnect started afresh.

Now each op is sized before it runs (``veil/workers/inline_work.py``: shapes and public arguments, results of
the request's earlier commands included) and a heavy one takes a handler thread; strikes count per principal
(``inline_lane.strike_key``), kept across reconnects, bounded, and never moved by another user's requests.

How the tests see where an op ran, without wall-clock thresholds: the op's allowlisted function is wrapped so
that, once started, it waits until the test has had a websocket ping answered on another connection, a fresh
handshake completed and a callback run on the event loop; had it run on the loop, none of those could happen
(the wrapper refuses to wait there, and records it). Results are compared with plain torch.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST, Op
from veil.messaging.serde import deserialize, serialize
from veil.mpc.party import OpenMessage
from veil.workers import inline_lane, inline_work_rules
from veil.workers.inline_lane import INLINE_STRIKES, PrincipalStrikes, strike_key
from veil.workers.websocket_auth import authenticate, handshake_headers
from veil.workers.websocket_server import WebsocketServerWorker
from veil.workers.websocket_transport import BlockingConnection

from network_helpers import OTHER, TOKEN, in_process_server
from test_redteam_lane import _OPEN, PING, PONG, Raw, _bin, _frame, _get, _spy_runs, _store, _tokens
from worker_processes import serve_in_thread, stop_served

R = m.ObjectRef


@pytest.fixture
def worker(hook):
    """``worker() -> server``: an in-process worker on loopback (served from a thread; tokens of
    test_redteam_lane), stopped after with every Raw connection closed."""
    started = []

    def start():
        server = WebsocketServerWorker(hook, id=f"s66-{os.getpid()}-{time.monotonic_ns()}", port=0, tokens=_tokens())
        started.append((server, serve_in_thread(server)))
        return server

    yield start
    while _OPEN:
        _OPEN.pop().close()
    for server, thread in started:
        stop_served(server, thread)


def _cmd(op, args=(), kwargs=None, out=(50,), prelude=None) -> bytes:
    return serialize(m.CommandMessage(op, tuple(args), kwargs or {}, list(out), False), sender="c", prelude=prelude)


class Held:
    """Wraps an allowlisted op: once it starts on a handler thread it waits for :meth:`release`; on the event loop
    thread it does not wait (that would hang the test) but records it and fails the op."""

    def __init__(self, monkeypatch, server, name: str) -> None:
        self.server, self.real = server, ALLOWLIST._by_name[name]
        self.started, self.released, self.on_loop = threading.Event(), threading.Event(), []
        monkeypatch.setitem(ALLOWLIST._by_name, name, Op(name, self._run, self.real.shapes, self.real.worker_function))

    def _run(self, *args, **kwargs):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is self.server._loop:
            self.on_loop.append(True)
            self.started.set()
            raise AssertionError("the heavy op ran on the event loop thread")
        self.started.set()
        assert self.released.wait(60), "the test never released the op"
        return self.real.func(*args, **kwargs)

    def release(self) -> None:
        self.released.set()


def _loop_serves_while_held(server, held: Held, bystander: Raw) -> None:
    """While ``held`` waits on its handler thread: a ping on another connection is answered, a new connection's
    handshake completes, and the loop runs a callback. Then the op is let go."""
    try:
        assert held.started.wait(30) and not held.on_loop, "the op ran on the event loop thread (or never started)"
        bystander.send(_frame(PING, b"s66"))
        assert bystander.frame(timeout=10)[1:] == (PONG, b"s66")
        fresh = BlockingConnection(f"ws://127.0.0.1:{server.bound_port}", handshake_headers(OTHER))
        fresh.close()
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), server._loop).result(timeout=10)
    finally:
        held.release()


def _stored(conn: Raw, tensors: dict) -> None:
    for oid, t in tensors.items():
        conn.send(_bin(_store(oid, t)))
        assert conn.reply(timeout=60) == m.OkReply()


def _got(conn: Raw, oid: int):
    conn.send(_bin(_get(oid)))
    reply = conn.reply(timeout=60)
    assert type(reply) is m.ObjectsReply, reply
    return reply.objects[0]


def _same(got, expected) -> bool:
    if expected.is_floating_point():
        return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-3)
    return torch.equal(got, expected)


g = torch.Generator().manual_seed(66)
A41, B14 = torch.randn(4096, 1, generator=g), torch.randn(1, 4096, generator=g)
V4096, W4096 = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
K64a, K64b = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
M1024x64, M64x1024 = torch.randn(1024, 64, generator=g), torch.randn(64, 1024, generator=g)
IMG, KER31, KER256 = torch.randn(1, 1, 128, 128, generator=g), torch.randn(1, 1, 31, 31, generator=g), \
    torch.randn(256, 1, 3, 3, generator=g)
SMALL8, V8 = torch.randn(8, 8, generator=g), torch.randn(8, generator=g)
IDX2000 = torch.randint(0, 64, (2000,), generator=g)
LONG = torch.randn(2**18, generator=g)  # 1 MiB: at the operand bound, but its sort is not
PIECES = torch.randn(8192, generator=g)
S256a, S256b = torch.randn(256, 1, generator=g), torch.randn(1, 256, generator=g)

#: (case, op, stored objects, args, kwargs, result ids, what plain torch gives for the first result id)
CASES = [
    ("broadcast add", "torch.add", {1: A41, 2: B14}, [R(1), R(2)], {}, [50], lambda: A41 + B14),
    ("broadcast loss", "torch.nn.functional.mse_loss", {1: A41, 2: B14}, [R(1), R(2)], {"reduction": "sum"}, [50],
     lambda: F.mse_loss(A41, B14, reduction="sum")),
    ("outer", "torch.outer", {1: V4096, 2: W4096}, [R(1), R(2)], {}, [50], lambda: torch.outer(V4096, W4096)),
    ("kron", "torch.kron", {1: K64a, 2: K64b}, [R(1), R(2)], {}, [50], lambda: torch.kron(K64a, K64b)),
    ("einsum", "torch.einsum", {1: V8, 2: V8}, ["i,j->ij", R(1), R(2)], {}, [50],
     lambda: torch.einsum("i,j->ij", V8, V8)),
    ("tensordot", "torch.tensordot", {1: V4096, 2: W4096}, [R(1), R(2)], {"dims": 0}, [50],
     lambda: torch.tensordot(V4096, W4096, dims=0)),
    ("mm whose product is large", "torch.mm", {1: M1024x64, 2: M64x1024}, [R(1), R(2)], {}, [50],
     lambda: M1024x64 @ M64x1024),
    ("matmul [N,1]x[1,N]", "torch.matmul", {1: A41, 2: B14}, [R(1), R(2)], {}, [50], lambda: A41 @ B14),
    ("conv2d, large kernel", "torch.conv2d", {1: IMG, 2: KER31}, [R(1), R(2)], {}, [50],
     lambda: F.conv2d(IMG, KER31)),
    ("conv2d, many output channels", "torch.nn.functional.conv2d", {1: IMG, 2: KER256}, [R(1), R(2)], {}, [50],
     lambda: F.conv2d(IMG, KER256)),
    ("zeros", "torch.zeros", {}, [64, 64], {}, [50], lambda: torch.zeros(64, 64)),
    ("arange", "torch.arange", {}, [0, 100], {}, [50], lambda: torch.arange(0, 100)),
    ("full", "torch.full", {}, [[4, 4], 2.0], {}, [50], lambda: torch.full([4, 4], 2.0)),
    ("repeat", "Tensor.repeat", {1: V8}, [R(1), 2, 3], {}, [50], lambda: V8.repeat(2, 3)),
    ("tile", "torch.tile", {1: V8}, [R(1), [3]], {}, [50], lambda: torch.tile(V8, [3])),
    ("repeat_interleave", "torch.repeat_interleave", {1: V8}, [R(1), 3], {}, [50],
     lambda: torch.repeat_interleave(V8, 3)),
    ("diag of a vector", "torch.diag", {1: V8}, [R(1)], {}, [50], lambda: torch.diag(V8)),
    ("one_hot", "torch.nn.functional.one_hot", {1: torch.arange(8)}, [R(1), 10], {}, [50],
     lambda: F.one_hot(torch.arange(8), 10)),
    ("nuclear norm", "torch.norm", {1: SMALL8}, [R(1), "nuc"], {}, [50], lambda: torch.norm(SMALL8, "nuc")),
    ("pad, large pads", "torch.nn.functional.pad", {1: SMALL8}, [R(1), [1100, 1100, 1100, 1100]], {}, [50],
     lambda: F.pad(SMALL8, [1100, 1100, 1100, 1100])),
    ("avg_pool2d, large kernel", "torch.nn.functional.avg_pool2d", {1: IMG}, [R(1), 32, 1], {}, [50],
     lambda: F.avg_pool2d(IMG, 32, 1)),
    ("adaptive pool to a large size", "torch.nn.functional.adaptive_avg_pool2d", {1: IMG[:, :, :8, :8].clone()},
     [R(1), [2048, 2048]], {}, [50], lambda: F.adaptive_avg_pool2d(IMG[:, :, :8, :8], [2048, 2048])),
    ("index by a long list", "Tensor.__getitem__", {1: torch.arange(1024.0)}, [R(1), [5] * 20000], {}, [50],
     lambda: torch.arange(1024.0)[[5] * 20000]),
    ("index_select", "torch.index_select", {1: K64a, 2: IDX2000}, [R(1), 0, R(2)], {}, [50],
     lambda: torch.index_select(K64a, 0, IDX2000)),
    ("embedding", "torch.nn.functional.embedding", {1: IDX2000, 2: K64a}, [R(1), R(2)], {}, [50],
     lambda: F.embedding(IDX2000, K64a)),
    ("sort of 2^18", "Tensor.sort", {1: LONG}, [R(1)], {}, [50, 51], lambda: LONG.sort().values),
    ("unbind into 8192 tensors", "Tensor.unbind", {1: PIECES}, [R(1)], {}, list(range(100, 100 + 8192)),
     lambda: PIECES[0]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_heavy_op_takes_a_handler_thread_and_the_loop_serves_everyone_meanwhile(worker, monkeypatch, case):
    _, op, tensors, args, kwargs, out, expected = case
    server = worker()
    a, bystander = Raw(server), Raw(server, token=OTHER)
    _stored(a, tensors)
    held = Held(monkeypatch, server, op)
    a.send(_bin(_cmd(op, args, kwargs, out)))
    _loop_serves_while_held(server, held, bystander)
    assert a.reply(timeout=120) == m.OkReply() and not held.on_loop
    assert _same(_got(a, out[0] if op != "Tensor.unbind" else 100), expected())
    if op == "Tensor.unbind":
        assert _same(_got(a, 100 + 8191), PIECES[8191])


def test_results_of_earlier_deferred_commands_are_sized_and_a_heavy_chain_takes_a_handler_thread(worker, monkeypatch):
    """Each step alone is light; the product of the first step's 256 x 256 result by itself is not."""
    server = worker()
    a, bystander = Raw(server), Raw(server, token=OTHER)
    _stored(a, {1: S256a, 2: S256b})
    held = Held(monkeypatch, server, "torch.mm")
    prelude = [["torch.add", [R(1), R(2)], {}, [10], False], ["Tensor.relu", [R(10)], {}, [11], False]]
    a.send(_bin(_cmd("torch.mm", [R(11), R(11)], prelude=prelude)))
    _loop_serves_while_held(server, held, bystander)
    assert a.reply(timeout=60) == m.OkReply() and not held.on_loop
    r = (S256a + S256b).relu()
    assert _same(_got(a, 50), r @ r)


def test_a_heavy_skeleton_use_takes_a_handler_thread(worker, monkeypatch):
    server = worker()
    a, bystander = Raw(server), Raw(server, token=OTHER)
    _stored(a, {1: V4096, 2: W4096})
    held = Held(monkeypatch, server, "torch.outer")
    define = ["torch.outer", [R(0), R(1)], {}, False]
    a.send(_bin(serialize(m.SkeletonCommand(3, [1, 2], [50], define), sender="c")))
    _loop_serves_while_held(server, held, bystander)
    assert a.reply(timeout=60) == m.OkReply() and not held.on_loop
    assert _same(_got(a, 50), torch.outer(V4096, W4096))


def test_an_expanded_view_counts_as_large_as_it_shows_and_its_copy_takes_a_handler_thread(worker, monkeypatch):
    """``expand`` makes a view of 4 bytes of storage showing 16 MiB: what later copies or multiplies it is sized
    by what it shows, not by its storage."""
    server = worker()
    runs = _spy_runs(monkeypatch)
    a, bystander = Raw(server), Raw(server, token=OTHER)
    _stored(a, {1: torch.ones(1, 1)})
    expand = _cmd("Tensor.expand", [R(1), 2048, 2048], out=[2])
    a.send(_bin(expand))
    assert a.reply() == m.OkReply()
    held = Held(monkeypatch, server, "Tensor.clone")
    clone = _cmd("Tensor.clone", [R(2)], out=[3])
    a.send(_bin(clone))
    _loop_serves_while_held(server, held, bystander)
    assert a.reply(timeout=60) == m.OkReply() and not held.on_loop
    assert [how for sid, d, how in runs if d == expand] == ["inline"]  # (a view: no work)
    assert [how for sid, d, how in runs if d == clone] == ["thread"]
    assert _same(_got(a, 3), torch.ones(2048, 2048))


def test_small_ops_and_a_small_training_step_stay_inline(worker, monkeypatch):
    """What a pointer training loop sends one by one (the Boston MLP's shapes) stays on the loop."""
    server = worker()
    runs = _spy_runs(monkeypatch)
    a = Raw(server)
    x, w, b, sq, img, k = (torch.randn(8, 13), torch.randn(32, 13), torch.randn(32), torch.randn(13, 13),
                           torch.randn(1, 1, 8, 8), torch.randn(2, 1, 3, 3))
    _stored(a, {1: x, 2: w, 3: b, 4: sq, 5: img, 6: k})
    requests = [
        _cmd("torch.add", [R(1), R(1)], out=[10]),
        _cmd("torch.mm", [R(4), R(4)], out=[11]),
        _cmd("torch.nn.functional.linear", [R(1), R(2), R(3)], out=[12]),
        _cmd("torch.conv2d", [R(5), R(6)], out=[13]),
        _cmd("Tensor.__getitem__", [R(1), (slice(0, 4), 1)], out=[14]),
        _cmd("torch.nn.functional.mse_loss", [R(12), R(12)], out=[15]),
        _cmd("torch.mm", [R(17), R(4)], out=[18], prelude=[  # a deferred forward pass riding on one request
            ["torch.nn.functional.linear", [R(1), R(2), R(3)], {}, [16], False],
            ["torch.nn.functional.relu", [R(16)], {}, [19], False],
            ["Tensor.__getitem__", [R(19), (slice(None), slice(0, 13))], {}, [17], False]]),
        serialize(m.SkeletonCommand(0, [1, 1], [20], ["torch.add", [R(0), R(1)], {}, False]), sender="c"),
        serialize(m.SkeletonCommand(0, [4, 4], [21]), sender="c"),
    ]
    for data in requests:
        a.send(_bin(data))
        assert a.reply() == m.OkReply()
    assert [how for _, d, how in runs if d in requests] == ["inline"] * len(requests)
    h = F.linear(x, w, b)
    for oid, expected in ((10, x + x), (11, sq @ sq), (12, h), (13, F.conv2d(img, k)), (14, x[0:4, 1]),
                          (15, F.mse_loss(h, h)), (18, h.relu()[:, :13] @ sq), (20, x + x), (21, sq + sq)):
        assert _same(_got(a, oid), expected), oid


def test_a_principal_struck_out_stays_on_handler_threads_after_a_reconnect_and_others_stay_inline(worker, monkeypatch):
    """Every request over budget (the budget made negative: no timing involved), so the strikes come at once."""
    monkeypatch.setattr(inline_lane, "INLINE_BUDGET_SECONDS", -1.0)
    server = worker()
    runs = _spy_runs(monkeypatch)

    def adds(conn, ids):  # (each its own result id: a result id is never reused)
        sent = [_cmd("torch.add", [R(1), R(1)], out=[i]) for i in ids]
        for data in sent:
            conn.send(_bin(data))
            assert conn.reply() == m.OkReply()
        return [how for sid, d, how in runs if sid == conn.session_id and d in sent]

    a = Raw(server)  # (its first request, the malformed one, starts the timing of its principal)
    _stored(a, {1: torch.ones(3)})  # strike 1
    assert adds(a, [2, 3]) == ["inline", "inline"]  # strikes 2 and 3
    assert a.session_id in server._slow_sessions
    assert adds(a, [4]) == ["thread"]
    a.close()
    deadline = time.monotonic() + 30  # (its session ends on the worker)
    while a.session_id in server.sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.session_id not in server.sessions
    again = Raw(server)  # the same token: a new session, the same principal
    _stored(again, {1: torch.ones(3)})
    assert adds(again, [2]) == ["thread"]
    assert torch.equal(_got(again, 2), torch.ones(3) * 2)
    other = Raw(server, token=OTHER)  # another user: its own count (one strike so far)
    _stored(other, {1: torch.ones(3)})
    assert adds(other, [2]) == ["inline"]


def test_strikes_are_per_principal_bounded_and_a_struck_out_one_that_keeps_sending_stays(hook, monkeypatch):
    server, tokens, session = in_process_server(hook, f"s66-strikes-{os.getpid()}-{time.monotonic_ns()}")
    tokens.add(OTHER, "other")
    assert strike_key(session) == strike_key(authenticate(tokens, [TOKEN])) != \
        strike_key(authenticate(tokens, [OTHER]))
    both = authenticate(tokens, [TOKEN, OTHER])  # a connection holding both tokens counts toward one of them
    assert strike_key(both) in (strike_key(session), strike_key(authenticate(tokens, [OTHER])))
    monkeypatch.setattr(inline_lane, "INLINE_STRUCK_PRINCIPALS", 8)
    table = PrincipalStrikes()
    for _ in range(INLINE_STRIKES):
        table.strike("mallory")
    for i in range(7):
        table.timing(f"user{i}")
    assert table.struck_out("mallory")  # (it sent a request: most recent again)
    for i in range(7, 20):
        table.timing(f"user{i}")
        table.strike(f"user{i}")
        assert len(table) <= 8
    assert "mallory" not in table  # the least recent went first: forgiven, never anyone else's count
    assert all(table[k] == 1 for k in table)
    table.strike("alice")
    assert table["alice"] == 1 and "bob" not in table


def test_an_opening_whose_deferred_op_is_heavy_takes_a_handler_thread(hook):
    server, _, session = in_process_server(hook, f"s66-open-{os.getpid()}-{time.monotonic_ns()}")
    gen = torch.Generator().manual_seed(7)
    x, y, a, b = (torch.randint(-2**62, 2**62, (1000,), generator=gen) for _ in range(4))
    stored = [m.StoredObject(i, t) for i, t in {1: x, 2: y, 3: a, 4: b, 5: V4096, 6: W4096}.items()]
    assert deserialize(server.serve_bytes(serialize(m.ObjectMessage(stored), sender="c"), session))[0] == m.OkReply()
    refs = tuple(R(i) for i in (1, 2, 3, 4))
    heavy = serialize(OpenMessage("beaver_mask", refs, {}), sender="c",
                      prelude=[["torch.outer", [R(5), R(6)], {}, [7], False]])
    light = serialize(OpenMessage("beaver_mask", refs, {}), sender="c",
                      prelude=[["torch.add", [R(5), R(6)], {}, [8], False]])
    assert server.serve_inline(heavy, session) is None  # (a handler thread; answered there alike)
    e, f = deserialize(server.serve_bytes(heavy, session))[0].objects
    assert torch.equal(e, x - a) and torch.equal(f, y - b)
    assert server.serve_inline(light, session) is not None
    for oid, expected in ((7, torch.outer(V4096, W4096)), (8, V4096 + W4096)):
        reply = deserialize(server.serve_bytes(serialize(m.GetObjectsMessage([oid], False), sender="c"), session))[0]
        assert _same(reply.objects[0], expected)


def test_the_estimate_names_every_op_of_its_tables_and_is_cheap_arithmetic():
    """Every name the rules know is allowlisted (a renamed op would silently fall back to the default rule), and
    ops whose work is fixed by public arguments are in NEVER or have a rule of their own."""
    names = set(ALLOWLIST._by_name)
    assert set(inline_work_rules.RULES) <= names and inline_work_rules.ELEMENTWISE <= names
    for name in ("torch.zeros", "torch.ones", "torch.full", "torch.arange", "torch.rand", "torch.randn",
                 "torch.randint", "torch.randperm", "torch.eye", "torch.einsum", "Tensor.backward",
                 "aten.new_zeros.default"):
        assert inline_work_rules.RULES[name] is inline_work_rules._never, name
    for name in ("torch.mm", "torch.matmul", "torch.bmm", "torch.conv2d", "torch.kron", "torch.outer",
                 "Tensor.repeat", "torch.tile", "torch.nn.functional.pad", "torch.nn.functional.avg_pool2d",
                 "Tensor.expand", "Tensor.unbind", "Tensor.__getitem__", "torch.nn.functional.embedding"):
        assert name in inline_work_rules.RULES, name
