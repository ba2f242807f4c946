"""Rule table of :class:`~veil.tensors.fixed_precision.FixedPrecisionTensor`.

Structural and additive ops act on the encoded children directly; public
operands are encoded first; products are followed by truncation (division
by the scale), which is local for plaintext children and a protocol for
shared ones (:meth:`AdditiveSharingTensor.truncate`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from veil.mpc.encoding import FixedPointEncoding, check_no_wrap, encode, encode_scalar
from veil.mpc.encoding import truncate as truncate_plain
from veil.mpc.errors import UnsupportedOperationError
from veil.mpc.ring import conv2d as ring_conv2d
from veil.mpc.ring import pair
from veil.shapes import broadcast_shape
from veil.tensors._dispatch import RuleTable
from veil.tensors.additive import AdditiveSharingTensor
from veil.tensors.rules.conv_backward import convolution_backward, spread
from veil.tensors.rules.common import INPLACE_TO_OUTOFPLACE, STRUCTURAL_OPS, run_inplace, scalar_value

aten = torch.ops.aten

FIXED_PRECISION_RULES = RuleTable("FixedPrecisionTensor")
_ALIASES = (aten.detach.default, aten.alias.default)
#: ops that only view or reorder the entries of one tensor: a truncation owed entry by entry commutes with
#: them, so they carry the debt (a weight gradient's ``t()`` and ``detach`` on its way to the optimizer,
#: which pays it with the learning rate's division: ``veil.tensors.mpc_glue.optim``)
_CARRYING = (aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default,
             aten._unsafe_view.default, aten.reshape.default)
FIXED_PRECISION_RULES.local(*[op for op in STRUCTURAL_OPS if op not in _ALIASES + _CARRYING],
                            aten.cat.default, aten.stack.default)

#: Side values that aliases of a tensor keep (e.g. ReLU's derivative bit,
#: which must survive autograd saving a detached alias of ReLU's output).
CARRIED_ATTRS: list[str] = []


@FIXED_PRECISION_RULES.handler(*_ALIASES)
def _alias(cls, func, args, kwargs):
    x = args[0]
    out = cls(func(x.child), x.encoding, x.dtype) if x.pending_divisor == 1 else _carry(cls, func, args, kwargs)
    for name in CARRIED_ATTRS:
        if hasattr(x, name):
            setattr(out, name, getattr(x, name))
    return out


@FIXED_PRECISION_RULES.handler(*_CARRYING)
def _carry(cls, func, args, kwargs):
    """A view or reordering of ``x``: owing what ``x`` owes (reading it pays through ``x``, :func:`_through`)."""
    x = args[0]
    if x.pending_divisor == 1:
        return cls._veil_apply_local(func, args, kwargs)

    def redo(paid, rest=args[1:]):
        return func(paid, *rest, **kwargs)

    return cls(redo(x.raw_child), x.encoding, x.dtype, pending_divisor=x.pending_divisor, settle_via=_through(x, redo))


def _is_shared(child: torch.Tensor) -> bool:
    return isinstance(child, AdditiveSharingTensor)


def truncate(child: torch.Tensor, divisor: int) -> torch.Tensor:
    """Divides encoded values by a public integer (protocol if shared)."""
    if _is_shared(child):
        return child.truncate(divisor)
    return truncate_plain(child, divisor)


#: Shared products (elementwise, the matmul family, convolutions) leave their truncation pending
#: (``FixedPrecisionTensor.pending_divisor``) for the next op to pay: a bias added at
#: the product's scale, an average pool's division folded into the same truncation, a
#: ReLU's comparison opening the truncation's mask in its own first round
#: (:func:`veil.mpc.bit_comparison.truncate_relu_with_bit`). Any other reader of
#: ``child`` pays it there, one truncation as before. False: truncate after every product.
LAZY_TRUNCATION = True


def product(cls, child: torch.Tensor, encoding: FixedPointEncoding, dtype: torch.dtype):
    """A product at scale ``s^2`` as a fixed-precision tensor: truncated, or owing ``s`` if shared."""
    if LAZY_TRUNCATION and _is_shared(child):
        return cls(child, encoding, dtype, pending_divisor=encoding.scale)
    return cls(truncate(child, encoding.scale), encoding, dtype)


def divide(cls, x, count: int):
    """``x / count`` for a public positive integer: owed (with what ``x`` owes already) if shared."""
    if count == 1:
        return x
    if LAZY_TRUNCATION and _is_shared(x.raw_child):
        return cls(x.raw_child, x.encoding, x.dtype, pending_divisor=x.pending_divisor * count)
    return cls(truncate(x.child, count), x.encoding, x.dtype)


def pending_of(value: Any) -> int:
    """What a fixed-precision operand still owes (1 for anything else)."""
    return getattr(value, "pending_divisor", 1) if isinstance(value, torch.Tensor) else 1


def _scaled_children(cls, args, divisor: int) -> tuple[list, FixedPointEncoding, torch.dtype] | None:
    """Operands at the scale ``s * divisor`` of the pending ones (the others multiplied by the public
    ``divisor``: exact), or None if a public operand would leave int64 there."""
    fixed = [a for a in args if isinstance(a, cls)]
    encoding = cls._veil_check_compatible(fixed)
    out = []
    for a in args:
        if isinstance(a, cls) and a.pending_divisor == divisor:
            out.append(a.raw_child)
            continue
        if isinstance(a, cls) and _is_shared(a.child):  # a shared addend's range is the caller's contract
            out.append(aten.mul.Tensor(a.child, divisor))  # (a product plus a bias: mpc/encoding.py)
            continue
        v = a.child if isinstance(a, cls) else _encode_public(a, encoding)  # public: checked below
        if isinstance(v, int):
            v *= divisor
            if not -(1 << 62) < v < (1 << 62):
                return None
        else:
            if v.numel() and int(v.abs().max()) >= (1 << 62) // divisor:
                return None
            v = v * divisor
        out.append(v)
    return out, encoding, fixed[0].dtype


def _through(source, redo) -> tuple:
    """How a value derived from one owing ``source`` by the local op ``redo`` pays
    (``FixedPrecisionTensor.child``): the source pays, ``redo`` runs on what it paid, unless the source was
    assigned a new value since."""
    return source, source._veil_assigned, redo


def _lazy_add_sub(cls, op, x, y):
    """``x +- y`` keeping the operands' common pending divisor; None when there is none to keep."""
    pending = {pending_of(a) for a in (x, y) if isinstance(a, cls)} - {1}
    if len(pending) != 1:  # none pending, or two different divisors: each pays its own
        return None
    (divisor,) = pending
    scaled = _scaled_children(cls, (x, y), divisor)
    if scaled is None:
        return None
    (xc, yc), encoding, dtype = scaled
    owing = [a for a in (x, y) if pending_of(a) == divisor]
    via = None
    if len(owing) == 1:  # one source: reading the sum pays the source (shared with its other uses) and adds
        source, first = owing[0], owing[0] is x
        other = y if first else x  # its value now (at the encoding's scale: it owes nothing)
        other = other.child if isinstance(other, cls) else _encode_public(other, encoding)

        def redo(paid, other=other, first=first):
            return op(paid, other) if first else op(other, paid)

        via = _through(source, redo)
    return cls(op(xc, yc), encoding, dtype, pending_divisor=divisor, settle_via=via)


def _encode_public(value: Any, encoding: FixedPointEncoding) -> Any:
    """Encodes a public Python number or plain tensor."""
    value = scalar_value(value)
    if isinstance(value, torch.Tensor):
        return encode(value, encoding)
    return encode_scalar(value, encoding)


def _children(cls, args) -> tuple[list, FixedPointEncoding, torch.dtype]:
    """Encoded children of operands (public ones encoded) + common metadata."""
    fixed = [a for a in args if isinstance(a, cls)]
    encoding = cls._veil_check_compatible(fixed)
    children = [a.child if isinstance(a, cls) else _encode_public(a, encoding) for a in args]
    return children, encoding, fixed[0].dtype


def _guard(children: list, estimate_fn, what: str) -> None:
    """Plaintext only: refuses a product whose exact value would wrap."""
    if any(_is_shared(c) or not isinstance(c, torch.Tensor) for c in children):
        return
    check_no_wrap(estimate_fn(*[c.to(torch.float64).abs() for c in children]), what)


@FIXED_PRECISION_RULES.handler(aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar)
def _add_sub(cls, func, args, kwargs):
    x, y = args[0], args[1]
    alpha = scalar_value(kwargs.get("alpha", 1))
    if alpha != 1:
        y = aten.mul.Tensor(y, alpha) if isinstance(y, cls) else scalar_value(y) * alpha
    op = aten.sub.Tensor if func in (aten.sub.Tensor, aten.sub.Scalar) else aten.add.Tensor
    lazy = _lazy_add_sub(cls, op, x, y)
    if lazy is not None:
        return lazy
    (xc, yc), encoding, dtype = _children(cls, (x, y))
    return cls(op(xc, yc), encoding, dtype)


def _is_public_integer(value: Any) -> bool:
    value = scalar_value(value)
    if isinstance(value, (bool, int)):
        return True
    return isinstance(value, torch.Tensor) and type(value) is torch.Tensor and not value.dtype.is_floating_point


#: a constant's public value, set by :func:`_constant` (a shared tensor of ones, as autograd's seed gradient
#: ``ones_like(loss)``, is public): a product with it is a public one, no Beaver round. Assigning the
#: tensor a new value drops it (``FixedPrecisionTensor.child``'s setter).
PUBLIC_ATTR = "_veil_public"


def _public_value(const, other) -> Any:
    """The public number ``const`` stands for, where ``other * const`` has ``other``'s shape; else None."""
    value = const.__dict__.get(PUBLIC_ATTR)
    if value is None or broadcast_shape(const.shape, other.shape) != other.shape:
        return None
    return value


def mul(cls, x, y):
    """Fixed-point product; public integers multiply exactly (no truncation)."""
    if isinstance(x, cls) and isinstance(y, cls):  # a constant's public value instead of its shares
        value = _public_value(y, x)
        if value is not None:
            y = value
        elif (value := _public_value(x, y)) is not None:
            x = value
    for a, b in ((x, y), (y, x)):
        if isinstance(a, cls) and _is_public_integer(b):
            b = scalar_value(b)
            b = b.to(torch.int64) if isinstance(b, torch.Tensor) else int(b)
            # an exact product; a factor of at most 1 in size keeps what ``a`` owes (a larger one would
            # stretch the value being truncated past the product's own range: ``a`` pays first)
            keep = a.pending_divisor != 1 and not isinstance(b, torch.Tensor) and abs(b) <= 1
            child = a.raw_child if keep else a.child
            _guard([child, b] if isinstance(b, torch.Tensor) else [child], lambda u, *v: u * (v[0] if v else abs(b)), "mul")
            via = _through(a, lambda paid, b=b: aten.mul.Tensor(paid, b)) if keep else None
            return cls(aten.mul.Tensor(child, b), a.encoding, a.dtype, pending_divisor=a.pending_divisor if keep else 1,
                       settle_via=via)
    (xc, yc), encoding, dtype = _children(cls, (x, y))
    _guard([xc, yc], torch.mul, "fixed-precision mul")
    return product(cls, aten.mul.Tensor(xc, yc), encoding, dtype)


@FIXED_PRECISION_RULES.handler(aten.mul.Tensor, aten.mul.Scalar)
def _mul(cls, func, args, kwargs):
    return mul(cls, args[0], args[1])


@FIXED_PRECISION_RULES.handler(aten.div.Tensor, aten.div.Scalar)
def _div(cls, func, args, kwargs):
    x, y = args[0], scalar_value(args[1])
    if not isinstance(x, cls) or isinstance(y, cls):
        raise UnsupportedOperationError(
            "division by a fixed-precision tensor needs veil.mpc.functions.reciprocal (approximate)"
        )
    if isinstance(y, int) and not isinstance(y, bool) and y != 0:
        # exact-ish: error <= 1 ulp; shared: owed, with what x owes (by +-1: a copy, never x itself)
        out = divide(cls, x, abs(y)) if abs(y) > 1 else cls(truncate(x.child, 1), x.encoding, x.dtype)
        return aten.neg.default(out) if y < 0 else out
    reciprocal = 1.0 / y if not isinstance(y, torch.Tensor) else torch.reciprocal(y.to(torch.float64))
    return mul(cls, x, reciprocal)


_MATMUL_OPS = (aten.mm.default, aten.bmm.default, aten.mv.default, aten.dot.default)


@FIXED_PRECISION_RULES.handler(*_MATMUL_OPS)
def _matmul(cls, func, args, kwargs):
    (xc, yc), encoding, dtype = _children(cls, args[:2])
    _guard([xc, yc], func, str(func))
    return product(cls, func(xc, yc), encoding, dtype)


@FIXED_PRECISION_RULES.handler(aten.convolution.default)
def _convolution(cls, func, args, kwargs):
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
    if transposed or len(x.shape) != 4:
        raise UnsupportedOperationError("only 2-D, non-transposed convolution is implemented in fixed precision")
    (xc, wc), encoding, dtype = _children(cls, (x, w))
    conv_kwargs = dict(stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups)
    if _is_shared(xc) or _is_shared(wc):
        out = func(xc, wc, None, stride, padding, dilation, transposed, output_padding, groups)
    else:
        _guard([xc, wc], lambda u, v: torch.nn.functional.conv2d(u, v, None, **conv_kwargs), "conv2d")
        out = ring_conv2d(xc, wc, **conv_kwargs)
    out = product(cls, out, encoding, dtype)
    if bias is not None:  # at the product's scale while its truncation is pending
        out = aten.add.Tensor(out, aten.view.default(bias, [1, -1, 1, 1]))
    return out


@FIXED_PRECISION_RULES.handler(aten.convolution_backward.default)
def _convolution_backward(cls, func, args, kwargs):
    return convolution_backward(*args, **kwargs)


@FIXED_PRECISION_RULES.handler(aten.mean.default, aten.mean.dim)
def _mean(cls, func, args, kwargs):
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if func is aten.mean.default or not dims:
        total, count = aten.sum.default(x), x.numel()
    else:
        dims = [dims] if isinstance(dims, int) else list(dims)
        total = aten.sum.dim_IntList(x, dims, keepdim)
        count = math.prod(x.shape[d] for d in dims)
    return cls(truncate(total.child, count), x.encoding, x.dtype)


@FIXED_PRECISION_RULES.handler(aten.pow.Tensor_Scalar)
def _pow(cls, func, args, kwargs):
    x, k = args[0], scalar_value(args[1])
    if not (isinstance(k, int) or (isinstance(k, float) and k.is_integer())) or k < 0:
        raise UnsupportedOperationError(f"fixed-precision pow supports non-negative integer exponents, got {k}")
    k = int(k)
    if k == 0:
        return aten.ones_like.default(x)
    result, base = None, x
    while k:  # square-and-multiply: O(log k) products
        if k & 1:
            result = base if result is None else mul(cls, result, base)
        k >>= 1
        if k:
            base = mul(cls, base, base)
    return result


@FIXED_PRECISION_RULES.handler(
    aten.ones_like.default, aten.full_like.default, aten.new_ones.default, aten.new_full.default,
    aten.empty_like.default, aten.new_empty.default, aten.fill.Scalar,
)
def _constant(cls, func, args, kwargs):
    x = args[0]
    like = x.raw_child  # its shape and where it lives, not its values: nothing owed is paid for a constant
    if func in (aten.new_ones.default, aten.new_full.default, aten.new_empty.default):
        ones = aten.new_ones.default(like, list(args[1]))
    else:
        ones = aten.ones_like.default(like)
    value = {aten.full_like.default: 1, aten.fill.Scalar: 1, aten.new_full.default: 2}.get(func)
    value = scalar_value(args[value]) if value is not None else 1
    if func in (aten.empty_like.default, aten.new_empty.default):
        value = 0
    out = cls(aten.mul.Tensor(ones, encode_scalar(value, x.encoding)), x.encoding, x.dtype)
    if _is_shared(ones):
        setattr(out, PUBLIC_ATTR, value)
    return out


def _pool_options(args: tuple, kwargs: dict) -> tuple:
    """An average pool's (kernel, stride, padding) as (h, w) pairs and its divisor, from its arguments
    after the tensor(s); ceil_mode and count_include_pad=False (uneven windows) refused."""
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    opts = dict(zip(names, args), **kwargs)
    kernel = pair(opts["kernel_size"])
    padding = pair(opts.get("padding", 0))
    if opts.get("ceil_mode") or any(padding) and not opts.get("count_include_pad", True):
        raise UnsupportedOperationError("avg_pool2d with ceil_mode or count_include_pad=False")
    return kernel, pair(opts.get("stride") or kernel), padding, opts.get("divisor_override") or kernel[0] * kernel[1]


@FIXED_PRECISION_RULES.handler(aten.avg_pool2d.default)
def _avg_pool2d(cls, func, args, kwargs):
    (kh, kw), (sh, sw), (ph, pw), divisor = _pool_options(args[1:], kwargs)
    x = args[0]
    child = x.raw_child  # a pending divisor is paid with the pool's, in one truncation
    child = aten.constant_pad_nd.default(child, [pw, pw, ph, ph], 0) if ph or pw else child
    windows = aten.unfold.default(aten.unfold.default(child, -2, kh, sh), -2, kw, sw)
    total = aten.sum.dim_IntList(windows, [-2, -1])
    divisor *= x.pending_divisor
    if x.pending_divisor != 1:  # the next op may fold it further (a ReLU's comparison)
        return cls(total, x.encoding, x.dtype, pending_divisor=divisor)
    return cls(truncate(total, divisor), x.encoding, x.dtype)


@FIXED_PRECISION_RULES.handler(aten.avg_pool2d_backward.default)
def _avg_pool2d_backward(cls, func, args, kwargs):
    """The transpose of :func:`_avg_pool2d`: each output's gradient goes back to every entry of its window
    (the gradient spread by the stride, shifted to each of the kernel's offsets, cropped to the input and
    summed: local ops), divided by the window's divisor in one truncation with any debt it carries."""
    grad, x = args[0], args[1]
    (kh, kw), (sh, sw), (ph, pw), divisor = _pool_options(args[2:], kwargs)
    spread_ = spread(grad.raw_child, (sh, sw))
    height, width = x.shape[-2] + 2 * ph, x.shape[-1] + 2 * pw  # the padded input the windows covered
    total = None
    for i in range(kh):
        for j in range(kw):  # this offset's entries of every window, at their places in the padded input
            pads = [j, width - j - spread_.shape[-1], i, height - i - spread_.shape[-2]]
            part = aten.constant_pad_nd.default(spread_, pads, 0)
            total = part if total is None else aten.add.Tensor(total, part)
    if ph or pw:  # the padding's gradients are dropped
        total = aten.constant_pad_nd.default(total, [-pw, -pw, -ph, -ph], 0)
    divisor *= grad.pending_divisor
    return cls(truncate(total, divisor), grad.encoding, grad.dtype)


@FIXED_PRECISION_RULES.handler(aten.constant_pad_nd.default)
def _pad(cls, func, args, kwargs):
    value = args[2] if len(args) > 2 else kwargs.get("value", 0)
    x = args[0]
    if value != 0:
        raise UnsupportedOperationError("padding a fixed-precision tensor with a non-zero constant")
    return cls(func(x.child, args[1]), x.encoding, x.dtype)


@FIXED_PRECISION_RULES.handler(aten._to_copy.default)
def _to_copy(cls, func, args, kwargs):
    x = args[0]
    dtype = kwargs.get("dtype") or x.dtype
    device = kwargs.get("device")
    if not dtype.is_floating_point or (device is not None and torch.device(device) != x.device):
        raise UnsupportedOperationError(f"cannot convert a FixedPrecisionTensor to dtype={dtype}, device={device}")
    return cls(x.child, x.encoding, dtype)


@FIXED_PRECISION_RULES.handler(aten.copy_.default)
def _copy(cls, func, args, kwargs):
    target, source = args[0], args[1]
    (child,), encoding, dtype = _children(cls, (source,)) if isinstance(source, cls) else ([_encode_public(source, target.encoding)], target.encoding, target.dtype)
    target._veil_assign(cls(aten.expand.default(child, list(target.shape)), target.encoding, target.dtype))
    return target


@FIXED_PRECISION_RULES.handler(aten.is_same_size.default)
def _same_size(cls, func, args, kwargs):
    return tuple(args[0].shape) == tuple(args[1].shape)


@FIXED_PRECISION_RULES.handler(*INPLACE_TO_OUTOFPLACE)
def _inplace(cls, func, args, kwargs):
    return run_inplace(cls, func, args, kwargs)


# Comparisons, ReLU, max/argmax and max-pooling live in their own rule module.
from veil.tensors.rules import comparison as _comparison_rules  # noqa: E402,F401
from veil.tensors.rules import losses as _loss_rules  # noqa: E402,F401
from veil.tensors.rules import approximations as _approximation_rules  # noqa: E402,F401
