"""Owner-side DP-SGD on workers: the owner's clipping and noise are applied and cannot be lowered."""

import pytest
import torch
import torch.nn as nn

import veil as sy
from veil.dp import BudgetExceededError, NoiseTooLowError, PrivacyParameterError, RemoteDPOwner, UnknownUserError
from veil.dp.accountant import epsilon_for
from veil.exceptions import PermissionDeniedError

W_TRUE = torch.tensor([[1.0, -2.0, 0.5]])


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x @ W_TRUE.T


def _worker(hook, name, n=10, budget=(float("inf"), 0.5), **dp):
    w = sy.VirtualWorker(hook, id=name)
    x, y = _data(n)
    dp.setdefault("max_grad_norm", 0.5)
    dp.setdefault("noise_multiplier", 2.0)
    w.enable_dp({"toy": (x, y)}, budgets={"me": budget}, **dp)
    return w, x, y


def _exact_model():
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(W_TRUE)
        model.bias.zero_()
    return model


def test_released_noise_std_is_sigma_times_C_over_qn(hook):
    w, x, _ = _worker(hook, "dpw_noise", n=10)
    model = _exact_model()  # exact fit: the clipped gradient sum is zero, the release is pure noise
    owner = RemoteDPOwner(w, "toy", model, x[:2])
    draws = torch.stack([torch.cat([g.flatten() for g in owner.sanitized_gradient(model, None, None, 1.0).values()])
                         for _ in range(150)])
    assert draws.mean().abs() < 0.05
    assert draws.std().item() == pytest.approx(2.0 * 0.5 / (1.0 * 10), rel=0.1)


def test_each_record_is_clipped_to_C(hook):
    w, x, y = _worker(hook, "dpw_clip", n=1, max_grad_norm=0.1, noise_multiplier=1e-9)
    model = nn.Linear(3, 1)  # far from the fit: the raw gradient norm is >> 0.1
    model.zero_grad()
    ((model(x) - y) ** 2).sum().backward()
    raw = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert raw.norm() > 1.0
    grads = RemoteDPOwner(w, "toy", model, x[:1]).sanitized_gradient(model, None, None, 1.0)
    released = torch.cat([grads["weight"].flatten(), grads["bias"].flatten()])
    assert released.norm().item() == pytest.approx(0.1, rel=1e-4)  # one record, clipped to C, / (q n) = 1
    torch.testing.assert_close(released / released.norm(), raw / raw.norm(), rtol=1e-4, atol=1e-5)


def test_unclipped_release_is_the_mean_gradient_and_mlps_work(hook):
    w, x, y = _worker(hook, "dpw_mlp", n=12, max_grad_norm=1e3, noise_multiplier=1e-9)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    grads = RemoteDPOwner(w, "toy", model, x[:2]).sanitized_gradient(model, None, None, 1.0)
    model.zero_grad()
    ((model(x) - y) ** 2).sum(1).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-4)


def test_lower_noise_is_refused_and_not_charged(hook):
    w, x, _ = _worker(hook, "dpw_low")
    model = nn.Linear(3, 1)
    owner = RemoteDPOwner(w, "toy", model, x[:2])
    with pytest.raises(NoiseTooLowError, match="below the minimum 2.0"):
        owner.sanitized_gradient(model, None, None, 0.5, noise_multiplier=1.0)
    assert sy.dp.remaining_budget(w, spent=True) == (0.0, 0.0)
    owner.sanitized_gradient(model, None, None, 0.5, noise_multiplier=3.0)  # more noise is fine
    assert sy.dp.remaining_budget(w, spent=True)[0] == pytest.approx(epsilon_for(3.0, 0.5, 1, 1e-5, "rdp"))


def test_requests_outside_the_owners_rules_are_refused(hook):
    w, x, _ = _worker(hook, "dpw_rules", max_sample_rate=0.5)
    model = nn.Linear(3, 1)
    owner = RemoteDPOwner(w, "toy", model, x[:2])
    with pytest.raises(PrivacyParameterError, match="sample_rate"):
        owner.sanitized_gradient(model, None, None, 0.9)
    with pytest.raises(PermissionDeniedError, match="not open to DP training"):
        RemoteDPOwner(w, "secret", model, x[:2]).sanitized_gradient(model, None, None, 0.1)
    with pytest.raises(PrivacyParameterError, match="unknown loss"):
        RemoteDPOwner(w, "toy", model, x[:2], loss="__import__").sanitized_gradient(model, None, None, 0.1)
    plain = sy.VirtualWorker(hook, id="dpw_plain")
    with pytest.raises(PermissionDeniedError, match="enable_dp"):
        RemoteDPOwner(plain, "toy", model, x[:2]).sanitized_gradient(model, None, None, 0.1)


def test_a_training_plan_is_not_accepted_as_architecture(hook):
    w, x, y = _worker(hook, "dpw_plan")
    model = nn.Linear(3, 1)
    owner = RemoteDPOwner(w, "toy", model, x[:2])
    train = sy.training_plan(model, lambda o, t: ((o - t) ** 2).mean(), lr=0.1)
    train.build(x[:2], y[:2])
    owner._plan = train.send(w)._handle  # a plan that runs backward/SGD instead of a forward pass
    with pytest.raises(PrivacyParameterError, match="takes 2 inputs|not a forward pass"):
        owner.sanitized_gradient(model, None, None, 0.5)


def test_budget_is_charged_per_user_and_refusal_stops_training(hook):
    budget = (1.0, 1e-5)
    workers = [_worker(hook, f"dpw_budget{i}", n=20, budget=budget, noise_multiplier=2.0, max_grad_norm=1.0)[0]
               for i in range(2)]
    model = nn.Linear(3, 1)
    res = sy.dp.train_remote_dp(model, workers, "toy", torch.zeros(2, 3), steps=200, sample_rate=0.1,
                                optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    assert all(res.exhausted) and res.steps < 200
    assert all(e <= 1.0 + 1e-9 for e in res.epsilons)
    for w, k in zip(workers, res.releases):
        assert sy.dp.remaining_budget(w, spent=True)[0] == pytest.approx(epsilon_for(2.0, 0.1, k, 1e-5, "rdp"))
        assert epsilon_for(2.0, 0.1, k + 1, 1e-5, "rdp") > 1.0  # refused only when the next step would not fit
    with pytest.raises(BudgetExceededError, match="refused: user 'me'"):
        RemoteDPOwner(workers[0], "toy", model, torch.zeros(2, 3)).sanitized_gradient(model, None, None, 0.1)


def test_a_user_without_budget_is_refused(hook):
    w = sy.VirtualWorker(hook, id="dpw_nobudget")
    x, y = _data(10)
    w.enable_dp({"toy": (x, y)}, max_grad_norm=1.0, noise_multiplier=1.0, budgets={"someone_else": (9.0, 1e-5)})
    model = nn.Linear(3, 1)
    with pytest.raises(UnknownUserError, match="no privacy budget for user 'me'"):
        RemoteDPOwner(w, "toy", model, x[:2]).sanitized_gradient(model, None, None, 0.5)
    assert issubclass(UnknownUserError, BudgetExceededError)


def test_vmap_and_per_record_paths_agree():
    from veil.dp.plan_grads import LOSSES, check_forward_plan, per_sample_gradients

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    plan = sy.Plan(model).build(torch.zeros(2, 3))
    compiled = check_forward_plan(plan.spec, 4)
    x, y = _data(40)
    state = plan.state_tensors()
    big = per_sample_gradients(compiled, state, [True] * 4, x, y, LOSSES["mse"])  # vmap
    small = [torch.cat(parts) for parts in zip(*(
        per_sample_gradients(compiled, state, [True] * 4, x[i:i + 20], y[i:i + 20], LOSSES["mse"])
        for i in (0, 20)))]
    with torch.no_grad():  # the worker may run under the caller's no_grad
        frozen = per_sample_gradients(compiled, state, [True, True, False, False], x[:3], y[:3], LOSSES["mse"])
    assert len(frozen) == 2
    for a, b in zip(big, small):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
