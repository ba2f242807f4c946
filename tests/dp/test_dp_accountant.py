"""The accountant reports exactly what dp_accounting reports for the same mechanism."""

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from veil.dp import Accountant, epsilon_for, find_noise_multiplier


def _direct(mech, events, delta):
    acc = pld.PLDAccountant() if mech == "pld" else rdp.RdpAccountant()
    for sigma, q, n in events:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    return acc.get_epsilon(1e-5)


@pytest.mark.parametrize("mech", ["pld", "rdp"])
def test_epsilon_equals_dp_accounting_direct(mech):
    acc = Accountant(mech)
    for _ in range(50):
        acc.step(1.1, 0.02)
    acc.step(0.9, 0.05, count=20)
    expected = _direct(mech, [(1.1, 0.02, 50), (0.9, 0.05, 20)], 1e-5)
    assert acc.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-6)
    assert acc.steps == 70


def test_pld_is_tighter_than_rdp_and_epsilon_grows_with_steps():
    assert epsilon_for(1.0, 0.01, 1000, 1e-5, "pld") < epsilon_for(1.0, 0.01, 1000, 1e-5, "rdp")
    assert epsilon_for(1.0, 0.01, 100, 1e-5) < epsilon_for(1.0, 0.01, 1000, 1e-5)


def test_empty_accountant_spent_nothing_and_state_round_trips():
    acc = Accountant()
    assert acc.get_epsilon(1e-5) == 0.0
    acc.step(1.0, 0.1, 10)
    again = Accountant.from_state_dict(acc.state_dict())
    assert again.get_epsilon(1e-5) == acc.get_epsilon(1e-5)


@pytest.mark.parametrize("mech", ["rdp", "pld"])
def test_noise_search_meets_target_tightly(mech):
    sigma = find_noise_multiplier(2.0, 1e-5, 0.05, 100, mech)
    eps = epsilon_for(sigma, 0.05, 100, 1e-5, mech)
    assert eps <= 2.0
    assert eps > 1.95  # not wastefully noisy


def test_rejects_invalid_steps():
    with pytest.raises(ValueError, match="sample_rate"):
        Accountant().step(1.0, 1.5)
    with pytest.raises(ValueError, match="unknown accountant"):
        Accountant("moments")
