"""VirtualWorker's large requests cross as one owned buffer (one copy of the tensor bytes, which the
decoder then uses in place) and still give exactly what was sent, never sharing the sender's memory;
its large fresh replies (opening steps' outputs) are handed over with their memory (no copy), and
nothing the worker stores ever is."""

from __future__ import annotations

import pytest
import torch

import veil as sy
from veil.messaging import messages as m
from veil.messaging.frames import FrameParts, HandedParts, OwnedBuffer
from veil.messaging.serde import SerializationError, deserialize, serialize
from veil.messaging.tensor_payload import ADOPT_MIN_BYTES
from veil.workers.virtual import owned_frame


@pytest.mark.parametrize("sizes", [[ADOPT_MIN_BYTES // 8 + 1], [3, 100_001], [70_000, 70_000], [1, 2, 3]], ids=str)
def test_an_owned_frame_decodes_to_the_sent_tensors_without_sharing_their_memory(sizes):
    tensors = [torch.randint(-2**62, 2**62, (n,)) for n in sizes] + [torch.randn(9, 7)]
    parts = serialize(m.ObjectsReply(tensors), sender="w", parts_over=0)
    assert type(parts) is FrameParts
    frame = owned_frame(parts)
    assert type(frame.obj) is OwnedBuffer
    got, _, _ = deserialize(frame)
    for t, g in zip(tensors, got.objects):
        assert torch.equal(t, g) and g.dtype == t.dtype
        assert g.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    assert bytes(frame) == b"".join(parts)  # the same message as the joined bytes


def test_a_large_tensor_is_used_in_place_and_stays_writable():
    t = torch.randint(-2**62, 2**62, (200_000,))
    frame = owned_frame(serialize(m.ObjectsReply([t]), sender="w", parts_over=0))
    (got,) = deserialize(frame)[0].objects
    assert torch.equal(got, t)
    buffer = torch.frombuffer(frame.obj, dtype=torch.uint8)
    # adopted: the tensor's bytes lie inside the owned buffer (no second copy)
    assert buffer.data_ptr() <= got.data_ptr() < buffer.data_ptr() + buffer.numel()
    got += 1  # writable (an opening sums into received tensors in place)
    assert torch.equal(got, t + 1)


def test_virtual_workers_round_trip_large_and_small_tensors(hook):
    alice = sy.VirtualWorker(hook, id="alice_frames")
    for t in (torch.arange(10), torch.randint(-2**62, 2**62, (300_000,)), torch.randn(400, 300)):
        ptr = t.send(alice)
        assert torch.equal((ptr + 1).get(), t + 1)
    x = torch.randn(100_000)
    shared = x.fix_precision().share(alice, sy.VirtualWorker(hook, id="bob_frames"),
                                     crypto_provider=sy.VirtualWorker(hook, id="cp_frames"))
    assert torch.allclose((shared * shared).get().float_precision(), x * x, atol=1e-3)


@pytest.mark.parametrize("sizes", [[ADOPT_MIN_BYTES // 8], [3, 100_001], [70_000, 70_000], [1, 2, 3], [0, 80_000]], ids=str)
def test_handed_parts_decode_to_the_sent_tensors_large_ones_in_place(sizes):
    tensors = [torch.randint(-2**62, 2**62, (n,)) for n in sizes] + [torch.randn(9, 7)]
    parts = serialize(m.ObjectsReply(tensors), sender="w", parts_over=0)
    got, _, _ = deserialize(HandedParts.of(parts))
    for t, g in zip(tensors, got.objects):
        assert torch.equal(t, g) and g.dtype == t.dtype and g.shape == t.shape
        shared = t.numel() and g.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        assert shared == (t.numel() * t.element_size() >= ADOPT_MIN_BYTES)  # small ones copied
    assert HandedParts.of(parts).nbytes == parts.nbytes


def test_handed_parts_that_do_not_match_their_header_are_refused():
    t = torch.randint(-2**62, 2**62, (100_000,))
    parts = serialize(m.ObjectsReply([t, t[:10]]), sender="w", parts_over=0)
    for bad in (parts[:2], [parts[0], parts[2], parts[1]], [*parts, memoryview(b"x")], [parts[0][5:], *parts[1:]]):
        handed = HandedParts(bad)
        handed.nbytes = 0
        with pytest.raises(SerializationError):
            deserialize(handed)


def test_opening_replies_are_handed_over_and_stored_objects_never_are(hook):
    alice = sy.VirtualWorker(hook, id="alice_handed")
    bob = sy.VirtualWorker(hook, id="bob_handed")
    seen = []
    original = sy.VirtualWorker._serve_decoded

    def serve(self, msg, sender, prelude):
        reply = original(self, msg, sender, prelude)
        seen.append((type(msg).__name__, type(reply).__name__))
        return reply

    sy.VirtualWorker._serve_decoded = serve
    try:
        t = torch.randint(-2**62, 2**62, (300_000,))
        ptr = t.send(alice)
        doubled = (ptr + ptr).get()  # a stored result's reply is copied, as before
        assert torch.equal(doubled, t + t) and torch.equal(ptr.get(), t)
        x, y = torch.randn(100_000), torch.randn(100_000)
        cp = sy.VirtualWorker(hook, id="cp_handed")
        z = x.fix_precision().share(alice, bob, crypto_provider=cp) * y.fix_precision().share(alice, bob,
                                                                                                crypto_provider=cp)
        assert torch.allclose(z.get().float_precision(), x * y, atol=1e-3)
    finally:
        sy.VirtualWorker._serve_decoded = original
    assert ("OpenMessage", "HandedParts") in seen  # the openings' outputs crossed without a copy
    assert all(kind != "HandedParts" for name, kind in seen if name != "OpenMessage")
