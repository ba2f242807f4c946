"""Recipes for correlated randomness, shared by every dealer.

A recipe says which fields of one item are *uniform* ring elements (a dealer
may let each party derive its share of them from a seed) and how the other,
*derived*, fields follow from them (their shares must be sent, at least to
one party). Items are returned to protocols as a tuple
``uniform fields + derived fields``:

* ``beaver`` ``(op, shape_a, shape_b, op_kwargs)``: ``(a, b, c = op(a, b))``
  [Beaver 1991].
* ``truncation`` ``(shape, divisor)``: ``(r, floor(r / divisor))`` (ABY3).
* ``comparison`` ``(shape, n_extra)``: ``(a_0..a_k, m, a_0*m, u, a_0*u ..
  a_k*u)`` with ``m = t * r`` for a uniform sign ``t`` and a log-uniform
  blinding factor ``r >= 1``, and ``u = (1 + t) / 2``; see
  :mod:`veil.mpc.comparison`.
"""

from __future__ import annotations

import secrets
from typing import Callable, Sequence

import torch

from veil.mpc.errors import ProviderError
from veil.mpc.ring import DTYPE, bilinear

#: bits of the comparison's multiplicative blinding factor r in [1, 2^BITS)
COMPARISON_BLIND_BITS = 20

Shape = tuple
Derive = Callable[[list, torch.Generator], list]


def _shape(s: Sequence[int]) -> Shape:
    return tuple(int(v) for v in s)


def _beaver(spec) -> tuple[list, list, Derive]:
    op, shape_a, shape_b, op_kwargs = spec
    fn = bilinear(op)
    shape_a, shape_b = _shape(shape_a), _shape(shape_b)
    meta = fn(torch.empty(shape_a, dtype=DTYPE, device="meta"), torch.empty(shape_b, dtype=DTYPE, device="meta"),
              **dict(op_kwargs))
    return [shape_a, shape_b], [tuple(meta.shape)], lambda u, g: [fn(u[0], u[1], **dict(op_kwargs))]


def _truncation(spec) -> tuple[list, list, Derive]:
    shape, divisor = _shape(spec[0]), int(spec[1])
    if divisor <= 0:
        raise ProviderError(f"truncation divisor must be positive, got {divisor}")
    return [shape], [shape], lambda u, g: [torch.div(u[0], divisor, rounding_mode="floor")]


def _comparison(spec) -> tuple[list, list, Derive]:
    shape, n_extra = _shape(spec[0]), int(spec[1])

    def derive(u: list, g: torch.Generator) -> list:
        t = torch.randint(0, 2, shape, generator=g, dtype=DTYPE) * 2 - 1
        exponent = torch.rand(shape, generator=g, dtype=torch.float64) * COMPARISON_BLIND_BITS
        r = torch.floor(torch.exp2(exponent)).to(DTYPE).clamp_(min=1)
        m = t * r
        half = (1 + t) // 2
        return [m, u[0] * m, half] + [a * half for a in u]

    return [shape] * (n_extra + 1), [shape] * (n_extra + 4), derive


RECIPES: dict[str, Callable] = {"beaver": _beaver, "truncation": _truncation, "comparison": _comparison}


def recipe(kind: str, spec) -> tuple[list, list, Derive]:
    """(uniform field shapes, derived field shapes, derive function) of a kind.

    Raises:
        ProviderError: For an unknown kind.
    """
    try:
        return RECIPES[kind](spec)
    except KeyError:
        raise ProviderError(f"unknown correlated-randomness kind {kind!r}; known: {sorted(RECIPES)}") from None


def dealer_generator() -> torch.Generator:
    """A generator for the derived fields' randomness, seeded from the OS."""
    return torch.Generator().manual_seed(secrets.randbits(63))
