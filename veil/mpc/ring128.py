"""The ring Z/2^128 as pairs of int64 limbs, for SPDZ2k MACs (:mod:`veil.mpc.mac`).

An element is ``(lo, hi)``: two int64 tensors of one shape with value
``lo + 2^64 hi mod 2^128``, ``lo`` read unsigned. torch has no 128-bit
integers, so every operation here is vectorised int64 code that keeps the
carries itself:

* addition/subtraction carry through an unsigned comparison of the low limbs;
* a product of two 64-bit limbs is split into 32-bit halves
  (:func:`mul_wide`), the schoolbook way;
* a *linear* or *bilinear* map ``B`` (a sum, a matmul, a convolution) is
  applied to 16- or 32-bit digits of the operands, whose images are exact in
  int64, and the digit images are recombined with carries (:func:`combine`).
  That makes any torch op that is linear over the integers usable mod 2^128.

Everything is pure torch on plain tensors; :mod:`veil.mpc.mac` runs it on
each party's shares through party functions.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

DTYPE = torch.int64
MASK16 = 0xFFFF
MASK32 = 0xFFFFFFFF
_MIN = -(1 << 63)

Pair = tuple  # (lo, hi)


# ------------------------------------------------------------------ conversions

def lift(x: torch.Tensor) -> Pair:
    """The 128-bit element equal to the signed 64-bit ``x`` (sign extension)."""
    x = torch.as_tensor(x, dtype=DTYPE)
    return x, x >> 63


def lift_unsigned(x: torch.Tensor) -> Pair:
    """The 128-bit element equal to ``x`` read as unsigned 64-bit."""
    x = torch.as_tensor(x, dtype=DTYPE)
    return x, torch.zeros_like(x)


def to_int(lo: int, hi: int) -> int:
    """Python int in ``[0, 2^128)`` of one element (tests, messages)."""
    return (int(lo) & ((1 << 64) - 1)) | ((int(hi) & ((1 << 64) - 1)) << 64)


def from_int(value: int) -> tuple[int, int]:
    """Signed int64 limbs of a Python int mod 2^128."""
    value %= 1 << 128

    def signed(v: int) -> int:
        return v - (1 << 64) if v >= 1 << 63 else v

    return signed(value & ((1 << 64) - 1)), signed(value >> 64)


# ------------------------------------------------------------------ elementwise ring ops

def _ult(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unsigned ``a < b`` as 0/1 int64."""
    return ((a ^ _MIN) < (b ^ _MIN)).to(DTYPE)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def add(a: Pair, b: Pair) -> Pair:
    lo = a[0] + b[0]
    return lo, a[1] + b[1] + _ult(lo, a[0])


def sub(a: Pair, b: Pair) -> Pair:
    return a[0] - b[0], a[1] - b[1] - _ult(a[0], b[0])


def neg(a: Pair) -> Pair:
    return sub((torch.zeros_like(a[0]), torch.zeros_like(a[1])), a)


def mul_wide(a: torch.Tensor, b: torch.Tensor) -> Pair:
    """The full 128-bit product of ``a`` and ``b`` read as unsigned 64-bit."""
    a0, a1 = a & MASK32, _shr(a, 32)
    b0, b1 = b & MASK32, _shr(b, 32)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1  # each < 2^64 unsigned
    mid = _shr(p00, 32) + (p01 & MASK32) + (p10 & MASK32)  # < 3 * 2^32: exact
    lo = (p00 & MASK32) | (mid << 32)
    hi = p11 + _shr(p01, 32) + _shr(p10, 32) + _shr(mid, 32)
    return lo, hi


def mul(a: Pair, b: Pair) -> Pair:
    """Elementwise product mod 2^128 (broadcasting)."""
    lo, hi = mul_wide(a[0], b[0])
    return lo, hi + a[0] * b[1] + a[1] * b[0]


def eq(a: Pair, b: Pair) -> torch.Tensor:
    return (a[0] == b[0]) & (a[1] == b[1])


# ------------------------------------------------------------------ exact linear / bilinear maps

def combine(terms: Iterable[tuple[int, torch.Tensor]], hi_extra: Sequence[torch.Tensor] = ()) -> Pair:
    """``sum_t 2^(16 c_t) T_t + 2^64 sum(hi_extra) mod 2^128`` for exact int64 terms.

    Each ``T_t`` is an exact (not wrapped) integer image of a digit; terms of
    one column ``c`` must sum to less than 2^62 in absolute value. Columns
    from 4 up only reach the high limb and are added wrapping.
    """
    columns: dict[int, torch.Tensor] = {}
    for c, t in terms:
        columns[c] = t if c not in columns else columns[c] + t
    if not columns and not hi_extra:
        raise ValueError("combine needs at least one term")
    like = next(iter(columns.values())) if columns else hi_extra[0]
    acc = torch.zeros_like(like)
    lo = torch.zeros_like(like)
    for c in range(4):
        if c in columns:
            acc = acc + columns[c]
        lo = lo | ((acc & MASK16) << (16 * c))
        acc = acc >> 16  # arithmetic: floor division, right for negative images too
    hi = acc
    for c, t in columns.items():
        if c >= 4:
            hi = hi + (t << (16 * (c - 4)))
    for t in hi_extra:
        hi = hi + t
    return lo, hi


def digits(x: torch.Tensor, width: int) -> list[torch.Tensor]:
    """Unsigned ``width``-bit digits of the 64-bit ``x``, least significant first."""
    mask = (1 << width) - 1
    return [(x >> (width * i)) & mask for i in range(64 // width)]


def linear(fn: Callable[..., torch.Tensor], xs: Sequence[Pair]) -> Pair:
    """``fn(*xs) mod 2^128`` for ``fn`` linear over the integers with small coefficients.

    ``fn`` must be Z-linear jointly in its arguments (a sum, a slice, a
    difference, zero padding) with ``sum |coefficients| < 2^30``: it is applied
    to the 32-bit halves of the low limbs (exact) and to the high limbs (wrapping).
    """
    halves = [digits(x[0], 32) for x in xs]
    t0 = fn(*[h[0] for h in halves])
    t1 = fn(*[h[1] for h in halves])
    return combine([(0, t0), (2, t1)], [fn(*[x[1] for x in xs])])


def bilinear(fn: Callable[..., torch.Tensor], p: Pair, x: Pair, public_first: bool = True, **kwargs) -> Pair:
    """``fn(P, X) mod 2^128`` (or ``fn(X, P)``) for a bilinear integer op ``fn``.

    ``P = p_lo + 2^64 p_hi``, ``X = x_lo + 2^64 x_hi``:
    ``fn(P, X) = fn(p_lo, x_lo) + 2^64 (fn(p_lo, x_hi) + fn(p_hi, x_lo))``;
    the first term is computed exactly from digits of both low limbs (16-bit
    digits: 16 images, each below ``n * 2^32`` for ``n`` summed products; 32-
    by 16-bit digits, 8 images, when ``n < 2^12``), the others wrapping. Exact
    for reductions over fewer than 2^26 products.
    """
    if fn is torch.mul and not kwargs:  # elementwise: no sums, the schoolbook product suffices
        return mul(p, x)

    def f(a, b):
        return fn(a, b, **kwargs) if public_first else fn(b, a, **kwargs)

    exact = _float_digit_images(fn, p[0], x[0], public_first, kwargs)
    if exact is not None:  # (where float64 GEMMs beat torch's int64 ones: veil.mpc.ring_gemm)
        return combine(exact, [f(p[0], x[1]), f(p[1], x[0])])
    width = 32 if _products_per_entry(f, p[0], x[0]) < 1 << 12 else 16
    pd, xd = digits(p[0], width), digits(x[0], 16)
    terms = [((width // 16) * i + j, f(pi, xj)) for i, pi in enumerate(pd) for j, xj in enumerate(xd)]
    return combine(terms, [f(p[0], x[1]), f(p[1], x[0])])


def _float_digit_images(fn: Callable, p: torch.Tensor, x: torch.Tensor, public_first: bool, kwargs: dict):
    """The exact images of the low limbs' 16-bit digits, one column ``i + j`` at a time, from float64 ops
    (``fn``'s twin in :data:`veil.mpc.ring.FLOAT_TWINS`), or None where that does not apply or pay here.

    A digit product is below 2^32, so a column's four images of ``n`` summed products each stay below
    2^53 (float64's exact integers) for ``n < 2^19``: 16 float64 products instead of 16 int64 ones (or of
    8 with 32-bit digits), each far cheaper on hosts where torch's int64 GEMM is a plain loop.
    """
    from veil.mpc.ring import FLOAT_TWINS, ring_gemm  # (ring imports nothing of this module)

    twin = FLOAT_TWINS.get(fn)
    if twin is None or not (ring_gemm.is_plain(p) and ring_gemm.is_plain(x)) or not ring_gemm.limbs_pay():
        return None

    def g(a, b):
        return twin(a, b, **kwargs) if public_first else twin(b, a, **kwargs)

    ones = g(torch.ones(p.shape, dtype=torch.float64), torch.ones(x.shape, dtype=torch.float64))
    if ones.numel() == 0 or not 0 < float(ones.max()) < 1 << 19:
        return None
    if ones.numel() * float(ones.max()) < ring_gemm.MIN_WORK:  # small products: the int64 digits' fewer calls win
        return None
    pd = [d.to(torch.float64) for d in digits(p, 16)]
    xd = [d.to(torch.float64) for d in digits(x, 16)]
    terms = []
    for column in range(7):
        acc = None
        for i in range(max(0, column - 3), min(column, 3) + 1):
            image = g(pd[i], xd[column - i])
            acc = image if acc is None else acc.add_(image)
        terms.append((column, acc.to(DTYPE)))
    return terms


def _products_per_entry(f: Callable, p: torch.Tensor, x: torch.Tensor) -> int:
    """The most products summed into one output entry (``f`` of all-ones operands).

    With fewer than 2^12, 32-bit digits of ``p`` keep every column below 2^62
    (two images of at most ``n * 2^48`` each): 8 images instead of 16.
    Shape-only (meta) tensors take the 16-bit path.
    """
    if p.device.type == "meta" or x.device.type == "meta" or p.numel() == 0 or x.numel() == 0:
        return 1 << 62
    return int(f(torch.ones_like(p), torch.ones_like(x)).max())


def sum_all(x: Pair) -> Pair:
    """The sum of every entry mod 2^128 (0-dim limbs)."""
    return linear(lambda t: t.sum(), [x])


# ------------------------------------------------------------------ sharing (dealer / data owner side)

def random_pair(shape: Sequence[int], random: Callable[[Sequence[int]], torch.Tensor]) -> Pair:
    return random(shape), random(shape)


def split(value: Pair, n: int, random: Callable[[Sequence[int]], torch.Tensor]) -> list[Pair]:
    """Additive shares mod 2^128: ``n - 1`` uniform, the last ``value - sum(others)``."""
    shares = [random_pair(tuple(value[0].shape), random) for _ in range(n - 1)]
    last = value
    for s in shares:
        last = sub(last, s)
    return shares + [last]


def total(shares: Iterable[Pair]) -> Pair:
    out = None
    for s in shares:
        out = s if out is None else add(out, s)
    return out
