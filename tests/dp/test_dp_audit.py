"""Empirical DP audit (small; bench/bench_dp_audit.py runs it longer): neighbouring datasets,
many releases, a statistical lower bound on epsilon that must stay below the charged epsilon,
and must catch a mechanism that under-charges (so the audit can fail)."""

import numpy as np
import pytest
import torch

from veil.dp import core
from veil.dp.accountant import epsilon_for
from veil.dp.audit import epsilon_lower_bound as _lower_bound
from veil.dp.queries import dp_histogram, dp_sum

RUNS = 2000


def epsilon_lower_bound(a, b, delta=0.0):
    # 99.9% confidence: a sound mechanism fails "bound <= charged" at most once in 1000 runs
    return _lower_bound(a, b, delta, alpha=1e-3)


def _neighbours(d=1):
    base = torch.zeros(20, d)
    return base, torch.cat([base, torch.ones(1, d)])  # D' adds one record at the upper bound


def test_laplace_sum_audit_stays_below_the_charged_epsilon():
    eps = 1.0
    d, d2 = _neighbours()
    a = np.array([float(dp_sum(d, 0.0, 1.0, eps).value) for _ in range(RUNS)])
    b = np.array([float(dp_sum(d2, 0.0, 1.0, eps).value) for _ in range(RUNS)])
    lb = epsilon_lower_bound(a, b)
    assert lb <= eps
    assert lb > 0.3  # the audit has power: the releases do tell D from D' somewhat


def test_gaussian_sum_audit_stays_below_the_charged_epsilon():
    eps, delta = 4.0, 1e-5  # a large epsilon, so that 2000 runs have the power to see it
    d, d2 = _neighbours()
    a = np.array([float(dp_sum(d, 0.0, 1.0, eps, delta, "gaussian").value) for _ in range(RUNS)])
    b = np.array([float(dp_sum(d2, 0.0, 1.0, eps, delta, "gaussian").value) for _ in range(RUNS)])
    assert 0.5 < epsilon_lower_bound(a, b, delta) <= eps


def test_dp_sgd_step_audit_stays_below_the_accountants_epsilon():
    sigma, c = 1.0, 1.0
    charged = epsilon_for(sigma, 1.0, 1, 1e-5, "rdp")  # one full-batch Gaussian step
    like = [torch.zeros(4)]
    others = torch.randn(10, 4) * 0.01
    canary = torch.tensor([[100.0, 0.0, 0.0, 0.0]])  # clipped to C along a fixed direction

    def release(with_canary):
        g = torch.cat([others, canary]) if with_canary else others
        return float(core.privatize([g], like, c, sigma, 1.0)[0][0])

    a = np.array([release(False) for _ in range(RUNS)])
    b = np.array([release(True) for _ in range(RUNS)])
    assert 0.5 < epsilon_lower_bound(a, b, 1e-5) <= charged


def test_the_audit_catches_a_histogram_charged_for_one_column_of_a_13_column_record():
    """Before the fix, a 13-column record was charged sensitivity 1: the audit shows epsilon >> 0.5."""
    eps = 0.5
    d, d2 = torch.zeros(5, 13), torch.cat([torch.zeros(5, 13), torch.full((1, 13), 9.0)])
    # what the old code did: noise for sensitivity 1 on the flattened histogram
    def old(x):
        return float(torch.histc(x.flatten(), 2, 0, 10)[1] + core.laplace_mechanism(torch.zeros(1), 1 / eps))
    lb_old = epsilon_lower_bound(np.array([old(d) for _ in range(RUNS)]), np.array([old(d2) for _ in range(RUNS)]))
    assert lb_old > eps  # the under-charge is caught
    new = lambda x: float(dp_histogram(x, 2, 0.0, 10.0, eps).value[1])  # noqa: E731
    lb_new = epsilon_lower_bound(np.array([new(d) for _ in range(RUNS)]), np.array([new(d2) for _ in range(RUNS)]))
    assert lb_new <= eps


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_rows_are_dropped_data_independently(bad):
    like = [torch.zeros(3)]
    g = torch.tensor([[0.3, 0.0, 0.0], [bad, 1.0, 1.0]])
    out = core.clipped_sum([g], 1.0, like)[0]
    torch.testing.assert_close(out, torch.tensor([0.3, 0.0, 0.0]))  # the bad row contributes exactly zero


def test_clipping_sanitizes_bad_rows_and_reports_their_norms():
    g = torch.tensor([[3.0, 4.0], [float("nan"), 0.0]])
    sums, norms = core.clip_and_sum([g], 1.0, [torch.zeros(2)])
    torch.testing.assert_close(sums[0], torch.tensor([0.6, 0.8]))
    assert norms[0] == 5.0 and not torch.isfinite(norms[1])


def test_unseeded_dp_sgd_noise_is_cryptographic_and_has_std_sigma_c_over_b():
    from veil.dp import DPOptimizer

    net = torch.nn.Linear(200, 20)
    opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), noise_multiplier=1.5, max_grad_norm=2.0,
                      expected_batch_size=4.0)
    for p in net.parameters():
        p.grad_sample = torch.zeros(3, *p.shape)
    opt.pre_step()
    noise = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert noise.std().item() == pytest.approx(1.5 * 2.0 / 4.0, rel=0.05)  # 4020 draws: SE 1.1%
    assert noise.mean().abs().item() < 0.05
    for p in net.parameters():
        p.grad_sample = torch.zeros(3, *p.shape)
    opt.pre_step()
    assert not torch.equal(noise, torch.cat([p.grad.flatten() for p in net.parameters()]))  # fresh key per step
