"""Red team, fresh pass: DP outside DP-SGD: PATE's accounting (veil/dp/pate.py, veil/compat/pate_analysis.py),
the accountant and budget ledger, and the federated data owner (veil/dp/federated.py).

Attackers: a hostile scientist who picks every parameter of an analysis or a release (noise, rates, deltas,
step counts) and may call a data owner from several threads at once. Each test asserts the SAFE behaviour.

Holes found (tests were strict xfail on the code before the fix, now pass):

1. PATE accounting took NaN for a privacy parameter and reported a guarantee: ``gnmax_epsilon_data_independent``
   with sigma NaN or delta NaN gave epsilon 0.0 (dp_accounting's conversion returns 0 for a NaN delta), the
   data-dependent and Confident-GNMax analyses too; ``lnmax_epsilon`` and ``perform_analysis`` returned NaN
   (``eps > budget`` is False for NaN). Fixed: every analysis checks sigma / gamma (finite, > 0), delta (in
   (0, 1)), query counts and teacher labels first (``pate._check_*``, ``pate_analysis``) with one
   PrivacyParameterError.
2. ``gnmax_rdp_data_dependent`` at ``log q = -inf`` (a consensus whose union bound underflows: sigma2 = 1e-160)
   returned NaN at every order, and in ``confident_gnmax_epsilon`` that NaN erased the *threshold* cost of
   every other query: epsilon 0.0 for any number of answers. Fixed: q = 0 is the deterministic limit (RDP 0,
   as the paper's code), and any NaN order falls back to the data-independent bound.
3. ``Accountant.step(count=nan)`` was accepted (``nan < 1`` is False) and RDP reported epsilon 0.0 for the
   whole history; fractional counts were composed as 1.5 steps. Fixed: a count is a whole number >= 1
   (``operator.index``), also when a state dict is loaded.
4. ``DPDataOwner.sanitized_gradient`` checked the budget, then charged: two threads both passed the check of
   the last release the budget allowed and both were answered (the epsilon spent went past the budget).
   Fixed: the check and the charge run under the owner's lock.
5. ``DPDataOwner`` kept every (sigma, q) a requester asked for: alternating two pairs grew its accountant's
   history by one run per release and any number of distinct pairs could be recorded, and every later budget
   check (a PLD composition of the whole history) took longer each time. Fixed: runs of one pair are merged
   (composition does not depend on the order) and a new pair past ``MAX_TRAINING_EVENTS`` is refused before
   the charge, as the worker ledger does.
6. ``DPDataOwner`` took a NaN budget epsilon (one release answered, as max_releases compares with NaN) and an
   infinite clipping bound or noise multiplier. Fixed: refused when the owner builds it.
7. ``enable_dp(accountant=...)`` took any name (every DP-SGD request then failed at its charge with a
   ValueError about the owner's typo), and an infinite clipping bound or sigma. Fixed: refused when the owner
   configures it.

Checks that held (kept as regressions): LNMax's PLD accounting upper-bounds the exact count-vector mechanism
and equals dp_accounting's; the ledger's float drift cannot buy a charge past the total.
"""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import dp_accounting
import veil as sy
from veil.compat.pate_analysis import perform_analysis
from veil.dp import federated, pate, per_sample
from veil.dp.accountant import Accountant, epsilon_for
from veil.dp.budget import MAX_TRAINING_EVENTS, BudgetLedger
from veil.dp.errors import BudgetExceededError, PrivacyParameterError
from veil.ids import new_id
from veil.messaging import messages as m

from server_sessions import open_session, quota_worker, request

TOKEN = "redteam-dp-fresh-scientist-token"

NAN, INF = float("nan"), float("inf")
PREDS = torch.zeros(5, 4, dtype=torch.long)  # five unanimous teachers, four examples, label 0


# ============================================================================================ holes

PATE_CALLS = {
    "gnmax_indep_sigma_nan": lambda: pate.gnmax_epsilon_data_independent(3, NAN, 1e-5),
    "gnmax_indep_delta_nan": lambda: pate.gnmax_epsilon_data_independent(3, 1.0, NAN),
    "gnmax_indep_delta_one": lambda: pate.gnmax_epsilon_data_independent(3, 1.0, 1.0),
    "gnmax_indep_queries_float": lambda: pate.gnmax_epsilon_data_independent(2.5, 1.0, 1e-5),
    "gnmax_dep_sigma_nan": lambda: pate.gnmax_epsilon_data_dependent(PREDS, [0, 1], 4, NAN, 1e-5),
    "gnmax_dep_sigma_negative": lambda: pate.gnmax_epsilon_data_dependent(PREDS, [0, 1], 4, -1.0, 1e-5),
    "gnmax_dep_delta_nan": lambda: pate.gnmax_epsilon_data_dependent(PREDS, [0, 1], 4, 1.0, NAN),
    "gnmax_dep_one_class": lambda: pate.gnmax_epsilon_data_dependent(PREDS, [0], 1, 1.0, 1e-5),
    "gnmax_dep_label_outside": lambda: pate.gnmax_epsilon_data_dependent(PREDS + 4, [0], 4, 1.0, 1e-5),
    "gnmax_dep_query_outside": lambda: pate.gnmax_epsilon_data_dependent(PREDS, [4], 4, 1.0, 1e-5),
    "confident_sigma1_nan": lambda: pate.confident_gnmax_epsilon(PREDS, [0], [True], 4, NAN, 1.0, 1e-5),
    "confident_sigma2_nan": lambda: pate.confident_gnmax_epsilon(PREDS, [0], [True], 4, 1.0, NAN, 1e-5),
    "lnmax_gamma_nan": lambda: pate.lnmax_epsilon(3, NAN, 0.0),
    "lnmax_gamma_negative": lambda: pate.lnmax_epsilon(3, -1.0, 0.0),
    "lnmax_queries_negative": lambda: pate.lnmax_epsilon(-3, 0.1, 0.0),
    "lnmax_delta_nan": lambda: pate.lnmax_epsilon(3, 0.1, NAN),
    "perform_analysis_gamma_nan": lambda: perform_analysis(PREDS.numpy(), [0, 1], NAN, 1e-5, num_classes=4),
    "perform_analysis_gamma_inf": lambda: perform_analysis(PREDS.numpy(), [0, 1], INF, 1e-5, num_classes=4),
}


@pytest.mark.parametrize("case", sorted(PATE_CALLS))
def test_pate_accounting_refuses_nan_and_out_of_range_parameters(case):
    """Attack: a NaN sigma or delta (or a step count of -3, a label the votes cannot have) handed to PATE's
    accounting. A NaN or 0.0 epsilon passes every ``epsilon > budget`` check; it must be refused, in one
    line, with PrivacyParameterError (before: 0.0 or NaN for most of these, math/torch errors for the rest)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PrivacyParameterError) as info:
            PATE_CALLS[case]()
    assert "\n" not in str(info.value)
    assert "index" not in str(info.value)  # (a teacher's vote is not quoted back)


def test_one_underflowing_answer_does_not_erase_the_threshold_cost_of_every_query():
    """Attack: Confident-GNMax with sigma2 = 1e-160: a unanimous vote's log q underflows to -inf, its data-
    dependent RDP was NaN at every order, and the total (threshold checks of all 50 queries included) became
    NaN: epsilon 0.0. Must hold: no NaN RDP; the epsilon is at least that of the threshold checks alone."""
    preds = torch.zeros(50, 50, dtype=torch.long)
    orders = pate.DEFAULT_ORDERS
    rdp = pate.gnmax_rdp_data_dependent(-math.inf, 1.0, orders)
    assert not np.isnan(rdp).any() and (rdp >= 0).all() and (rdp <= orders + 1e-12).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        answered = pate.confident_gnmax_epsilon(preds, range(50), [True] * 50, 10, 2.0, 1e-160, 1e-5)
    threshold_only = pate.confident_gnmax_epsilon(preds, range(50), [False] * 50, 10, 2.0, 1e-160, 1e-5)
    lib = dp_accounting
    acc = lib.rdp.RdpAccountant(list(orders))
    acc.compose(lib.GaussianDpEvent(2.0), 50)  # sensitivity-1 Gaussian threshold check, 50 times
    assert threshold_only == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert answered >= threshold_only > 1.0


@pytest.mark.parametrize("count", [NAN, INF, 1.5, 0, -2])
def test_accountant_counts_only_whole_steps(count):
    """Attack: ``Accountant.step(sigma, q, count=nan)``: RDP's epsilon of the history became 0.0 (NaN steps
    composed to nothing). Must hold: refused (PrivacyParameterError), nothing recorded; the same count in a
    state dict is refused on load."""
    acc = Accountant("rdp")
    acc.step(1.0, 0.01, 3)
    before = acc.get_epsilon(1e-5)
    with pytest.raises(PrivacyParameterError):
        acc.step(1.0, 0.01, count)
    assert acc.history == [[1.0, 0.01, 3]] and acc.get_epsilon(1e-5) == before
    with pytest.raises(PrivacyParameterError):
        Accountant.from_state_dict({"mechanism": "rdp", "history": [[1.0, 0.01, count]]})


def _data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=g)
    return x, x.sum(1, keepdim=True)


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).flatten(1).sum(1)


def test_two_threads_cannot_both_spend_the_last_release_of_a_federated_owner(monkeypatch):
    """Attack: the owner's budget allows exactly one release (sigma 1, q 0.5); two threads ask at once. The
    budget check and the charge were separate steps with the model's copy and validation between them: a
    barrier there (both threads past the check, as a thread switch at that moment does) let both be answered.
    Must hold: one release, one BudgetExceededError, the owner's epsilon within its budget."""
    sigma, q, delta = 1.0, 0.5, 1e-5
    eps = epsilon_for(sigma, q, 1, delta, "rdp") * 1.001
    assert epsilon_for(sigma, q, 2, delta, "rdp") > eps  # (a second release does not fit)
    x, y = _data()
    owner = federated.DPDataOwner(x, y, max_grad_norm=1.0, noise_multiplier=sigma, budget=(eps, delta),
                                  accountant="rdp")
    barrier = threading.Barrier(2, timeout=1.0)
    real = per_sample.validate

    def between_check_and_charge(module):  # both threads past the budget check at once, neither charged yet
        try:
            barrier.wait()
        except threading.BrokenBarrierError:  # (one thread kept out until the other was charged)
            pass
        return real(module)

    monkeypatch.setattr(per_sample, "validate", between_check_and_charge)
    model = nn.Linear(3, 1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    outcomes: list = []

    def ask() -> None:
        try:
            owner.sanitized_gradient(model, params, _mse, q)
            outcomes.append("released")
        except BudgetExceededError:
            outcomes.append("refused")

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["refused", "released"]
    assert owner.accountant.steps == 1 and owner.epsilon(delta) <= eps


def test_a_federated_owner_keeps_a_bounded_accountant_whatever_rates_are_asked():
    """Attack (resources): the scientist alternates two sample rates (each release a new run of the history),
    then asks for ever new ones: the owner's accountant grew by one run per release, and each budget check
    composes the whole history. Must hold: alternating pairs keep two runs; a pair past MAX_TRAINING_EVENTS
    distinct ones is refused before the charge (PrivacyParameterError); the known pairs still work."""
    x, y = _data()
    owner = federated.DPDataOwner(x, y, max_grad_norm=1.0, noise_multiplier=1.0, accountant="rdp")
    model = nn.Linear(3, 1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    for i in range(8):
        owner.sanitized_gradient(model, params, _mse, 0.5 if i % 2 else 0.25)
    assert len(owner.accountant.history) == 2 and owner.accountant.steps == 8
    rates = [0.3 + 0.01 * i for i in range(MAX_TRAINING_EVENTS - 2)]
    for r in rates:
        owner.sanitized_gradient(model, params, _mse, r)
    with pytest.raises(PrivacyParameterError):
        owner.sanitized_gradient(model, params, _mse, 0.9)
    assert owner.accountant.steps == 8 + len(rates)  # the refused one was not charged
    owner.sanitized_gradient(model, params, _mse, 0.25)  # a known pair
    assert len(owner.accountant.history) == MAX_TRAINING_EVENTS


@pytest.mark.parametrize("setting", [{"budget": (NAN, 1e-5)}, {"budget": (1.0, NAN)}, {"max_grad_norm": INF},
                                     {"noise_multiplier": INF}])
def test_a_federated_owner_refuses_a_nan_budget_or_an_infinite_clip(setting):
    """``DPDataOwner(budget=(nan, delta))`` was accepted and answered one release (max_releases compares with
    NaN), then refused; ``max_grad_norm=inf`` clips nothing (no sensitivity at all). Must hold: refused when
    the owner builds it, with PrivacyParameterError."""
    x, y = _data()
    kwargs = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, **setting}
    with pytest.raises(PrivacyParameterError):
        federated.DPDataOwner(x, y, accountant="rdp", **kwargs)


@pytest.mark.parametrize("setting", [{"accountant": "rpd"}, {"max_grad_norm": INF}, {"noise_multiplier": INF}])
def test_a_worker_owner_refuses_an_unknown_accountant_or_an_infinite_clip(hook, setting):
    """``enable_dp(accountant="rpd")`` was accepted, and every DP-SGD request then failed at its charge with a
    ValueError about the owner's typo; ``max_grad_norm=inf`` (``--dp-clip inf``) clips nothing, and an infinite
    sigma failed every release after its charge. Must hold: refused at configuration, in one line."""
    w = sy.VirtualWorker(hook, id=f"rt_dp_fresh_config_{sorted(setting)[0]}")
    kwargs = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, **setting}
    with pytest.raises(PrivacyParameterError) as info:
        w.enable_dp(**kwargs)
    assert "\n" not in str(info.value)


# ==================================================================================== defences that held

@pytest.mark.parametrize("gamma, queries", [(0.05, 1), (0.5, 10), (0.2, 60)])
def test_lnmax_accounting_bounds_the_exact_count_vector_mechanism(gamma, queries):
    """LNMax adds Lap(1/gamma) to every count; one teacher's vote moves two counts by one each, so the exact
    privacy loss of the noisy count vector is two Laplace mechanisms of sensitivity 1 composed (its argmax is
    post-processing). The charged epsilon must be at least that PLD's, equal dp_accounting's PLD of the
    1-D event veil names, and never above basic composition (2 gamma per query)."""
    delta = 1e-6
    lib = dp_accounting
    exact = lib.pld.PLDAccountant()
    exact.compose(lib.LaplaceDpEvent(1 / gamma), 2 * queries)
    named = lib.pld.PLDAccountant()
    named.compose(lib.LaplaceDpEvent(1 / (2 * gamma)), queries)
    charged = pate.lnmax_epsilon(queries, gamma, delta)
    assert charged >= exact.get_epsilon(delta) * (1 - 1e-9)
    assert charged == pytest.approx(min(named.get_epsilon(delta), 2 * gamma * queries), rel=1e-9)
    assert charged <= 2 * gamma * queries and pate.lnmax_epsilon(queries, gamma) == 2 * gamma * queries


def test_a_query_cannot_store_its_answer_over_the_owners_dataset(hook):
    """Attack (write by aliasing, replay): a raw ``veil.dp.query`` frame whose return ids name the DP dataset
    itself (the noisy count would replace the owner's records), or one id twice. Must hold: the dataset is
    unchanged, the collision with the owner's id is refused before any charge, and a duplicate id costs at
    most the one charge of a release (never a second)."""
    srv = quota_worker(hook, "rt_dp_fresh_alias", TOKEN, None)
    data = torch.rand(6, 2)
    srv.load(data.clone(), tags=("#c", "#data"), private=True)
    srv.load(torch.rand(6, 1), tags=("#c", "#target"), private=True)
    dp = srv.enable_dp("c", budgets={"sci": (5.0, 0.0)}, hide_count=True)
    session = open_session(srv, TOKEN)
    (desc,) = request(srv, session, m.SearchMessage(["#c", "#data"])).descriptors
    assert desc.shape == (0, 2)  # (the count hidden)
    ref = m.ObjectRef(desc.id)
    reply = request(srv, session, m.CommandMessage("veil.dp.query", (ref, "count", 1.0), {}, [desc.id, new_id()]))
    assert type(reply) is m.ErrorReply and dp.ledger.spent("sci") == (0.0, 0.0)
    rid = new_id()
    reply = request(srv, session, m.CommandMessage("veil.dp.query", (ref, "count", 1.0), {}, [rid, rid]))
    assert type(reply) is m.ErrorReply and dp.ledger.spent("sci")[0] <= 1.0
    stored = [e.obj for _, e in srv.monitor.owner_entries() if "#data" in e.tags]
    assert len(stored) == 1 and torch.equal(stored[0], data)


def test_float_drift_in_the_ledger_buys_no_charge_past_the_total(tmp_path):
    """Attack: many small charges whose float sum rounds down (0.1 ten times is 0.9999999999999999), from two
    connections to one ledger file. Must hold: the spent total never passes the budget beyond the relative
    1e-9 slack, and the charge past it is refused."""
    path = tmp_path / "ledger.sqlite3"
    first, second = BudgetLedger(path), BudgetLedger(path)
    try:
        first.set_budget("sci", 1.0, 0.0)
        accepted = 0
        for i in range(11):
            try:
                (first if i % 2 else second).charge("sci", 0.1, 0.0, "tiny")
                accepted += 1
            except BudgetExceededError:
                pass
        assert accepted == 10
        spent = first.spent("sci")[0]
        assert spent <= 1.0 * (1 + 1e-9)
        with pytest.raises(BudgetExceededError):
            second.charge("sci", 2e-9, 0.0, "past the slack")
    finally:
        first.close()
        second.close()
