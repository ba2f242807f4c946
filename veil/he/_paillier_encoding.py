"""Fixed-point encoding of torch tensors into Paillier plaintext integers.

We follow python-paillier's convention (``phe.EncodedNumber``): a value ``v``
is the integer ``m`` with ``v = m * 16**exponent``, and negative ``m`` is
stored as ``n + m``. Unlike ``phe``, which picks an exponent per number, a
whole tensor shares one exponent so that elementwise addition needs no
per-element alignment.

Precision: integer tensors use exponent 0 and are exact. Float tensors use
:data:`DEFAULT_FLOAT_EXPONENT` (-8, i.e. a step of ``16**-8 = 2**-32`` ~ 2.3e-10)
unless ``precision`` is given; the absolute rounding error of an encrypted
float is at most half a step, and a product with an encoded plaintext float
adds the two exponents (error grows with the magnitudes involved).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from veil.he.errors import EncodingOverflowError

BASE = 16
LOG2_BASE = 4
DEFAULT_FLOAT_EXPONENT = -8

_INT64_SAFE = 2**62  # below this a float64 -> int64 cast is exact and cannot overflow


def exponent_for_precision(precision: float) -> int:
    """Largest exponent whose step ``16**exponent`` is no coarser than ``precision``."""
    if not precision > 0 or not math.isfinite(precision):
        raise ValueError(f"precision must be a positive finite number, got {precision!r}")
    return math.floor(math.log(precision, BASE))


def as_tensor(value) -> torch.Tensor:
    """Turn a Python number, numpy array or tensor into a CPU tensor (no copy if possible)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, bool):
        return torch.tensor(int(value))
    if isinstance(value, (int, float, np.ndarray, np.generic, list, tuple)):
        return torch.as_tensor(value)
    raise TypeError(f"cannot use a {type(value).__name__} as a plaintext tensor")


def default_exponent(t: torch.Tensor) -> int:
    """Exponent used for ``t`` when the caller does not choose one."""
    return DEFAULT_FLOAT_EXPONENT if t.is_floating_point() else 0


def encode(t: torch.Tensor, exponent: int, uniform: bool = False) -> np.ndarray:
    """Encode ``t`` as signed integers at ``exponent``.

    Args:
        t: a real (not complex) tensor.
        exponent: the shared base-16 exponent.
        uniform: take one path whatever the values (the exact one): the fast path's choice said whether the
            largest value was past ~2**30 (at the default exponent), in the time an owner's plaintext took.

    Returns:
        An object-dtype numpy array of Python ints with ``t``'s shape.

    Raises:
        ValueError: ``t`` holds NaN or infinity, or is complex.
    """
    if t.is_complex():
        raise ValueError("complex tensors cannot be encoded for Paillier")
    shape = tuple(t.shape)
    if not t.is_floating_point():
        ints = t.to(torch.int64).reshape(-1).numpy().astype(object)
        if exponent > 0:
            raise ValueError("an integer tensor cannot be encoded at a positive exponent")
        if exponent < 0:
            ints = ints * (BASE ** (-exponent))
        return ints.reshape(shape)
    x = t.to(torch.float64).reshape(-1).numpy()
    if not np.isfinite(x).all():
        raise ValueError("cannot encode NaN or infinite values")
    shift = -LOG2_BASE * exponent
    if not uniform:
        with np.errstate(over="ignore"):  # (past float64's range: inf, taken by the exact path below)
            scaled = np.rint(np.ldexp(x, shift))  # scaling by a power of two is exact in binary floating point
        if scaled.size == 0 or np.abs(scaled).max() < _INT64_SAFE:
            return scaled.astype(np.int64).astype(object).reshape(shape)
    return _exact_ints(_split(x, shift)).reshape(shape)


def _split(x: np.ndarray, shift: int) -> np.ndarray:
    """``rint(x * 2**shift)`` as rows ``(whole, left)``, the value being ``whole * 2**left``: ``whole`` is x's
    53-bit mantissa scaled down (and rounded as ``np.rint``) where the shift is negative, ``left`` the rest.
    Scaling x itself in float64 overflowed to inf past ~2**(1024 - shift): a value-dependent OverflowError
    after a room check that had passed."""
    mantissa, power = np.frexp(x)  # x = mantissa * 2**power, 0.5 <= |mantissa| < 1
    total = power.astype(np.int64) - 53 + shift  # x * 2**shift = (mantissa * 2**53) * 2**total
    whole = np.rint(np.ldexp(np.ldexp(mantissa, 53), np.minimum(total, 0)))  # (exact: a power-of-two scaling)
    return np.stack([whole, np.maximum(total, 0).astype(np.float64)])


def _exact_ints(split: np.ndarray) -> np.ndarray:
    """:func:`_split`'s rows as Python ints, one path for every value (exact at any size)."""
    return np.array([int(w) << int(s) for w, s in zip(split[0], split[1])], dtype=object)


def decode(values: list, exponent: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Turn signed integers at ``exponent`` back into a tensor of ``dtype``.

    Args:
        values: signed Python/gmpy2 integers, flat, in row-major order.
        exponent: their shared base-16 exponent.
        shape: shape of the result.
        dtype: dtype of the result; integer dtypes require ``exponent >= 0``
            results to be whole numbers (they are, since we only lower exponents
            for floats) and to fit the dtype.

    Raises:
        EncodingOverflowError: an integer result does not fit ``dtype``.
    """
    if not dtype.is_floating_point and exponent == 0:
        ints = [int(v) for v in values]
        info = torch.iinfo(dtype) if dtype != torch.bool else None
        if info is not None and ints and (max(ints) > info.max or min(ints) < info.min):
            raise EncodingOverflowError(f"decrypted values do not fit in {dtype}")
        out = torch.tensor(ints, dtype=torch.int64) if ints else torch.empty(0, dtype=torch.int64)
        return out.to(dtype).reshape(shape)
    scale_bits = LOG2_BASE * exponent
    try:
        flt = np.array([int(v) for v in values], dtype=np.float64) if values else np.empty(0)
        flt = np.ldexp(flt, scale_bits)
    except OverflowError:
        # A mantissa above ~2**1024: drop low bits first, they are below float precision.
        flt = np.array([_big_to_float(int(v), scale_bits) for v in values], dtype=np.float64)
    out_dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
    return torch.from_numpy(flt).to(out_dtype).reshape(shape)


def _big_to_float(m: int, scale_bits: int) -> float:
    """``m * 2**scale_bits`` as a float: +-inf past float64's range (as ``np.ldexp`` gives on the other path),
    not a bare ``OverflowError`` for some plaintexts only."""
    shift = max(0, abs(m).bit_length() - 64)
    sign = -1 if m < 0 else 1
    try:
        return sign * math.ldexp(float(abs(m) >> shift), scale_bits + shift)
    except OverflowError:
        return sign * math.inf
