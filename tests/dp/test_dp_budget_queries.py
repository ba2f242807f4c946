"""Budget ledger (atomic, persistent) and DP queries' noise scale."""

import math
import sqlite3

import dp_accounting
import pytest
import torch

from veil.dp import BudgetExceededError, UnknownUserError, make_generator
from veil.dp.budget import BudgetLedger
from veil.dp.queries import dp_count, dp_histogram, dp_mean, dp_sum, gaussian_sigma


def test_charge_refuses_past_budget_and_records_nothing(tmp_path):
    with BudgetLedger(tmp_path / "ledger.db") as ledger:
        ledger.set_budget("alice", 1.0, 1e-5)
        assert ledger.charge("alice", 0.4, 0.0, "count") == pytest.approx((0.6, 1e-5))
        ledger.charge("alice", 0.6, 0.0, "sum")
        with pytest.raises(BudgetExceededError, match="alice"):
            ledger.charge("alice", 0.01, 0.0, "mean")
        assert ledger.remaining("alice")[0] == pytest.approx(0.0)
        assert len(ledger.history("alice")) == 2
        with pytest.raises(BudgetExceededError, match="delta"):
            ledger.set_budget("bob", 5.0, 1e-6)
            ledger.charge("bob", 0.1, 1e-5, "gaussian")
        with pytest.raises(UnknownUserError):
            ledger.charge("carol", 0.1, 0.0, "x")


def test_budget_survives_reopen(tmp_path):
    path = tmp_path / "ledger.db"
    ledger = BudgetLedger(path)
    ledger.set_budget("alice", 2.0, 1e-5)
    ledger.charge("alice", 1.5, 5e-6, "training run")
    ledger.close()
    again = BudgetLedger(path)
    eps, delta = again.remaining("alice")
    assert eps == pytest.approx(0.5) and delta == pytest.approx(5e-6)
    with pytest.raises(BudgetExceededError):
        again.charge("alice", 0.6, 0.0, "too much")
    again.close()


def test_two_connections_cannot_overspend(tmp_path):
    path = tmp_path / "ledger.db"
    a, b = BudgetLedger(path), BudgetLedger(path)
    a.set_budget("u", 1.0, 0.0)
    a.charge("u", 0.7, 0.0, "first")
    with pytest.raises(BudgetExceededError):
        b.charge("u", 0.7, 0.0, "second")  # sees a's committed charge
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM charges").fetchone()[0] == 1


def _draws(fn, n=4000):
    gen = make_generator(0)
    return torch.stack([fn(gen).value for _ in range(n)])


def _discrete_laplace_std(scale):
    # Counts get the discrete Laplace (two-sided geometric): Var = 2 e^(-1/b) / (1 - e^(-1/b))^2.
    a = math.exp(-1 / scale)
    return math.sqrt(2 * a) / (1 - a)


def test_laplace_count_has_scale_one_over_epsilon():
    x = torch.zeros(50, 3)
    eps = 0.5
    vals = _draws(lambda g: dp_count(x, eps, generator=g))
    # Laplace(b): std = sqrt(2) b, mean = true count. The noise comes from a CSPRNG (not the seed), so the
    # bounds are ~4.5 standard errors of 4000 draws (the std's: sqrt((kurtosis 6 - 1) / 4n) = 1.8%):
    # 5% (2.8 errors) failed about one run in 200
    assert vals.mean().item() == pytest.approx(50, abs=0.2)
    assert vals.std().item() == pytest.approx(_discrete_laplace_std(1 / eps), rel=0.08)
    assert torch.equal(vals, vals.round())  # integer noise on an integer count


def test_gaussian_sum_uses_clipping_bound_and_analytic_sigma():
    x = torch.tensor([1.0, 100.0, -5.0])  # clipped to [-2, 2]: 1 + 2 - 2 = 1
    res = dp_sum(x, -2.0, 2.0, 1.0, 1e-5, "gaussian", make_generator(3))
    assert res.noise_scale == pytest.approx(2.0 * dp_accounting.get_sigma_gaussian(1.0, 1e-5))
    assert (res.epsilon, res.delta) == (1.0, 1e-5)
    # 25,000 draws: the mean's standard error is 8.8 / 158 = 0.056, so 0.3 is 5.4 of them (with 4,000 draws
    # it was 2.2, and the test failed about one run in thirty)
    vals = _draws(lambda g: dp_sum(x, -2.0, 2.0, 1.0, 1e-5, "gaussian", g), n=25_000)
    assert vals.mean().item() == pytest.approx(1.0, abs=0.3)
    assert vals.std().item() == pytest.approx(res.noise_scale, rel=0.05)
    # sigma calibrated this way really is (1, 1e-5)-DP for sensitivity 2:
    assert dp_accounting.get_epsilon_gaussian(res.noise_scale / 2.0, 1e-5) == pytest.approx(1.0, rel=1e-6)
    assert gaussian_sigma(1.0, 0.5, 1e-5) < math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5


def test_mean_and_histogram():
    x = torch.rand(2000) * 10
    m = dp_mean(x, 0.0, 10.0, 5.0, generator=make_generator(1))
    assert m.value.item() == pytest.approx(x.mean().item(), abs=0.1)
    assert m.epsilon == 5.0
    h = dp_histogram(x, 5, 0.0, 10.0, 1.0, generator=make_generator(2))
    assert h.value.shape == (5,)
    assert h.noise_scale == 1.0  # sensitivity 1 / epsilon 1
    vals = _draws(lambda g: dp_histogram(x, 5, 0.0, 10.0, 2.0, generator=g), n=2000)
    assert vals.std(0).mean().item() == pytest.approx(_discrete_laplace_std(1 / 2.0), rel=0.06)
    true = torch.histc(x, 5, 0, 10).double()
    torch.testing.assert_close(vals.mean(0), true, atol=0.1, rtol=0)
