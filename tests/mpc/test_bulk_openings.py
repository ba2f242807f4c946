"""Bulk openings: replies sent from tensor memory, opened shares summed in place.

A worker's reply to an opening step (fresh masked tensors) may leave its ``_recv_msg`` as serde
FrameParts (``reply_parts_over``; network servers send them fragment by fragment from the
tensors' memory), and ``open_parties`` sums the parties' shares into a received reply's tensors
instead of allocating one new tensor per opened value. Results are compared with plain torch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.messaging import messages as m
from veil.messaging.frames import FrameParts
from veil.messaging.serde import deserialize, serialize
from veil.mpc.party import open_parties
from veil.workers.reply_frames import REPLY_FRAGMENT, _part_fragments
from veil.workers.websocket_server import WebsocketServerWorker


class PartsWorker(sy.VirtualWorker):
    """An in-process party whose fresh replies over 1 KiB come back in parts, as a network server's do."""

    reply_parts_over = 1024
    own_replies = False  # keep them as FrameParts (a VirtualWorker makes them one owned buffer)

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.replies: list[str] = []

    def _recv_msg(self, data):
        reply = super()._recv_msg(data)
        self.replies.append("parts" if type(reply) is FrameParts else "bytes")
        return reply


@pytest.fixture
def parts_parties(hook):
    return PartsWorker(hook, id="alice"), PartsWorker(hook, id="bob"), sy.VirtualWorker(hook, id="crypto_provider")


def _shared(t, alice, bob, cp):
    return t.fix_precision().share(alice, bob, crypto_provider=cp)


def test_network_servers_send_opening_replies_in_parts():
    assert WebsocketServerWorker.reply_parts_over == REPLY_FRAGMENT
    assert sy.VirtualWorker.own_replies  # in-process replies in parts become one owned buffer (test_virtual_frames)


def test_opening_replies_in_parts_give_torchs_results(parts_parties):
    alice, bob, cp = parts_parties
    torch.manual_seed(0)
    x, y = torch.randn(3000), torch.randn(3000)
    m1, m2 = torch.randn(40, 30), torch.randn(30, 20)
    got_mul = (_shared(x, alice, bob, cp) * _shared(y, alice, bob, cp)).get().float_precision()
    got_mm = (_shared(m1, alice, bob, cp) @ _shared(m2, alice, bob, cp)).get().float_precision()
    got_relu = F.relu(_shared(x, alice, bob, cp)).get().float_precision()  # XOR openings too
    assert torch.allclose(got_mul, x * y, atol=1e-3)
    assert torch.allclose(got_mm, m1 @ m2, atol=1e-2)
    assert torch.allclose(got_relu, F.relu(x), atol=1e-4)
    assert "parts" in alice.replies and "parts" in bob.replies


def test_only_fresh_replies_leave_in_parts(parts_parties):
    """A stored object's bytes are copied into the reply: another request may write it later."""
    alice, _, _ = parts_parties
    t = torch.randn(10_000)
    ptr = t.send(alice)
    alice.replies.clear()
    assert torch.equal(ptr.get(), t)
    assert alice.replies == ["bytes"]


@pytest.mark.parametrize("n", [1, (REPLY_FRAGMENT // 8) * 2 + 3, 3 * REPLY_FRAGMENT // 8])
def test_reply_fragments_rebuild_the_message(n):
    a, b = torch.randint(-2**62, 2**62, (n,)), torch.randint(-2**62, 2**62, (n + 5,))
    reply = m.ObjectsReply([a, b])
    parts = serialize(reply, sender="w", parts_over=0)
    assert type(parts) is FrameParts
    fragments = list(_part_fragments(parts))
    assert all(0 < len(f) <= REPLY_FRAGMENT for f in fragments)
    joined = b"".join(fragments)
    assert joined == serialize(reply, sender="w") and len(joined) == parts.nbytes
    back = deserialize(joined)[0].objects
    assert torch.equal(back[0], a) and torch.equal(back[1], b)


def test_in_place_sum_leaves_local_shares_alone(hook, monkeypatch):
    """One party local (plain tensors), one remote: the sum goes into the received reply's tensors.

    The local step here returns two of its inputs as they are (a step may): summing into its
    outputs would overwrite the local party's shares."""
    from veil.mpc import party

    monkeypatch.setitem(party.PARTY_FUNCTIONS, "beaver_mask", lambda x, y, a, b: (x, y))  # bob runs it too (in-process)
    bob = sy.VirtualWorker(hook, id="bob")
    torch.manual_seed(1)
    x0, y0, a0, b0 = (torch.randint(-2**62, 2**62, (500,)) for _ in range(4))
    x1, y1, a1, b1 = (torch.randint(-2**62, 2**62, (500,)) for _ in range(4))
    local = [t.clone() for t in (x0, y0, a0, b0)]
    remote = [t.send(bob) for t in (x1, y1, a1, b1)]
    e, f = open_parties("beaver_mask", {"alice": (x0, y0, a0, b0), "bob": tuple(remote)})
    assert torch.equal(e, x0 + x1) and torch.equal(f, y0 + y1)
    assert all(torch.equal(t, u) for t, u in zip((x0, y0, a0, b0), local))
    # opening again gives the same values: nothing the parties hold was overwritten
    e2, f2 = open_parties("beaver_mask", {"alice": (x0, y0, a0, b0), "bob": tuple(remote)})
    assert torch.equal(e2, e) and torch.equal(f2, f)


def test_large_products_over_network_workers_match_torch(connect_websocket):
    """Opening replies of 2.4 MB per tensor (over one fragment) from ``veil worker`` processes."""
    alice, bob, cp = (connect_websocket(n) for n in ("alice", "bob", "dave"))
    torch.manual_seed(2)
    x, y = torch.randn(300_000), torch.randn(300_000)
    got = (_shared(x, alice, bob, cp) * _shared(y, alice, bob, cp)).get().float_precision()
    assert torch.allclose(got, x * y, atol=1e-3)
    m1, m2 = torch.randn(300, 400), torch.randn(400, 300)
    got = (_shared(m1, alice, bob, cp) @ _shared(m2, alice, bob, cp)).get().float_precision()
    assert torch.allclose(got, m1 @ m2, atol=5e-2)


def test_an_opening_output_that_is_an_argument_is_copied(monkeypatch):
    """The reply leaves from its tensors' memory after the handler: it must not be a stored share's."""
    from veil.mpc import party

    computed = []

    def step(x, y, a, b):
        computed.append(x - a)
        return computed[-1], y[2:]  # a view of an argument (a stored share on a worker)

    monkeypatch.setitem(party.PARTY_FUNCTIONS, "beaver_mask", step)
    x, y, a = torch.arange(6), torch.arange(6, 12), torch.ones(6, dtype=torch.int64)
    out = party.run_openable("beaver_mask", (x, y, a, a), {})
    assert torch.equal(out[0], x - a) and torch.equal(out[1], y[2:])
    assert out[0] is computed[0]  # computed for the reply: sent as it is
    assert out[1].untyped_storage().data_ptr() != y.untyped_storage().data_ptr()


def test_opening_outputs_that_share_memory_are_copied_apart(hook, monkeypatch):
    """A step returning one tensor twice (or a view of an earlier output): an in-process worker hands its outputs'
    memory to the caller, who sums into each received output in place; aliased outputs would sum twice."""
    from veil.mpc import party

    def step(x, y, a, b):
        d = x - a
        return d, d  # the same fresh tensor twice

    monkeypatch.setitem(party.PARTY_FUNCTIONS, "beaver_mask", step)
    out = party.run_openable("beaver_mask", (torch.arange(6), torch.arange(6), torch.ones(6, dtype=torch.int64),
                                             torch.ones(6, dtype=torch.int64)), {})
    assert out[0].untyped_storage().data_ptr() != out[1].untyped_storage().data_ptr()
    alice, bob = sy.VirtualWorker(hook, id="alias_a"), sy.VirtualWorker(hook, id="alias_b")
    torch.manual_seed(3)
    n = 40_000  # over the size from which replies are handed over without a copy
    shares = {w.id: [torch.randint(-2**62, 2**62, (n,)) for _ in range(4)] for w in (alice, bob)}
    ptrs = {w.id: tuple(t.send(w) for t in shares[w.id]) for w in (alice, bob)}
    e, f = open_parties("beaver_mask", ptrs)
    expected = sum(s[0] - s[2] for s in shares.values())
    assert torch.equal(e, expected) and torch.equal(f, expected)
