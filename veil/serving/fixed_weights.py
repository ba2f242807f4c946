"""The served model's weights as fixed operands: their Beaver masks opened once per model, not per query.

After the model is shared, :func:`fix_weights` gives every Conv2d and Linear
layer of the shared circuit (fixed-precision additive shares, no MACs) a
:class:`veil.mpc.fixed_operand.FixedOperand` of its weight (one opening round
per layer, at model load), and wraps the Conv2d/Linear layers of
``nn.Sequential`` containers that :mod:`veil.serving.fuse` left alone in
:class:`FixedLayer`. :func:`layer_product` is then the layer's product on
shared inputs: each query opens ``x - a`` only (see :mod:`veil.mpc.fixed_operand`).
"""

from __future__ import annotations

import torch
from torch import nn

from veil.mpc import fixed_operand  # (imported by veil.serving: registers its party steps on every worker)
from veil.serving.fuse import LayerReLU

aten = torch.ops.aten
#: attribute of a layer holding its weight's FixedOperand (not a parameter or buffer: nothing moves it)
ATTR = "_veil_fixed_weight"


def _shared_weight(weight) -> bool:
    from veil.tensors.additive import AdditiveSharingTensor
    from veil.tensors.fixed_precision import FixedPrecisionTensor
    from veil.tensors.mac_dispatch import is_authenticated

    return (isinstance(weight, FixedPrecisionTensor) and type(weight.child) is AdditiveSharingTensor
            and not is_authenticated(weight.child))


def _right_operand(layer: nn.Module):
    """The layer's weight as the right operand of its product (a Linear's transposed)."""
    w = layer.weight.child
    return w if isinstance(layer, nn.Conv2d) else aten.t.default(w)


def fix_weights(model: nn.Module) -> int:
    """Fixes the weights of the shared model's Conv2d/Linear layers (see the module doc).

    Returns:
        How many weights were fixed.
    """
    for sub in list(model.modules()):
        if type(sub) is nn.Sequential:
            for name, layer in list(sub._modules.items()):
                if type(layer) in (nn.Conv2d, nn.Linear) and _fixable(layer):
                    sub._modules[name] = FixedLayer(layer)
    fixed = 0
    for sub in list(model.modules()):
        if isinstance(sub, (LayerReLU, FixedLayer)) and _fixable(sub.layer):
            w = _right_operand(sub.layer)
            setattr(sub.layer, ATTR, fixed_operand.fix_operand(w.child, w.crypto_provider))
            fixed += 1
    return fixed


def _fixable(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Conv2d) and (isinstance(layer.padding, str) or layer.padding_mode != "zeros"):
        return False
    return _shared_weight(layer.weight)


def layer_product(layer: nn.Module, x):
    """The layer's product (no bias, no truncation) on the shares ``x`` (an AdditiveSharingTensor): with its
    fixed weight when it has one and ``x`` is on the same parties, else the generic shared product."""
    from veil.tensors.additive import AdditiveSharingTensor

    fixed = getattr(layer, ATTR, None)
    conv = isinstance(layer, nn.Conv2d)
    if fixed is not None and type(x) is AdditiveSharingTensor and x.mac is None and x.parties == tuple(fixed.kept):
        if conv:
            kw = dict(stride=tuple(layer.stride), padding=tuple(layer.padding), dilation=tuple(layer.dilation),
                      groups=layer.groups)
            return AdditiveSharingTensor(fixed_operand.fixed_product(x.child, fixed, "conv2d", **kw),
                                         x.crypto_provider)
        return AdditiveSharingTensor(fixed_operand.fixed_product(x.child, fixed, "mm"), x.crypto_provider)
    w = layer.weight.child
    if conv:
        return aten.convolution.default(x, w, None, list(layer.stride), list(layer.padding), list(layer.dilation),
                                        False, [0, 0], layer.groups)
    return aten.mm.default(x, aten.t.default(w))


class FixedLayer(nn.Module):
    """A Conv2d or Linear whose shared product uses its fixed weight; anything else runs the layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from veil.tensors.fixed_precision import FixedPrecisionTensor

        layer = self.layer
        dim = 4 if isinstance(layer, nn.Conv2d) else 2
        if getattr(layer, ATTR, None) is None or not _shared_input(x, layer.weight, dim):
            return layer(x)
        enc = x.encoding
        y = layer_product(layer, x.child)
        if layer.bias is not None:  # at the product's scale s^2: exact (a public integer factor), then one truncation
            shape = [1, -1, 1, 1] if dim == 4 else [1, -1]
            y = aten.add.Tensor(y, aten.view.default(aten.mul.Tensor(layer.bias.child, enc.scale), shape))
        return FixedPrecisionTensor(y.truncate(enc.scale), enc, x.dtype)


def _shared_input(x, weight, dim: int) -> bool:
    from veil.tensors.additive import AdditiveSharingTensor
    from veil.tensors.fixed_precision import FixedPrecisionTensor

    return (isinstance(x, FixedPrecisionTensor) and type(x.child) is AdditiveSharingTensor and x.child.mac is None
            and x.encoding == weight.encoding and x.dim() == dim)
