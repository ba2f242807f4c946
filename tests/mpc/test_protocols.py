"""Beaver products and truncation on raw share dicts, against plain torch."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.mpc.beaver import beaver_conv2d, beaver_matmul, beaver_mul
from veil.mpc.opening import count_openings, reconstruct
from veil.mpc.providers import LocalDealer
from veil.mpc.sharing import split
from veil.mpc.truncation import truncate_secureml, truncate_shares, truncate_with_pairs


def shared(x, parties, gen=None):
    return dict(zip(parties, split(x, len(parties), gen)))


def test_beaver_mul_broadcast_one_round(parties, dealer):
    x, y = torch.randint(-1000, 1000, (3, 1)), torch.randint(-1000, 1000, (1, 4))
    with count_openings() as stats:
        z = beaver_mul(shared(x, parties), shared(y, parties), dealer)
    assert torch.equal(reconstruct(z), x * y)
    n = len(parties)
    assert stats.rounds == 1
    assert stats.elements == (x.numel() + y.numel()) * n * (n - 1)


def test_beaver_mul_wraps_like_ring(parties, dealer):
    x = torch.randint(-(2**62), 2**62, (50,))
    y = torch.randint(-(2**62), 2**62, (50,))
    assert torch.equal(reconstruct(beaver_mul(shared(x, parties), shared(y, parties), dealer)), x * y)


def test_beaver_matmul(parties, dealer):
    x, y = torch.randint(-100, 100, (2, 5, 3)), torch.randint(-100, 100, (2, 3, 4))
    assert torch.equal(reconstruct(beaver_matmul(shared(x, parties), shared(y, parties), dealer)), x @ y)


@pytest.mark.parametrize("op, shapes", [("mul", ((40,), (40,))), ("mm", ((6, 9), (9, 5))), ("matmul", ((6, 9), (9, 5))),
                                        ("matmul", ((2, 6, 9), (9, 5))), ("bmm", ((3, 4, 7), (3, 7, 2))),
                                        ("mul", ((5, 1), (1, 3)))])
def test_beaver_fused_combine_wraps_like_ring(parties, dealer, op, shapes):
    """The fused combine (addcmul/addmm/baddbmm into one new tensor) over the whole ring, as the plain op."""
    from veil.mpc.beaver import beaver_op
    from veil.mpc.ring import bilinear

    gen = torch.Generator().manual_seed(len(op) + len(shapes[0]))
    x, y = (torch.empty(s, dtype=torch.int64).random_(-(2**63), None, generator=gen) for s in shapes)
    got = reconstruct(beaver_op(shared(x, parties, gen), shared(y, parties, gen), op, dealer))
    assert torch.equal(got, bilinear(op)(x, y))


def test_beaver_conv2d(parties, dealer):
    x, w = torch.randint(-100, 100, (2, 3, 7, 7)), torch.randint(-100, 100, (4, 3, 3, 3))
    z = beaver_conv2d(shared(x, parties), shared(w, parties), dealer, stride=2, padding=1)
    assert torch.equal(reconstruct(z), F.conv2d(x, w, stride=2, padding=1))


def test_mismatched_parties_rejected(dealer):
    x = shared(torch.arange(3), ("a", "b"))
    y = shared(torch.arange(3), ("a", "c"))
    with pytest.raises(ValueError, match="different parties"):
        beaver_mul(x, y, dealer)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=16),
    divisor=st.sampled_from([2**16, 1000, 7, 2]),
    n=st.sampled_from([2, 3, 4]),
    seed=st.integers(0, 2**32),
)
def test_truncation_error_below_one(values, divisor, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor(values)
    parties = [f"p{i}" for i in range(n)]
    z = reconstruct(truncate_shares(shared(x, parties, gen), divisor, LocalDealer(seed=seed)))
    assert (z.double() - x.double() / divisor).abs().max() <= 1.0


def test_truncation_methods(gen):
    x = torch.randint(-(2**40), 2**40, (1000,))
    two = shared(x, ("a", "b"), gen)
    assert (reconstruct(truncate_secureml(two, 2**16)) - x // 2**16).abs().max() <= 1
    three = shared(x, ("a", "b", "c"), gen)
    with count_openings() as stats:
        z_shares = truncate_with_pairs(three, 2**16, LocalDealer(seed=3))
    z = reconstruct(z_shares)
    assert (z - x // 2**16).abs().max() <= 1 and stats.rounds == 1
    with pytest.raises(ValueError):
        truncate_secureml(three, 4)


@pytest.mark.parametrize("through", ["numpy", "torch"])
@pytest.mark.parametrize("divisor", [2, 3, 7, 1000, 2**16, 10 * 2**16, 3 * 2**20, 2**62 - 2, 2**61 + 1])
def test_floor_div_unsigned_matches_python_on_the_ring_edges(divisor, through, monkeypatch):
    """Both ways: numpy's unsigned division, and torch's ops (taken for what numpy cannot view)."""
    from veil.mpc import ring_numpy
    from veil.mpc.truncation import floor_div_unsigned

    if through == "torch":
        monkeypatch.setattr(ring_numpy, "array_of", lambda t: None)

    edges = [0, 1, 2, divisor - 1, divisor, divisor + 1, 2**62, 2**63 - 1, -(2**63), -1, -2, -divisor, -divisor - 1]
    rng = torch.Generator().manual_seed(divisor % 1000)
    values = torch.cat([torch.tensor(edges, dtype=torch.int64),
                        torch.randint(-(2**63), 2**63 - 1, (200,), generator=rng, dtype=torch.int64)])
    got = floor_div_unsigned(values, divisor)
    expected = [((v % 2**64) // divisor + 2**63) % 2**64 - 2**63 for v in values.tolist()]
    assert got.tolist() == expected


@pytest.mark.parametrize("divisor", [0, -4, 2**64, 2**70, 16.0])
def test_floor_div_unsigned_refuses_a_divisor_outside_the_ring(divisor):
    """A divisor of 2^64 or more (where numpy would wrap the shift count: a silent wrong quotient), below 1 or not
    an int is refused in one line; the MAC truncation's finish divides through it."""
    from veil.mpc.truncation import floor_div_unsigned

    with pytest.raises(ValueError, match="divisor in \\[1, 2\\^64\\)"):
        floor_div_unsigned(torch.tensor([5, -5]), divisor)
