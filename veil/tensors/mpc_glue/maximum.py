"""Comparisons, ReLU, max/argmax and max-pooling of shared integer tensors.

Everything is built on :func:`veil.mpc.comparison.sign_select` (or, for
SPDZ2k-authenticated tensors, :func:`veil.mpc.mac_comparison.sign_select`)
and on local (structural) ops of :class:`AdditiveSharingTensor`:

* ``x > y``, ``<``, ``>=``, ``<=``: one sign test of ``x - y`` (``+1`` for
  the non-strict ones, exact on ring integers): 1 round.
* ``x == y``: the sign tests of ``x - y`` and ``y - x`` batched in one
  protocol run: 1 round.
* ``relu``: 1 round (the product by the bit comes with the bit).
* ``max``/``argmax`` over ``n`` entries: a tournament of ``ceil(log2 n)``
  levels of 1 round; the winner's index rides along as an extra product of
  the same bit (argmax returns the first maximal index, like torch).
* ``max_pool2d``: the windows gathered locally (``unfold``), then ``max``.
"""

from __future__ import annotations

from typing import Optional

import torch

from veil.mpc.comparison import sign_select
from veil.mpc.errors import UnsupportedOperationError
from veil.mpc.ring import pair
from veil.tensors import mac_dispatch
from veil.tensors.additive import AdditiveSharingTensor as AST

aten = torch.ops.aten


def _wrap(shares: dict, like: AST) -> AST:
    return AST(shares, like.crypto_provider)


def _sign_select(d: AST, extras: list, products: bool = True) -> tuple[AST, list]:
    """``[d > 0]`` and ``v * [d > 0]`` for ``v`` in ``(d, *extras)``, as tensors; authenticated
    (SPDZ2k) operands take the MAC-checked protocol (:mod:`veil.mpc.mac_comparison`)."""
    if mac_dispatch.is_authenticated(d):
        return mac_dispatch.sign_select(d, extras, products)
    bits, prods = sign_select(d.child, [e.child for e in extras], d.crypto_provider, products=products)
    return _wrap(bits, d), [_wrap(p, d) for p in prods]


def positive_bit(d: AST) -> AST:
    """Shares of ``[d > 0]`` (0/1 integers)."""
    bits, _ = _sign_select(d, [], products=False)
    return bits


def relu(x: AST) -> AST:
    """Shares of ``max(x, 0)``."""
    return relu_with_bit(x)[0]


def relu_with_bit(x: AST) -> tuple[AST, AST]:
    """Shares of ``max(x, 0)`` and of the bit ``[x > 0]`` (same 1 round).

    The bit is ReLU's derivative: keeping it lets the backward pass multiply
    by it (1 Beaver round) instead of running a second comparison.
    """
    bits, (prod,) = _sign_select(x, [])
    return prod, bits


def compare(name: str, x, y) -> AST:
    """Shares of the 0/1 result of ``x <name> y`` (gt, lt, ge, le, eq, ne)."""
    d = aten.sub.Tensor(x, y)
    if not isinstance(d, AST):
        raise TypeError("compare needs at least one shared operand")
    if name == "gt":
        return positive_bit(d)
    if name == "lt":
        return positive_bit(aten.neg.default(d))
    if name == "ge":
        return positive_bit(aten.add.Tensor(d, 1))
    if name == "le":
        return positive_bit(aten.add.Tensor(aten.neg.default(d), 1))
    if name in ("eq", "ne"):
        both = positive_bit(aten.stack.default([d, aten.neg.default(d)]))
        differ = aten.add.Tensor(aten.select.int(both, 0, 0), aten.select.int(both, 0, 1))
        return differ if name == "ne" else aten.rsub.Scalar(differ, 1)
    raise UnsupportedOperationError(f"unknown comparison {name!r}")


def max_last(x: AST, with_index: bool) -> tuple[AST, Optional[AST]]:
    """Max (and first argmax) over the last dimension, which is removed."""
    n = x.shape[-1]
    if n == 0:
        raise ValueError("max of an empty dimension")
    index = None
    if with_index:
        arange = torch.arange(n, dtype=torch.int64).expand(tuple(x.shape))
        index = mac_dispatch.public_like(arange, x) if mac_dispatch.is_authenticated(x) else AST.from_public(arange, x)
    while n > 1:
        h = n // 2
        # neighbours meet (entries 2k and 2k+1): every entry keeps a contiguous range of the original
        # indices, a's before b's, so keeping a on a tie keeps the first maximal index at every level
        a, b = aten.slice.Tensor(x, -1, 0, 2 * h, 2), aten.slice.Tensor(x, -1, 1, 2 * h, 2)
        diff = aten.sub.Tensor(a, b)
        extras = []
        if index is not None:
            ia, ib = aten.slice.Tensor(index, -1, 0, 2 * h, 2), aten.slice.Tensor(index, -1, 1, 2 * h, 2)
            extras = [aten.sub.Tensor(ia, ib)]
        # bit = [a >= b] = [a - b + 1 > 0]: ties keep the first index, like torch.
        bits, prods = _sign_select(aten.add.Tensor(diff, 1), extras)
        # (a - b + 1) * bit - bit = (a - b) * bit
        x_new = aten.add.Tensor(b, aten.sub.Tensor(prods[0], bits))
        if index is not None:
            idx_new = aten.add.Tensor(ib, prods[1])
        if n % 2:
            x_new = aten.cat.default([x_new, aten.narrow.default(x, -1, 2 * h, 1)], -1)
            if index is not None:
                idx_new = aten.cat.default([idx_new, aten.narrow.default(index, -1, 2 * h, 1)], -1)
        x, n = x_new, h + n % 2
        if index is not None:
            index = idx_new
    x = aten.select.int(x, -1, 0)
    return x, (aten.select.int(index, -1, 0) if index is not None else None)


def max_dim(x: AST, dim: Optional[int], keepdim: bool, with_index: bool) -> tuple[AST, Optional[AST]]:
    """torch.max / argmax semantics over ``dim`` (None: all entries, flattened)."""
    if dim is None:
        values, index = max_last(aten.view.default(x, [-1]), with_index)
        if keepdim:
            shape = [1] * x.dim()
            values = aten.view.default(values, shape)
            index = aten.view.default(index, shape) if index is not None else None
        return values, index
    dim = dim % x.dim()
    # permute (structural, allowlisted on workers) rather than movedim
    order = [d for d in range(x.dim()) if d != dim] + [dim]
    moved = aten.permute.default(x, order) if dim != x.dim() - 1 else x
    values, index = max_last(moved, with_index)
    if keepdim:
        values = aten.unsqueeze.default(values, dim)
        index = aten.unsqueeze.default(index, dim) if index is not None else None
    return values, index


def max_pool2d(x: AST, kernel_size, stride, padding, dilation, ceil_mode) -> AST:
    """2-D max pooling of a shared (N, C, H, W) or (C, H, W) tensor."""
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride) if stride else (kh, kw)
    if any(pair(padding)) or pair(dilation) != (1, 1) or ceil_mode:
        raise UnsupportedOperationError("shared max_pool2d supports padding=0, dilation=1, ceil_mode=False")
    windows = aten.unfold.default(aten.unfold.default(x, -2, kh, sh), -2, kw, sw)
    shape = list(windows.shape[:-2]) + [kh * kw]
    values, _ = max_last(aten.reshape.default(aten.clone.default(windows), shape), with_index=False)
    return values


