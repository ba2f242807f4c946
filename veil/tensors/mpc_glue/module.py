"""Encrypted inference (and training) for ``nn.Module``: encode, share, decode.

``model.fix_precision()`` encodes every floating-point parameter and buffer
in place; BatchNorm layers (eval mode) are first folded into a per-channel
affine map, ``y = x * scale + shift`` with ``scale = gamma / sqrt(var + eps)``
and ``shift = beta - mean * scale``, because the square root would otherwise
have to be evaluated on shared values. ``model.share(alice, bob,
crypto_provider=cp)`` then secret-shares every encoded tensor, so
``model(x_shared)`` runs the layers' own forward code on shared values:
Linear (Beaver matmul), Conv2d (Beaver conv), ReLU and MaxPool2d (private
comparison), AvgPool2d and Flatten (local), the folded BatchNorm (Beaver
product with broadcasting).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import nn

from veil.mpc.errors import UnsupportedOperationError
from veil.tensors.fixed_precision import FixedPrecisionTensor, fix_precision

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class FoldedBatchNorm(nn.Module):
    """An eval-mode BatchNorm as ``x * scale + shift`` (per channel, dim 1)."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        if bn.training or bn.running_mean is None:
            raise UnsupportedOperationError(
                f"{type(bn).__name__} must be in eval mode with running statistics: call model.eval() first"
            )
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
        self.channel_dims = 2 if isinstance(bn, nn.BatchNorm2d) else None
        self.scale = nn.Parameter(scale.detach().clone(), requires_grad=False)
        self.shift = nn.Parameter(shift.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


def _fold_batch_norms(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, _BATCH_NORMS):
            setattr(module, name, FoldedBatchNorm(child))
        else:
            _fold_batch_norms(child)


def _slots(module: nn.Module) -> Iterator[tuple[dict, str, torch.Tensor, bool]]:
    """(table, name, tensor, is_parameter) for every parameter and buffer."""
    for sub in module.modules():
        for name, t in list(sub._parameters.items()):
            if t is not None:
                yield sub._parameters, name, t, True
        for name, t in list(sub._buffers.items()):
            if t is not None:
                yield sub._buffers, name, t, False


def _store(table: dict, name: str, value: torch.Tensor, is_param: bool, requires_grad: bool) -> None:
    table[name] = nn.Parameter(value, requires_grad=requires_grad) if is_param else value


def fix_precision_module(module: nn.Module, precision_fractional: Optional[int] = None, base: int = 2) -> nn.Module:
    """Encodes a model's floating-point parameters and buffers (in place).

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are dropped
    with their folded layers; any other integer buffer is kept as is.
    """
    _fold_batch_norms(module)
    for table, name, t, is_param in list(_slots(module)):
        if t.dtype.is_floating_point and not isinstance(t, FixedPrecisionTensor):
            encoded = fix_precision(t.detach(), precision_fractional, base)
            _store(table, name, encoded, is_param, is_param and t.requires_grad)
    return module


def share_module(module: nn.Module, *parties: Any, crypto_provider: Any = None, requires_grad: bool = False,
                 **options: Any) -> nn.Module:
    """Secret-shares every encoded parameter and buffer (in place).

    Raises:
        TypeError: If a floating-point tensor was not encoded first.
    """
    for table, name, t, is_param in list(_slots(module)):
        if t.dtype.is_floating_point and not isinstance(t, FixedPrecisionTensor):
            raise TypeError(f"parameter {name!r} is not in fixed precision: call model.fix_precision() first")
        if isinstance(t, FixedPrecisionTensor):
            shared = t.share(*parties, crypto_provider=crypto_provider, **options)
            _store(table, name, shared, is_param, is_param and requires_grad)
    return module


def float_precision_module(module: nn.Module) -> nn.Module:
    """Reconstructs shared values and decodes every encoded tensor (in place)."""
    for table, name, t, is_param in list(_slots(module)):
        if isinstance(t, FixedPrecisionTensor):
            plain = t.get().float_precision() if t.is_shared else t.float_precision()
            _store(table, name, plain, is_param, is_param)
    return module
