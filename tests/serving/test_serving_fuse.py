"""Conv2d -> AvgPool2d fusion before sharing (veil/serving/fuse.py): the same function as plain PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from veil.serving.fuse import fuse_linear_layers


@pytest.mark.parametrize("conv_kw,pool,size", [
    (dict(kernel_size=3, padding=1), 2, 28),
    (dict(kernel_size=3, padding=1), 2, 7),  # odd size: the pool drops the last row and column
    (dict(kernel_size=5, padding=2, bias=False), 3, 17),
    (dict(kernel_size=(3, 1), padding=(1, 0), groups=2), (2, 3), 13),
    (dict(kernel_size=2, padding=0), 2, 9),
])
def test_fused_model_computes_the_same(conv_kw, pool, size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, **conv_kw), nn.AvgPool2d(pool), nn.ReLU(), nn.Flatten())
    x = torch.randn(3, 4, size, size)
    with torch.no_grad():
        expected = model(x)
        assert fuse_linear_layers(model) == 1
        got = model(x)
    assert isinstance(model[1], nn.Identity)
    assert model[0].stride == ((pool, pool) if isinstance(pool, int) else pool)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_only_exact_rewrites():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2), nn.AvgPool2d(2),  # strided convolution: kept
        nn.Conv2d(2, 2, 3, dilation=2), nn.AvgPool2d(2),  # dilated: kept
        nn.Conv2d(2, 2, 3, padding=1), nn.AvgPool2d(2, stride=1),  # overlapping pool: kept
        nn.Conv2d(2, 2, 3, padding=1), nn.AvgPool2d(2, padding=1),  # padded pool: kept
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.AvgPool2d(2),  # not zero padding: kept
        nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),  # not adjacent: kept
    )
    before = [type(m) for m in model]
    assert fuse_linear_layers(model) == 0
    assert [type(m) for m in model] == before


def test_nested_sequential_is_rewritten():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.AvgPool2d(2)), nn.ReLU())
    x = torch.randn(2, 1, 10, 10)
    with torch.no_grad():
        expected = model(x)
        assert fuse_linear_layers(model) == 1
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
