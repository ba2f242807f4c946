"""Share slots: a same-host peer fetch answered through shared memory instead of the socket.

A peer opening's share crosses a Unix socket (``local_socket.py``) as two kernel copies: into the socket on
the publishing party, out of it on the fetching one, while both sides stream 16 MB of a ``mul 1e6`` round
each way at once. Here the publishing party keeps, per fetching peer's connection, a few *slots*: sealed
memfds (``memfd_create``) mapped once on each side. A fetch that says it can take a slot is answered by
copying the published tensors into a free slot and replying :class:`PeerSlotReply` (the slot's number, a
few dozen bytes). A slot's file descriptor crosses the Unix socket once, with the reply that first uses it
(``SCM_RIGHTS``); the fetching party maps it read-only and reads the shares where they are. It tells which
slots it has finished reading in its next fetch (``PeerFetchMessage.done``); until then the publisher never
writes that slot again.

What each side trusts the other with:

- The publisher writes into a connection's slots only tensors published to that connection's peer, when
  that peer's fetch takes them, or, computed there, a round's outputs for that peer alone
  (``peer_slot_outputs``: after the monitor allowed the step and its audit row is on record): the peer,
  which may keep its mapping as long as it likes, sees nothing the bytes reply would not have sent it. A
  reserved slot is never reused while its round runs, nor after it unless the peer was handed it (a reply
  may still be made from its memory: it is retired). Slots are per connection and never cross to another
  session. A peer that never reports a slot done only stops getting slots: at most :data:`MAX_SLOTS` holding
  at most :data:`MAX_SLOT_BYTES` together per connection, then the bytes reply as before.
- The fetching party maps only a memfd sealed against shrinking and growing (a file that shrank under the
  mapping would raise SIGBUS on read, killing the worker) of at most :data:`MAX_SLOT_BYTES`, at most
  :data:`MAX_SLOTS` per connection; any other descriptor is closed at once. The publisher can still change a
  slot's bytes at any time, so a slot's views are read exactly once (``peer_openings._combine`` sums them
  into fresh tensors) and never stored: values changed mid-read are values the peer could have sent anyway.
- Off unless both sides are on Linux over a Unix link. ``VEIL_SHARE_SLOTS=0`` turns it off.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import stat
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from veil.exceptions import SerializationError
from veil.messaging import messages as m
from veil.shapes import numel

#: replies of fewer tensor bytes than this go as bytes (a slot saves copies, not a round trip)
MIN_SLOT_BYTES = 256 << 10
#: slots one connection holds (each side), and the bytes they hold together (the largest slot, too)
MAX_SLOTS = 4
MAX_SLOT_BYTES = 256 << 20
#: where each tensor starts in a slot: a multiple of this (any dtype's alignment)
ALIGN = 64
#: descriptors one read may bring (a publisher sends one per reply; more are closed)
_FDS_PER_READ = 2

# <fcntl.h> / <linux/fcntl.h> (Python's fcntl module has them from 3.8 on Linux, named the same)
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_SEAL_SEAL, _SEAL_SHRINK, _SEAL_GROW = 0x1, 0x2, 0x4
_SIZE_SEALS = _SEAL_SHRINK | _SEAL_GROW


def enabled() -> bool:
    """Whether this process offers and takes slots (Linux with memfd_create, not turned off)."""
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create") \
        and os.environ.get("VEIL_SHARE_SLOTS", "1") != "0"


@m.register_message
@dataclass
class PeerSlotReply:
    """A peer fetch's answer: the published tensors are in slot ``slot`` (laid out as the fetch expects, each
    at a multiple of :data:`ALIGN`), ``nbytes`` long; ``drop``: slots the fetching party unmaps first (the
    publisher retired them)."""

    TYPE: ClassVar[int] = 105
    slot: int = 0
    nbytes: int = 0
    drop: list = field(default_factory=list)


def layout(shapes_dtypes: list) -> tuple[list[int], int]:
    """Each tensor's byte offset in a slot, and the bytes they span (tensors in order, aligned)."""
    offsets, at = [], 0
    for shape, dtype in shapes_dtypes:
        offsets.append(at)
        at += -(-numel(shape) * dtype.itemsize // ALIGN) * ALIGN
    return offsets, at


def _views(whole: torch.Tensor, shapes_dtypes: list, offsets: list) -> list[torch.Tensor]:
    """The tensors laid out in a slot's bytes (``whole``, uint8) at ``offsets`` (:func:`layout`)."""
    return [whole[at: at + numel(shape) * dtype.itemsize].view(dtype).view(shape)
            for (shape, dtype), at in zip(shapes_dtypes, offsets)]


# ------------------------------------------------------------------ the publishing side (server)


class _Slot:
    __slots__ = ("number", "fd", "map", "nbytes", "busy", "sent", "pinned")

    def __init__(self, number: int, nbytes: int) -> None:
        self.number, self.nbytes, self.busy, self.sent = number, nbytes, False, False
        self.pinned = False  # a round's outputs are being computed or used in it (:meth:`SlotPool.reserve`)
        self.fd = os.memfd_create("veil-share-slot", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, nbytes)
            fcntl.fcntl(self.fd, _F_ADD_SEALS, _SIZE_SEALS | _SEAL_SEAL)  # its size is fixed for good
            self.map = mmap.mmap(self.fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # (a view still alive: the mapping goes with it)
            pass
        os.close(self.fd)


class Reservation:
    """A slot a round's outputs are written into where they are computed (:meth:`SlotPool.reserve`)."""

    __slots__ = ("slot", "views", "nbytes", "handed")

    def __init__(self, slot: _Slot, views: list, nbytes: int) -> None:
        self.slot, self.views, self.nbytes, self.handed = slot, views, nbytes, False

    def holds(self, tensors: list) -> bool:
        """Whether ``tensors`` are this slot's views, in order (what the round published)."""
        return len(tensors) == len(self.views) and all(
            t.data_ptr() == v.data_ptr() and t.shape == v.shape and t.dtype == v.dtype
            for t, v in zip(tensors, self.views))


class SlotPool:
    """One fetching peer connection's slots on the publishing worker.

    Used on its event loop (place, release, sent, unplace, close), except :meth:`reserve` and
    :meth:`unreserve`, which a handler thread calls: the table is changed under a lock, and a slot's memory
    is written either by the loop (a copy into a slot it just picked) or by the thread that reserved it.

    ``raw``: the connection's socket, duplicated, for the writes that carry a descriptor (asyncio's transport
    has no sendmsg); closed with the pool, the connection itself is not."""

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw
        self._slots: dict[int, _Slot] = {}
        self._numbers = 0
        self._retired: list[int] = []  # slots closed here that the peer still maps (told in the next reply)
        self._reserved: dict[int, Reservation] = {}  # slot number -> its round's outputs, until unreserved
        self._lock = threading.Lock()
        self._closed = False
        self.in_place = 0  # fetches answered from a reserved slot, with no copy (tests, benchmarks)

    @classmethod
    def for_connection(cls, transport: Any) -> "SlotPool | None":
        """A pool for a peer's connection over a Unix socket (None for any other, or when slots are off)."""
        sock = transport.get_extra_info("socket") if transport is not None and enabled() else None
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(sock.fileno()))
        raw.setblocking(False)
        return cls(raw)

    def release(self, done: Any) -> None:
        """The peer finished reading these slots (its fetch's ``done``); anything else in it is ignored."""
        if type(done) is not list:
            return
        with self._lock:
            for number in done[:MAX_SLOTS]:
                slot = self._slots.get(number) if type(number) is int else None
                if slot is not None:
                    slot.busy = False

    def reserve(self, shapes_dtypes: list) -> Reservation | None:
        """A free slot for a round's outputs of these shapes and dtypes, as writable views (the step computes
        into them, and the peer's fetch is then answered with this slot, no copy); None when there is none to
        be had or the outputs are too small or too large for a slot. The slot is the peer's to read as soon
        as anything is written into it: reserve only after the step was allowed and its row is on record.
        Pinned until :meth:`unreserve`, whatever the peer reports done."""
        offsets, nbytes = layout(shapes_dtypes)
        with self._lock:
            slot = None if self._closed else self._free_slot(nbytes)
            if slot is None:
                return None
            slot.busy = slot.pinned = True
        # over a memoryview: a close() (the link's, on the loop) then leaves the mapping to these views
        try:
            whole = torch.frombuffer(memoryview(slot.map), dtype=torch.uint8)
        except ValueError:  # (closed just now, the link with it: the outputs are computed as before)
            return None
        found = Reservation(slot, _views(whole, shapes_dtypes, offsets), nbytes)
        with self._lock:
            self._reserved[slot.number] = found
        return found

    def unreserve(self, found: Reservation) -> None:
        """The round that reserved the slot ended: free again once the peer is done with it. A slot the peer
        was never handed is retired instead, never written again: the round's published tensors are its views,
        and a fetch that took them may still be answered from them (placed after the round ended, sent as
        bytes); reused, another round's outputs would be written under that reply (red team)."""
        with self._lock:
            slot = found.slot
            if self._reserved.get(slot.number) is found:
                del self._reserved[slot.number]
            slot.pinned = False
            if found.handed or self._slots.get(slot.number) is not slot:  # (closed or discarded already)
                return
            if slot.sent:
                self._retire(slot)  # (the peer unmaps it when the next reply tells it)
            elif slot.number == self._numbers:  # its descriptor never went: its number is the next slot's again
                del self._slots[slot.number]
                slot.close()
                self._numbers -= 1

    def _free_slot(self, nbytes: int) -> _Slot | None:
        """(under the lock) The smallest free slot of at least ``nbytes``, or a new one (retiring free ones to
        keep within :data:`MAX_SLOTS` and :data:`MAX_SLOT_BYTES`); None: too small, too large or none free.

        A new slot only while every other slot's descriptor went: the peer numbers slots in the order their
        descriptors arrive, and a descriptor goes with the first reply that hands its slot over, so the one
        slot whose descriptor has not gone is always the newest (a reserved one may wait a round for it)."""
        if nbytes < MIN_SLOT_BYTES or nbytes > MAX_SLOT_BYTES:
            return None
        free = [s for s in self._slots.values() if not s.busy and not s.pinned]
        slot = min((s for s in free if s.nbytes >= nbytes), key=lambda s: s.nbytes, default=None)
        if slot is not None or not all(s.sent for s in self._slots.values()):
            return slot
        size = min(1 << (nbytes - 1).bit_length(), MAX_SLOT_BYTES)  # (the next reply of another size fits)
        free.sort(key=lambda s: s.nbytes)
        while free and (len(self._slots) >= MAX_SLOTS or self._held() + size > MAX_SLOT_BYTES):
            self._retire(free.pop(0))  # the smallest free slots make room
        if len(self._slots) >= MAX_SLOTS or self._held() + size > MAX_SLOT_BYTES:
            return None  # (the peer still reads the others)
        try:
            slot = _Slot(self._numbers + 1, size)
        except OSError:  # (out of descriptors or memory: the round's shares were taken; they go as bytes)
            return None
        self._numbers += 1
        self._slots[slot.number] = slot
        return slot

    def place(self, tensors: list) -> tuple[PeerSlotReply, int | None] | None:
        """The reply for a fetch of ``tensors``: (the reply, the descriptor to send with it if the peer has not
        got that slot yet), or None (too small to be worth it, too large, or no slot free: reply with bytes).
        Tensors computed in a slot reserved here go as that slot; any others are copied into a free one. The
        slot is busy until the peer reports it done, or :meth:`unplace` (the reply could not go)."""
        offsets, nbytes = layout([(tuple(t.shape), t.dtype) for t in tensors])
        with self._lock:
            found = next((r for r in self._reserved.values() if not r.handed and r.holds(tensors)), None)
            if found is not None:
                found.handed = True
                slot = found.slot
                self.in_place += 1
            else:
                slot = self._free_slot(nbytes)
                if slot is None:
                    return None
                slot.busy = True
            drop, self._retired = self._retired, []
        if found is None:  # (on the loop, as close(): the mapping cannot go under this copy)
            view = torch.frombuffer(slot.map, dtype=torch.uint8)
            for t, at in zip(tensors, offsets):
                size = t.numel() * t.element_size()
                view[at: at + size].view(t.dtype).copy_(t.reshape(-1))
            del view
        return PeerSlotReply(slot.number, nbytes, drop), (None if slot.sent else slot.fd)

    def _held(self) -> int:
        return sum(s.nbytes for s in self._slots.values())

    def _retire(self, slot: _Slot) -> None:
        del self._slots[slot.number]
        if slot.sent:  # (the peer unmaps it when the next reply tells it)
            self._retired.append(slot.number)
        slot.close()

    def sent(self, reply: PeerSlotReply) -> None:
        """The reply (and the slot's descriptor with it) left: the peer has the slot."""
        with self._lock:
            slot = self._slots.get(reply.slot)
            if slot is not None:
                slot.sent = True

    def unplace(self, reply: PeerSlotReply) -> None:
        """The reply did not go: its slot is free again, and the retirements it carried are told next time."""
        with self._lock:
            slot = self._slots.get(reply.slot)
            if slot is not None and not slot.sent and slot.number == self._numbers:
                # its descriptor never went, and the peer numbers slots in the order descriptors arrive: kept, a
                # later slot's descriptor would arrive under this one's number (the peer then reads another
                # slot's bytes as this one's); discarded, its number is the next slot's again (a round's views
                # of it keep its memory mapped until they go: the bytes reply is sent from them)
                del self._slots[slot.number]
                self._reserved.pop(slot.number, None)
                slot.close()
                self._numbers -= 1
            elif slot is not None:
                slot.busy = False
            self._retired = reply.drop + self._retired

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for slot in self._slots.values():
                slot.close()  # (a reserved slot's views keep its memory mapped until they go)
            self._slots.clear()
            self._reserved.clear()
        self.raw.close()


class SlotSend:
    """What the server's read loop sends for a fetch answered in a slot: the reply, the descriptor to attach
    (None: the peer has the slot), and the bytes reply's object if the descriptor cannot go."""

    __slots__ = ("reply", "fd", "fallback")

    def __init__(self, reply: PeerSlotReply, fd: int | None, fallback: Any) -> None:
        self.reply, self.fd, self.fallback = reply, fd, fallback


def send_with_fd(sock: socket.socket, data: bytes, fd: int) -> int:
    """Writes ``data`` with ``fd`` attached (SCM_RIGHTS) on a non-blocking Unix socket: the bytes written
    (0 when none were, and then the descriptor did not go either)."""
    try:
        return sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    except OSError:  # (would block, or the peer is gone: the bytes reply goes, or reports the closed connection)
        return 0


# ------------------------------------------------------------------ the fetching side (client)


class SlotMaps:
    """The slots a connection's peer handed over, mapped read-only, numbered in the order their descriptors
    arrived (the publisher numbers them the same way); and the slots read since the last fetch."""

    def __init__(self) -> None:
        self._maps: dict[int, tuple[mmap.mmap, int]] = {}
        self._arrived = 0
        self._done: list[int] = []
        self._lock = threading.Lock()

    def read_size(self) -> int:
        return socket.CMSG_SPACE(_FDS_PER_READ * array.array("i").itemsize)

    def received(self, ancdata: list) -> None:
        """Descriptors that came with a read: each mapped as the next slot if it is a size-sealed memfd of at
        most MAX_SLOT_BYTES and there is room, else closed (a slot number is used up either way). Room: twice
        MAX_SLOTS (a new slot's descriptor arrives before the reply that drops the one it replaced is read)."""
        for level, kind, data in ancdata:
            if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
                continue
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                self._arrived += 1
                try:
                    mapped = self._map(fd)
                finally:
                    os.close(fd)  # (the mapping keeps the memory)
                if mapped is not None:
                    with self._lock:
                        self._maps[self._arrived] = mapped

    def _map(self, fd: int) -> tuple[mmap.mmap, int] | None:
        try:
            info = os.fstat(fd)
            # (st_blksize: a hugetlbfs memfd's is its huge page size; a hole punched in one after it was mapped
            # faults with SIGBUS when the huge page pool is empty: only page-sized shmem is mapped)
            if not stat.S_ISREG(info.st_mode) or not 0 < info.st_size <= MAX_SLOT_BYTES \
                    or info.st_blksize != mmap.PAGESIZE \
                    or fcntl.fcntl(fd, _F_GET_SEALS) & _SIZE_SEALS != _SIZE_SEALS or len(self._maps) >= 2 * MAX_SLOTS:
                return None
            return mmap.mmap(fd, info.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ), info.st_size
        except OSError:  # (not a memfd: no seals to get)
            return None

    def views(self, reply: PeerSlotReply, expected: list) -> list[torch.Tensor]:
        """The tensors ``reply`` placed, as read-only views of the slot (read once, then :meth:`done`)."""
        for number in reply.drop[: 2 * MAX_SLOTS] if type(reply.drop) is list else ():
            self.forget(number)
        offsets, nbytes = layout(expected)
        with self._lock:
            found = self._maps.get(reply.slot) if type(reply.slot) is int else None
        if found is None or type(reply.nbytes) is not int or reply.nbytes != nbytes or nbytes > found[1]:
            raise SerializationError(f"a peer's share slot reply names slot {reply.slot!r} of {reply.nbytes!r} "
                                     f"bytes; this connection maps no such slot for {nbytes} bytes")
        with warnings.catch_warnings():  # (read-only memory: read once, never written)
            warnings.simplefilter("ignore", UserWarning)
            # over a memoryview: torch keeps a reference to the object it is given, not a buffer export, so on
            # the mmap itself close() (a drop, the link's close, on another thread) would unmap under live views
            # (SIGSEGV, or reads of whatever is mapped there next); the memoryview's export makes close() fail
            # (BufferError) and the mapping goes with the last view
            whole = torch.frombuffer(memoryview(found[0]), dtype=torch.uint8)
        return _views(whole, expected, offsets)

    def unread(self, reply: Any) -> None:
        """A slot reply dropped unread (its round failed after the fetch was posted): its drops are applied and
        its slot reported done (else the publisher keeps that slot busy, and the retired ones stay mapped, for
        the connection's life)."""
        if type(reply) is not PeerSlotReply:
            return
        for number in reply.drop[: 2 * MAX_SLOTS] if type(reply.drop) is list else ():
            self.forget(number)
        if type(reply.slot) is int:
            self.done(reply.slot)

    def done(self, number: int) -> None:
        with self._lock:
            if number in self._maps and number not in self._done:
                self._done.append(number)

    def take_done(self) -> list[int]:
        with self._lock:
            done, self._done = self._done, []
        return done

    def forget(self, number: Any) -> None:
        with self._lock:
            found = self._maps.pop(number, None) if type(number) is int else None
        if found is not None:
            _close_map(found[0])

    def close(self) -> None:
        with self._lock:
            maps, self._maps = list(self._maps.values()), {}
        for mapped, _ in maps:
            _close_map(mapped)


def _close_map(mapped: mmap.mmap) -> None:
    try:
        mapped.close()
    except BufferError:  # views still alive: the mapping is unmapped when the last goes
        pass
