"""Rule table of :class:`~veil.tensors.additive.AdditiveSharingTensor`.

Linear ops are local (each party on its share); public operands are added by
party 0 only; products of two shared tensors run the Beaver protocol; division
by a public integer runs a truncation protocol.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc.beaver import beaver_op
from veil.mpc.errors import NotEncodedError, UnsupportedOperationError
from veil.mpc.ring import conv2d as ring_conv2d
from veil.shapes import broadcast_shape
from veil.tensors import pending_products
from veil.tensors._dispatch import RuleTable
from veil.tensors.rules.common import INPLACE_TO_OUTOFPLACE, STRUCTURAL_OPS, run_inplace, scalar_value

aten = torch.ops.aten

ADDITIVE_RULES = RuleTable("AdditiveSharingTensor")
ADDITIVE_RULES.local(*STRUCTURAL_OPS)


def public_int(value: Any, what: str) -> Any:
    """Checks that a public operand is an integer (scalar or tensor).

    Raises:
        NotEncodedError: For non-integral floats and float tensors.
    """
    value = scalar_value(value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise NotEncodedError(f"{what}: cannot combine a shared integer tensor with float {value}; use fix_precision")
        return int(value)
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point:
            raise NotEncodedError(f"{what}: cannot combine a shared integer tensor with a {value.dtype} tensor; use fix_precision")
        return value.to(torch.int64)
    return value


def _broadcast(cls, x, shape):
    """Expands every share of ``x`` to ``shape`` (public data may broadcast)."""
    if tuple(x.shape) == tuple(shape):
        return x
    return cls({p: s.expand(shape) for p, s in x.child.items()}, x.crypto_provider)


@ADDITIVE_RULES.handler(aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar)
def _add_sub(cls, func, args, kwargs):
    x, y = args[0], args[1]
    alpha = kwargs.get("alpha", 1)
    if isinstance(x, cls) and isinstance(y, cls):
        return cls._veil_apply_local(func, args, kwargs)
    subtract = func in (aten.sub.Tensor, aten.sub.Scalar)
    if isinstance(x, cls):
        public = public_int(y, str(func)) * public_int(alpha, str(func))
        return _add_public(cls, x, -public if subtract else public)
    # public (+|-) alpha * shared
    shared = cls._veil_apply_local(aten.mul.Tensor, (y, public_int(alpha, str(func))), {})
    if subtract:
        shared = cls._veil_apply_local(aten.neg.default, (shared,), {})
    return _add_public(cls, shared, public_int(x, str(func)))


def _add_public(cls, x, public):
    """Shares of ``x + public``: party 0 adds it, the others copy their share.

    The copy matters: a result must never hold the operand's share objects,
    because opening a result (``.get()``) frees remote shares, which would
    break ``x`` after ``(x + 3).get()``.
    """
    shape = broadcast_shape(tuple(x.shape), tuple(public.shape) if isinstance(public, torch.Tensor) else ())
    x = _broadcast(cls, x, shape)
    first = x.parties[0]
    shares = {p: s + public if p == first else aten.clone.default(s) for p, s in x.child.items()}
    return cls(shares, x.crypto_provider)


def _bilinear(cls, func, x, y, op: str, **op_kwargs):
    """Shared (x) shared -> Beaver; shared (x) public -> local on each share."""
    if isinstance(x, cls) and isinstance(y, cls):
        cls._veil_check_compatible((x, y))
        if pending_products.deferring():  # a backward pass's: opened with its next independent products
            return pending_products.defer_product(cls, x, y, op, **op_kwargs)
        return cls(beaver_op(x.child, y.child, op, x.crypto_provider, **op_kwargs), x.crypto_provider)
    if isinstance(x, cls):
        return cls._veil_apply_local(func, (x, public_int(y, str(func))), op_kwargs)
    return cls._veil_apply_local(func, (public_int(x, str(func)), y), op_kwargs)


@ADDITIVE_RULES.handler(aten.mul.Tensor, aten.mul.Scalar)
def _mul(cls, func, args, kwargs):
    return _bilinear(cls, func, args[0], args[1], "mul")


_MATMUL_NAMES = {aten.mm.default: "mm", aten.bmm.default: "bmm", aten.mv.default: "matmul", aten.dot.default: "matmul"}


@ADDITIVE_RULES.handler(*_MATMUL_NAMES)
def _matmul(cls, func, args, kwargs):
    return _bilinear(cls, func, args[0], args[1], _MATMUL_NAMES[func])


def _conv_public_local(cls, x, w, **conv_kwargs):
    if isinstance(x, cls):
        w = public_int(w, "convolution")
        return cls({p: ring_conv2d(s, w, **conv_kwargs) for p, s in x.child.items()}, x.crypto_provider)
    x = public_int(x, "convolution")
    return cls({p: ring_conv2d(x, s, **conv_kwargs) for p, s in w.child.items()}, w.crypto_provider)


@ADDITIVE_RULES.handler(aten.convolution.default)
def _convolution(cls, func, args, kwargs):
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
    if transposed or len(x.shape) != 4:
        raise UnsupportedOperationError("only 2-D, non-transposed convolution is implemented on shared tensors")
    conv_kwargs = dict(stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups)
    if isinstance(x, cls) and isinstance(w, cls):
        out = _bilinear(cls, func, x, w, "conv2d", **conv_kwargs)
    else:
        out = _conv_public_local(cls, x, w, **conv_kwargs)
    if bias is not None:
        out = aten.add.Tensor(out, aten.view.default(bias, [1, -1, 1, 1]))
    return out


@ADDITIVE_RULES.handler(aten.div.Tensor_mode, aten.div.Scalar_mode, aten.floor_divide.default, aten.floor_divide.Scalar)
def _floor_div(cls, func, args, kwargs):
    x, d = args[0], scalar_value(args[1])
    mode = kwargs.get("rounding_mode", "floor" if func.overloadpacket is aten.floor_divide else None)
    if not isinstance(x, cls) or isinstance(d, torch.Tensor) or mode not in ("floor", "trunc"):
        raise UnsupportedOperationError("shared tensors can only be divided by a public positive integer")
    return x.truncate(int(public_int(d, str(func))))


@ADDITIVE_RULES.handler(aten.div.Tensor, aten.div.Scalar, aten.mean, aten.true_divide.Tensor)
def _true_div(cls, func, args, kwargs):
    raise NotEncodedError(
        f"{func} on an integer shared tensor would need real numbers: use fix_precision() before share(), "
        "or floor division by a public integer"
    )


@ADDITIVE_RULES.handler(aten.ones_like.default, aten.full_like.default, aten.new_ones.default, aten.new_full.default)
def _public_constant(cls, func, args, kwargs):
    like = args[0]
    shape = args[1] if func in (aten.new_ones.default, aten.new_full.default) else like.shape
    if func is aten.full_like.default:
        value = args[1]
    elif func is aten.new_full.default:
        value = args[2]
    else:
        value = 1
    value = public_int(value, str(func))
    return cls.from_public(torch.full(tuple(shape), value, dtype=torch.int64), like)


@ADDITIVE_RULES.handler(aten.cat.default, aten.stack.default)
def _cat(cls, func, args, kwargs):
    tensors = list(args[0])
    like = next(t for t in tensors if isinstance(t, cls))
    tensors = [t if isinstance(t, cls) else cls.from_public(public_int(t, str(func)), like) for t in tensors]
    return cls._veil_apply_local(func, (tensors,) + tuple(args[1:]), kwargs)


@ADDITIVE_RULES.handler(aten.constant_pad_nd.default)
def _pad(cls, func, args, kwargs):
    value = args[2] if len(args) > 2 else kwargs.get("value", 0)
    if value != 0:
        raise UnsupportedOperationError("padding a shared tensor with a non-zero constant")
    return cls._veil_apply_local(func, args[:2], {})


@ADDITIVE_RULES.handler(*INPLACE_TO_OUTOFPLACE)
def _inplace(cls, func, args, kwargs):
    return run_inplace(cls, func, args, kwargs)
