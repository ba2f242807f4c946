"""Red team, fresh eyes on PATE and DP queries: teacher-vote aggregation, its analyses, and repeated queries.

Holes found (each test failed on the code before its fix: the first four as strict xfails, the large-gamma
and fractional-index ones run against a copy of the commit before):

- ``perform_analysis`` (PySyft's 2017 LNMax accountant) counted the data-independent epsilon over the
  number of *columns* of ``teacher_preds``, not the answers in ``indices``: fifty noisy answers about one
  example were reported at the data-independent cost of one.
- ``gnmax`` / ``confident_gnmax`` drew their noise from a ``generator`` the caller passed (torch's seedable
  PRNG): the same seed gave the same labels, and whoever knows it removes the noise; every other release
  (queries, LNMax) ignores it and draws from the OS CSPRNG.
- The PATE analyses took custom RDP ``orders`` unchecked: an order of 1 (or infinity) made the
  data-dependent RDP ``-inf`` and the reported epsilon 0.0 for any votes (order 1 alone: the
  data-independent one infinity; NaN: infinity; below 1: dp_accounting's bare ValueError).
- ``perform_analysis`` with gamma >= ~50 raised a bare OverflowError (``exp(gamma * gap)``, ``e^{2 gamma}``);
  now computed in logs, and a gamma past ``MAX_EPSILON / 2`` (where gamma * gap overflowed to inf and the
  moments to 0) is refused in one line.
- The GNMax analyses and ``perform_analysis`` read a fractional query index (1.9) as example 1, and
  ``perform_analysis`` a vote 2.7 as 2: refused now.
- ``vote_counts`` quoted an out-of-range (private) vote in its error text (torch's "index 7777 is out of
  bounds") and truncated float votes (2.7 counted as a vote for 2) without a word.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import veil as sy
from veil.compat.pate_analysis import perform_analysis
from veil.dp import pate
from veil.dp.errors import PrivacyParameterError
from veil.ids import new_id


# ================================================================================ holes (fixed)

def _ind_by_hand(answers: int, gamma: float, delta: float, moments: int = 8) -> float:
    """The 2017 data-independent bound: min_l (answers * min(2 gamma^2 l (l+1), 2 gamma l) + ln 1/delta) / l."""
    eps = 2 * gamma
    return min((answers * min(0.5 * eps * eps * l * (l + 1), eps * l) + math.log(1 / delta)) / l
               for l in range(1, moments + 1))


@pytest.mark.filterwarnings("ignore:PATE analysis")
def test_perform_analysis_charges_every_answer_not_every_column():
    """Attack: a student asks about the same example fifty times (fresh LNMax noise each time, so fifty
    answers, each (2 gamma)-DP). Must hold: the data-independent epsilon is that of fifty answers, as for
    fifty different examples, and never below the data-dependent one; one answer among fifty columns costs
    one answer (PySyft counted min(answers, columns); veil counted the columns)."""
    gamma, delta = 0.1, 1e-5
    one_column = np.zeros((100, 1), dtype=np.int64)
    dep, ind = perform_analysis(one_column, np.zeros(50, dtype=np.int64), gamma, delta)
    assert ind == pytest.approx(_ind_by_hand(50, gamma, delta), rel=1e-12) and dep <= ind
    many = np.zeros((100, 50), dtype=np.int64)
    assert perform_analysis(many, np.arange(50), gamma, delta) == pytest.approx((dep, ind), rel=1e-12)
    assert perform_analysis(many, np.array([3]), gamma, delta)[1] == pytest.approx(_ind_by_hand(1, gamma, delta))


@pytest.mark.filterwarnings("ignore:PATE analysis")
def test_perform_analysis_of_a_large_gamma_answers_instead_of_overflowing():
    """Attack (huge parameters): gamma 50 (an almost noiseless release) made ``exp(gamma * gap)`` and
    ``e^{2 gamma}`` overflow: a bare OverflowError ("math range error") instead of an epsilon. Must hold: up to
    the largest epsilon a query may spend (2 gamma <= 1000) the analysis answers, the data-independent value
    by hand and the data-dependent one below it; past it a one-line PrivacyParameterError."""
    preds = np.zeros((10, 3), dtype=np.int64)
    preds[:4, 0] = 1  # example 0: 6 votes to 4; example 1: unanimous
    for gamma in (50.0, 400.0, 500.0):
        dep, ind = perform_analysis(preds, [0, 1], gamma, 1e-5, num_classes=3)
        assert ind == pytest.approx(_ind_by_hand(2, gamma, 1e-5), rel=1e-12)
        assert 2 * gamma <= dep <= ind  # (example 0's answer alone costs its 2 gamma)
    for gamma in (501.0, 1e308):
        with pytest.raises(PrivacyParameterError, match="noise_eps"):
            perform_analysis(preds, [0, 1], gamma, 1e-5, num_classes=3)


@pytest.mark.parametrize("release", ["gnmax", "confident_gnmax"])
def test_gnmax_noise_is_never_seeded_by_the_callers_generator(release):
    """Attack: labels released with noise from ``torch.Generator().manual_seed(0)``: anyone who knows (or
    guesses) the seed replays the noise and reads the exact vote counts' argmax. Must hold: two releases
    with the same seeded generator on 64 tied vote rows differ (fresh noise: equal with probability 2^-64)."""
    counts = torch.full((64, 2), 5.0)

    def labels():
        gen = torch.Generator().manual_seed(0)
        if release == "gnmax":
            return pate.gnmax(counts, 1.0, gen)
        return pate.confident_gnmax(counts, threshold=-1e9, sigma1=1.0, sigma2=1.0, generator=gen)

    assert not torch.equal(labels(), labels())


_PREDS = torch.zeros(50, 4, dtype=torch.long)  # full consensus: the data-dependent bound is tiny
_ANALYSES = {
    "data_independent": lambda o: pate.gnmax_epsilon_data_independent(10, 5.0, 1e-5, o),
    "data_dependent": lambda o: pate.gnmax_epsilon_data_dependent(_PREDS, [0, 1], 4, 5.0, 1e-5, o),
    "confident": lambda o: pate.confident_gnmax_epsilon(_PREDS, [0, 1], [True, False], 4, 5.0, 5.0, 1e-5, o),
}


@pytest.mark.parametrize("orders", [[1.0], [1.0, 32.0], [math.inf], [2.0, math.inf], [math.nan], [0.5, 2.0], [],
                                    [[2.0, 3.0]]], ids=lambda o: repr(o))
def test_pate_analysis_refuses_orders_that_report_no_cost(orders):
    """Attack: custom RDP orders. At order 1 the data-dependent bound divides by ``lambda - 1`` and came out
    ``-inf``; dp_accounting turns a ``-inf`` RDP into epsilon 0.0 (an infinite order too), which passes any
    ``epsilon <= budget`` check. Must hold: every analysis refuses orders that are not finite numbers > 1
    (a one-dimensional, non-empty list) with a one-line PrivacyParameterError."""
    for name, analysis in _ANALYSES.items():
        with pytest.raises(PrivacyParameterError, match="orders") as err:
            analysis(orders)
        assert "\n" not in str(err.value), name


def test_vote_counts_refuses_bad_votes_without_quoting_them():
    """Attack (error text, silent rounding): a teacher's vote out of range made torch's error quote it
    ("index 7777 is out of bounds"); a float vote 2.7 was counted for label 2. Must hold: both refused with
    a PrivacyParameterError that names the range, never the vote."""
    with pytest.raises(PrivacyParameterError) as err:
        pate.vote_counts(torch.tensor([[7777, 1], [0, 1]]), 10)
    assert "7777" not in str(err.value)
    with pytest.raises(PrivacyParameterError):
        pate.vote_counts(torch.tensor([[-1, 1], [0, 1]]), 10)
    with pytest.raises(PrivacyParameterError):
        pate.vote_counts(torch.tensor([[2.7, 1.0], [0.0, 1.0]]), 10)
    with pytest.raises(PrivacyParameterError) as err:  # (the compat accountant: the same votes)
        perform_analysis(np.array([[2.7, 1.0], [0.0, 1.0]]), [0], 0.1)
    assert "2.7" not in str(err.value)


def test_the_analyses_refuse_fractional_query_indices():
    """Attack (silent rounding): an index 1.9 was read as example 1 (``int()`` / ``astype``), so the analysis
    priced the answer with another example's votes (here a unanimous one: a far lower data-dependent cost
    than example 2's split vote). Must hold: refused in one line, by both accountants."""
    preds = torch.zeros(50, 3, dtype=torch.long)
    preds[:25, 2] = 1
    for bad in ([1.9], np.array([1.9]), torch.tensor([1.9])):
        with pytest.raises(PrivacyParameterError, match="ind"):
            pate.gnmax_epsilon_data_dependent(preds, bad, 2, 5.0, 1e-5)
        with pytest.raises(PrivacyParameterError, match="ind"):
            perform_analysis(preds, bad, 0.1, num_classes=2)
    assert pate.gnmax_epsilon_data_dependent(preds, torch.tensor([2]), 2, 5.0, 1e-5) == \
        pate.gnmax_epsilon_data_dependent(preds, [2], 2, 5.0, 1e-5)


# ================================================================================ attacks that hold

def test_vote_counts_match_numpy_and_the_analysis_accepts_them():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 5, size=(30, 12))
    expected = np.stack([np.bincount(preds[:, j], minlength=5) for j in range(12)]).astype(np.float64)
    assert np.array_equal(pate.vote_counts(torch.from_numpy(preds), 5).numpy(), expected)


def test_custom_orders_still_give_dp_accountings_epsilon():
    """Valid orders (finite, > 1) are used as given: the data-independent GNMax epsilon equals dp_accounting's
    own RDP accountant on a Gaussian of noise multiplier sigma / sqrt(2)."""
    import dp_accounting

    orders = [1.5, 2.0, 8.0, 32.0, 256.0]
    acc = dp_accounting.rdp.RdpAccountant(orders)
    acc.compose(dp_accounting.GaussianDpEvent(5.0 / math.sqrt(2)), 10)
    assert _ANALYSES["data_independent"](orders) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    # (sigma 10: some votes' bound is above 0; at sigma 5 under full consensus it is ~1e-11 per answer, below
    # delta^2, and dp_accounting's KL step rightly gives epsilon 0)
    dep = pate.gnmax_epsilon_data_dependent(_PREDS, [0, 1], 4, 10.0, 1e-5, np.array(orders))
    assert 0 < dep <= pate.gnmax_epsilon_data_independent(2, 10.0, 1e-5, orders)


def test_confident_gnmax_answers_at_the_rate_of_its_threshold_noise():
    """Statistics: with a plurality of 12 and threshold 10, Pr[answer] = Phi((12 - 10) / sigma1) (sigma1 = 2:
    0.841) and, answered, Pr[label 0 | gap 4] = Phi(4 / (sqrt(2) sigma2)) (sigma2 = 4: 0.760). 20,000 rows;
    standard errors 0.0026 and 0.0034, bounds 6 of them (a wrong scale, e.g. sigma^2 for sigma, fails)."""
    n = 20_000
    counts = torch.tensor([[12.0, 8.0, 0.0]]).repeat(n, 1)
    labels = pate.confident_gnmax(counts, threshold=10.0, sigma1=2.0, sigma2=4.0)
    answered = labels != -1
    assert answered.double().mean().item() == pytest.approx(stats.norm.cdf(1.0), abs=6 * 0.0026)
    share0 = (labels[answered] == 0).double().mean().item()
    assert share0 == pytest.approx(stats.norm.cdf(4 / (math.sqrt(2) * 4.0)), abs=6 * 0.0034)


def test_the_same_query_twice_is_charged_twice_and_noised_afresh(hook):
    """Replay vs. caching: the same DP sum asked twice (fresh request ids, as remote_query sends) is two
    releases: both charged, each with its own noise (a cached answer would be equal; two continuous Laplace
    draws coincide with probability ~0). The noisy values stay near the plain torch sum (scale 10)."""
    w = sy.VirtualWorker(hook, id=f"fresh_pate_{new_id()}")
    values = torch.linspace(0, 10, 200).reshape(200, 1)
    w.load(values, tags=("#twice",), private=True)
    w.enable_dp(budgets={"me": (10.0, 0.0)})
    (ptr,) = w.search(["#twice"])
    a = sy.dp.remote_query(ptr, "sum", epsilon=1.0, bounds=(0.0, 10.0))
    b = sy.dp.remote_query(ptr, "sum", epsilon=1.0, bounds=(0.0, 10.0))
    assert a.value.item() != b.value.item()
    assert abs(a.value.item() - values.sum().item()) < 300 and abs(b.value.item() - values.sum().item()) < 300
    assert sy.dp.remaining_budget(w, spent=True) == pytest.approx((2.0, 0.0))
