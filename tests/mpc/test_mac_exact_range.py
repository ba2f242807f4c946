"""SPDZ2k-authenticated products and truncation stay exact over the whole documented range.

Beaver products mod 2^128 reduce to the exact ring product mod 2^64 for any
inputs; authenticated truncation is ``floor(x/d)`` or ``+1`` for every
``|x| <= 2^62 - d`` (the bound of :mod:`veil.mpc.truncation`); every result
below is MAC-checked on ``.get()``. Zero wrong entries are allowed (2*10^4 truncations per case by default,
10^6 with VEIL_SLOW=1).
"""

import os

import pytest
import torch

from veil.mpc.providers import LocalDealer
from veil.mpc.ring import random_ring
from veil.mpc.truncation import TRUNCATION_BOUND
from veil.tensors.additive import share

PARTIES = {2: ("a", "b"), 3: ("a", "b", "c")}
#: entries per truncation test: 2*10^4 by default, 10^6 with VEIL_SLOW=1
N_TRUNC = 1_000_000 if os.environ.get("VEIL_SLOW") else 20_000


def across_range(n: int, bound: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` values in ``[-bound, bound]``: half uniform, half log-uniform magnitudes, plus the edges."""
    half = n // 2
    uniform = torch.empty(half, dtype=torch.int64).random_(-bound, bound + 1, generator=gen)
    bits = torch.randint(0, bound.bit_length(), (n - half,), generator=gen)
    mags = torch.minimum(torch.empty(n - half, dtype=torch.int64).random_(0, 2**63 - 1, generator=gen) >> (63 - bits),
                         torch.tensor(bound))
    signs = torch.randint(0, 2, (n - half,), generator=gen) * 2 - 1
    edges = torch.tensor([bound, -bound, bound - 1, -bound + 1, 0, 1, -1])
    return torch.cat([edges, uniform, mags * signs])[:n]


@pytest.mark.parametrize("n_parties,divisor", [(2, 2**16), (3, 2**16), (2, 3)])
def test_authenticated_truncation_over_the_whole_range(n_parties, divisor):
    gen = torch.Generator().manual_seed(divisor + n_parties)
    values = across_range(N_TRUNC, TRUNCATION_BOUND - divisor, gen)
    x = share(values, PARTIES[n_parties], LocalDealer(seed=divisor), active_security=True)
    err = x.truncate(divisor).get() - torch.div(values, divisor, rounding_mode="floor")
    bad = (err < 0) | (err > 1)
    assert int(bad.sum()) == 0, values[bad][:3].tolist()


@pytest.mark.parametrize("n_parties", [2, 3])
def test_authenticated_products_are_exact_mod_2_64_for_any_inputs(n_parties):
    gen = torch.Generator().manual_seed(n_parties)
    a, b = random_ring((5_000,), gen), random_ring((5_000,), gen)
    dealer = LocalDealer(seed=n_parties)
    A, B = (share(t, PARTIES[n_parties], dealer, active_security=True) for t in (a, b))
    assert torch.equal((A * B).get(), a * b)  # int64 products wrap: the ring product
    m, w = random_ring((16, 64), gen), random_ring((64, 8), gen)
    M, W = (share(t, PARTIES[n_parties], dealer, active_security=True) for t in (m, w))
    assert torch.equal((M @ W).get(), m @ w)
    assert torch.equal((M @ w).get(), m @ w)  # public operand: 16-bit digits, exact mod 2^128
    assert torch.equal((M.sum(0) - 3 * M[0]).get(), m.sum(0) - 3 * m[0])


def test_fixed_point_products_at_the_edge_of_the_range():
    """Products whose raw value is close to 2^62 truncate exactly under MACs."""
    scale = 2**16
    gen = torch.Generator().manual_seed(7)
    x = across_range(5_000, 2**31 - 1, gen)  # raw encodings; |x*y| < 2^62
    y = across_range(5_000, 2**31 - 1, gen).flip(0)
    dealer = LocalDealer(seed=7)
    X, Y = (share(t, PARTIES[2], dealer, active_security=True) for t in (x, y))
    err = (X * Y).truncate(scale).get() - torch.div(x * y, scale, rounding_mode="floor")
    assert int(((err < 0) | (err > 1)).sum()) == 0
