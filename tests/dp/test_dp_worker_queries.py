"""DP queries on data held by a worker: noise scale, charge before release, refusal when spent."""

import math

import pytest
import torch

import veil as sy
from veil.dp import BudgetExceededError, PrivacyParameterError
from veil.dp.queries import gaussian_sigma


def _owner(hook, name, budget=(float("inf"), 0.5)):
    w = sy.VirtualWorker(hook, id=name)
    values = torch.linspace(0, 10, 200).reshape(200, 1)
    w.load(values, tags=("#ages",), private=True)
    w.enable_dp(budgets={"me": budget})
    (ptr,) = w.search(["#ages"])
    return w, ptr, values


def test_laplace_count_noise_scale_and_charge(hook):
    w, ptr, values = _owner(hook, "dpq_count")
    n = 1500  # noise comes from OS entropy: bounds are ~4.5 standard errors wide
    draws = torch.tensor([float(sy.dp.remote_query(ptr, "count", epsilon=0.5).value) for _ in range(n)])
    assert draws.mean().item() == pytest.approx(200, abs=0.35)  # SE 0.07
    # discrete Laplace (counts), scale b = 1/eps, p = e^(-1/b): E|X - 200| = 2p / (1 - p^2) = 1.919 (not b, the
    # continuous one's), sd of |X| ~2.04, so a standard error of 0.053: 6 of them (false failure ~2e-9)
    p = math.exp(-0.5)
    assert (draws - 200).abs().mean().item() == pytest.approx(2 * p / (1 - p * p), abs=6 * 0.053)
    assert sy.dp.remaining_budget(w, spent=True)[0] == pytest.approx(n * 0.5)


def test_gaussian_mean_and_histogram_report_their_cost(hook):
    w, ptr, values = _owner(hook, "dpq_gauss")
    r = sy.dp.remote_query(ptr, "sum", epsilon=1.0, delta=1e-5, mechanism="gaussian", bounds=(0, 10))
    assert (r.epsilon, r.delta) == (1.0, 1e-5)
    assert r.noise_scale == pytest.approx(gaussian_sigma(10.0, 1.0, 1e-5))
    m = sy.dp.remote_query(ptr, "mean", epsilon=50.0, bounds=(0, 10))
    assert m.value.item() == pytest.approx(values.mean().item(), abs=0.5)
    h = sy.dp.remote_query(ptr, "histogram", epsilon=50.0, bounds=(0, 10), bins=4)
    assert h.value.shape == (4,) and h.value.sum().item() == pytest.approx(200, abs=2)
    spent = sy.dp.remaining_budget(w, spent=True)
    assert spent == pytest.approx((101.0, 1e-5))


def test_query_refused_when_budget_is_spent_and_nothing_released(hook):
    w, ptr, _ = _owner(hook, "dpq_spent", budget=(1.0, 0.0))
    sy.dp.remote_query(ptr, "count", epsilon=0.6)
    objects_before = len(w._objects)
    with pytest.raises(BudgetExceededError, match="user 'me' has \\(epsilon=0.4 left|refused"):
        sy.dp.remote_query(ptr, "count", epsilon=0.6)
    assert len(w._objects) == objects_before  # no result was stored for the refused query
    with pytest.raises(BudgetExceededError):  # delta budget is 0: Gaussian queries are refused
        sy.dp.remote_query(ptr, "count", epsilon=0.1, delta=1e-6, mechanism="gaussian")
    assert sy.dp.remaining_budget(w) == pytest.approx((0.4, 0.0))


def test_queries_need_bounds_and_known_names(hook):
    w, ptr, _ = _owner(hook, "dpq_bad")
    with pytest.raises(PrivacyParameterError, match="bounds"):
        sy.dp.remote_query(ptr, "mean", epsilon=1.0)
    with pytest.raises(PrivacyParameterError, match="unknown DP query"):
        sy.dp.remote_query(ptr, "max", epsilon=1.0)
    assert sy.dp.remaining_budget(w, spent=True) == (0.0, 0.0)


def test_dp_datasets_refuse_plain_arithmetic(hook):
    """Under the owner's DP policy, pointers to the data answer only DP releases."""
    import pytest as _pytest

    import veil as sy
    from veil.exceptions import PermissionDeniedError

    w = sy.VirtualWorker(hook, id="dp_only_owner")
    x, y = torch.randn(20, 3), torch.randn(20, 1)
    w.load(x, tags=("#clinic", "#data"), private=True)
    w.load(y, tags=("#clinic", "#target"), private=True)
    w.enable_dp("clinic", max_grad_norm=1.0, noise_multiplier=1.0, budgets={"me": (5.0, 1e-5)})
    data, target = w.search(["#clinic", "#data"])[0], w.search(["#clinic", "#target"])[0]
    with _pytest.raises(PermissionDeniedError, match="differential-privacy"):
        (data * 1).get()
    with _pytest.raises(PermissionDeniedError, match="differential-privacy"):
        target.sum()
    noisy = sy.dp.remote_query(target, "count", epsilon=0.5)
    assert abs(noisy.value - 20) < 40  # the DP query still works
