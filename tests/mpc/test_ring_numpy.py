"""veil.mpc.ring_numpy's in-place ring add and subtract against torch's: the same wrapped values, in place,
whatever path (numpy's or torch's fallback) an operand takes."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from veil.mpc import ring_numpy
from veil.mpc.ring import INT64_MAX, INT64_MIN

EDGES = [INT64_MIN, INT64_MIN + 1, -1, 0, 1, INT64_MAX - 1, INT64_MAX]
ring_ints = st.one_of(st.sampled_from(EDGES), st.integers(INT64_MIN, INT64_MAX))
OPS = [(ring_numpy.add_, torch.Tensor.add_), (ring_numpy.sub_, torch.Tensor.sub_)]


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(ring_ints, ring_ints), min_size=0, max_size=40), which=st.sampled_from([0, 1]))
def test_tensor_operands_wrap_like_torch(pairs, which):
    mine, theirs = OPS[which]
    x = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    y = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    want = theirs(x.clone(), y)
    got = x.clone()
    assert mine(got, y) is got  # in place, on the caller's tensor
    assert torch.equal(got, want)
    assert ring_numpy.array_of(x) is not None  # (these took numpy's path)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(ring_ints, min_size=1, max_size=20), scalar=st.integers(-(1 << 70), 1 << 70),
       which=st.sampled_from([0, 1]))
def test_python_int_operands_in_and_out_of_int64(values, scalar, which):
    """An int of the int64 range goes to numpy; a larger one to torch, which refuses or wraps as it always
    did: the helper must do exactly what torch does."""
    mine, theirs = OPS[which]
    x = torch.tensor(values, dtype=torch.int64)
    try:
        want = theirs(x.clone(), scalar)
    except (RuntimeError, OverflowError) as refused:
        with pytest.raises(type(refused)):
            mine(x.clone(), scalar)
        return
    assert torch.equal(mine(x.clone(), scalar), want)


@pytest.mark.parametrize("which", [0, 1])
def test_views_and_other_operands_keep_torchs_result(which):
    mine, theirs = OPS[which]
    g = torch.Generator().manual_seed(7)
    base = torch.empty(6, 8, dtype=torch.int64).random_(INT64_MIN, None, generator=g)
    other = torch.empty(8, 6, dtype=torch.int64).random_(INT64_MIN, None, generator=g)
    cases = [
        (lambda: base.clone().t(), lambda: other.clone()),  # a transposed (strided) target
        (lambda: base.clone()[:, ::2], lambda: other.clone().t()[:, ::2]),  # strided both ways
        (lambda: base.clone(), lambda: other[:, 0].clone()),  # a row that broadcasts: torch's path
        (lambda: base.clone(), lambda: torch.tensor(3)),  # a 0-d tensor: torch's path
        (lambda: base.clone(), lambda: other.t().to(torch.int32)),  # another dtype: torch's path
    ]
    for make_x, make_y in cases:
        x, y = make_x(), make_y()
        want = theirs(x.clone(), y)
        got = mine(x, y)
        assert got is x and torch.equal(got, want)


def test_other_dtypes_and_meta_tensors_take_torchs_path():
    f = torch.tensor([1.5, -2.0])
    assert torch.equal(ring_numpy.add_(f.clone(), torch.tensor([1.0, 1.0])), torch.tensor([2.5, -1.0]))
    meta = torch.empty(3, dtype=torch.int64, device="meta")
    assert ring_numpy.sub_(meta, torch.empty(3, dtype=torch.int64, device="meta")).is_meta
