"""The parties' local truncation finish (veil.mpc.truncation) against its formula, per party, over the
whole ring: party 0's ``floor(c/d) - K/d + (1 - c_hi) g - q`` (computed piece by piece through a scratch
buffer: piece boundaries, odd lengths, several dims) and the others' ``(1 - c_hi) g - q`` from packed bits."""

from __future__ import annotations

import pytest
import torch

from veil.mpc import truncation
from veil.mpc.party import PARTY_FUNCTIONS
from veil.mpc.ring import INT64_MAX, INT64_MIN, RING_SIZE, wrap_int

finish, finish_bits = PARTY_FUNCTIONS["trunc_finish"], PARTY_FUNCTIONS["trunc_finish_bits"]
EDGES = torch.tensor([0, 1, -1, INT64_MAX, INT64_MIN, INT64_MIN + 1, 1 << 62, -(1 << 62), 65535, 65536, -65536])


def _ring(shape, gen):
    t = torch.empty(shape, dtype=torch.int64).random_(INT64_MIN, None, generator=gen)
    flat = t.view(-1)
    flat[: min(len(EDGES), flat.numel())] = EDGES[: flat.numel()]  # the wrap points on every run
    return t


def _formula(c, q, g, d, first):
    """Python integers: the exact value of the party's share mod 2^64."""
    out = []
    for cv, qv, gv in zip(c.view(-1).tolist(), q.view(-1).tolist(), g.view(-1).tolist()):
        z = (0 if cv < 0 else gv) - qv
        if first:
            z += (cv % RING_SIZE) // d - truncation.shift_for(d) // d
        out.append(wrap_int(z))
    return torch.tensor(out, dtype=torch.int64).view(c.shape)


@pytest.mark.parametrize("divisor", [1 << 16, 2, 1000, 7])
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 7, 2), (2 * 64 + 3,), (64,)], ids=str)
def test_finish_over_the_ring(monkeypatch, divisor, shape):
    monkeypatch.setattr(truncation, "_FINISH_PIECE", 64)  # piece boundaries at small sizes
    gen = torch.Generator().manual_seed(divisor + len(shape))
    c, q, g = (_ring(shape, gen) for _ in range(3))
    saved = [t.clone() for t in (c, q, g)]
    assert torch.equal(finish(c, q, g, divisor=divisor, first=True), _formula(c, q, g, divisor, True))
    assert torch.equal(finish(c, q, g, divisor=divisor, first=False), _formula(c, q, g, divisor, False))
    got = finish_bits(truncation.pack_top_bits(c), q, g)
    assert torch.equal(got, _formula(c, q, g, divisor, False))
    assert all(torch.equal(s, t) for s, t in zip(saved, (c, q, g)))  # the inputs are left as they were


def test_finish_default_pieces():
    """More than one piece at the real piece size, the last one partial."""
    gen = torch.Generator().manual_seed(5)
    n = 2 * truncation._FINISH_PIECE + 5
    c, q, g = (_ring((n,), gen) for _ in range(3))
    want = _formula(c[-300:], q[-300:], g[-300:], 1 << 16, True)
    got = finish(c, q, g, divisor=1 << 16, first=True)
    assert torch.equal(got[-300:], want)
    mid = slice(truncation._FINISH_PIECE - 100, truncation._FINISH_PIECE + 100)
    assert torch.equal(got[mid], _formula(c[mid], q[mid], g[mid], 1 << 16, True))


def test_finish_refuses_mismatched_shapes():
    c, q = torch.zeros(6, dtype=torch.int64), torch.zeros(6, dtype=torch.int64)
    for cc, qq, gg in [(c, q, torch.zeros(1, dtype=torch.int64)), (torch.zeros(1, dtype=torch.int64), q, q),
                       (c.view(2, 3), q, q)]:
        with pytest.raises(ValueError, match="differ in shape"):
            finish(cc, qq, gg, divisor=1 << 16, first=True)
