"""Products with a constant operand whose Beaver mask is opened once (veil/mpc/fixed_operand.py)."""

import secrets

import pytest
import torch

import veil as sy
from veil.mpc import fixed_operand
from veil.mpc.errors import ProviderError
from veil.mpc.opening import count_openings, reconstruct
from veil.mpc.providers.worker_dealer import dealer_for
from veil.mpc.ring import bilinear
from veil.mpc.sharing import split


def _shared(value, parties, gen):
    return dict(zip(parties, split(value, len(parties), gen)))


def _ints(shape, gen):
    return torch.randint(-1000, 1000, shape, generator=gen, dtype=torch.int64)


CASES = [("conv2d", (2, 3, 9, 9), (4, 3, 4, 4), {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1),
                                                  "groups": 1}),
         ("mm", (5, 7), (7, 3), {})]


@pytest.mark.parametrize("op,shape_x,shape_w,kw", CASES, ids=["conv2d", "mm"])
def test_product_equals_torch_on_local_shares(parties, dealer, gen, op, shape_x, shape_w, kw):
    w = _ints(shape_w, gen)
    fixed = fixed_operand.fix_operand(_shared(w, parties, gen), dealer)
    for _ in range(3):  # the same fixed mask, a fresh (a, c) per product
        x = _ints(shape_x, gen)
        out = reconstruct(fixed_operand.fixed_product(_shared(x, parties, gen), fixed, op, **kw))
        torch.testing.assert_close(out, bilinear(op)(x, w, **kw), rtol=0, atol=0)


def test_a_wrong_product_is_visible(parties, dealer, gen):
    """The comparison above can fail: a triple for another fixed mask gives another product."""
    w = _ints((7, 3), gen)
    fixed = fixed_operand.fix_operand(_shared(w, parties, gen), dealer)
    other = fixed_operand.fix_operand(_shared(w, parties, gen), dealer)
    fixed.fixed_id = other.fixed_id  # c = a * b' for the other operand's mask
    x = _ints((5, 7), gen)
    out = reconstruct(fixed_operand.fixed_product(_shared(x, parties, gen), fixed, "mm"))
    assert not torch.equal(out, x @ w)


def test_provider_refuses_a_fixed_mask_dealt_twice_and_unknown_ids(dealer):
    fid = secrets.token_hex(16)
    dealer.fixed_operand_mask(fid, (3,), ("alice", "bob"))
    with pytest.raises(ProviderError, match="already dealt"):
        dealer.fixed_operand_mask(fid, (3,), ("alice", "bob"))
    with pytest.raises(ProviderError, match="no fixed mask"):
        dealer.fixed_operand_triples(secrets.token_hex(16), "mul", (3,), (3,), ("alice", "bob"))
    with pytest.raises(ProviderError, match="no fixed mask"):  # the right id, another shape
        dealer.fixed_operand_triples(fid, "mul", (4,), (4,), ("alice", "bob"))


@pytest.fixture
def workers(hook):
    parties = [sy.VirtualWorker(hook, id=n) for n in ("alice", "bob")]
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    return parties, cp, dealer_for(cp, hook.local_worker)


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "all-shares"])
def test_product_on_workers_opens_only_x(workers, seeded):
    """Over VirtualWorkers with the worker dealer: the decoded product equals torch, and each product opens
    the input alone (the weights once, at fix time)."""
    parties, cp, dealer = workers
    dealer.seeded = seeded
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 1, 4, 4, generator=gen)
    ws = w.fix_precision().share(*parties, crypto_provider=cp).child.child
    with count_openings() as setup:
        fixed = fixed_operand.fix_operand(ws, dealer)
    assert setup.rounds == 1 and setup.elements == 2 * w.numel()
    kw = {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    for _ in range(2):
        x = torch.randn(1, 1, 28, 28, generator=gen)
        xs = x.fix_precision().share(*parties, crypto_provider=cp).child.child
        with count_openings() as per_query:
            z = fixed_operand.fixed_product(xs, fixed, "conv2d", **kw)
            out = reconstruct(z)
        assert per_query.rounds == 2 and per_query.elements == 2 * x.numel() + 2 * out.numel()  # x - a, then .get
        expected = torch.nn.functional.conv2d(x, w, stride=2, padding=1)
        torch.testing.assert_close(out.double() / 2 ** 32, expected.double(), atol=1e-3, rtol=0)
