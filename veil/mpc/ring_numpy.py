"""Wrapping int64 addition and subtraction (the ring Z/2^64's) in place, through numpy's ufuncs.

torch adds integers as ``a + alpha * b`` and multiplies by ``alpha`` lane by lane even when it is 1: on the
2-core AVX-512 EPYC box an in-place int64 add of 2^16 entries held in cache takes 40 us, against 18 us for
torch's own XOR and 12 us for numpy's add. Where the operands stream from memory the two are alike
(2^16 entries spread over L3: 42 against 33 us; whole Beaver masks and combines measured no faster), so
veil uses these only in loops over cache-sized pieces: the seeded expansion's fold of AES streams
(``veil.mpc.prg``: a mul 1e6 dealing 24.5-25.5 -> 22.5-23.9 ms, minimum of 41) and the truncation finish's
torch path. :func:`array_of` also gives :mod:`veil.mpc.truncation` the arrays its numpy finish and unsigned
division work on.

Plain CPU int64 tensors go to numpy on the same memory; anything else (another dtype, a meta or subclassed
tensor, an operand that broadcasts) takes torch's path, which gives the same values. numpy's int64 ufuncs
wrap around like torch's (two's complement, no overflow check on arrays) and release the GIL for the loop.
"""

from __future__ import annotations

import numpy as np
import torch

from veil.mpc.ring import INT64_MAX, INT64_MIN


def array_of(t) -> np.ndarray | None:
    """``t``'s memory as an int64 ndarray, when ``t`` is a plain CPU int64 tensor numpy can view."""
    if type(t) is not torch.Tensor or t.dtype != torch.int64 or t.device.type != "cpu":
        return None
    try:
        return t.numpy()
    except (RuntimeError, TypeError):  # (a meta tensor, a conjugate or negative view)
        return None


def _operand(other, shape):
    """``other`` as numpy may take it beside a tensor of ``shape``: an int64 ndarray of that shape, or a
    Python int of the int64 range (numpy casts it without a copy of the tensor); else None."""
    if type(other) is int:
        return other if INT64_MIN <= other <= INT64_MAX else None
    if type(other) is torch.Tensor and other.shape == shape:
        return array_of(other)
    return None


def add_(t: torch.Tensor, other) -> torch.Tensor:
    """``t += other`` in place (mod 2^64); returns ``t``."""
    return _in_place(np.add, torch.Tensor.add_, t, other)


def sub_(t: torch.Tensor, other) -> torch.Tensor:
    """``t -= other`` in place (mod 2^64); returns ``t``."""
    return _in_place(np.subtract, torch.Tensor.sub_, t, other)


def _in_place(ufunc, torch_method, t: torch.Tensor, other) -> torch.Tensor:
    a = array_of(t)
    b = _operand(other, t.shape) if a is not None else None
    if b is None:
        return torch_method(t, other)
    ufunc(a, b, out=a)
    return t
