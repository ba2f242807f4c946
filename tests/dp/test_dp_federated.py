"""Federated DP building block: owner-side sanitized gradients and the training loop."""

import pytest
import torch
import torch.nn as nn

from veil.dp import BudgetExceededError, NoiseTooLowError, make_generator
from veil.dp.federated import DPDataOwner, max_releases, train_federated_dp
from veil.dp.accountant import epsilon_for


def mse(out, y):
    return (out - y).pow(2).flatten(1).sum(1)


def _owner(n=30, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    kw.setdefault("max_grad_norm", 1e6)
    kw.setdefault("noise_multiplier", 1e-9)
    return DPDataOwner(x, y, generator=make_generator(1), **kw), x, y


def test_without_clipping_or_noise_the_gradient_is_the_plain_mean_gradient():
    owner, x, y = _owner()
    model = nn.Linear(3, 1)
    grads = owner.sanitized_gradient(model, model.state_dict(), mse, sample_rate=1.0)
    model.zero_grad()
    mse(model(x), y).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-4)


def test_each_record_contributes_at_most_C():
    owner, x, y = _owner(n=1, max_grad_norm=0.1)
    model = nn.Linear(3, 1)
    grads = owner.sanitized_gradient(model, model.state_dict(), lambda o, t: 1e3 * mse(o, t), sample_rate=1.0)
    norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    assert norm == pytest.approx(0.1, rel=1e-4)  # one record, clipped to C, divided by q n = 1


def test_owner_refuses_less_noise_and_charges_its_ledger():
    owner, _, _ = _owner(noise_multiplier=1.0, max_grad_norm=1.0)
    model = nn.Linear(3, 1)
    with pytest.raises(NoiseTooLowError, match="below"):
        owner.sanitized_gradient(model, model.state_dict(), mse, 0.5, noise_multiplier=0.5)
    assert owner.accountant.steps == 0
    owner.sanitized_gradient(model, model.state_dict(), mse, 0.5, noise_multiplier=2.0)
    assert owner.epsilon(1e-5) == pytest.approx(epsilon_for(2.0, 0.5, 1, 1e-5))


def test_noise_std_on_the_released_gradient():
    owner, _, _ = _owner(n=10, noise_multiplier=2.0, max_grad_norm=0.5)
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        model.bias.zero_()  # exact fit: the gradient is zero, the release is pure noise
    draws = torch.stack([owner.sanitized_gradient(model, model.state_dict(), mse, 0.5)["weight"].flatten()
                         for _ in range(300)])
    assert draws.std().item() == pytest.approx(2.0 * 0.5 / (0.5 * 10), rel=0.08)


def test_budget_stops_an_owner_and_training_continues_with_the_other():
    budget = (1.0, 1e-5)
    owners = [_owner(noise_multiplier=2.0, max_grad_norm=1.0, budget=budget, accountant="rdp")[0] for _ in range(2)]
    limit = max_releases(2.0, 0.1, 1.0, 1e-5, "rdp")
    assert 2 <= limit < 50
    model = nn.Linear(3, 1)
    res = train_federated_dp(model, owners, mse, steps=100, sample_rate=0.1,
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.01), delta=1e-5,
                             generator=make_generator(0))
    assert res.releases == [limit, limit]
    assert all(res.exhausted)
    assert res.epsilon <= 1.0
    assert epsilon_for(2.0, 0.1, limit + 1, 1e-5, 'rdp') > 1.0  # the limit is tight
    with pytest.raises(BudgetExceededError):
        owners[0].sanitized_gradient(model, model.state_dict(), mse, 0.1)


def test_federated_training_learns():
    owners = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(200, 3, generator=g)
        owners.append(DPDataOwner(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]), max_grad_norm=5.0,
                                  noise_multiplier=0.5, accountant="rdp", generator=make_generator(seed + 5)))
    model = nn.Linear(3, 1)
    res = train_federated_dp(model, owners, mse, steps=200, sample_rate=0.2,
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.05), delta=1e-5,
                             generator=make_generator(2))
    assert sum(res.releases) == 200 and min(res.releases) > 60
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[1.0, -2.0, 0.5]]), atol=0.2, rtol=0)
    assert res.epsilon == pytest.approx(max(epsilon_for(0.5, 0.2, r, 1e-5, "rdp") for r in res.releases))
