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
        assert fuse_linear_layers(model) == 2  # conv-pool, then the fused conv with the ReLU
        got = model(x)
    assert isinstance(model[1], nn.Identity) and isinstance(model[2], nn.Identity)
    assert model[0].layer.stride == ((pool, pool) if isinstance(pool, int) else pool)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_only_exact_rewrites():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2), nn.AvgPool2d(2),  # strided convolution: kept
        nn.Conv2d(2, 2, 3, dilation=2), nn.AvgPool2d(2),  # dilated: kept
        nn.Conv2d(2, 2, 3, padding=1), nn.AvgPool2d(2, stride=1),  # overlapping pool: kept
        nn.Conv2d(2, 2, 3, padding=1), nn.AvgPool2d(2, padding=1),  # padded pool: kept
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.AvgPool2d(2),  # not zero padding: kept
        nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),  # not adjacent: kept
        nn.Conv2d(2, 2, 3, padding="same"), nn.ReLU(),  # string padding: kept
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), nn.ReLU(),  # not zero padding: kept
    )
    before = [type(m) for m in model]
    assert fuse_linear_layers(model) == 0
    assert [type(m) for m in model] == before


def test_nested_sequential_is_rewritten():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.AvgPool2d(2)), nn.Tanh())
    x = torch.randn(2, 1, 10, 10)
    with torch.no_grad():
        expected = model(x)
        assert fuse_linear_layers(model) == 1
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_shared_layer_relu_matches_plaintext_in_fewer_rounds(hook):
    """On VirtualWorkers: the fused MNIST CNN (conv-pool, conv-ReLU) gives plaintext's outputs in 17 rounds
    instead of 23 (3 pool truncations and 3 product truncations ride on other rounds); so does the model
    unchanged with lazy truncation (the default), which folds the same truncations at run time."""
    import veil.tensors.rules.fixed_precision as fp_rules
    import veil as sy
    from veil.mpc.opening import count_openings
    from veil.tensors.mpc_glue.module import fix_precision_module, share_module

    from serving_helpers import mnist_cnn

    a, b, cp = (sy.VirtualWorker(hook, id=n) for n in ("fuse_alice", "fuse_bob", "fuse_cp"))
    rounds = {}
    for fuse, lazy in ((False, False), (False, True), (True, True)):
        torch.manual_seed(0)
        model = mnist_cnn().eval()
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            expected = model(x)
            if fuse:
                assert fuse_linear_layers(model) == 6
                assert sum(type(m).__name__ == "LayerReLU" for m in model) == 3
            fix_precision_module(model)
            share_module(model, a, b, crypto_provider=cp)
            fp_rules.LAZY_TRUNCATION = lazy
            try:
                with count_openings() as stats:
                    out = model(x.fix_precision().share(a, b, crypto_provider=cp)).settle()
            finally:
                fp_rules.LAZY_TRUNCATION = True
            got = out.get().float_precision()
        rounds[fuse, lazy] = stats.rounds
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
    assert rounds == {(False, False): 23, (False, True): 17, (True, True): 17}


def test_layer_relu_linear_and_no_bias(hook):
    import veil as sy

    from veil.serving.fuse import LayerReLU

    a, b, cp = (sy.VirtualWorker(hook, id=n) for n in ("lr_alice", "lr_bob", "lr_cp"))
    torch.manual_seed(2)
    for layer in (nn.Linear(7, 5), nn.Linear(7, 5, bias=False)):
        model = nn.Sequential(layer, nn.ReLU())
        x = torch.randn(4, 7) * 3
        with torch.no_grad():
            expected = model(x)
            assert fuse_linear_layers(model) == 1 and isinstance(model[0], LayerReLU)
            torch.testing.assert_close(model(x), expected)  # plaintext: the layer then ReLU
            model.fix_precision().share(a, b, crypto_provider=cp)
            got = model(x.fix_precision().share(a, b, crypto_provider=cp)).get().float_precision()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
        assert bool((got >= 0).all())
