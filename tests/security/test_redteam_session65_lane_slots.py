"""Red team, session 65: the inline lane and share slots.

Hole found: a torch op is "short by construction" only while its operands are small. A scientist stored two
4096 x 4096 tensors and sent ``torch.mm`` on them: it ran on the event loop thread (~3 s on this box), three
times per session before the session's CPU strikes sent it to handler threads, afresh after each reconnect;
meanwhile no other connection, ping, peer fetch or revocation was served. Now a plain op whose stored operands
(its own and its deferred commands') pass ``INLINE_MAX_OPERAND_BYTES`` takes a handler thread.

Held (kept as regression tests): a share slot whose publisher punches a hole in it after the reader mapped it
reads as zeros, no SIGBUS.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers import inline_lane
from veil.workers.websocket_server import WebsocketServerWorker

from network_helpers import OTHER, in_process_server
from test_redteam_lane import Raw, _bin, _get, _op, _store, serve  # noqa: F401  (serve: a fixture)


def _command(op, ids, out, prelude=None) -> bytes:
    return serialize(m.CommandMessage(op, tuple(m.ObjectRef(i) for i in ids), {}, out, False), sender="c",
                     prelude=prelude)


def test_a_torch_op_on_large_operands_leaves_the_event_loop_to_every_other_connection(serve, monkeypatch):
    server = serve()
    inline = []
    inner = WebsocketServerWorker.try_inline

    def spy(self, data, session):
        out = inner(self, data, session)
        inline.append(out[0] is not None)
        return out

    a = Raw(server)
    x = torch.randn(2048, 2048)  # 16 MiB: stored through a handler thread (larger than an inline request)
    a.send(_bin(serialize(m.ObjectMessage([m.StoredObject(1, x)]), sender="c")))
    assert a.reply(timeout=60) == m.OkReply()
    monkeypatch.setattr(WebsocketServerWorker, "try_inline", spy)
    delays, replied, stop = [], threading.Event(), threading.Event()

    def probe():  # how long the event loop takes to run a callback while the product is computed
        while not stop.is_set():
            t0 = time.perf_counter()
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), server._loop).result(timeout=60)
            delays.append((time.perf_counter() - t0, replied.is_set()))
            time.sleep(0.005)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        started = time.perf_counter()
        a.send(_bin(_op("torch.mm", [1, 1], 2)))
        assert a.reply(timeout=60) == m.OkReply()
        took = time.perf_counter() - started
        replied.set()
    finally:
        stop.set()
        prober.join()
    assert inline and not any(inline), "the product ran on the event loop"
    during = [d for d, after in delays if not after]
    assert during and max(during) < max(0.2, took / 2), (max(during), took)
    a.send(_bin(_get(2)))
    got = a.reply(timeout=60).objects[0]
    assert torch.allclose(got, torch.mm(x, x), rtol=1e-4, atol=1e-2)
    other = Raw(server, token=OTHER)  # another session is still served
    other.send(_bin(_store(5, torch.arange(4.0))))
    assert other.reply() == m.OkReply()
    other.send(_bin(_op("torch.add", [5, 5], 6)))
    assert other.reply() == m.OkReply()
    other.send(_bin(_get(6)))
    assert torch.equal(other.reply().objects[0], torch.arange(4.0) * 2)


def test_commands_and_deferred_ops_on_large_operands_take_a_handler_thread_and_small_ones_stay_inline(hook):
    server, _, session = in_process_server(hook, f"s65-lane-{os.getpid()}-{time.monotonic_ns()}")
    limit = inline_lane.INLINE_MAX_OPERAND_BYTES
    big, small = torch.ones(limit // 4 + 1), torch.ones(16)  # float32: one element over the bound, and tiny
    stored = serialize(m.ObjectMessage([m.StoredObject(1, big), m.StoredObject(2, small)]), sender="c")
    assert deserialize(server.serve_bytes(stored, session))[0] == m.OkReply()
    deferred_big = [["torch.neg", [m.ObjectRef(1)], {}, [10], False]]
    deferred_small = [["torch.neg", [m.ObjectRef(2)], {}, [11], False]]
    for data in (_command("torch.neg", [1], [3]),  # the hot path (a full-rights session's plain command)
                 serialize(m.ListObjectsMessage(), sender="c", prelude=deferred_big),  # a deferred op riding on a list
                 _command("torch.add", [2, 2], [4], prelude=[["torch.neg", [m.ObjectRef(1)], {}, [12], False]])):
        reply, decoded = server.try_inline(data, session)
        assert reply is None and decoded is not None  # decoded once, for its handler thread
        assert deserialize(server.serve_bytes(data, session, decoded=decoded))[0] is not None
    for data in (_command("torch.neg", [2], [5]), serialize(m.ListObjectsMessage(), sender="c", prelude=deferred_small)):
        reply, _ = server.try_inline(data, session)
        assert reply is not None and type(deserialize(reply)[0]) is not m.ErrorReply
    for oid, expected in ((3, -big), (10, -big), (12, -big), (4, small * 2), (5, -small), (11, -small)):
        reply = deserialize(server.serve_bytes(serialize(m.GetObjectsMessage([oid], False), sender="c"), session))[0]
        assert type(reply) is m.ObjectsReply and torch.equal(reply.objects[0], expected), (oid, reply)


_PUNCH = r"""
import array, ctypes, fcntl, os, socket, torch
from veil.workers.share_slots import PeerSlotReply, SlotMaps, layout
size = 1 << 20
fd = os.memfd_create("hostile", os.MFD_ALLOW_SEALING)
os.ftruncate(fd, size)
os.pwrite(fd, b"\x01" * size, 0)
fcntl.fcntl(fd, 1033, 0x2 | 0x4)  # F_ADD_SEALS: shrink and grow, what the reader asks for
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
maps = SlotMaps()
_, anc, _, _ = b.recvmsg(1, maps.read_size())
maps.received(anc)
expected = [((size // 8,), torch.int64)]
views = maps.views(PeerSlotReply(1, layout(expected)[1], []), expected)
before = int(views[0][:4].tolist()[0])
libc = ctypes.CDLL(None, use_errno=True)
assert libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(size)) == 0  # PUNCH_HOLE | KEEP_SIZE
print(before, int(views[0].sum()), int(torch.zeros(3).sum()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "memfd_create"), reason="memfd: Linux")
def test_a_slot_whose_publisher_punches_a_hole_after_it_was_mapped_reads_zeros_and_never_faults():
    out = subprocess.run([sys.executable, "-c", _PUNCH], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]  # (a SIGBUS would be -7)
    before, after, zero = (int(v) for v in out.stdout.split())
    assert before == 0x0101010101010101 and after == zero == 0
