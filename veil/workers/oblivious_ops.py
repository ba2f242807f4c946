"""Which ATen ops may touch a secret value: the table behind :mod:`veil.workers.oblivious`.

An op is listed here only if neither its success nor its output shape can
depend on the values of its inputs (dtype, shape and public-argument checks are
fine: they do not depend on a secret's values). Everything else that touches a
secret is refused, so an op torch adds later, or one we did not think of
(``linalg_cholesky`` fails on a non-positive-definite input, ``one_hot`` on a
class out of range), is a refusal rather than a one-bit oracle.

Names are ATen schema names without the overload (``aten::add`` covers
``add.Tensor`` and ``add.Scalar``); in-place variants are listed explicitly.
"""

from __future__ import annotations

from typing import Any

import torch


def _with_inplace(*names: str) -> frozenset:
    return frozenset(n for name in names for n in (f"aten::{name}", f"aten::{name}_"))


def _plain(*names: str) -> frozenset:
    return frozenset(f"aten::{name}" for name in names)


#: views, copies and layout: the values move, the shapes come from public arguments
STRUCTURAL = _plain(
    "view", "_unsafe_view", "reshape", "_reshape_alias", "view_as", "reshape_as", "alias", "detach", "lift_fresh",
    "lift_fresh_copy", "permute", "transpose", "t", "expand", "expand_as", "slice", "select", "narrow", "unsqueeze",
    "squeeze", "flatten", "unflatten", "movedim", "as_strided", "diagonal", "diag_embed", "clone", "contiguous",
    "_to_copy", "to", "copy", "copy_", "cat", "stack", "split", "split_with_sizes", "unsafe_split", "chunk",
    "unbind", "flip", "roll", "repeat", "tile", "constant_pad_nd", "unfold", "im2col", "col2im", "tril", "triu",
    "empty_like", "zeros_like", "ones_like", "full_like", "fill", "fill_", "zero_", "new_zeros", "new_ones",
    "new_empty", "new_full", "squeeze_", "unsqueeze_", "t_", "transpose_", "pixel_shuffle", "channel_shuffle",
    "masked_fill", "masked_fill_", "where",
)

#: elementwise arithmetic, bit operations and comparisons on the ring (never fail on values)
RING = _with_inplace(
    "add", "sub", "mul", "neg", "abs", "sign", "sgn", "square", "addcmul", "clamp", "clamp_min", "clamp_max",
    "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "bitwise_left_shift", "bitwise_right_shift",
    "logical_and", "logical_or", "logical_xor", "logical_not", "eq", "ne", "lt", "le", "gt", "ge", "lerp",
) | _plain("rsub", "maximum", "minimum", "fmax", "fmin", "__and__", "__or__", "__xor__", "__lshift__",
           "__rshift__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__")

#: floating-point maths (NaN and inf propagate; nothing raises on a value)
FLOAT = _with_inplace(
    "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "reciprocal", "pow", "sigmoid",
    "tanh", "relu", "gelu", "silu", "hardtanh", "leaky_relu", "elu", "threshold", "sin", "cos", "floor", "ceil",
    "round", "trunc", "frac", "erf", "true_divide", "addcdiv",
) | _plain("softplus")

#: reductions and order statistics of fixed output shape
REDUCTIONS = _plain(
    "sum", "mean", "prod", "cumsum", "cumprod", "amax", "amin", "aminmax", "max", "min", "argmax", "argmin",
    "sort", "topk", "kthvalue", "var", "std", "var_mean", "std_mean", "norm", "linalg_vector_norm", "softmax",
    "_softmax", "log_softmax", "_log_softmax", "logsumexp", "all", "any", "count_nonzero",
)

#: linear layers, convolutions, pooling and their gradients
LINEAR = _with_inplace("addmm", "addmv", "baddbmm", "addbmm") | _plain(
    "mm", "bmm", "mv", "matmul", "dot", "vdot", "linear", "convolution", "_convolution", "conv1d", "conv2d",
    "conv3d", "convolution_backward", "max_pool2d", "max_pool2d_with_indices", "max_pool2d_with_indices_backward",
    "avg_pool2d", "avg_pool2d_backward", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
    "_adaptive_avg_pool2d_backward", "native_layer_norm", "native_layer_norm_backward", "native_batch_norm",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "native_batch_norm_backward",
    "threshold_backward", "sigmoid_backward", "tanh_backward", "_softmax_backward_data",
    "_log_softmax_backward_data",
)

#: ATen op -> arguments that may not hold a secret: their values make the op fail when out of range or
#: zero (indices, divisors, targets); the op's other arguments may
VALUE_CHECKED: dict[str, frozenset] = {
    "aten::index": frozenset({"indices"}),
    "aten::index_put": frozenset({"indices"}),
    "aten::index_put_": frozenset({"indices"}),
    "aten::_index_put_impl_": frozenset({"indices"}),
    "aten::index_select": frozenset({"index"}),
    "aten::gather": frozenset({"index"}),
    "aten::take": frozenset({"index"}),
    "aten::take_along_dim": frozenset({"indices"}),
    "aten::scatter": frozenset({"index"}),
    "aten::scatter_": frozenset({"index"}),
    "aten::scatter_add": frozenset({"index"}),
    "aten::scatter_add_": frozenset({"index"}),
    "aten::index_add": frozenset({"index"}),
    "aten::index_add_": frozenset({"index"}),
    "aten::index_copy": frozenset({"index"}),
    "aten::index_copy_": frozenset({"index"}),
    "aten::index_fill": frozenset({"index"}),
    "aten::index_fill_": frozenset({"index"}),
    "aten::embedding": frozenset({"indices"}),
    "aten::nll_loss_forward": frozenset({"target"}),
    "aten::nll_loss2d_forward": frozenset({"target"}),
    "aten::nll_loss": frozenset({"target"}),
    "aten::nll_loss_nd": frozenset({"target"}),
    "aten::div": frozenset({"other"}),  # integer division with a rounding mode fails on 0
    "aten::div_": frozenset({"other"}),
    "aten::floor_divide": frozenset({"other"}),
    "aten::floor_divide_": frozenset({"other"}),
    "aten::remainder": frozenset({"other", "self"}),  # remainder.Scalar_Tensor: the divisor is "self"
    "aten::remainder_": frozenset({"other"}),
    "aten::fmod": frozenset({"other"}),
    "aten::fmod_": frozenset({"other"}),
}

#: ops a secret may enter in any argument
OBLIVIOUS: frozenset = STRUCTURAL | RING | FLOAT | REDUCTIONS | LINEAR

#: value-shaped ops named in refusals (the allowlist refuses them anyway; a clearer message)
VALUE_SHAPED = _plain(
    "nonzero", "nonzero_numpy", "nonzero_static", "argwhere", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "unique_dim_consecutive", "repeat_interleave", "bincount", "histc", "histogram",
    "multinomial",
)


#: ATen ops converting a one-element tensor argument to a Scalar of the destination's dtype with torch's overflow
#: check: ``zeros(1, dtype=int8).masked_fill(m, t)`` fails iff ``t`` is out of int8's range (``a[mask] = t`` is
#: index_put); data-oblivious in every other argument
CONVERTED_VALUES = {"aten::masked_fill": "value", "aten::masked_fill_": "value", "aten::index_fill": "value",
                    "aten::index_fill_": "value", "aten::index_put": "values", "aten::index_put_": "values",
                    "aten::_index_put_impl_": "values"}


def converted_value(func: Any, args: tuple, kwargs: dict) -> Any:
    """The one-element tensor ATen op ``func`` converts to its destination's other dtype (its success follows that
    value), or None."""
    wanted = CONVERTED_VALUES.get(func._schema.name)
    if wanted is None:
        return None
    value = dest = None
    for i, a in enumerate(func._schema.arguments):
        if a.name in (wanted, "self"):
            v = args[i] if i < len(args) else kwargs.get(a.name)
            value, dest = (v, dest) if a.name == wanted else (value, v)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        return None
    return None if isinstance(dest, torch.Tensor) and dest.dtype == value.dtype else value
