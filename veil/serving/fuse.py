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

Only ``nn.Sequential`` containers are rewritten (in place, the pool becoming
``nn.Identity``); a custom ``forward`` is left as it is.
"""

from __future__ import annotations

import torch
from torch import nn


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


def fuse_linear_layers(model: nn.Module) -> int:
    """Rewrites every Conv2d -> AvgPool2d pair inside ``nn.Sequential`` containers (in place).

    Returns:
        How many pairs were fused.
    """
    fused = 0
    for sub in list(model.modules()):
        if type(sub) is not nn.Sequential:
            continue
        names = list(sub._modules)
        for a, b in zip(names, names[1:]):
            conv, pool = sub._modules[a], sub._modules[b]
            if conv is not None and pool is not None and _fusable(conv, pool):
                sub._modules[a] = fused_conv_pool(conv, pool)
                sub._modules[b] = nn.Identity()
                fused += 1
    return fused
