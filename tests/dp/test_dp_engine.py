"""PrivacyEngine end to end, and Poisson sampling."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from veil.dp import DPDataLoader, PoissonBatchSampler, PrivacyEngine, epsilon_for, make_generator


def _data(n=200):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x, y)


def test_poisson_batches_have_binomial_sizes_and_can_be_empty():
    sampler = PoissonBatchSampler(100, 0.1, steps=2000, generator=make_generator(0))
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float)
    assert abs(sizes.mean().item() - 10) < 0.3
    assert abs(sizes.var().item() - 9) < 1.0  # n q (1 - q)
    tiny = PoissonBatchSampler(5, 0.05, steps=50, generator=make_generator(1))
    assert any(len(b) == 0 for b in tiny)


def test_dp_loader_yields_empty_tensors_for_empty_batches():
    loader = DPDataLoader(_data(3), sample_rate=0.01, steps=20, generator=make_generator(2))
    batches = list(loader)
    empty = [b for b in batches if len(b[0]) == 0]
    assert empty
    x, y = empty[0]
    assert x.shape == (0, 4) and y.shape == (0,) and y.dtype == torch.long


def test_training_with_empty_batches_does_not_crash():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    engine = PrivacyEngine(seed=3)
    loader = DataLoader(_data(3), batch_size=1)
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    loader.batch_sampler.sample_rate = 0.05  # force many empty batches
    for _ in range(5):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert engine.accountant.steps == 15


def test_engine_learns_and_reports_the_accountants_epsilon():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    engine = PrivacyEngine(accountant="rdp", seed=1)
    loader = DataLoader(_data(), batch_size=20)
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                             data_loader=loader, noise_multiplier=0.8, max_grad_norm=1.0)
    for _ in range(8):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    ds = _data()
    acc = (model(ds.tensors[0]).argmax(1) == ds.tensors[1]).float().mean()
    assert acc > 0.8
    assert engine.get_epsilon(1e-5) == pytest.approx(epsilon_for(0.8, 0.1, 80, 1e-5, "rdp"))


def test_make_private_with_epsilon_hits_target():
    model = nn.Linear(4, 2)
    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(_data(), batch_size=20)
    model, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        target_epsilon=1.0, target_delta=1e-5, epochs=3, max_grad_norm=1.0)
    assert isinstance(loader, DPDataLoader)
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert 0.95 < engine.get_epsilon(1e-5) <= 1.0


def test_fused_criterion_trains_like_the_unfused_loop_with_the_same_noise():
    """The criterion-fused step (one vmap(grad_and_value)) gives the same DP-SGD updates as the usual loop."""
    finals = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        engine = PrivacyEngine(accountant="rdp", seed=5)
        loader = DataLoader(_data(), batch_size=20)
        kw = {"criterion": nn.CrossEntropyLoss()} if fused else {}
        out = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                  data_loader=loader, noise_multiplier=0.8, max_grad_norm=1.0, **kw)
        if fused:
            model, opt, criterion, loader = out
        else:
            (model, opt, loader), criterion = out, nn.CrossEntropyLoss()
        for _ in range(2):
            for x, y in loader:
                opt.zero_grad()
                criterion(model(x), y).backward()
                opt.step()
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert engine.accountant.steps == 20
    torch.testing.assert_close(finals[0], finals[1], atol=1e-4, rtol=1e-4)
