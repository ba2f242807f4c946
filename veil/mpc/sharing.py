"""Splitting ring values into additive shares (data-owner side)."""

from __future__ import annotations

from typing import Optional

import torch

from veil.mpc.errors import NotEncodedError
from veil.mpc.ring import DTYPE, random_ring


def split(value: torch.Tensor, n_parties: int, generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
    """Splits an int64 tensor into ``n_parties`` additive shares mod 2^64.

    The first ``n - 1`` shares are uniform over Z/2^64; the last is
    ``value - sum(others)``. Any ``n - 1`` shares are therefore jointly
    uniform and independent of ``value``.

    Raises:
        NotEncodedError: If ``value`` is not an integer tensor.
        ValueError: If fewer than two parties are requested.
    """
    if value.dtype.is_floating_point or value.dtype.is_complex:
        raise NotEncodedError(
            f"cannot secret-share a {value.dtype} tensor: encode it first with fix_precision()"
        )
    if n_parties < 2:
        raise ValueError(f"additive sharing needs at least 2 parties, got {n_parties}")
    value = value.to(DTYPE)
    shares = [random_ring(value.shape, generator) for _ in range(n_parties - 1)]
    last = value
    for s in shares:
        last = last - s
    shares.append(last)
    return shares
