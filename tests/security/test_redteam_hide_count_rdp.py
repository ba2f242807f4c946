"""Red team: the hidden count's DP-SGD accounting (replace-one), the owner's notice of data past the bound,
and a search meeting a nested tensor.

Holes found (each test failed on the code before its fix; see the report):
- A DP-SGD step over a hidden count's slots was charged as add/remove at sigma / 2 (sensitivity 2C): sound,
  but 5-7x the true replace-one cost at small q (sigma 1, q 0.01, 1,000 steps: 15.5 against 2.84). Now the
  library's PLD accountant composes it under NeighboringRelation.REPLACE_ONE (veil.dp.replace_one; values
  checked independently in tests/dp/test_replace_one_accounting.py), the sigma / 2 bound where that is not
  bounded in time.
- A scientist's noise_multiplier of 1e300 (finite, above the owner's) overflowed both accountants inside the
  ledger's charge: an OverflowError instead of a step. It is now accounted at 1e6 (more noise never costs
  more).
- Setting the policy of data past its bound said nothing: its DP releases read only the first max_records
  records. Now a log line, and the console's dataset page, tell the owner.
- A nested tensor the owner loaded made every search (and listing) of every session fail with the torch
  error "NestedTensorImpl doesn't support sizes": it is now left out, as a stored plan is.
Held: NaN / inf / absurd noise multipliers and sample rates are refused before any charge.
"""

from __future__ import annotations

import logging

import pytest
import torch

import veil as sy
from tests.security.test_redteam_hide_count_third import _training_worker
from veil.dp.accountant import Accountant
from veil.dp.errors import PrivacyParameterError
from veil.governance.console import views

BOUND, SIGMA, DELTA = 64, 1.0, 1e-5


def _spent(w) -> float:
    return sy.dp.remaining_budget(w, spent=True)[0]


@pytest.mark.slow
def test_a_hidden_count_step_is_charged_its_replace_one_cost_not_the_sigma_half_bound(hook):
    """Attack (on the owner): a scientist trains at a small sample rate, where the sigma / 2 charge is far
    above a replaced record's true cost, spending the owner's budget for nothing. Must hold: the charge is
    the replace-one epsilon (above the add/remove one, below the sigma / 2 one), alike within and past the
    bound."""
    q = 0.05
    spent = {}
    for n in (40, 400):
        w, model, client = _training_worker(hook, f"rt-hcr-sgd-{n}", n)
        client.sanitized_gradient(model, None, None, q)
        spent[n] = _spent(w)
    assert spent[40] == spent[400]
    replaced, added, half = Accountant("rdp"), Accountant("pld"), Accountant("rdp")
    replaced.step(SIGMA, q, replace_one=True)
    added.step(SIGMA, q)
    half.step(SIGMA / 2, q)
    assert spent[40] == replaced.get_epsilon(DELTA)
    assert added.get_epsilon(DELTA) < spent[40] < half.get_epsilon(DELTA) / 2, (spent, half.get_epsilon(DELTA))


def test_a_huge_noise_multiplier_is_a_step_not_an_overflow(hook):
    """Attack: noise_multiplier=1e300 (finite, above the owner's): the accountants square it. Must hold: the
    step is answered and charged a finite, ~0 epsilon; the worker serves the next step."""
    w, model, client = _training_worker(hook, "rt-hcr-huge", 40)
    client.sanitized_gradient(model, None, None, 1.0, noise_multiplier=1e300)
    after_huge = _spent(w)
    assert 0 <= after_huge < 1e-3
    client.sanitized_gradient(model, None, None, 1.0)
    assert _spent(w) > after_huge + 1.0


@pytest.mark.parametrize("sigma,q", [(float("nan"), 0.5), (float("inf"), 0.5), (1.0, float("nan")),
                                     (1.0, float("inf")), (1.0, 0.0), (1.0, 1.5)])
def test_nan_inf_or_out_of_range_parameters_are_refused_before_any_charge(hook, sigma, q):
    w, model, client = _training_worker(hook, "rt-hcr-bad", 40)
    with pytest.raises(PrivacyParameterError):
        client.sanitized_gradient(model, None, None, q, noise_multiplier=sigma)
    assert _spent(w) == 0


def _hidden_dataset(hook, name: str, n: int):
    w = sy.VirtualWorker(hook, id=name)
    x = torch.rand(10, 2)
    w.load(x, tags=("#h", "#data"), private=True)
    w.load(torch.zeros(10, 1), tags=("#h", "#target"), private=True)
    w.enable_dp("h", budgets={"me": (10.0, 0.5)}, hide_count=True, max_records=BOUND)
    x.data = torch.rand(n, 2)
    return w


def test_a_policy_set_on_data_past_the_bound_warns_the_owner(hook, caplog):
    """Must hold: the owner's set_policy on data of 65 records (bound 64) logs that DP releases read only
    its first 64; the console's dataset row says it; data within the bound says nothing; a scientist's
    search still sees no count."""
    for n, warned in ((65, True), (64, False)):
        w = _hidden_dataset(hook, f"rt-hcr-policy-{n}", n)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="veil.dp.bound_note"):
            w.set_policy("h", "dp-only")
        lines = [r.getMessage() for r in caplog.records if r.name == "veil.dp.bound_note"]
        assert bool(lines) is warned, lines
        if warned:
            assert len(lines) == 1 and "first 64 records" in lines[0] and "65 records" in lines[0], lines
        notes = {tuple(r["tags"]): r["bound_note"] for r in views.datasets(w)}
        assert (notes[("#h", "#data")] is not None) is warned and notes[("#h", "#target")] is None, notes
        assert tuple(w.search("#data")[0].shape) == (0, 2)  # (a scientist's view: still no count)


def test_a_search_meeting_a_stored_nested_tensor_answers_the_others(hook):
    """Attack (availability): a nested tensor among the owner's data made every session's search fail
    ("NestedTensorImpl doesn't support sizes"). Must hold: the search answers the tensors it can point to,
    the nested one left out, and the worker keeps serving."""
    w = sy.VirtualWorker(hook, id="rt-hcr-nested")
    w.load(torch.nested.nested_tensor([torch.rand(2), torch.rand(3)]), tags=("#n",), private=True)
    w.load(torch.arange(3.0), tags=("#n", "#plain"))
    found = w.search("#n")
    assert [tuple(p.shape) for p in found] == [(3,)]
    assert torch.equal(found[0].get(), torch.arange(3.0))
    assert [tuple(p.shape) for p in w.search("#plain")] == [(3,)]
