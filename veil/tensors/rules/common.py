"""Helpers and op lists shared by the rule tables."""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc.op_classes import OpClass, ops_of

aten = torch.ops.aten

# Ops that move, select, copy or sum entries without mixing in public data:
# for a fixed-point tensor they act on the encoded integers, for a shared
# tensor every party applies them to its own share. Both are exact. Derived
# from the one op table (veil.mpc.op_classes).
STRUCTURAL_OPS = ops_of(OpClass.STRUCTURAL, OpClass.LINEAR)

# In-place op -> out-of-place op computing the same value.
INPLACE_TO_OUTOFPLACE = {
    aten.add_.Tensor: aten.add.Tensor,
    aten.add_.Scalar: aten.add.Scalar,
    aten.sub_.Tensor: aten.sub.Tensor,
    aten.sub_.Scalar: aten.sub.Scalar,
    aten.mul_.Tensor: aten.mul.Tensor,
    aten.mul_.Scalar: aten.mul.Scalar,
    aten.div_.Tensor: aten.div.Tensor,
    aten.div_.Scalar: aten.div.Scalar,
    aten.neg_.default: aten.neg.default,
    aten.zero_.default: aten.zeros_like.default,
}


def run_inplace(cls: type, func, args: tuple, kwargs: dict) -> Any:
    """Runs an in-place op as its out-of-place twin and swaps the child in.

    The wrapper keeps its identity (and autograd metadata), only the data it
    holds changes, which is what in-place semantics require.
    """
    target = args[0]
    out = INPLACE_TO_OUTOFPLACE[func](*args, **kwargs)
    if not isinstance(out, cls):
        raise TypeError(f"in-place {func} on {cls.__name__} produced {type(out).__name__}")
    if tuple(out.shape) != tuple(target.shape):
        raise RuntimeError(f"in-place {func} would change the shape {tuple(target.shape)} -> {tuple(out.shape)}")
    target._veil_assign(out)
    return target


def is_float_public(value: Any) -> bool:
    """True for Python floats and floating-point plain tensors."""
    if isinstance(value, float):
        return True
    return isinstance(value, torch.Tensor) and type(value) is torch.Tensor and value.dtype.is_floating_point


def scalar_value(value: Any) -> Any:
    """A 0-dim plain tensor (a wrapped Python number) as a Python number."""
    if isinstance(value, torch.Tensor) and type(value) is torch.Tensor and value.dim() == 0:
        return value.item()
    return value
