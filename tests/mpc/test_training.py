"""Encrypted training: autograd through shared fixed-precision values.

Every run is compared with the same plaintext training (same initial
weights, same batches). Documented error: each fixed-point product is
truncated with an error below 2^-16 per entry, so after a few SGD steps the
parameters of a small model agree with plaintext to about 1e-3.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil as sy
from veil.datasets import load_mnist_5k
from veil.tensors.mpc_glue import maximum
from veil.mpc.errors import NotEncodedError


def _workers(hook, n):
    parties = [sy.VirtualWorker(hook, id=f"tp{i}") for i in range(n)]
    return parties, sy.VirtualWorker(hook, id="tcp")


def _sgd_steps(model, opt, batches):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss)
    return losses


@pytest.mark.parametrize("n_parties", [2, 3])
def test_tiny_mlp_training_matches_plaintext(hook, n_parties):
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model = copy.deepcopy(plain)
    x, y = torch.randn(12, 6), torch.randn(12, 3)
    parties, cp = _workers(hook, n_parties)
    model.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True)
    assert all(p.requires_grad and p.is_shared for p in model.parameters())
    xs = x.fix_precision().share(*parties, crypto_provider=cp)
    ys = y.fix_precision().share(*parties, crypto_provider=cp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1).fix_precision()
    popt = torch.optim.SGD(plain.parameters(), lr=0.1)

    losses = [loss.get().float_precision().item() for loss in _sgd_steps(model, opt, [(xs, ys)] * 4)]
    expected = [loss.item() for loss in _sgd_steps(plain, popt, [(x, y)] * 4)]

    assert losses == pytest.approx(expected, abs=1e-3)
    assert losses[-1] < losses[0]
    model.get().float_precision()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert type(p) is nn.Parameter
        assert torch.allclose(p, q, atol=1e-3)


def test_relu_backward_reuses_the_forward_bit(hook, monkeypatch):
    parties, cp = _workers(hook, 2)
    x = torch.tensor([[-1.5, 0.25, 2.0, -0.125]])
    xs = x.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True)
    out = torch.relu(xs)
    calls = []
    monkeypatch.setattr(maximum, "compare", lambda *a: calls.append(a))  # must not be needed
    (out * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert calls == []
    assert torch.equal(xs.grad.get().float_precision(), torch.tensor([[0.0, 2.0, 3.0, 0.0]]))


def test_mse_loss_reductions_match_torch(hook):
    parties, cp = _workers(hook, 2)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    sa, sb = (t.fix_precision().share(*parties, crypto_provider=cp) for t in (a, b))
    for reduction in ("mean", "sum", "none"):
        got = F.mse_loss(sa, sb, reduction=reduction).get().float_precision()
        assert torch.allclose(got, F.mse_loss(a, b, reduction=reduction), atol=1e-3)


def test_optimizer_fix_precision_rejects_what_it_cannot_run(hook):
    with pytest.raises(NotEncodedError, match="fixed-precision"):
        torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1).fix_precision()
    model = nn.Linear(2, 2).fix_precision()
    with pytest.raises(NotImplementedError, match="Adam"):
        torch.optim.Adam(model.parameters(), lr=0.1).fix_precision()
    with pytest.raises(NotEncodedError, match="precision_fractional"):
        torch.optim.SGD(model.parameters(), lr=0.1).fix_precision(precision_fractional=3)


@pytest.mark.parametrize("n_parties", [2, 3])
def test_sgd_step_truncates_every_parameter_in_one_round(hook, n_parties):
    """Plain SGD updates all shared parameters with one truncation round, as torch's per-parameter step."""
    from veil.mpc.communicator import communicate

    torch.manual_seed(5)
    plain = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 2))
    model = copy.deepcopy(plain)
    parties, cp = _workers(hook, n_parties)
    model.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05).fix_precision()
    popt = torch.optim.SGD(plain.parameters(), lr=0.05)
    x, y = torch.randn(9, 5), torch.randn(9, 2)
    xs, ys = (t.fix_precision().share(*parties, crypto_provider=cp) for t in (x, y))
    for model_, opt_, a, b in ((model, opt, xs, ys), (plain, popt, x, y)):
        opt_.zero_grad()
        F.mse_loss(model_(a), b).backward()
    with communicate() as comm:
        opt.step()
    popt.step()
    assert comm.rounds == 1  # 6 parameters, 6 rounds when stepped one by one
    model.get().float_precision()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-3)


def test_sgd_with_momentum_keeps_torchs_step(hook):
    """Momentum (a state buffer per parameter) runs torch's own step: one round per parameter."""
    from veil.mpc.communicator import communicate

    torch.manual_seed(6)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model = copy.deepcopy(plain)
    parties, cp = _workers(hook, 2)
    model.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5).fix_precision()
    popt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.5)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    xs, ys = (t.fix_precision().share(*parties, crypto_provider=cp) for t in (x, y))
    for _ in range(2):
        for model_, opt_, a, b in ((model, opt, xs, ys), (plain, popt, x, y)):
            opt_.zero_grad()
            F.mse_loss(model_(a), b).backward()
            if opt_ is opt:
                with communicate() as comm:
                    opt_.step()
            else:
                opt_.step()
    assert comm.rounds > 1
    model.get().float_precision()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-3)


def _mlp():
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def _train(model, opt, x, y, epochs, batch):
    gen = torch.Generator().manual_seed(1)  # same shuffles for both runs
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)  # rows are ordered by digit
        for start in range(0, len(perm), batch):
            idx = perm[start : start + batch]
            opt.zero_grad()
            F.mse_loss(model(x[idx]), y[idx]).backward()
            opt.step()


def mnist_accuracies(hook, plain: nn.Module, shape: tuple, epochs: int = 3, batch: int = 64, lr: float = 1.0):
    """Test accuracies (plaintext, encrypted) of ``plain`` and of a copy of it trained on shares, the same
    steps on MNIST 5k (inputs viewed as ``shape``, MSE on one-hot labels: no softmax on shares)."""
    data = load_mnist_5k()
    x, labels = data["x_train"].view(*shape), data["y_train"]
    y = F.one_hot(labels, 10).float()
    x_test, y_test = data["x_test"].view(*shape), data["y_test"]
    model = copy.deepcopy(plain)
    _train(plain, torch.optim.SGD(plain.parameters(), lr=lr), x, y, epochs, batch)
    parties, cp = _workers(hook, 2)
    model.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True)
    xs, ys = (t.fix_precision().share(*parties, crypto_provider=cp) for t in (x, y))
    _train(model, torch.optim.SGD(model.parameters(), lr=lr).fix_precision(), xs, ys, epochs, batch)
    model.get().float_precision()
    with torch.no_grad():
        return tuple((m(x_test).argmax(1) == y_test).float().mean().item() for m in (plain, model))


@pytest.mark.slow
def test_encrypted_mnist_mlp_training_matches_plaintext_accuracy(hook):
    torch.manual_seed(0)
    acc_plain, acc_enc = mnist_accuracies(hook, _mlp(), (-1, 784))
    assert acc_plain > 0.85
    assert abs(acc_enc - acc_plain) <= 0.02
