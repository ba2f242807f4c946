"""Plaintext rewrites of a model before it is shared: fewer protocol rounds for the same function.

A ``Conv2d`` (stride 1, no dilation, zero padding) followed by an ``AvgPool2d``
(kernel = stride, no padding) is one linear map: the average of ``k x k``
neighbouring outputs of the convolution is a convolution with the kernel
widened by ``k - 1``, stride ``k``, the same padding and bias, whose weight is
the average of the ``k^2`` shifted copies of the original weight. For the
shared model that saves one truncation round per pair (the pool's division
by ``k^2``; the convolution's own truncation stays) and computes ``k^2`` times
fewer convolution outputs. Output sizes agree: the convolution gives
``H' = H + 2p - kc + 1`` and the pool ``floor(H' / k)``; the fused
convolution ``floor((H + 2p - (kc + k - 1)) / k) + 1``, the same.

A ``Conv2d`` or ``Linear`` followed by a ``ReLU`` becomes :class:`LayerReLU`:
on shared fixed-precision inputs it adds the bias at the product's scale
``s^2`` and runs :func:`veil.mpc.bit_comparison.truncate_relu`, so the
product's truncation rides on the comparison's rounds (one round fewer per
pair); on anything else (the plaintext dry run, public fixed precision,
authenticated shares, another comparison protocol) it is the layer then ReLU.

Only ``nn.Sequential`` containers are rewritten (in place, the pool or ReLU
becoming ``nn.Identity``); a custom ``forward`` is left as it is.
"""

from __future__ import annotations

import torch
from torch import nn

aten = torch.ops.aten


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _fusable(conv: nn.Module, pool: nn.Module) -> bool:
    if type(conv) is not nn.Conv2d or type(pool) is not nn.AvgPool2d:
        return False
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return False
    if _pair(conv.stride) != (1, 1) or _pair(conv.dilation) != (1, 1):
        return False
    k = _pair(pool.kernel_size)
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    return (stride == k and _pair(pool.padding) == (0, 0) and not pool.ceil_mode
            and pool.divisor_override is None and conv.weight.dtype.is_floating_point)


def fused_conv_pool(conv: nn.Conv2d, pool: nn.AvgPool2d) -> nn.Conv2d:
    """The one convolution computing ``pool(conv(x))`` (see the module doc)."""
    kh, kw = _pair(pool.kernel_size)
    out_c, in_c, ch, cw = conv.weight.shape
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, (ch + kh - 1, cw + kw - 1), stride=(kh, kw),
                      padding=conv.padding, groups=conv.groups, bias=conv.bias is not None)
    with torch.no_grad():
        w = torch.zeros(out_c, in_c, ch + kh - 1, cw + kw - 1, dtype=conv.weight.dtype)
        for di in range(kh):
            for dj in range(kw):
                w[:, :, di:di + ch, dj:dj + cw] += conv.weight.detach()
        fused.weight.copy_(w / (kh * kw))
        if conv.bias is not None:
            fused.bias.copy_(conv.bias.detach())
    fused.weight.requires_grad_(conv.weight.requires_grad)
    return fused.to(conv.weight.dtype)


class LayerReLU(nn.Module):
    """``relu(layer(x))`` for a Conv2d or Linear ``layer``; on shared inputs with the product's truncation
    folded into the ReLU's comparison (see the module doc)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _shared_circuit(x, self.layer.weight, 4 if isinstance(self.layer, nn.Conv2d) else 2):
            return torch.relu(self.layer(x))
        from veil.mpc.bit_comparison import truncate_relu
        from veil.tensors.additive import AdditiveSharingTensor
        from veil.tensors.fixed_precision import FixedPrecisionTensor

        from veil.serving.fixed_weights import layer_product

        layer, enc = self.layer, x.encoding
        y = layer_product(layer, x.child)  # with the weight's fixed mask when it has one
        shape = [1, -1, 1, 1] if isinstance(layer, nn.Conv2d) else [1, -1]
        if layer.bias is not None:  # at the product's scale s^2: exact (a public integer factor)
            y = aten.add.Tensor(y, aten.view.default(aten.mul.Tensor(layer.bias.child, enc.scale), shape))
        out = truncate_relu(y.child, enc.scale, y.crypto_provider)
        return FixedPrecisionTensor(AdditiveSharingTensor(out, y.crypto_provider), enc, x.dtype)


def _shared_circuit(x: torch.Tensor, weight: torch.Tensor, dim: int) -> bool:
    """True when ``x`` and ``weight`` are fixed-precision additive shares (no MACs, one encoding) and
    comparisons run the bitwise circuit: the case :func:`truncate_relu` computes."""
    from veil.mpc import comparison
    from veil.tensors.additive import AdditiveSharingTensor
    from veil.tensors.fixed_precision import FixedPrecisionTensor
    from veil.tensors.mac_dispatch import is_authenticated

    if comparison.DEFAULT_COMPARISON != "circuit":
        return False
    if not (isinstance(x, FixedPrecisionTensor) and isinstance(weight, FixedPrecisionTensor)):
        return False
    xc, wc = x.child, weight.child
    return (type(xc) is AdditiveSharingTensor and type(wc) is AdditiveSharingTensor and x.encoding == weight.encoding
            and not is_authenticated(xc) and not is_authenticated(wc) and x.dim() == dim)


def _pairs(sub: nn.Sequential):
    """Adjacent ``(name, module, name, module)`` of a Sequential, skipping Identity modules in between."""
    items = [(n, m) for n, m in sub._modules.items() if m is not None and type(m) is not nn.Identity]
    return [(a, m, b, n) for (a, m), (b, n) in zip(items, items[1:])]


def fuse_linear_layers(model: nn.Module) -> int:
    """Rewrites Conv2d -> AvgPool2d, then Conv2d/Linear -> ReLU pairs of ``nn.Sequential`` containers (in place).

    Returns:
        How many pairs were fused.
    """
    fused = 0
    for sub in list(model.modules()):
        if type(sub) is not nn.Sequential:
            continue
        for a, conv, b, pool in _pairs(sub):
            if _fusable(conv, pool) and sub._modules[a] is conv:
                sub._modules[a] = fused_conv_pool(conv, pool)
                sub._modules[b] = nn.Identity()
                fused += 1
        for a, layer, b, relu in _pairs(sub):
            if type(layer) in (nn.Conv2d, nn.Linear) and type(relu) is nn.ReLU and _relu_fusable(layer):
                sub._modules[a] = LayerReLU(layer)
                sub._modules[b] = nn.Identity()
                fused += 1
    return fused


def _relu_fusable(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Conv2d):
        return not isinstance(layer.padding, str) and layer.padding_mode == "zeros"
    return True
