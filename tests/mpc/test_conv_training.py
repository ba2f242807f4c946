"""Encrypted CNN training: a convolution's backward pass (veil/tensors/rules/conv_backward.py).

The decomposition is checked against torch's own ``aten.convolution_backward`` over strides, paddings,
dilations and kernel shapes (hypothesis), then a small CNN trains on shared fixed-precision values with
2 and 3 parties and its losses and parameters are compared with the same steps in plain torch. The
rounds of the backward pass and the network parties are in test_pending_products.py (case "conv").
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import veil as sy
from veil.mpc.errors import UnsupportedOperationError
from veil.tensors.mac_dispatch import is_authenticated
from veil.tensors.rules.conv_backward import convolution_backward

from tests.mpc.test_training import _sgd_steps

aten = torch.ops.aten


@st.composite
def _conv_case(draw):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # an input at least as large as the dilated kernel after padding
    size = [draw(st.integers(max(1, d * (kk - 1) + 1 - 2 * p), 9)) for kk, p, d in zip(k, padding, dilation)]
    n, c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    mask = draw(st.lists(st.booleans(), min_size=3, max_size=3))
    return (n, c_in, *size), (c_out, c_in, *k), stride, padding, dilation, mask


@settings(max_examples=80, deadline=None)
@given(_conv_case(), st.integers(0, 2**31))
def test_the_decomposition_equals_torchs_convolution_backward(case, seed):
    """Small integers in float64: every sum is exact, so the two must agree to the last bit."""
    x_shape, w_shape, stride, padding, dilation, mask = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 8, x_shape, generator=gen).double()
    w = torch.randint(-8, 8, w_shape, generator=gen).double()
    y = F.conv2d(x, w, None, stride, padding, dilation)
    g = torch.randint(-8, 8, y.shape, generator=gen).double()
    args = (g, x, w, [w_shape[0]], list(stride), list(padding), list(dilation), False, [0, 0], 1, mask)
    want = aten.convolution_backward.default(*args)
    got = convolution_backward(*args)
    for name, a, b, asked in zip(("input", "weight", "bias"), want, got, mask):
        if not asked:
            assert b is None, name
            continue
        assert b.shape == a.shape and torch.equal(b, a), name


@st.composite
def _pool_case(draw):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))  # torch: at most half the kernel
    size = [draw(st.integers(max(1, kk - 2 * p), 9)) for kk, p in zip(k, padding)]
    divisor = draw(st.sampled_from([None, 1, 3]))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 3)), *size), k, stride, padding, divisor


@settings(max_examples=60, deadline=None)
@given(_pool_case(), st.integers(0, 2**31))
def test_average_pooling_backward_matches_torch(hook, case, seed):
    """Fixed precision against float64: the gradient reaches every entry of each window, divided once."""
    shape, k, stride, padding, divisor = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = F.avg_pool2d(x, k, stride, padding, divisor_override=divisor)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    want = aten.avg_pool2d_backward.default(g, x, list(k), list(stride), list(padding), False, True, divisor)
    got = aten.avg_pool2d_backward.default(g.float().fix_precision(), x.float().fix_precision(), list(k),
                                           list(stride), list(padding), False, True, divisor)
    assert got.shape == want.shape
    assert torch.allclose(got.float_precision().double(), want, atol=4 * 2.0**-16)


def test_the_benchmark_cnn_trains_encrypted_as_in_plaintext(hook, monkeypatch):
    """bench_mpc's MNIST CNN (three conv + average-pool + ReLU blocks, a linear layer), batch 8. The
    gradient that reaches its first layer is ~1e-5 per entry (an MSE loss, divided by 4 at each pool):
    about one ulp at 16 fractional bits, where its first layer's weight gradients come out 20-100% off
    (in plain fixed precision too). With 22 bits they are within ~2%, and training tracks plaintext."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))  # bench/ off the path after
    from bench_mpc import _mnist_cnn

    torch.manual_seed(2)
    plain = _mnist_cnn().train()
    model = copy.deepcopy(plain)
    x, y = torch.rand(8, 1, 28, 28), F.one_hot(torch.randint(0, 10, (8,)), 10).float()
    parties, cp = _workers(hook, 2)
    bits = 22
    model.fix_precision(precision_fractional=bits).share(*parties, crypto_provider=cp, requires_grad=True)
    xs = x.fix_precision(precision_fractional=bits).share(*parties, crypto_provider=cp)
    ys = y.fix_precision(precision_fractional=bits).share(*parties, crypto_provider=cp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1).fix_precision(precision_fractional=bits)
    losses = [loss.get().float_precision().item() for loss in _steps(model, opt, xs, ys, 2)]
    expected = [loss.item() for loss in _steps(plain, torch.optim.SGD(plain.parameters(), lr=0.1), x, y, 2)]
    assert losses == pytest.approx(expected, abs=1e-4)
    model.get().float_precision()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-4), (p - q).abs().max()


def _workers(hook, n):
    return [sy.VirtualWorker(hook, id=f"cp{i}") for i in range(n)], sy.VirtualWorker(hook, id="ccp")


def _steps(model, opt, x, y, n):
    return _sgd_steps(model, opt, [(x, y)] * n)


@pytest.mark.parametrize("n_parties", [2, 3])
def test_a_small_cnn_trains_encrypted_as_in_plaintext(hook, n_parties):
    torch.manual_seed(7)
    plain = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(2 * 3 * 3, 2))
    model = copy.deepcopy(plain)
    x, y = torch.randn(6, 1, 8, 8), torch.randn(6, 2)
    parties, cp = _workers(hook, n_parties)
    model.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True)
    xs = x.fix_precision().share(*parties, crypto_provider=cp)
    ys = y.fix_precision().share(*parties, crypto_provider=cp)
    opt = torch.optim.SGD(model.parameters(), lr=0.05).fix_precision()
    popt = torch.optim.SGD(plain.parameters(), lr=0.05)

    losses = [loss.get().float_precision().item() for loss in _steps(model, opt, xs, ys, 3)]
    expected = [loss.item() for loss in _steps(plain, popt, x, y, 3)]

    assert losses == pytest.approx(expected, abs=1e-3)
    model.get().float_precision()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-3), (p - q).abs().max()


def test_a_cnn_with_average_pooling_trains_under_active_security(hook):
    """With MACs (``active_security=True``) the backward passes' convolutions, shifts and truncations run on
    authenticated shares, MAC-checked at every opening: the same losses and parameters as plaintext."""
    torch.manual_seed(7)
    plain = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.AvgPool2d(2), nn.ReLU(), nn.Conv2d(3, 2, 2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(2, 2))
    model = copy.deepcopy(plain)
    x, y = torch.randn(6, 1, 8, 8), torch.randn(6, 2)
    parties, cp = _workers(hook, 2)
    model.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True, active_security=True)
    xs, ys = (t.fix_precision().share(*parties, crypto_provider=cp, active_security=True) for t in (x, y))
    opt = torch.optim.SGD(model.parameters(), lr=0.05).fix_precision()
    losses = [loss.get().float_precision().item() for loss in _steps(model, opt, xs, ys, 1)]
    # the gradients the backward rules made are authenticated too (a rule that fell back to plain shares
    # would leave them unchecked)
    assert all(is_authenticated(p.child) and is_authenticated(p.grad.child) for p in model.parameters())
    losses += [loss.get().float_precision().item() for loss in _steps(model, opt, xs, ys, 1)]
    expected = [loss.item() for loss in _steps(plain, torch.optim.SGD(plain.parameters(), lr=0.05), x, y, 2)]
    assert losses == pytest.approx(expected, abs=1e-3)
    model.get().float_precision()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-3), (p - q).abs().max()


def test_a_grouped_convolution_is_refused_in_backward_with_a_clear_error(hook):
    parties, cp = _workers(hook, 2)
    conv = nn.Conv2d(2, 2, 3, groups=2)
    conv.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True)
    xs = torch.randn(1, 2, 5, 5).fix_precision().share(*parties, crypto_provider=cp)
    out = conv(xs).sum()
    with pytest.raises(UnsupportedOperationError, match="groups=1"):
        out.backward()


@pytest.mark.slow
def test_encrypted_mnist_cnn_training_matches_plaintext_accuracy(hook):
    """A conv (stride 2) + ReLU + linear CNN, 3 epochs on MNIST 5k (batch 64, MSE on one-hot labels), from
    the same initial weights: the encrypted model's test accuracy within 2 points of the plaintext one's."""
    from tests.mpc.test_training import mnist_accuracies

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 10))
    acc_plain, acc_enc = mnist_accuracies(hook, plain, (-1, 1, 28, 28))
    assert acc_plain > 0.85
    assert abs(acc_enc - acc_plain) <= 0.02
