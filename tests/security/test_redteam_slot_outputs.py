"""Red team, a peer opening's outputs computed straight into the share slot its one reader maps
(``veil.workers.peer_slot_outputs``, ``SlotPool.reserve`` / ``unreserve``, ``veil.mpc.output_buffers``).

The peer maps its slots for good: whatever is written into one it can read at once. Holes found and mended here:
an environment switch (``VEIL_EXP_NOREC=1``) skipped the wait for the allowed audit row before a slot was
reserved and written; a slot whose round ended before the peer was handed it (the round's fetch taken but not
yet placed, or answered with bytes) was free again at once, so another round's outputs were written under the
reply still being made from it (the reader summed the other round's share: a silently wrong result); a link
closed between the reservation and its views raised a raw ValueError out of the round; and the wait for the
row hands the worker's turn over between the monitor's checks and the step, so an argument written in place
meanwhile (another connection of the session) was opened unchecked. Pinned besides: only outputs of exactly
the masks' layouts, int64, of a two-party round (or a top-bits round's other party), with no owner-derived
value, go into a slot; what lands there equals torch's ``x - a`` / ``r + x``.
"""

from __future__ import annotations

import socket

import pytest
import torch

from veil.exceptions import PermissionDeniedError, RemoteExecutionError
from veil.mpc.output_buffers import outputs_into
from veil.mpc.party import run_openable
from veil.workers import peer_slot_outputs, share_slots
from veil.workers.peer_openings import PeerOpenMessage
from veil.workers.peer_slot_outputs import into_peer_slot
from veil.workers.share_slots import MIN_SLOT_BYTES, PeerSlotReply, SlotMaps, SlotPool

from network_helpers import send_placed, slot_link  # (tests/security/conftest.py puts tests/network on the path)

pytestmark = pytest.mark.skipif(not share_slots.enabled(), reason="share slots need Linux and memfd_create")

N = MIN_SLOT_BYTES // 8 + 3  # int64 entries: just past the smallest reply that takes a slot
I64 = torch.int64
ROUND = "r" * 16


class _Monitor:
    def __init__(self, layout):
        self.layout = layout

    def opening_layout(self):
        return self.layout


class _Worker:
    """What into_peer_slot reads of a network worker: its id, the monitor's opening layout, the peers' pools."""

    def __init__(self, pool: SlotPool, layout, wid: str = "alice"):
        self.id, self.monitor, self.peer_slot_pools = wid, _Monitor(layout), {"bob": pool, "charlie": pool}


def _msg(name: str = "beaver_mask", parties=("alice", "bob"), reveal: str = "") -> PeerOpenMessage:
    return PeerOpenMessage(name, (), {}, ROUND, list(parties), [1, 2], reveal)


def _others(msg: PeerOpenMessage, wid: str = "alice") -> frozenset:
    return frozenset(p for p in msg.parties if p != wid)


def _ring(*shape) -> torch.Tensor:
    return torch.randint(-2**62, 2**62, shape)


def _masked_args():
    return _ring(N), _ring(N), _ring(N), _ring(N)


def _mask_layout(n: int = N, derived: bool = False):
    return [((n,), I64), ((n,), I64)], derived


def _deliver(pool: SlotPool, reader: socket.socket, maps: SlotMaps, tensors: list):
    """A fetch as the server's loop answers it: placed (None: the bytes reply goes), sent, received."""
    placed = pool.place(tensors)
    return None if placed is None else send_placed(pool, reader, maps, placed)


def _read(pool: SlotPool, maps: SlotMaps, reply: PeerSlotReply, layout: list) -> list:
    views = maps.views(reply, layout)
    values = [torch.add(v, 0) for v in views]
    del views
    maps.done(reply.slot)
    pool.release(maps.take_done())
    return values


def _busy(pool: SlotPool) -> list:
    return [n for n, s in pool._slots.items() if s.busy or s.pinned]


# ------------------------------------------------------------------ holes found and mended


def test_no_environment_switch_skips_the_allowed_row_before_a_slot_is_written(monkeypatch):
    """The row not on record (a database error, a stalled writer): the round fails and no slot is reserved or
    written, whatever the worker's environment says."""
    monkeypatch.setenv("VEIL_EXP_NOREC", "1")

    def not_recorded(worker):
        raise RemoteExecutionError("the audit row could not be recorded")

    monkeypatch.setattr(peer_slot_outputs, "on_record_before_leaving", not_recorded)
    with slot_link() as (pool, reader, maps):
        msg = _msg()
        with pytest.raises(RemoteExecutionError):
            into_peer_slot(_Worker(pool, _mask_layout()), msg, _others(msg), "beaver_mask", _masked_args(), {})
        assert pool._reserved == {} and pool._slots == {}


def test_an_argument_written_in_place_while_the_row_is_recorded_is_not_opened(monkeypatch):
    """The wait for the allowed row hands the turn over between the monitor's checks (masks, owner-derived
    values) and the step: another connection of the session writes into a checked share meanwhile. The round
    is refused and nothing reaches a slot (the step would open a value nobody checked)."""
    x, y, a, b = _masked_args()
    secret = _ring(N)

    def written_meanwhile(worker):
        x.add_(secret)  # (what x.add_(owner_data) from another connection would do, the turn being handed over)

    monkeypatch.setattr(peer_slot_outputs, "on_record_before_leaving", written_meanwhile)
    with slot_link() as (pool, reader, maps):
        msg = _msg()
        with pytest.raises(PermissionDeniedError, match="written while its audit row"):
            into_peer_slot(_Worker(pool, _mask_layout()), msg, _others(msg), "beaver_mask", (x, y, a, b), {})
        assert pool._reserved == {} and pool._slots == {}
        # a view written counts too (views share the version counter)
        x2, y2, a2, b2 = _masked_args()
        monkeypatch.setattr(peer_slot_outputs, "on_record_before_leaving", lambda w: x2.view(-1)[:5].zero_())
        with pytest.raises(PermissionDeniedError):
            into_peer_slot(_Worker(pool, _mask_layout()), msg, _others(msg), "beaver_mask", (x2, y2, a2, b2), {})
        assert pool._reserved == {} and pool._slots == {}


@pytest.mark.parametrize("first_sent", [False, True], ids=["new-slot", "reused-slot"])
def test_a_slot_whose_round_ended_before_it_was_handed_is_never_written_under_its_reply(first_sent):
    """The round's reader took its outputs (wait_taken woke) but the loop had not placed them yet when the
    round ended: another session's round reserving then must not get that slot, or its outputs are written
    under the reply still being made from it (copied to another slot or sent as bytes): the reader would sum
    another round's share as this one's."""
    with slot_link() as (pool, reader, maps):
        layout = [((N,), I64), ((N,), I64)]
        if first_sent:  # the slot was handed out and read before (the peer maps it)
            warm = pool.reserve(layout)
            warm.views[0].fill_(1)
            warm.views[1].fill_(2)
            reply = _deliver(pool, reader, maps, warm.views)
            pool.unreserve(warm)
            assert [v[0].item() for v in _read(pool, maps, reply, layout)] == [1, 2]
        first = pool.reserve(layout)
        e1, f1 = _ring(N), _ring(N)
        first.views[0].copy_(e1)
        first.views[1].copy_(f1)
        published = first.views  # what the round published, and its reader took
        pool.unreserve(first)  # the round ended before the loop placed the taken tensors
        second = pool.reserve(layout)  # another session's round, same peer link
        assert second is not None
        e2, f2 = _ring(N), _ring(N)
        second.views[0].copy_(e2)
        second.views[1].copy_(f2)
        # the loop answers the first round's fetch now: in a slot or as bytes, with the first round's values
        late = _deliver(pool, reader, maps, published)
        got = published if late is None else _read(pool, maps, late, layout)
        assert torch.equal(got[0], e1) and torch.equal(got[1], f1)
        # and the second round's reader gets its own (numbered as the reader counts descriptors)
        reply = _deliver(pool, reader, maps, second.views)
        assert reply is not None
        assert [torch.equal(v, w) for v, w in zip(_read(pool, maps, reply, layout), (e2, f2))] == [True, True]
        pool.unreserve(second)


def test_a_link_closed_while_a_slot_is_reserved_leaves_the_round_to_compute_as_before(monkeypatch):
    """The link closes (its pool with it, on the loop) just after a handler picked a slot: no raw error out of
    the round, no reservation (the step computes as before and the fetch, over a new link, gets bytes)."""
    with slot_link() as (pool, reader, maps):
        real = memoryview

        def closing_first(obj):
            pool.close()
            return real(obj)

        monkeypatch.setattr(share_slots, "memoryview", closing_first, raising=False)
        assert pool.reserve([((N,), I64)]) is None
        monkeypatch.undo()
        assert pool.reserve([((N,), I64)]) is None  # (closed: no more slots)


# ------------------------------------------------------------------ attacks that held


def test_outputs_computed_in_a_slot_equal_torch_and_go_without_a_copy():
    """The positive case the rest pins against: a two-party beaver_mask (and a top-bits trunc_mask) computes
    into the reserved slot, equals torch, and the fetch is answered with that very slot."""
    with slot_link() as (pool, reader, maps):
        x, y, a, b = _masked_args()
        msg = _msg()
        found = into_peer_slot(_Worker(pool, _mask_layout()), msg, _others(msg), "beaver_mask", (x, y, a, b), {})
        assert found is not None and found[0] is pool
        with outputs_into(found[1].views):
            outputs = run_openable("beaver_mask", (x, y, a, b), {})
        assert found[1].holds(outputs)
        reply = _deliver(pool, reader, maps, outputs)
        assert pool.in_place == 1
        e, f = _read(pool, maps, reply, [((N,), I64), ((N,), I64)])
        assert torch.equal(e, x - a) and torch.equal(f, y - b)
        pool.unreserve(found[1])
        # trunc_mask, the top-bits round's other party publishing to the first (x is a strided view of a share)
        xt, r = _ring(N, 2).t(), _ring(2, N)
        top = _msg("trunc_mask", ("bob", "alice"), "top_bits")
        found = into_peer_slot(_Worker(pool, ([((2, N), I64)], False)), top, _others(top), "trunc_mask",
                               (xt, r), {"shift": 7})
        assert found is not None
        with outputs_into(found[1].views):
            (c,) = run_openable("trunc_mask", (xt, r), {"shift": 7})
        (got,) = _read(pool, maps, _deliver(pool, reader, maps, [c]), [((2, N), I64)])
        assert torch.equal(got, r + xt + 7)
        pool.unreserve(found[1])


@pytest.mark.parametrize("case", ["broadcast-masks", "float-operand", "int32-masks", "extra-output", "derived",
                                  "three-parties", "top-bits-first", "not-a-slot-step", "no-pool", "too-small"])
def test_openings_whose_outputs_could_be_refused_reserve_no_slot(case, monkeypatch):
    """Outputs the monitor's check after the step would refuse (a broadcast mask hides differences only, a float
    operand is not hidden mod 2^64, a mask of another dtype), owner-derived values (their approvals are used
    up after the step), rounds with more than one reader or none with slots: no slot is reserved, nothing is
    written where the peer maps, and the row wait is not even entered."""
    waited = []
    monkeypatch.setattr(peer_slot_outputs, "on_record_before_leaving", waited.append)
    x, y, a, b = _masked_args()
    name, args, layout, msg, wid = "beaver_mask", (x, y, a, b), _mask_layout(), _msg(), "alice"
    if case == "broadcast-masks":  # one mask entry each: e = x - a would open differences of x
        args, layout = (x, y, a[:1], b[:1]), _mask_layout(1)
    elif case == "float-operand":
        args = (x.double(), y, a, b)
    elif case == "int32-masks":
        layout = ([((N,), torch.int32), ((N,), torch.int32)], False)
    elif case == "extra-output":  # fewer masks than outputs
        layout = ([((N,), I64)], False)
    elif case == "derived":
        layout = _mask_layout(derived=True)
    elif case == "three-parties":
        msg = _msg(parties=("alice", "bob", "charlie"))
    elif case == "top-bits-first":
        name, args, layout = "trunc_mask", (x, a), ([((N,), I64)], False)
        msg = _msg("trunc_mask", ("alice", "bob"), "top_bits")
    elif case == "not-a-slot-step":
        name = "beaver_masks"
    elif case == "too-small":
        args, layout = (x[:10], y[:10], a[:10], b[:10]), _mask_layout(10)
    with slot_link() as (pool, reader, maps):
        worker = _Worker(pool, layout, wid)
        if case == "no-pool":
            worker.peer_slot_pools = {}
        assert into_peer_slot(worker, msg, _others(msg, wid), name, args, {}) is None
        assert pool._reserved == {} and _busy(pool) == [] and pool._slots == {}
        if case != "too-small":
            assert waited == []


def test_outside_an_opening_there_is_no_layout_and_no_slot():
    """opening_layout() is None outside open_step's run: nothing is reserved."""
    with slot_link() as (pool, reader, maps):
        msg = _msg()
        assert into_peer_slot(_Worker(pool, None), msg, _others(msg), "beaver_mask", _masked_args(), {}) is None
        assert pool._slots == {}


def test_a_pinned_slot_is_never_reused_whatever_the_peer_reports_and_a_handed_one_waits_for_done():
    """The peer reports a reserved slot done early (before its round ended): it stays pinned, no other round or
    fetch gets it; handed and the round ended, it is free only once the peer reports it done."""
    with slot_link() as (pool, reader, maps):
        layout = [((N,), I64)]
        first = pool.reserve(layout)
        first.views[0].copy_(torch.arange(N))
        reply = _deliver(pool, reader, maps, first.views)
        assert reply is not None and pool.in_place == 1
        pool.release([reply.slot] * 3)  # done, early and repeated
        other = pool.reserve(layout)  # another round: a new slot, not the pinned one
        assert other is not None and other.slot.number != reply.slot
        assert pool.place([torch.ones(N, dtype=I64)]) is None  # nor a copy (the new slot's descriptor has not gone)
        assert torch.equal(first.views[0], torch.arange(N))  # nothing wrote into the pinned slot
        pool.unreserve(other)
        pool.unreserve(first)
        assert pool._slots[reply.slot].busy is False  # (reported done already: free now)
        second = pool.reserve(layout)
        assert second is not None and second.slot.number == reply.slot
        second.views[0].fill_(5)
        again = _deliver(pool, reader, maps, second.views)
        pool.unreserve(second)
        assert pool._slots[again.slot].busy  # handed, not reported done: nobody writes it
        third = pool.reserve(layout)
        assert third is not None and third.slot.number != again.slot
        assert torch.equal(_read(pool, maps, again, layout)[0], torch.full((N,), 5))
        pool.unreserve(third)


def test_a_reserved_slots_descriptor_that_could_not_go_keeps_the_readers_numbers():
    """A new reserved slot handed to a fetch whose descriptor could not go (bytes instead): discarded, and the
    next slot takes its number, so the reader reads each round's own bytes."""
    with slot_link() as (pool, reader, maps):
        layout = [((N,), I64)]
        found = pool.reserve(layout)
        found.views[0].fill_(3)
        reply, fd = pool.place(found.views)
        assert fd is not None
        pool.unplace(reply)  # (the transport still buffered an earlier reply)
        assert torch.equal(found.views[0], torch.full((N,), 3))  # the bytes reply is sent from these views
        pool.unreserve(found)
        for k in range(3):
            nxt = pool.reserve(layout)
            nxt.views[0].fill_(10 + k)
            got = _deliver(pool, reader, maps, nxt.views)
            pool.unreserve(nxt)
            assert torch.equal(_read(pool, maps, got, layout)[0], torch.full((N,), 10 + k))
