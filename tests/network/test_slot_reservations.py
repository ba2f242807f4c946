"""Reserved share slots (``SlotPool.reserve``): a peer opening's outputs computed where the reader maps them.

What the publisher writes into a reserved slot's views is what the reader's views show after the fetch's
reply, with no copy (``in_place``); a reserved slot is never handed to another fetch or reused while its
round runs, even when the reader reports it done; one whose round ended before any fetch is retired, never
written again (a reply may still be made from it); at most one
slot's descriptor is ever unsent (the reader numbers slots in the order descriptors arrive, so a slot made
for a reservation waits for its own reply instead of shifting the reader's numbers); a pool that closed under
a reservation leaves its views usable. And the step side: ``run_openable`` returns outputs written into the
runner's buffers as they are (no copy), and a buffer of another shape is not used.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.mpc.output_buffers import outputs_into
from veil.mpc.party import run_openable
from veil.workers import share_slots
from veil.workers.share_slots import MIN_SLOT_BYTES

from network_helpers import send_placed, slot_link

pytestmark = pytest.mark.skipif(not share_slots.enabled(), reason="share slots need Linux and memfd_create")

N = MIN_SLOT_BYTES // 8 + 3  # int64 entries: just past the smallest reply that takes a slot
LAYOUT = [((N,), torch.int64), ((2, N), torch.int64)]


@pytest.fixture
def link():
    with slot_link() as made:
        yield made


def _random(shape) -> torch.Tensor:
    return torch.randint(-2**62, 2**62, shape)


def _free_mapped_slot(pool, reader, maps):
    """A slot the reader maps and has reported done (free again): the reply that handed it over."""
    first = send_placed(pool, reader, maps, pool.place([_random((N,)), _random((2, N))]))
    maps.done(first.slot)
    pool.release(maps.take_done())
    return first


def test_a_reserved_slot_goes_to_the_reader_without_a_copy(link):
    pool, reader, maps = link
    first = _free_mapped_slot(pool, reader, maps)
    found = pool.reserve(LAYOUT)
    assert found is not None and found.slot.number == first.slot  # (the slot the reader maps already)
    e, f = _random((N,)), _random((2, N))
    torch.sub(e, 0, out=found.views[0])  # what a step computing into the buffers writes
    found.views[1].copy_(f)
    reply = send_placed(pool, reader, maps, pool.place(found.views))
    assert reply.slot == first.slot and pool.in_place == 1
    seen = maps.views(reply, LAYOUT)
    assert torch.equal(seen[0], e) and torch.equal(seen[1], f)
    pool.unreserve(found)


def test_a_reserved_slot_is_not_reused_while_its_round_runs_even_when_reported_done(link):
    pool, reader, maps = link
    first = _free_mapped_slot(pool, reader, maps)
    found = pool.reserve(LAYOUT)
    mine = found.views[0].clone()
    send_placed(pool, reader, maps, pool.place(found.views))
    pool.release([first.slot])  # the reader says done (early, or honestly) while the round still runs
    other = pool.place([torch.ones(N, dtype=torch.int64), torch.ones(2, N, dtype=torch.int64)])
    assert other is None or other[0].slot != first.slot  # (a new slot, or bytes: never the pinned one)
    second = pool.reserve(LAYOUT)
    assert second is None or second.slot.number != first.slot
    assert torch.equal(found.views[0], mine)  # the publisher's own outputs, untouched
    pool.unreserve(found)
    if second is not None:
        pool.unreserve(second)
    again = pool.reserve(LAYOUT)
    assert again is not None and again.slot.number == first.slot  # released by the reader, unpinned: free again


def test_a_slot_unreserved_before_any_fetch_is_retired_not_written_again(link):
    pool, reader, maps = link
    first = _free_mapped_slot(pool, reader, maps)
    found = pool.reserve(LAYOUT)
    mine = [_random((N,)), _random((2, N))]
    for view, value in zip(found.views, mine):
        view.copy_(value)
    pool.unreserve(found)  # the round ended before the peer was handed the slot (a reply may still be made from it)
    t = [_random((N,)), _random((2, N))]
    reply = send_placed(pool, reader, maps, pool.place(t))
    assert reply.slot != first.slot and first.slot in reply.drop and pool.in_place == 0  # a new slot; the old dropped
    seen = maps.views(reply, LAYOUT)
    assert torch.equal(seen[0], t[0]) and torch.equal(seen[1], t[1])
    assert torch.equal(found.views[0], mine[0]) and torch.equal(found.views[1], mine[1])  # never written again


def test_a_slot_made_for_a_reservation_keeps_the_readers_numbers(link):
    pool, reader, maps = link
    found = pool.reserve(LAYOUT)  # no slot yet: a new one, whose descriptor has not gone
    assert found is not None and not found.slot.sent
    # another fetch meanwhile: no second unsent slot (its descriptor would arrive first, under this one's number)
    assert pool.place([_random((N,))]) is None
    e = _random((N,))
    found.views[0].copy_(e)
    found.views[1].zero_()
    reply = send_placed(pool, reader, maps, pool.place(found.views))
    seen = maps.views(reply, LAYOUT)  # the reader mapped it under the number the reply names
    assert torch.equal(seen[0], e) and not seen[1].any()
    pool.unreserve(found)
    later = [_random((N,))]
    second = send_placed(pool, reader, maps, pool.place(later))
    assert second.slot != reply.slot and torch.equal(maps.views(second, [((N,), torch.int64)])[0], later[0])


def test_a_pool_closed_under_a_reservation_leaves_its_views_usable(link):
    pool, _reader, _maps = link
    found = pool.reserve(LAYOUT)
    pool.close()  # the link went while a handler computed into the slot
    found.views[0].fill_(7)  # no crash: the views keep the memory mapped
    assert int(found.views[0].sum()) == 7 * N
    assert pool.reserve(LAYOUT) is None
    pool.unreserve(found)


def test_run_openable_keeps_outputs_written_into_the_runners_buffers():
    x, y, a, b = (_random((4, 5)) for _ in range(4))
    memory = torch.empty(2 * 20, dtype=torch.int64)  # two buffers in one storage, as a slot's views are
    buffers = [memory[:20].view(4, 5), memory[20:].view(4, 5)]
    with outputs_into(buffers):
        e, f = run_openable("beaver_mask", (x, y, a, b), {})
    assert e.data_ptr() == buffers[0].data_ptr() and f.data_ptr() == buffers[1].data_ptr()
    assert torch.equal(e, x - a) and torch.equal(f, y - b)
    (c,) = run_openable("trunc_mask", (x, a), {"shift": 5})  # no buffers set: a tensor of its own
    assert torch.equal(c, a + x + 5) and c.untyped_storage().data_ptr() != memory.untyped_storage().data_ptr()


def test_a_buffer_of_another_shape_is_not_used():
    x, r = _random((3, 4)), _random((3, 4))
    wrong = torch.empty(12, dtype=torch.int64)
    with outputs_into([wrong]):
        (c,) = run_openable("trunc_mask", (x, r), {"shift": 0})
    assert torch.equal(c, r + x) and c.data_ptr() != wrong.data_ptr()


_SHAPES = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
_DTYPES = st.sampled_from([torch.int64, torch.int32, torch.float32, torch.bool])


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["beaver_mask", "trunc_mask"]), shapes=st.lists(_SHAPES, min_size=4, max_size=4),
       dtypes=st.lists(_DTYPES, min_size=4, max_size=4), extra=st.sampled_from([(), (3,), (True,), ("3",)]))
def test_the_slot_steps_layouts_from_their_operands_equal_running_them_on_meta_tensors(name, shapes, dtypes, extra):
    """peer_slot_outputs reserves a slot only for outputs of the masks' exact layouts: the layouts it reads off
    the operands must be what the step gives (worked out on meta tensors), also for mismatched or odd arguments."""
    from veil.workers.peer_slot_outputs import _meta_layout, _output_layout

    tensors = tuple(torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes))
    args = (tensors if name == "beaver_mask" else tensors[:2]) + extra
    assert _output_layout(name, args, {}) == _meta_layout(name, args, {})
