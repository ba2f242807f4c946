"""The Beaver masking step (veil/mpc/beaver.py ``beaver_mask``) against plain torch: ``e = x - a``, ``f = y - b``
with torch's values and dtypes, for strided (transposed) operands and masks of any dtype."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.mpc.party import PARTY_FUNCTIONS

_DTYPES = st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.float64])


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 5), x_dtype=_DTYPES, a_dtype=_DTYPES,
       transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_the_masks_equal_torch_for_strided_operands_and_any_dtype(rows, cols, x_dtype, a_dtype, transposed, seed):
    gen = torch.Generator().manual_seed(seed)

    def tensor(shape, dtype):
        return torch.randint(0, 200, shape, generator=gen).to(dtype)

    x = tensor((cols, rows), x_dtype).t() if transposed else tensor((rows, cols), x_dtype)  # (a weight's view)
    a, y, b = tensor((rows, cols), a_dtype), tensor((rows, cols), x_dtype), tensor((rows, cols), a_dtype)
    e, f = PARTY_FUNCTIONS["beaver_mask"](x, y, a, b)
    for got, want in ((e, x - a), (f, y - b)):
        assert got.dtype == want.dtype and torch.equal(got, want), (got, want)
