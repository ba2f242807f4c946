"""Red team, share slots (``veil.workers.share_slots``): a same-host peer fetch answered through a sealed memfd.

Holes found and mended here: a slot's views did not keep its mapping (``torch.frombuffer`` holds the mmap
object, not a buffer export, so a drop or the link's close on another thread unmapped memory a round was
still summing: SIGSEGV, or reads of whatever was mapped there next); a slot whose descriptor could not go was
kept under a number the reader never counted (every later slot was read under its predecessor's number: a
failed round, then another slot's stale bytes summed as a share, silently); a hugetlbfs memfd passed the seal
check (a hole punched after mapping faults with SIGBUS when the huge page pool is empty); a slot reply
dropped unread (its round failed after posting the fetch) kept the publisher's slot busy for the link's life;
no memfd to be had (EMFILE) failed the connection after the round's shares were taken. Pinned besides: the
reader maps only size-sealed memfds, at most two descriptors a read, and closes every descriptor it is sent;
products over Unix peer links of two and three parties equal torch and leave the workers' descriptors as
they were.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import gc
import os
import socket

import pytest
import torch

from veil.exceptions import SerializationError
from veil.workers import peer_openings, share_slots
from veil.workers.share_slots import MAX_SLOTS, MIN_SLOT_BYTES, PeerSlotReply, SlotMaps, SlotPool, send_with_fd

from tests.mpc.peer_fixtures import cp, parties  # noqa: F401  (network parties with peer openings, a dealer)

from network_helpers import send_placed, slot_link  # (tests/security/conftest.py puts tests/network on the path)

pytestmark = pytest.mark.skipif(not share_slots.enabled(), reason="share slots need Linux and memfd_create")

N = MIN_SLOT_BYTES // 8 + 3  # int64 entries: just past the smallest reply that takes a slot




def _receive(reader: socket.socket, maps: SlotMaps) -> None:
    buf = bytearray(64)
    _, ancdata, _, _ = reader.recvmsg_into([buf], maps.read_size(), socket.MSG_CMSG_CLOEXEC)
    maps.received(ancdata)


def _deliver(pool: SlotPool, reader: socket.socket, maps: SlotMaps, tensors: list,
             goes: bool = True) -> PeerSlotReply | None:
    """One fetch as the server answers it: placed, then sent (the descriptor the first time) and received; or,
    ``goes`` False, the descriptor could not go (a write still buffered) and the bytes reply went instead."""
    placed = pool.place(tensors)
    if not goes:
        pool.unplace(placed[0])
        return None
    return send_placed(pool, reader, maps, placed)


def _read(pool: SlotPool, maps: SlotMaps, reply: PeerSlotReply, tensors: list) -> list:
    """What a round does with a slot reply: sums of the views (fresh tensors), then done."""
    views = maps.views(reply, [(tuple(t.shape), t.dtype) for t in tensors])
    values = [torch.add(v, 0) for v in views]
    del views
    maps.done(reply.slot)
    pool.release(maps.take_done())
    return values


def _slot_mappings() -> int:
    with open("/proc/self/maps") as f:
        return f.read().count("veil-share-slot")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _sealed_memfd(seals: int, size: int = MIN_SLOT_BYTES, flags: int = 0) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | flags)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, share_slots._F_ADD_SEALS, seals)
    return fd


def test_a_slot_stays_mapped_while_its_views_live_through_a_drop_and_the_links_close():
    """A hostile publisher's drop of the slot a round is summing (a reply to another fetch over the link), or
    the link closed meanwhile: the views still read the slot, and it is unmapped when the last view goes."""
    with slot_link() as (pool, reader, maps):
        e = torch.randint(-2**62, 2**62, (N,))
        reply = _deliver(pool, reader, maps, [e])
        before = _slot_mappings()
        views = maps.views(reply, [((N,), torch.int64)])
        maps.forget(reply.slot)  # a reply's drop naming it
        maps.close()  # the link closed
        assert _slot_mappings() == before  # (asserted before reading: an unmapped view would kill the test run)
        assert torch.equal(torch.add(views[0], 0), e)
        del views
        gc.collect()
        assert _slot_mappings() == before - 1


def test_a_slot_whose_descriptor_could_not_go_does_not_shift_the_readers_numbers():
    """The descriptor of a new slot cannot go (the transport still buffers an earlier reply): the bytes reply
    goes; later slots are numbered as the reader counts their descriptors, and each round reads its own bytes."""
    with slot_link() as (pool, reader, maps):
        _deliver(pool, reader, maps, [torch.arange(N)], goes=False)
        big = torch.full((4 * N,), 7)
        assert torch.equal(_read(pool, maps, _deliver(pool, reader, maps, [big]), [big])[0], big)
        for k in range(3):
            small = torch.arange(N) * (k + 3)
            assert torch.equal(_read(pool, maps, _deliver(pool, reader, maps, [small]), [small])[0], small)


def test_the_reader_maps_no_hugetlb_memfd(monkeypatch):
    """A size-sealed hugetlbfs memfd is closed without being mapped (a hole punched in it later faults with
    SIGBUS when the huge page pool is empty)."""
    try:
        fd = _sealed_memfd(share_slots._SIZE_SEALS, 2 << 20, os.MFD_HUGETLB)
    except OSError:
        pytest.skip("no hugetlbfs memfds here")
    mapped = []

    def refuse(*args, **kwargs):  # (mapping one needs free huge pages: this host may have none either way)
        mapped.append(args)
        raise OSError("would map")

    monkeypatch.setattr(share_slots.mmap, "mmap", refuse)
    with slot_link() as (pool, reader, maps):
        before = _open_fds()
        assert send_with_fd(pool.raw, b"x", fd) == 1
        os.close(fd)
        _receive(reader, maps)
        assert mapped == [] and _open_fds() == before - 1


@pytest.mark.parametrize("seals", [0, share_slots._SEAL_GROW, share_slots._SEAL_SEAL, share_slots._SEAL_GROW
                                   | share_slots._SEAL_SEAL], ids=["unsealed", "grow", "seal", "grow+seal"])
def test_a_memfd_that_can_still_shrink_is_not_mapped(seals):
    """A memfd the publisher could shrink under the mapping (SIGBUS on read) is closed, and a reply naming it
    fails the round cleanly."""
    with slot_link() as (pool, reader, maps):
        fd = _sealed_memfd(seals)
        before = _open_fds()
        assert send_with_fd(pool.raw, b"x", fd) == 1
        _receive(reader, maps)
        assert _open_fds() == before
        os.ftruncate(fd, 0)  # (what it would do next)
        os.close(fd)
        with pytest.raises(SerializationError):
            maps.views(PeerSlotReply(1, MIN_SLOT_BYTES, []), [((MIN_SLOT_BYTES // 8,), torch.int64)])


def test_a_hundred_descriptors_in_one_read_or_to_a_reader_without_slots_leak_none():
    """Sealed memfds by the hundred with one write: the reader maps the two one read has room for (each
    mapping keeps a descriptor of its own) and the kernel closes the rest; to a connection that takes no slots
    (a plain read) none stays open either."""
    with slot_link() as (pool, reader, maps):
        fds = [_sealed_memfd(share_slots._SIZE_SEALS) for _ in range(100)]
        before = _open_fds()
        pool.raw.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        _receive(reader, maps)
        assert len(maps._maps) == 2 and _open_fds() == before + 2
        pool.raw.sendmsg([b"y"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        assert reader.recv(8) == b"y" and _open_fds() == before + 2
        for fd in fds:
            os.close(fd)


def test_a_slot_reply_dropped_unread_frees_its_slot_and_applies_its_drops():
    """A round failed after it posted its fetch (e.g. an orchestrator's ids that do not fit the step): the slot
    reply it drops is reported done, so the publisher reuses the slot instead of keeping it busy for good."""

    class Link:
        def share_slots(self):
            return maps

    with slot_link() as (pool, reader, maps):
        t = torch.arange(N)
        first = _deliver(pool, reader, maps, [t])
        peer_openings._slot_unread(Link(), first)
        again = _deliver(pool, reader, maps, [t * 2])  # the fetch that reports it done is the next one
        assert again.slot != first.slot  # (the done list goes with the next fetch)
        pool.release(maps.take_done())
        third = _deliver(pool, reader, maps, [t * 5])
        assert third.slot == first.slot and torch.equal(_read(pool, maps, third, [t])[0], t * 5)
        peer_openings._slot_unread(Link(), PeerSlotReply(again.slot, 0, [first.slot]))
        assert first.slot not in maps._maps and maps.take_done() == [again.slot]


def test_no_memfd_to_be_had_answers_with_bytes(monkeypatch):
    """memfd_create failing (the worker out of descriptors): no slot, the bytes reply (the round's shares were
    already taken), and slots again once it works."""
    with slot_link() as (pool, reader, maps):
        def exhausted(*args):
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(share_slots.os, "memfd_create", exhausted)
        assert pool.place([torch.arange(N)]) is None
        monkeypatch.undo()
        t = torch.arange(N) - 9
        assert torch.equal(_read(pool, maps, _deliver(pool, reader, maps, [t]), [t])[0], t)


def test_a_send_on_a_closed_link_is_no_error():
    """The peer gone before a slot's descriptor goes: nothing went (the bytes reply then reports the close)."""
    with slot_link() as (pool, reader, maps):
        reply, fd = pool.place([torch.arange(N)])
        reader.close()
        assert send_with_fd(pool.raw, b"r", fd) == 0


def _fds_of(servers, names) -> dict:
    """Each party's open descriptors: (share slot memfds, others)."""
    counts = {}
    for n in names:
        links = []
        for fd in os.listdir(f"/proc/{servers[n].pid}/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/{servers[n].pid}/fd/{fd}"))
        slots = sum("veil-share-slot" in link for link in links)
        counts[n] = (slots, len(links) - slots)
    return counts


def test_products_of_two_and_three_parties_over_unix_links_equal_torch_and_leave_no_descriptor(
        hook, parties, cp, websocket_servers):  # noqa: F811  (fixtures)
    """Fixed-precision products (their truncations are top-bits rounds) and a comparison (XOR openings) over
    Unix peer links that take slots: equal to torch; a third run leaves every party's other descriptors as the
    first did, and its slot memfds within MAX_SLOTS a link each way (the publisher's descriptor and its
    mapping's, the reader's mapping's)."""
    x, y = torch.randn(200, 300), torch.randn(200, 300)  # (480 KB per share: past MIN_SLOT_BYTES)
    xs = x.fix_prec().share(*parties, crypto_provider=cp)
    ys = y.fix_prec().share(*parties, crypto_provider=cp)
    names = [p.id for p in parties]
    counts = []
    for _ in range(3):
        assert torch.allclose((xs * ys).get().float_prec(), x * y, atol=1e-3)
        assert torch.equal((xs > 0).get().float_prec(), (x.fix_prec().child > 0).float())
        gc.collect()
        counts.append(_fds_of(websocket_servers, names))
    for n in names:
        assert counts[2][n][1] == counts[0][n][1], (n, counts)
        assert 0 < counts[2][n][0] <= 3 * MAX_SLOTS * (len(names) - 1), (n, counts)
