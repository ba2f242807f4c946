"""A party's Beaver combine (veil.mpc.beaver's ``beaver_combine``) against the textbook formula, per party,
over the whole ring: ``z_i = c_i + op(e, b_i) + op(a_i, f)`` (+ ``op(e, f)`` for party 0), whichever fused
path the op and shapes take (elementwise party 0 adds ``e * f`` in place; matmul party 0 folds it into ``b + f``)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from veil.mpc.party import PARTY_FUNCTIONS
from veil.mpc.ring import INT64_MAX, INT64_MIN, bilinear

combine = PARTY_FUNCTIONS["beaver_combine"]
EDGES = [0, 1, -1, 2, INT64_MAX, INT64_MIN, INT64_MIN + 1, 1 << 62, -(1 << 62), 1 << 32, (1 << 32) - 1]
RING = st.one_of(st.sampled_from(EDGES), st.integers(INT64_MIN, INT64_MAX))


def _textbook(a, b, c, e, f, op, first):
    fn = bilinear(op)
    z = c + fn(e, b) + fn(a, f)
    return z + fn(e, f) if first else z


@settings(max_examples=80, deadline=None)
@given(values=st.lists(RING, min_size=5 * 6, max_size=5 * 6), first=st.booleans())
def test_elementwise_combine_is_the_formula(values, first):
    t = torch.tensor(values, dtype=torch.int64).view(5, 6)
    a, b, c, e, f = t[0], t[1], t[2], t[3], t[4]
    got = combine(a, b, c, e, f, op="mul", first=first, op_kwargs={})
    assert torch.equal(got, _textbook(a, b, c, e, f, "mul", first))
    # the dealt and opened operands are left as they were (a stored dealt object must not change)
    assert torch.equal(torch.stack([a, b, c, e, f]), t)


@pytest.mark.parametrize("op, sa, sb", [("mul", (4, 3), (4, 3)), ("mul", (4, 1), (1, 3)), ("matmul", (4, 5), (5, 3)),
                                        ("mm", (4, 5), (5, 3)), ("bmm", (2, 4, 5), (2, 5, 3))])
@pytest.mark.parametrize("first", [True, False])
def test_combine_over_the_ring(op, sa, sb, first):
    gen = torch.Generator().manual_seed(hash((op, sa, first)) % 2**31)
    ring = lambda s: torch.empty(s, dtype=torch.int64).random_(INT64_MIN, None, generator=gen)  # noqa: E731
    a, e, b, f = ring(sa), ring(sa), ring(sb), ring(sb)
    c = ring(bilinear(op)(a, b).shape)
    saved = [t.clone() for t in (a, b, c, e, f)]
    assert torch.equal(combine(a, b, c, e, f, op=op, first=first, op_kwargs={}), _textbook(a, b, c, e, f, op, first))
    assert all(torch.equal(s, t) for s, t in zip(saved, (a, b, c, e, f)))
