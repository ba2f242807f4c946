"""PATE aggregation and analysis."""

import math

import dp_accounting
import numpy as np
import pytest
import torch
from scipy import stats

from veil.dp import make_generator, pate


def test_vote_counts_match_a_python_tally():
    preds = torch.tensor([[0, 1, 2], [0, 1, 1], [2, 1, 1]])
    counts = pate.vote_counts(preds, 3)
    assert counts.tolist() == [[2, 0, 1], [0, 3, 0], [0, 2, 1]]


def test_aggregators_return_plurality_when_noise_is_small_and_abstain_below_threshold():
    counts = torch.tensor([[90.0, 5, 5], [10, 80, 10], [34, 33, 33]])
    gen = make_generator(0)
    assert pate.gnmax(counts[:2], 1.0, gen).tolist() == [0, 1]
    assert pate.lnmax(counts[:2], 5.0, gen).tolist() == [0, 1]
    labels = pate.confident_gnmax(counts, threshold=60, sigma1=1.0, sigma2=1.0, generator=gen)
    assert labels.tolist() == [0, 1, -1]


def test_gnmax_noise_has_the_declared_scale():
    # With two tied classes, Pr[class 0] = 1/2; with a gap g it is Phi(g / (sqrt(2) sigma)).
    sigma, gap = 4.0, 3.0
    counts = torch.tensor([[10.0 + gap, 10.0]]).repeat(20000, 1)
    frac = (pate.gnmax(counts, sigma, make_generator(1)) == 0).double().mean().item()
    assert frac == pytest.approx(stats.norm.cdf(gap / (math.sqrt(2) * sigma)), abs=0.01)


def test_log_q_is_the_prop10_bound():
    counts = np.array([30.0, 25.0, 5.0])
    sigma = 3.0
    expected = sum(0.5 * math.erfc((30 - c) / (2 * sigma)) for c in (25.0, 5.0))
    assert pate.gnmax_log_q(counts, sigma) == pytest.approx(math.log(expected))
    assert pate.gnmax_log_q(np.array([5.0, 5.0, 5.0]), sigma) == pytest.approx(math.log(2 / 3))


def _prop7_plain(q, sigma, lam):
    """Prop. 7 of Papernot et al. 2018 written out in plain floats (no logs)."""
    mu2 = sigma * math.sqrt(math.log(1 / q))
    mu1 = mu2 + 1
    e1, e2 = mu1 / sigma**2, mu2 / sigma**2
    a = (1 - q) / (1 - (q * math.exp(e2)) ** ((mu2 - 1) / mu2))
    b = math.exp(e1) / q ** (1 / (mu1 - 1))
    return math.log((1 - q) * a ** (lam - 1) + q * b ** (lam - 1)) / (lam - 1)


@pytest.mark.parametrize("gap", [60.0, 100.0, 150.0])
def test_data_dependent_rdp_matches_prop7_written_out(gap):
    sigma = 20.0
    counts = np.array([gap + 10, 10.0, 0.0])
    log_q = pate.gnmax_log_q(counts, sigma)
    orders = np.array([2.0, 5.0, 10.0])
    got = pate.gnmax_rdp_data_dependent(log_q, sigma, orders)
    for lam, g in zip(orders, got):
        want = min(_prop7_plain(math.exp(log_q), sigma, lam), lam / sigma**2)
        assert g == pytest.approx(want, rel=1e-9)
    assert (got <= orders / sigma**2).all()
    assert (got < orders / sigma**2).any()  # strong consensus: strictly better somewhere


def test_data_independent_epsilon_equals_dp_accounting_and_plain_rdp_bound():
    sigma, n, delta = 40.0, 200, 1e-5
    eps = pate.gnmax_epsilon_data_independent(n, sigma, delta)
    acc = dp_accounting.rdp.RdpAccountant(list(pate.DEFAULT_ORDERS))
    acc.compose(dp_accounting.GaussianDpEvent(sigma / math.sqrt(2)), n)
    assert eps == pytest.approx(acc.get_epsilon(delta))
    # The classic conversion eps = min_l n l / sigma^2 + log(1/delta)/(l-1) is an upper bound.
    classic = min(n * l / sigma**2 + math.log(1 / delta) / (l - 1) for l in pate.DEFAULT_ORDERS)
    assert eps <= classic
    assert eps > 0.8 * classic


def test_data_dependent_is_much_smaller_under_consensus_and_never_larger():
    torch.manual_seed(0)
    consensus = torch.zeros(250, 300, dtype=torch.long)
    consensus[:15] = torch.randint(0, 10, (15, 300))
    noisy = torch.randint(0, 10, (250, 300))
    sigma, delta = 40.0, 1e-5
    indep = pate.gnmax_epsilon_data_independent(300, sigma, delta)
    dep_consensus = pate.gnmax_epsilon_data_dependent(consensus, range(300), 10, sigma, delta)
    dep_noisy = pate.gnmax_epsilon_data_dependent(noisy, range(300), 10, sigma, delta)
    assert dep_consensus < 0.5 * indep
    assert dep_noisy <= indep * (1 + 1e-9)
    # Only the queried examples count.
    fewer = pate.gnmax_epsilon_data_dependent(consensus, range(100), 10, sigma, delta)
    assert fewer < dep_consensus


def test_confident_gnmax_pays_threshold_for_every_query():
    preds = torch.zeros(100, 50, dtype=torch.long)
    none = pate.confident_gnmax_epsilon(preds, range(50), [False] * 50, 10, 50.0, 20.0, 1e-5)
    some = pate.confident_gnmax_epsilon(preds, range(50), [True] * 50, 10, 50.0, 20.0, 1e-5)
    assert 0 < none < some


def test_lnmax_epsilon_is_two_gamma_per_query_and_advanced_composition_helps():
    assert pate.lnmax_epsilon(10, 0.05) == pytest.approx(1.0)
    assert pate.lnmax_epsilon(1000, 0.02, delta=1e-5) < 40.0
