"""Rules for losses used in encrypted training (fixed precision).

Only losses that need no division by a secret or transcendental function are
supported exactly: the mean squared error (PySyft's encrypted-training
tutorials regress one-hot labels with it; SecureML trains with MSE too).
Cross entropy would need an approximate softmax (:mod:`veil.mpc.functions`)
and is not registered here.

The mean divides by the *public* element count through truncation (error
below one unit in the last place) instead of multiplying by an encoded
``1/n``, whose rounding would bias every gradient by up to ``2^-17 n``
relative.
"""

from __future__ import annotations

import math

import torch

from veil.mpc.errors import UnsupportedOperationError
from veil.tensors.rules.fixed_precision import FIXED_PRECISION_RULES, _children, divide, mul

aten = torch.ops.aten

# torch.nn._reduction enum values (aten passes ints).
_NONE, _MEAN, _SUM = 0, 1, 2


def _reduction(args: tuple, kwargs: dict, position: int) -> int:
    reduction = args[position] if len(args) > position else kwargs.get("reduction", _MEAN)
    if reduction not in (_NONE, _MEAN, _SUM):
        raise UnsupportedOperationError(f"mse_loss reduction {reduction!r}")
    return reduction


@FIXED_PRECISION_RULES.handler(aten.mse_loss.default)
def _mse_loss(cls, func, args, kwargs):
    x, y = args[0], args[1]
    reduction = _reduction(args, kwargs, 2)
    (xc, yc), encoding, dtype = _children(cls, (x, y))
    diff = cls(aten.sub.Tensor(xc, yc), encoding, dtype)
    squared = mul(cls, diff, diff)
    if reduction == _NONE:
        return squared
    total = aten.sum.default(squared)
    return divide(cls, total, math.prod(x.shape)) if reduction == _MEAN else total


@FIXED_PRECISION_RULES.handler(aten.mse_loss_backward.default)
def _mse_loss_backward(cls, func, args, kwargs):
    """``d/dx mean((x - y)^2) = 2 (x - y) grad / n``."""
    grad, x, y = args[0], args[1], args[2]
    reduction = _reduction(args, kwargs, 3)
    (xc, yc), encoding, dtype = _children(cls, (x, y))
    diff = cls(aten.sub.Tensor(xc, yc), encoding, dtype)
    scaled = mul(cls, diff, grad)  # grad broadcasts (a scalar for mean/sum)
    n = math.prod(x.shape)
    if reduction == _MEAN and n % 2 == 0:  # 2 / n as one division: the product's truncation folds into it
        return divide(cls, scaled, n // 2)
    scaled = mul(cls, scaled, 2)  # a public integer: exact
    return divide(cls, scaled, n) if reduction == _MEAN else scaled
