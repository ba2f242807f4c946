"""Recipes for correlated randomness, shared by every dealer.

A recipe says which fields of one item are *uniform* ring elements (a dealer
may let each party derive its share of them from a seed) and how the other,
*derived*, fields follow from them (their shares must be sent, at least to
one party). Items are returned to protocols as a tuple
``uniform fields + derived fields``:

* ``beaver`` ``(op, shape_a, shape_b, op_kwargs)``: ``(a, b, c = op(a, b))``
  [Beaver 1991].
* ``truncation`` ``(shape, divisor)``: ``(r, floor(r / divisor), g)`` with
  ``r`` read unsigned and ``g`` its wrap correction (:mod:`veil.mpc.truncation`).
* ``zero`` ``(shape,)``: ``(0,)``, fresh random shares of zero (``refresh``).
* ``beaver_mac`` ``(key_id, op, shape_a, shape_b, op_kwargs)``: an
  authenticated triple ``(a, b, c, alpha*a, alpha*b, alpha*c)`` under the
  MAC key registered as ``key_id`` at this provider (:mod:`veil.mpc.mac`).
* ``truncation_mac`` ``(key_id, shape, divisor)``: an authenticated
  truncation pair ``(r, q, g, alpha*r, alpha*q, alpha*g)``.

Comparison material (masks and DCF keys) is not a recipe: see
:mod:`veil.mpc.fss.material`.
"""

from __future__ import annotations

import secrets
from typing import Callable, Sequence

import torch

from veil.mpc.errors import ProviderError
from veil.mpc.ring import DTYPE, bilinear

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
    from veil.mpc.truncation import TRUNCATION_BOUND, floor_div_unsigned, wrap_correction

    shape, divisor = _shape(spec[0]), int(spec[1])
    if not 1 < divisor <= TRUNCATION_BOUND:
        raise ProviderError(f"truncation divisor must be in [2, 2^62], got {divisor}")
    return [shape], [shape, shape], lambda u, g: [floor_div_unsigned(u[0], divisor), wrap_correction(u[0], divisor)]


def _zero(spec) -> tuple[list, list, Derive]:
    """Fresh additive shares of zero (re-randomizing a sharing: ``refresh``)."""
    shape = _shape(spec[0])
    return [], [shape], lambda u, g: [torch.zeros(shape, dtype=DTYPE)]


#: key id -> SPDZ MAC key, held by the crypto provider's process only
#: (filled by ``register_mac_key``; parties never call a recipe's derive).
MAC_KEYS: dict[str, torch.Tensor] = {}


def register_mac_key(key_id: str, alpha: torch.Tensor) -> None:
    """Stores a MAC key at the provider (see :mod:`veil.mpc.mac`)."""
    if not isinstance(key_id, str) or not isinstance(alpha, torch.Tensor) or alpha.dtype != DTYPE or alpha.dim():
        raise ProviderError("a MAC key is a string id and a 0-dim int64 tensor")
    MAC_KEYS[key_id] = alpha.clone()


def _beaver_mac(spec) -> tuple[list, list, Derive]:
    key_id, op, shape_a, shape_b, op_kwargs = spec
    shapes_u, shapes_d, derive_c = _beaver((op, shape_a, shape_b, op_kwargs))

    def derive(u: list, g: torch.Generator) -> list:
        alpha = MAC_KEYS.get(key_id)
        if alpha is None:
            raise ProviderError(f"unknown MAC key {key_id!r} at this crypto provider")
        c = derive_c(u, g)[0]
        return [c, alpha * u[0], alpha * u[1], alpha * c]

    return shapes_u, shapes_d + [shapes_u[0], shapes_u[1], shapes_d[0]], derive


def _truncation_mac(spec) -> tuple[list, list, Derive]:
    key_id, shape, divisor = spec
    shapes_u, shapes_d, derive_qh = _truncation((shape, divisor))

    def derive(u: list, g: torch.Generator) -> list:
        alpha = MAC_KEYS.get(key_id)
        if alpha is None:
            raise ProviderError(f"unknown MAC key {key_id!r} at this crypto provider")
        q, w = derive_qh(u, g)
        return [q, w, alpha * u[0], alpha * q, alpha * w]

    return shapes_u, shapes_d + [shapes_u[0], shapes_d[0], shapes_d[1]], derive


RECIPES: dict[str, Callable] = {
    "beaver": _beaver, "truncation": _truncation, "beaver_mac": _beaver_mac,
    "truncation_mac": _truncation_mac, "zero": _zero,
}


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
