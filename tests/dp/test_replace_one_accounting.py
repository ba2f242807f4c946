"""The replace-one charge of DP-SGD steps over a hidden count's slots (veil.dp.replace_one), checked against
values computed here independently of the accountant: the exact Gaussian at q = 1, the hockey-stick divergence
of one subsampled step integrated numerically, the library's optimistic PLD (a lower estimate), and the
orderings any sound replace-one charge keeps (>= add/remove, <= the sigma / 2 bound, monotone)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from veil.dp import replace_one
from veil.dp.accountant import MAX_ACCOUNTED_NOISE, Accountant
from veil.dp.errors import PrivacyParameterError

DELTA = 1e-5


def _charged(sigma, q, steps, mechanism="rdp", delta=DELTA):
    acc = Accountant(mechanism)
    acc.step(sigma, q, steps, replace_one=True)
    return acc.get_epsilon(delta)


def _add_remove(sigma, q, steps, mechanism="rdp", delta=DELTA):
    acc = Accountant(mechanism)
    acc.step(sigma, q, steps)
    return acc.get_epsilon(delta)


def _gaussian_delta(eps, mu):
    """Exact delta(eps) of a Gaussian mechanism of sensitivity / sigma = mu (Balle and Wang 2018)."""
    return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize("sigma,steps", [(2.0, 1), (4.0, 10)])
def test_without_subsampling_the_charge_is_the_exact_gaussian_of_twice_the_sensitivity(sigma, steps):
    """q = 1: a replaced record moves the sum by up to 2C, so ``steps`` steps are one Gaussian of
    mu = 2 sqrt(steps) / sigma; the charge must cover it (delta at the charge <= DELTA) and be close to it."""
    mu = 2 * math.sqrt(steps) / sigma
    exact = optimize.brentq(lambda e: _gaussian_delta(e, mu) - DELTA, 1e-9, 200)
    charged = _charged(sigma, 1.0, steps)
    assert _gaussian_delta(charged, mu) <= DELTA * (1 + 1e-6)
    assert exact <= charged <= exact + 0.02, (exact, charged)


def _subsampled_delta(eps, sigma, q):
    """delta(eps) of one Poisson-subsampled Gaussian step, replace-one, integrated on a dense grid:
    P = (1-q) N(0) + q N(-1), Q = (1-q) N(0) + q N(1), unit sensitivity, noise sigma (symmetric pair)."""
    x = np.linspace(-1 - 40 * sigma, 1 + 40 * sigma, 1_000_001)
    p = (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, -1, sigma)
    r = (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, 1, sigma)
    return float(np.trapezoid(np.maximum(p - math.exp(eps) * r, 0), x))


@pytest.mark.parametrize("sigma,q", [(1.0, 0.05), pytest.param(0.8, 0.3, marks=pytest.mark.slow)])
def test_one_subsampled_step_is_charged_at_least_its_exact_cost_and_close_to_it(sigma, q):
    delta = 1e-3  # (a delta the grid integrates well above its error)
    charged = _charged(sigma, q, 1, delta=delta)
    assert _subsampled_delta(charged, sigma, q) <= delta * (1 + 1e-4)
    assert _subsampled_delta(charged - 0.02, sigma, q) > delta  # tight: not a bound far above the cost


def test_the_known_value_and_the_old_sigma_half_charge():
    """sigma 1, q 0.01, 1,000 steps, delta 1e-5: add/remove RDP 2.10, replace-one 2.84 (PLD), where the
    sigma / 2 charge was 15.47."""
    assert _add_remove(1.0, 0.01, 1000) == pytest.approx(2.10, abs=0.01)
    assert _charged(1.0, 0.01, 1000) == pytest.approx(2.844, abs=0.005)
    assert _add_remove(0.5, 0.01, 1000) == pytest.approx(15.47, abs=0.01)


@pytest.mark.slow
def test_the_charge_is_above_the_library_optimistic_estimate_over_many_steps():
    """Independent lower estimate: the library's PLD of the same pair with optimistic rounding."""
    from dp_accounting.pld import privacy_loss_distribution as pld
    from veil.dp.accountant import dp_lib
    lower = pld.from_gaussian_mechanism(1.0, sampling_prob=0.01, pessimistic_estimate=False,
                                        value_discretization_interval=1e-4,
                                        neighboring_relation=dp_lib().NeighboringRelation.REPLACE_ONE)
    optimistic = lower.self_compose(1000).get_epsilon_for_delta(DELTA)
    assert optimistic <= _charged(1.0, 0.01, 1000) <= optimistic + 0.08


@pytest.mark.slow
def test_replace_one_lies_between_add_remove_and_the_half_noise_bound_and_is_monotone():
    """A scientist's choice of (sigma, q, steps) never makes the charge drop below add/remove at the same
    parameters by the same (PLD) accountant (a padding row turning into a record is an add), nor rise above
    the old sigma / 2 charge; it grows with q and steps and falls with sigma."""
    grid = [(1.0, 0.001, 100), (1.0, 0.01, 100), (1.0, 0.1, 100), (1.0, 0.1, 200), (2.0, 0.1, 200),
            (0.6, 0.5, 3), (5.0, 1.0, 2)]
    got = {}
    for s, q, n in grid:
        got[s, q, n] = e = _charged(s, q, n)
        assert _add_remove(s, q, n, "pld") * (1 - 1e-9) <= e <= _add_remove(s / 2, q, n, "rdp") * (1 + 1e-9)
    assert got[1.0, 0.001, 100] < got[1.0, 0.01, 100] < got[1.0, 0.1, 100] < got[1.0, 0.1, 200]
    assert got[2.0, 0.1, 200] < got[1.0, 0.1, 200]
    assert all(got[p] < _add_remove(p[0] / 2, *p[1:]) for p in grid)  # (each tightened by the PLD)


def test_a_history_mixing_both_relations_composes_them_and_round_trips():
    acc = Accountant("rdp")
    acc.step(1.0, 0.05, 50)
    acc.step(1.0, 0.05, 50, replace_one=True)
    both = acc.get_epsilon(DELTA)
    assert both > _charged(1.0, 0.05, 50) and both > _add_remove(1.0, 0.05, 100)
    state = acc.state_dict()
    assert state["replace_one"] == [[1.0, 0.05, 50]] and state["history"] == [[1.0, 0.05, 50]]
    assert Accountant.from_state_dict(state).get_epsilon(DELTA) == both
    old = {"mechanism": "rdp", "history": [[1.0, 0.05, 50]]}  # (a stored state from before: no replace-one)
    assert Accountant.from_state_dict(old).get_epsilon(DELTA) == _add_remove(1.0, 0.05, 50)
    assert acc.pairs() == {(1.0, 0.05, False), (1.0, 0.05, True)} and acc.steps == 100


def test_where_the_pld_is_not_used_the_sigma_half_bound_is_charged(monkeypatch):
    """A noise multiplier below PLD_MIN_NOISE (time bound), or a PLD that fails or answers NaN: the old
    sigma / 2 RDP charge, never less."""
    half = _add_remove(0.1, 0.01, 10)
    assert _charged(0.2, 0.01, 10) == half
    assert _charged(1.0, 0.5, 2000) == _add_remove(0.5, 0.5, 2000) > replace_one.PLD_MAX_BOUND  # (time bound)
    for broken in (lambda *a: 1 / 0, lambda *a: float("nan"), lambda *a: -1.0):
        monkeypatch.setattr(replace_one, "_pld_epsilon", broken)
        assert _charged(1.0, 0.05, 10) == _add_remove(0.5, 0.05, 10)


def test_bad_noise_and_counts_are_refused_and_a_huge_sigma_is_charged_finitely():
    acc = Accountant("rdp")
    for sigma in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(PrivacyParameterError):
            acc.step(sigma, 0.1, replace_one=True)
    for count in (float("nan"), 1.5, 0):
        with pytest.raises(PrivacyParameterError):
            acc.step(1.0, 0.1, count, replace_one=True)
    with pytest.raises(PrivacyParameterError):
        acc.step(1.0, 0.1, replace_one=1)
    acc.step(1e300, 0.5, 3, replace_one=True)  # (its square overflowed both libraries)
    assert acc.replaced == [[MAX_ACCOUNTED_NOISE, 0.5, 3]]
    assert 0 <= acc.get_epsilon(DELTA) < 1e-3
