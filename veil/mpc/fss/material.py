"""The dealer's side of the FSS comparison: masks, their derived shares, DCF keys.

For ``n_values`` values ``v_0 = d, v_1, ...`` multiplied by the bit ``[d > 0]``
(see :mod:`veil.mpc.comparison`; ``n_values = 0`` for the bit alone), one
item is, per compared entry:

* additive fields (shares for every party): the uniform masks
  ``r_0 .. r_{max(n_values, 1) - 1}``, then ``R_hi`` (bit
  ``COMPARISON_BITS - 1`` of ``r_0``) and ``r_j * R_hi`` for ``j < n_values``;
* a DCF key pair (the first two parties only) for
  ``f(X_lo) = beta * [X_lo < R_lo]`` over ``COMPARISON_BITS - 1`` bits, with
  ``R_lo`` the low bits of ``r_0`` and the vector payload
  ``beta = (1 - 2 R_hi) * (1, r_0, .., r_{n_values-1})`` of ``K = 1 +
  n_values`` ring elements.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from veil.mpc.fss import dcf
from veil.mpc.ring import DTYPE

#: ``m``: comparisons read the sign bit of ``d - 1`` over ``m`` bits. With
#: ``m = 64`` that is the ring's own sign bit: exact for every ``d`` but
#: ``-2^63`` (no silent failures outside a sub-range; with 40 bits, ``2^39 ==
#: 0`` was true). The DCF runs over ``m - 1 = 63`` bits, so its key size and
#: cost are 63/39 of the old 40-bit ones.
COMPARISON_BITS = 64
#: the DCF's input bits
DCF_BITS = COMPARISON_BITS - 1
LOW_MASK = (1 << DCF_BITS) - 1


def n_masks(n_values: int) -> int:
    """Masks per item: one per value, and ``r_0`` for the bit alone."""
    return max(n_values, 1)


def n_additive(n_values: int) -> int:
    """Additive fields per item: the masks, ``R_hi`` and ``r_j * R_hi``."""
    return n_masks(n_values) + 1 + n_values


def field_shapes(shape: Sequence[int], n_values: int, holds_key: bool) -> list[tuple]:
    """Shapes of one party's fields (additive fields, then the key if it holds one)."""
    shape = tuple(int(s) for s in shape)
    fields = [shape] * n_additive(n_values)
    if holds_key:
        fields += dcf.key_shapes(math.prod(shape), DCF_BITS, 1 + n_values)
    return fields


def split_bits(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)``: bit ``m - 1`` and the low ``m - 1`` bits of ``r mod 2^m``."""
    return (r >> DCF_BITS) & 1, r & LOW_MASK


def derive(masks: list, n_values: int, generator: Optional[torch.Generator] = None,
           between: Optional[Callable[[], None]] = None) -> tuple[list, tuple]:
    """The derived additive fields and the DCF key pair for given masks.

    Args:
        masks: The ``n_masks(n_values)`` uniform masks ``r_0 ..`` (int64 tensors of one shape).
        n_values: Values multiplied by the bit (0: the bit alone).
        generator: Seeds the DCF roots reproducibly (tests only); default OS entropy.
        between: Called between chunks of the key generation (:func:`veil.mpc.fss.dcf.gen`).

    Returns:
        ``([R_hi, r_0 * R_hi, ..], (key_0, key_1))``.
    """
    hi, lo = split_bits(masks[0])
    sign = (1 - 2 * hi).reshape(-1, 1)
    multiplied = masks[:n_values]
    beta = torch.cat([torch.ones_like(sign)] + [r.reshape(-1, 1) for r in multiplied], dim=1) * sign
    keys = dcf.gen(lo.reshape(-1), beta, DCF_BITS, generator, between)
    return [hi] + [r * hi for r in multiplied], keys


def check_fields(fields: Sequence, shape: Sequence[int], n_values: int, holds_key: bool) -> None:
    """Raises ValueError unless ``fields`` are int64 tensors of the expected shapes."""
    expected = field_shapes(shape, n_values, holds_key)
    if len(fields) != len(expected):
        raise ValueError(f"comparison material has {len(fields)} fields, expected {len(expected)}")
    for j, (t, s) in enumerate(zip(fields, expected)):
        if not isinstance(t, torch.Tensor) or t.dtype != DTYPE or tuple(t.shape) != s:
            got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"comparison material field {j} must be an int64 tensor of shape {s}, got {got}")
