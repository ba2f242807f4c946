"""Fixed-point encoding of real numbers into the ring Z/2^64.

A real ``x`` is represented by the integer ``round(x * s)`` mod 2^64, stored as
``torch.int64``, where the *scale* is ``s = base ** precision_fractional``.

* Default: ``base=2`` with 16 fractional bits (as CrypTen), so ``s = 2^16``,
  a resolution (one "ulp") of ``2^-16 ~ 1.5e-5``, and scaling/truncation are
  exact shifts.
* ``base=10`` with 3 fractional digits reproduces PySyft 0.2's encoding
  (``s = 1000``).

Safe range (what the protocols support, and what the encoder enforces):

* Encoded values: ``|x| * s < 2^62`` (``|x| < 2^46`` by default), checked by
  :func:`encode`. Then any difference of two encoded values stays below
  ``2^63`` in magnitude, so comparisons (exact over the whole ring, see
  :mod:`veil.mpc.comparison`) are exact for every pair of encoded values.
* Values being truncated (a product before its division by ``s``, a sum
  before ``mean``; with lazy truncation also an average pool's window sum of
  products, divided by ``s k^2`` at once, and a product plus a bias at scale
  ``s^2``): ``|v| <= 2^62 - d`` in the ring, i.e. ``|x * y| <
  (2^62 - s) / s^2`` (``~2^30`` by default); in this range shared truncation
  is exact to one ulp with no failure probability
  (:mod:`veil.mpc.truncation`). Plaintext fixed-precision tensors check it;
  shared ones cannot (nothing reveals magnitudes), so staying in range is
  the caller's contract, as in every fixed-point MPC framework.

Decoding is exact for negative numbers: an encoded ``v`` is split as
``v = q*s + r`` with ``q = floor(v / s)`` and ``0 <= r < s`` (floor division
on both parts, so the remainder is never negative), then ``x = q + r/s``.
Mixing truncating and flooring division is the bug that decodes -16.9999 as
-17.9999 in other implementations; see the regression test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from veil.mpc.errors import EncodingOverflowError
from veil.mpc.ring import DTYPE

Number = Union[int, float]

# Default fractional precision per base: 16 bits (CrypTen) or 3 digits (PySyft).
DEFAULT_PRECISION: dict[int, int] = {2: 16, 10: 3}

#: encoded magnitudes stay below this (see the module docstring)
ENCODING_BOUND = 1 << 62
_BOUND = float(ENCODING_BOUND)


@dataclass(frozen=True)
class FixedPointEncoding:
    """Parameters of a fixed-point encoding.

    Attributes:
        base: Radix of the scale (2 or 10 are the usual choices).
        precision_fractional: Number of fractional base-``base`` digits.
    """

    base: int = 2
    precision_fractional: int = 16

    def __post_init__(self) -> None:
        if self.base < 2:
            raise ValueError(f"base must be >= 2, got {self.base}")
        if self.precision_fractional < 0:
            raise ValueError(f"precision_fractional must be >= 0, got {self.precision_fractional}")
        if type(self.base) is not int or type(self.precision_fractional) is not int:
            raise ValueError("base and precision_fractional must be integers")
        # (bounded before the power is computed: 3 ** (10 ** 9) is hours of CPU in one C call)
        if self.precision_fractional * math.log2(self.base) >= 62 or self.base**self.precision_fractional >= 2**62:
            raise ValueError(
                f"scale {self.base}^{self.precision_fractional} leaves no room in the 64-bit ring"
            )

    @property
    def scale(self) -> int:
        """The integer ``base ** precision_fractional``."""
        return self.base**self.precision_fractional

    @property
    def resolution(self) -> float:
        """One unit in the last place, ``1 / scale``."""
        return 1.0 / self.scale

    @property
    def max_abs(self) -> float:
        """Magnitudes below this are encodable (``2^62 / scale``)."""
        return ENCODING_BOUND / self.scale

    @property
    def max_abs_product(self) -> float:
        """``|x*y|`` below this truncates exactly after a shared product."""
        return (ENCODING_BOUND - self.scale) / self.scale**2


def make_encoding(precision_fractional: Optional[int] = None, base: int = 2) -> FixedPointEncoding:
    """Builds an encoding, filling in the default precision for the base.

    Raises:
        ValueError: If no default precision is known for ``base``.
    """
    if precision_fractional is None:
        if base not in DEFAULT_PRECISION:
            raise ValueError(f"no default precision for base {base}; pass precision_fractional")
        precision_fractional = DEFAULT_PRECISION[base]
    return FixedPointEncoding(base=base, precision_fractional=precision_fractional)


def check_encodable(x: torch.Tensor, encoding: FixedPointEncoding) -> None:
    """Raises if ``x`` holds NaN/inf or magnitudes that do not fit the ring.

    Raises:
        EncodingOverflowError: Naming the largest magnitude and the limit.
    """
    if x.numel() == 0:
        return
    xd = x.detach().to(torch.float64)
    if not bool(torch.isfinite(xd).all()):
        raise EncodingOverflowError("cannot encode NaN or infinite values in fixed precision")
    largest = float(xd.abs().max())
    if round(largest * encoding.scale) >= _BOUND:
        raise EncodingOverflowError(
            f"value of magnitude {largest:.6g} exceeds the encodable range |x| < "
            f"{encoding.max_abs:.6g} for base={encoding.base}, "
            f"precision_fractional={encoding.precision_fractional}"
        )


def encode(x: torch.Tensor, encoding: FixedPointEncoding) -> torch.Tensor:
    """Encodes a real tensor as ``round(x * scale)`` in Z/2^64.

    The rounding error is at most half an ulp: ``|decode(encode(x)) - x| <=
    0.5 / scale`` (plus float64's relative error 2^-53 on ``x * scale``).

    Raises:
        EncodingOverflowError: If a value is not finite or out of range.
    """
    check_encodable(x, encoding)
    return torch.round(x.detach().to(torch.float64) * encoding.scale).to(DTYPE)


def encode_scalar(x: Number, encoding: FixedPointEncoding) -> int:
    """Encodes a Python number; same rounding and range as :func:`encode`."""
    if isinstance(x, bool):
        x = int(x)
    if isinstance(x, int):
        value = x * encoding.scale
    else:
        if not math.isfinite(x):
            raise EncodingOverflowError("cannot encode NaN or infinite values in fixed precision")
        value = round(x * encoding.scale)
    if not -ENCODING_BOUND < value < ENCODING_BOUND:
        raise EncodingOverflowError(
            f"scalar {x!r} exceeds the encodable range |x| < {encoding.max_abs:.6g}"
        )
    return int(value)


def decode(v: torch.Tensor, encoding: FixedPointEncoding, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decodes ring elements to reals, exactly for negative values.

    Floor division gives ``q`` and a remainder ``0 <= r < scale`` for every
    sign, so ``q + r/scale`` is the true quotient (up to float rounding).
    """
    scale = encoding.scale
    q = torch.div(v, scale, rounding_mode="floor")
    r = v - q * scale
    return (q.to(torch.float64) + r.to(torch.float64) / scale).to(dtype)


def truncate(v: torch.Tensor, divisor: int) -> torch.Tensor:
    """Divides plaintext ring values by a public positive integer, rounding.

    Used after multiplying two encoded values (``divisor = scale``) and for
    means. Rounds half up: ``|truncate(v, d) - v/d| <= 1/2``. Uses only
    torch ops, so it also runs on remote plaintext tensors.

    Error bound after a fixed-point product: with encoded inputs carrying at
    most 1/2 ulp each, ``|decode(truncate(enc(x)*enc(y), s)) - x*y| <=
    (|x| + |y|) / (2s) + 1/(4 s^2) + 1/(2s)``; see :func:`mul_error_bound`.
    """
    if divisor <= 0:
        raise ValueError(f"divisor must be a positive integer, got {divisor}")
    if divisor == 1:
        return v
    return torch.div(v + divisor // 2, divisor, rounding_mode="floor")


def mul_error_bound(x_abs: float, y_abs: float, encoding: FixedPointEncoding, truncation_ulps: float = 0.5) -> float:
    """Worst-case error of a fixed-point product ``x * y``.

    Args:
        x_abs: Bound on ``|x|``.
        y_abs: Bound on ``|y|``.
        encoding: The encoding of both operands.
        truncation_ulps: Error of the truncation step in ulps: 0.5 for
            plaintext rounding, 1 for secret-shared truncation.
    """
    u = encoding.resolution
    return (x_abs + y_abs) * u / 2 + u * u / 4 + truncation_ulps * u


def check_no_wrap(estimate: torch.Tensor, what: str) -> None:
    """Raises if a float64 estimate of an integer result leaves the safe range.

    Plaintext fixed-precision ops compute the same op on ``|a|`` and ``|b|`` in
    float64 to bound the integer result before it silently wraps.

    Raises:
        EncodingOverflowError: Naming the operation and the magnitude.
    """
    if estimate.numel() == 0:
        return
    largest = float(estimate.abs().max())
    if not largest < _BOUND:
        raise EncodingOverflowError(
            f"{what}: intermediate magnitude ~2^{math.log2(largest):.1f} overflows the safe range 2^62; "
            "reduce input magnitudes or precision_fractional"
        )
