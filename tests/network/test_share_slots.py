"""Share slots (``veil.workers.share_slots``): a same-host peer fetch answered through a sealed memfd.

The pool and the maps over a Unix socket pair: what the publisher places is what the reader's views hold
(compared with the tensors), a busy slot is never written again until the reader reports it done, a full pool
answers with bytes, a retired slot is dropped on the reader's side; the reader maps only size-sealed memfds
(anything else is closed, no descriptor leaks). And SMPC products over network parties whose peer links are
Unix sockets take slots and still equal torch.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch

from veil.exceptions import SerializationError
from veil.workers import share_slots
from veil.workers.share_slots import MAX_SLOTS, MIN_SLOT_BYTES, PeerSlotReply, SlotMaps, SlotPool, send_with_fd

from network_helpers import send_placed, slot_link

pytestmark = pytest.mark.skipif(not share_slots.enabled(), reason="share slots need Linux and memfd_create")

N = MIN_SLOT_BYTES // 8 + 3  # int64 entries: just past the smallest reply that takes a slot


@pytest.fixture
def link():
    with slot_link() as made:
        yield made


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _deliver(pool: SlotPool, reader: socket.socket, maps: SlotMaps, tensors: list) -> PeerSlotReply:
    """What the server and the reader's transport do for one fetch: place, send, receive."""
    placed = pool.place(tensors)
    assert placed is not None
    return send_placed(pool, reader, maps, placed)


def _layout(tensors: list) -> list:
    return [(tuple(t.shape), t.dtype) for t in tensors]


def test_the_reader_sees_what_was_placed_and_a_busy_slot_is_not_written_again(link):
    pool, reader, maps = link
    e, f = torch.randint(-2**62, 2**62, (N,)), torch.randint(-2**62, 2**62, (3, N))
    first = _deliver(pool, reader, maps, [e, f])
    views = maps.views(first, _layout([e, f]))
    assert torch.equal(views[0], e) and torch.equal(views[1], f)
    # not reported done: the next placement goes to another slot, the first one's bytes stay
    g = torch.randint(-2**62, 2**62, (N,))
    second = _deliver(pool, reader, maps, [g, g.view(1, N).expand(3, N).contiguous()])
    assert second.slot != first.slot
    assert torch.equal(views[0], e) and torch.equal(views[1], f)
    # reported done (the server releases what the next fetch's done list names): reused, and the view shows it
    maps.done(first.slot)
    pool.release(maps.take_done())
    third = _deliver(pool, reader, maps, [g, f])
    assert third.slot == first.slot and torch.equal(views[0], g)
    assert torch.equal(maps.views(third, _layout([g, f]))[1], f)


def test_a_pool_whose_slots_are_all_busy_answers_with_bytes_and_bogus_done_lists_change_nothing(link):
    pool, reader, maps = link
    t = torch.arange(N, dtype=torch.int64)
    numbers = {_deliver(pool, reader, maps, [t]).slot for _ in range(MAX_SLOTS)}
    assert len(numbers) == MAX_SLOTS
    for bogus in (None, "1", [str(n) for n in numbers], [-1, 0, 10**30], [99] * 1000, {"done": list(numbers)}):
        pool.release(bogus)
        assert pool.place([t]) is None  # (still all busy: the bytes reply goes instead)
    assert pool.place([torch.arange(10)]) is None  # too small to be worth a slot


def test_a_full_pool_retires_a_free_slot_and_the_reader_unmaps_it(link):
    pool, reader, maps = link
    small = torch.zeros(N, dtype=torch.int64)
    numbers = [_deliver(pool, reader, maps, [small]).slot for _ in range(MAX_SLOTS)]
    for n in numbers:
        maps.done(n)
    pool.release(maps.take_done())
    big = torch.ones(4 * N, dtype=torch.int64)  # fits none of them: the smallest free one makes room
    reply = _deliver(pool, reader, maps, [big])
    assert reply.drop and set(reply.drop) <= set(numbers)
    assert torch.equal(maps.views(reply, _layout([big]))[0], big)
    with pytest.raises(SerializationError):
        maps.views(PeerSlotReply(reply.drop[0], 8 * N, []), _layout([small]))


def test_the_reader_maps_only_size_sealed_memfds_and_leaks_no_descriptor(link, tmp_path):
    pool, reader, maps = link
    sender = pool.raw
    before = _open_fds()
    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, MIN_SLOT_BYTES)
    path = tmp_path / "regular"
    path.write_bytes(b"\0" * MIN_SLOT_BYTES)
    regular = os.open(path, os.O_RDONLY)
    pipe_r, pipe_w = os.pipe()
    for fd in (unsealed, regular, pipe_r):
        assert send_with_fd(sender, b"x", fd) == 1
        buf = bytearray(8)
        _, ancdata, _, _ = reader.recvmsg_into([buf], maps.read_size(), socket.MSG_CMSG_CLOEXEC)
        maps.received(ancdata)
    for fd in (unsealed, regular, pipe_r, pipe_w):
        os.close(fd)
    assert _open_fds() == before  # every descriptor received was closed, none mapped
    for number in (1, 2, 3):
        with pytest.raises(SerializationError):
            maps.views(PeerSlotReply(number, MIN_SLOT_BYTES, []), [((MIN_SLOT_BYTES // 8,), torch.int64)])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Unix links are Linux-only")
def test_products_over_unix_peer_links_take_slots_and_equal_torch(hook, connect_websocket, websocket_servers,
                                                                  monkeypatch):
    from veil.tensors.mpc_glue import runtime
    from veil.tensors.mpc_glue.runtime import enable_peer_openings

    monkeypatch.setattr(runtime, "PEER_MIN_ELEMENTS", 0)
    alice, bob, dave = (connect_websocket(n) for n in ("alice", "bob", "dave"))
    enable_peer_openings(alice, bob)
    try:
        x, y = torch.randn(200, 300), torch.randn(200, 300)  # e and f: 2 x 480 KB per party, past MIN_SLOT_BYTES
        xs = x.fix_prec().share(alice, bob, crypto_provider=dave)
        ys = y.fix_prec().share(alice, bob, crypto_provider=dave)
        for _ in range(3):  # (the later products reuse the slots the earlier ones were done with)
            z = (xs * ys).get().float_prec()
            assert torch.allclose(z, x * y, atol=1e-3)
            w = (xs.mm(ys.t())).get().float_prec()
            assert torch.allclose(w, x @ y.t(), atol=5e-2)
    finally:
        enable_peer_openings(alice, bob, enabled=False)
    for name in ("alice", "bob"):
        with open(f"/proc/{websocket_servers[name].pid}/maps") as f:
            held = f.read().count("veil-share-slot")
        assert 2 <= held <= 2 * MAX_SLOTS, (name, held)  # its own slots and the peer's, mapped once each
