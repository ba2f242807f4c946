"""Peer rounds to network parties are posted (``runtime.POST_PEER_ROUNDS``, ``Outbox.send_round(post=...)``).

The orchestrator writes a peer round's requests and goes on without reading the replies (they carry
nothing: the opened values stay at the parties); the next request to a party is written behind it and
the posted replies are read after it, so a party that finishes one round finds the next one waiting.
Results must be exactly plain PyTorch's, a failed posted round must surface at the next request to that
party as the party's own error, and the parties must serve on afterwards.
"""

import pytest
import torch

from veil.exceptions import ObjectNotFoundError
from veil.messaging import messages as m
from veil.tensors.mpc_glue import runtime

from tests.mpc.peer_fixtures import cp, parties  # noqa: F401  (fixtures: 2 and 3 network parties, peer openings on)


def _posted(me) -> list:
    """The posted rounds whose replies this process has not read yet."""
    return [f for flights in me._in_flight.values() for f in flights if f[4]]


def test_posted_peer_rounds_give_plain_pytorch_results(hook, parties, cp):
    me = hook.local_worker
    gen = torch.Generator().manual_seed(11)
    a, b, c = (torch.randn(24, 24, generator=gen) for _ in range(3))
    x, y, z = (t.fix_precision().share(*parties, crypto_provider=cp) for t in (a, b, c))
    out = ((x @ y) * z).settle()  # four peer rounds back to back, each read behind the next
    assert _posted(me)  # the last round's replies are still on their way
    got = out.get().float_precision()
    assert not _posted(me)
    assert torch.allclose(got, (a @ b) * c, atol=1e-2), (got - (a @ b) * c).abs().max()


def test_integer_products_of_posted_rounds_are_exact(hook, parties, cp):
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randint(-2**20, 2**20, (32, 16), generator=gen), torch.randint(-2**20, 2**20, (16, 8), generator=gen)
    x, y = a.share(*parties, crypto_provider=cp), b.share(*parties, crypto_provider=cp)
    assert torch.equal(((x @ y) * (x @ y)).get(), (a @ b) * (a @ b))


def test_a_failed_posted_round_is_raised_at_the_next_request_and_the_parties_serve_on(hook, parties, cp):
    me = hook.local_worker
    a = torch.randint(-100, 100, (8, 8))
    x = a.share(*parties, crypto_provider=cp)
    for share in x.child.values():  # the parties lose x's shares behind this process's back
        me.send_msg(m.DeleteMessage([share.id_at_location]), share.location)
    y = x * x  # the product's peer round fails at every party: posted, nothing raised yet
    assert _posted(me)
    with pytest.raises(ObjectNotFoundError):  # the party's own error, at the next request
        y.get()
    assert not _posted(me)
    b = torch.randint(-100, 100, (8, 8))
    assert torch.equal((b.share(*parties, crypto_provider=cp) * b.share(*parties, crypto_provider=cp)).get(), b * b)


def test_rounds_are_waited_for_when_posting_is_off(hook, parties, cp, monkeypatch):
    monkeypatch.setattr(runtime, "POST_PEER_ROUNDS", False)
    me = hook.local_worker
    a = torch.randint(-100, 100, (8, 8))
    x = a.share(*parties, crypto_provider=cp)
    y = x * x
    assert not _posted(me)
    assert torch.equal(y.get(), a * a)


def test_wait_posted_reads_every_posted_reply(hook, parties, cp):
    me = hook.local_worker
    a = torch.randint(-100, 100, (8, 8))
    x = a.share(*parties, crypto_provider=cp)
    y = x * x
    assert _posted(me)
    me.wait_posted()
    assert not me._in_flight
    assert torch.equal(y.get(), a * a)
