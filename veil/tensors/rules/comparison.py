"""Rules for order-dependent ops: comparisons, ReLU, max/argmax, max-pooling.

Plaintext fixed-precision tensors compare their encoded integers directly
(order is preserved by the encoding). Shared tensors run the private
comparison protocol through :mod:`veil.tensors.mpc_glue.maximum` (1 round per
comparison; see :mod:`veil.mpc.comparison` for its cost and limits).
Comparison results of fixed-precision tensors are fixed-precision 0/1 (as
PySyft 0.2); of shared integer tensors, shared 0/1 integers.
"""

from __future__ import annotations

import torch

from veil.mpc import comparison
from veil.mpc.bit_comparison import truncate_relu_with_bit
from veil.tensors import mac_dispatch
from veil.tensors.mpc_glue import maximum
from veil.tensors.additive import AdditiveSharingTensor
from veil.tensors.rules.additive import ADDITIVE_RULES, public_int
from veil.tensors.rules.fixed_precision import CARRIED_ATTRS, FIXED_PRECISION_RULES, _children
from veil.tensors.rules.common import scalar_value

aten = torch.ops.aten

COMPARISONS = (
    aten.gt.Tensor, aten.gt.Scalar, aten.lt.Tensor, aten.lt.Scalar, aten.ge.Tensor, aten.ge.Scalar,
    aten.le.Tensor, aten.le.Scalar, aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar,
)
MAX_OPS = (aten.max.default, aten.max.dim, aten.argmax.default)
POOL_OPS = (aten.max_pool2d_with_indices.default, aten.max_pool2d.default)


def _shared(value) -> bool:
    return isinstance(value, AdditiveSharingTensor)


def _public(value):
    return value if _shared(value) else public_int(value, "comparison")


# ------------------------------------------------------------ shared integers


@ADDITIVE_RULES.handler(*COMPARISONS)
def _ast_compare(cls, func, args, kwargs):
    return maximum.compare(func.overloadpacket.__name__, _public(args[0]), _public(args[1]))


@ADDITIVE_RULES.handler(aten.relu.default)
def _ast_relu(cls, func, args, kwargs):
    return maximum.relu(args[0])


def _max_args(func, args, kwargs):
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return (None, False) if func is aten.max.default else (dim, keepdim)


@ADDITIVE_RULES.handler(*MAX_OPS)
def _ast_max(cls, func, args, kwargs):
    dim, keepdim = _max_args(func, args, kwargs)
    values, index = maximum.max_dim(args[0], dim, keepdim, with_index=func is not aten.max.default)
    if func is aten.max.default:
        return values
    return index if func is aten.argmax.default else (values, index)


def _pool_args(args, kwargs):
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    opts = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, **dict(zip(names, args[1:])), **kwargs}
    return [opts[n] for n in names]


@ADDITIVE_RULES.handler(*POOL_OPS)
def _ast_pool(cls, func, args, kwargs):
    values = maximum.max_pool2d(args[0], *_pool_args(args, kwargs))
    if func is aten.max_pool2d.default:
        return values
    return values, torch.zeros(tuple(values.shape), dtype=torch.int64)  # indices are not computed


# ------------------------------------------------------------ fixed precision


@FIXED_PRECISION_RULES.handler(*COMPARISONS)
def _fp_compare(cls, func, args, kwargs):
    children, encoding, dtype = _children(cls, [scalar_value(a) for a in args[:2]])
    if not any(_shared(c) for c in children):
        return func(*children)  # public operands: a public bool tensor
    bits = maximum.compare(func.overloadpacket.__name__, *children)
    return cls(aten.mul.Tensor(bits, encoding.scale), encoding, dtype)


#: Attribute of a shared ReLU output holding the shared bit ``[x > 0]``.
RELU_BIT_ATTR = "_veil_relu_bit"
CARRIED_ATTRS.append(RELU_BIT_ATTR)


@FIXED_PRECISION_RULES.handler(aten.relu.default)
def _fp_relu(cls, func, args, kwargs):
    x = args[0]
    if x.pending_divisor != 1 and _folds_truncation(x.raw_child):
        raw = x.raw_child  # a product owing its truncation: paid inside the comparison's rounds
        child, bit = truncate_relu_with_bit(raw.child, x.pending_divisor, raw.crypto_provider)
        out = cls(AdditiveSharingTensor(child, raw.crypto_provider), x.encoding, x.dtype)
        setattr(out, RELU_BIT_ATTR, AdditiveSharingTensor(bit, raw.crypto_provider))
        return out
    if not _shared(x.child):
        return cls(torch.relu(x.child), x.encoding, x.dtype)
    child, bit = maximum.relu_with_bit(x.child)
    out = cls(child, x.encoding, x.dtype)
    # Autograd saves this very output for threshold_backward: the bit rides
    # along so that the backward pass needs no second comparison.
    setattr(out, RELU_BIT_ATTR, bit)
    return out


def _plain_shares(raw) -> bool:
    """Plain additive shares: no MACs (the authenticated comparison has its own protocol and range)."""
    return type(raw) is AdditiveSharingTensor and not mac_dispatch.is_authenticated(raw)


def _folds_truncation(raw) -> bool:
    """Whether ReLU can run truncation and comparison together on ``raw``: plain additive shares and the
    bitwise comparison circuit."""
    return _plain_shares(raw) and comparison.DEFAULT_COMPARISON == "circuit"


@FIXED_PRECISION_RULES.handler(aten.threshold_backward.default)
def _fp_threshold_backward(cls, func, args, kwargs):
    """ReLU's backward: ``grad * [output > threshold]``."""
    grad, output, threshold = args[0], args[1], scalar_value(args[2])
    bit = getattr(output, RELU_BIT_ATTR, None) if threshold == 0 else None
    if bit is None:
        if not _shared(output.child):
            mask = output.child > _children(cls, [output, threshold])[0][1]
            return cls(aten.mul.Tensor(grad.child, mask.to(torch.int64)), grad.encoding, grad.dtype)
        bit = maximum.compare("gt", *_children(cls, [output, threshold])[0])
    # A 0/1 integer factor: an exact product, no truncation.
    return cls(aten.mul.Tensor(grad.child, bit), grad.encoding, grad.dtype)


def _owed_through_max(x) -> int:
    """What the maxima of ``x`` still owe: ``max(y) / d = max(y / d)``, so a product's maximum (or max-pool)
    can run on its untruncated shares (plain additive ones; the authenticated comparison's range is not
    stretched to the product's scale) and owe what the product did; 1: ``x`` pays first."""
    return x.pending_divisor if x.pending_divisor != 1 and _plain_shares(x.raw_child) else 1


@FIXED_PRECISION_RULES.handler(*MAX_OPS)
def _fp_max(cls, func, args, kwargs):
    """max / argmax. Indices come back fixed-precision (the index times the
    scale, exact), so that ``pred.eq(target)`` works against fixed-precision
    targets, as in PySyft 0.2's encrypted evaluation loops."""
    x = args[0]
    dim, keepdim = _max_args(func, args, kwargs)
    with_index = func is not aten.max.default
    owed = _owed_through_max(x)
    if owed != 1:
        values, index = maximum.max_dim(x.raw_child, dim, keepdim, with_index=with_index)
    elif not _shared(x.child):
        rest = [dim, keepdim] if with_index and dim is not None else []
        out = func(x.child, *rest)
        values, index = (out, None) if func is aten.max.default else (
            (None, out) if func is aten.argmax.default else (out[0], out[1]))
    else:
        values, index = maximum.max_dim(x.child, dim, keepdim, with_index=with_index)
    if index is not None:
        index = cls(aten.mul.Tensor(index, x.encoding.scale), x.encoding, x.dtype)
    if func is aten.argmax.default:
        return index
    values = cls(values, x.encoding, x.dtype, pending_divisor=owed)
    return values if func is aten.max.default else (values, index)


@FIXED_PRECISION_RULES.handler(*POOL_OPS)
def _fp_pool(cls, func, args, kwargs):
    x = args[0]
    opts = _pool_args(args, kwargs)
    owed = _owed_through_max(x)
    if owed != 1 or _shared(x.child):
        values = maximum.max_pool2d(x.raw_child, *opts)
        indices = torch.zeros(tuple(values.shape), dtype=torch.int64)  # not computed on shares
    else:
        values, indices = aten.max_pool2d_with_indices.default(x.child.to(torch.float64), *opts)
        values = values.to(torch.int64)  # exact: |encoded| < 2^53 for pooled activations
    out = cls(values, x.encoding, x.dtype, pending_divisor=owed)
    return out if func is aten.max_pool2d.default else (out, indices)
