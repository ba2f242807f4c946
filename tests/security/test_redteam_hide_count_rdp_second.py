"""Red team, second pass: the replace-one charge of DP-SGD over a hidden count's slots (veil.dp.replace_one,
the ledger's charge_training_step).

Holes found (each test failed on a2d8262's code; see the report):
- Every DP-SGD step recomposed the user's whole history by dp_accounting's PLD accountant, building each
  run's one-step PLD again (0.1-0.9 s a step): an honest fit of N steps paid N builds. The one-step PLD is
  now kept per (sigma, q) and only self-composed (~20 ms), the composed epsilon per history.
- That composition ran inside the ledger's write transaction (its lock is every user's, and SQLite's
  BEGIN IMMEDIATE every process's): one scientist's steps of fresh (sigma, q) held every other user's DP
  release ~1 s each. The step's epsilon is now composed before the transaction, which recomposes the same
  history from the caches (a history changed meanwhile is composed again there: never a stale charge).
- A step whose budget was refused recorded nothing, so the cap on distinct (sigma, q) pairs never counted
  it: a scientist out of budget could send steps of ever new pairs, each composing a new PLD. Pairs a
  refused step tried now count toward the cap (per ledger, in memory).
- The PLD's noise floor (PLD_MIN_NOISE) was checked on the replace-one runs only: an add/remove run of a
  small sigma in the same history (a ledger shared with a worker not hiding its count, or a history
  charged at sigma / 2 before a2d8262) was composed by the PLD (sigma 0.1, q 1: 6.6 s, 200 MiB).
- The same for a worker with accountant="pld" (add/remove): each step rebuilt its PLDs at the library's
  1e-4 interval (1-4 s) under the ledger's lock. Its one-step PLDs are kept too (veil.dp.pld_cache), by
  bytes (64 MiB): up to ~6 MiB each, 32 kept by count could hold hundreds of MiB.
Held (guards): a scientist's policy message on data past the bound is refused before the owner's note is
logged, and nothing of the count reaches her (the note is the owner's log and console only); the charge of
a history split past PLD_MAX_RUNS, or mixing both relations, is at least the library's optimistic
replace-one estimate of the whole history; a noise multiplier above the clamp is charged at least its own
cost; the cached composition equals dp_accounting's PLDAccountant exactly.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from review_steps import shows_number
from server_sessions import open_session, quota_worker, request

import veil as sy
from tests.security.test_redteam_hide_count_rdp import _training_worker
from veil.dp import pld_cache, replace_one
from veil.dp.accountant import MAX_ACCOUNTED_NOISE, Accountant, _rdp_epsilon, dp_lib, sgm_event
from veil.dp.budget import MAX_TRAINING_EVENTS, BudgetLedger
from veil.dp.errors import BudgetExceededError, PrivacyParameterError
from veil.governance.wire import AdminPolicyMessage
from veil.messaging import messages as m

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _quiet_absl():
    logging.getLogger("absl").setLevel(logging.ERROR)


class _Builds:
    """Counts the one-step PLD builds (by sigma), and those made while ``lock`` is held by the builder."""

    def __init__(self, monkeypatch, lock=None, refuse_below=None):
        self.sigmas: list[float] = []
        self.under_lock: list[float] = []
        real = pld_lib.from_gaussian_mechanism

        def counting(standard_deviation, *a, **k):
            if refuse_below is not None and standard_deviation < refuse_below:
                raise AssertionError(f"a PLD built at sigma {standard_deviation}")
            self.sigmas.append(standard_deviation)
            if lock is not None and lock._is_owned():
                self.under_lock.append(standard_deviation)
            return real(standard_deviation, *a, **k)

        monkeypatch.setattr(pld_lib, "from_gaussian_mechanism", counting)


def _optimistic(runs, delta=DELTA):
    """The library's optimistic (lower) replace-one PLD estimate of ``runs``: any sound charge is above it."""
    total = None
    for s, q, c in runs:
        one = pld_lib.from_gaussian_mechanism(s, sampling_prob=q, pessimistic_estimate=False,
                                              value_discretization_interval=1e-3,
                                              neighboring_relation=dp_lib().NeighboringRelation.REPLACE_ONE)
        total = one.self_compose(c) if total is None else total.compose(one.self_compose(c))
    return total.get_epsilon_for_delta(delta)


def test_an_honest_fit_builds_its_step_pld_once_not_at_every_step(hook, monkeypatch):
    """Attack (cost): a fit of N DP-SGD steps is N charges, each recomposing the history. Must hold: the
    one-step PLD of the fit's (sigma, q) is built once for the whole fit, not once per step."""
    sigma, steps = 1.0437, 4  # (a sigma no other test composes: the build is this fit's)
    w, model, client = _training_worker(hook, "rt-hcr2-fit", 40)
    builds = _Builds(monkeypatch)
    for _ in range(steps):
        client.sanitized_gradient(model, None, None, 0.01, noise_multiplier=sigma)
    assert builds.sigmas.count(sigma) <= 1, builds.sigmas
    acc = Accountant("rdp")
    acc.step(sigma, 0.01, steps, replace_one=True)
    assert sy.dp.remaining_budget(w, spent=True)[0] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)


def test_a_step_composes_no_pld_under_the_ledger_lock(tmp_path, monkeypatch):
    """Attack (starvation): a scientist's steps of fresh (sigma, q) each built a PLD inside the ledger's
    write transaction, whose lock every other user's charge waits for. Must hold: no PLD is built while
    the charging thread holds the ledger's lock; the charge is the accountant's epsilon."""
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.set_budget("eve", 1e6, 0.5)
    builds = _Builds(monkeypatch, lock=ledger._lock)
    runs = [(0.8123, 0.2), (0.8124, 0.05)]
    for s, q in runs:
        ledger.charge_training_step("eve", s, q, DELTA, replace_one=True)
    assert builds.sigmas and not builds.under_lock, builds.under_lock
    acc = Accountant("rdp")
    for s, q in runs:
        acc.step(s, q, replace_one=True)
    assert ledger.spent("eve")[0] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)


def test_the_kept_one_step_plds_stay_within_their_bytes(monkeypatch):
    """Attack (memory): one-step PLDs are kept between charges, ~80 KiB to ~6 MiB each (more at small sigma);
    kept by count, a scientist's distinct pairs (16 per user) could hold hundreds of MiB. Must hold: the kept
    bytes stay within ONE_STEP_BYTES, the most recent kept, and a PLD dropped is built again the same."""
    from veil.workers.user_caches import ScopedCache

    first = pld_cache._build(1.0, 0.01, True, 1e-3)
    one, want = pld_cache._pld_bytes(first), first.self_compose(3).get_epsilon_for_delta(DELTA)
    monkeypatch.setattr(pld_cache, "_kept", ScopedCache(int(one * 2.5), int(one * 2.5)))  # (per user, all users)
    first = pld_cache.one_step_pld(1.0, 0.01, True, 1e-3)
    for i in range(1, 5):
        pld_cache.one_step_pld(1.0 + i / 100, 0.01, True, 1e-3)
    assert pld_cache._kept.weight() <= int(one * 2.5)
    assert pld_cache._kept.keys(None) == [(1.03, 0.01, True, 1e-3), (1.04, 0.01, True, 1e-3)]
    again = pld_cache.one_step_pld(1.0, 0.01, True, 1e-3)
    assert again is not first and again.self_compose(3).get_epsilon_for_delta(DELTA) == want


def test_a_history_changed_while_composing_is_charged_for_its_new_state(tmp_path, monkeypatch):
    """Guard (the composition moved out of the transaction): another process's step landing between the
    composition and the transaction must not leave the charge of the history without it."""
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.set_budget("eve", 1e6, 0.5)
    ledger.charge_training_step("eve", 1.0, 0.05, DELTA, replace_one=True)
    other = BudgetLedger(tmp_path / "ledger.db")  # (a second worker process's connection)
    real, raced = Accountant.get_epsilon, threading.Event()

    def racing(self, delta):
        if not raced.is_set() and not ledger._lock._is_owned():  # (composing before the transaction)
            raced.set()
            other.charge_training_step("eve", 1.0, 0.05, DELTA, replace_one=True)
        return real(self, delta)

    monkeypatch.setattr(Accountant, "get_epsilon", racing)
    ledger.charge_training_step("eve", 1.0, 0.05, DELTA, replace_one=True)
    monkeypatch.setattr(Accountant, "get_epsilon", real)
    acc = Accountant("rdp")
    acc.step(1.0, 0.05, 3, replace_one=True)
    assert raced.is_set()
    assert ledger.spent("eve")[0] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    other.close()
    ledger.close()


def test_refused_steps_of_ever_new_pairs_stop_at_the_cap(tmp_path, monkeypatch):
    """Attack (starvation): a scientist out of budget sends steps of ever new (sigma, q): each composed a
    new PLD and was refused, recording nothing, so the distinct-pairs cap never counted them. Must hold:
    after MAX_TRAINING_EVENTS distinct pairs tried, a new one is refused before any composition."""
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.set_budget("eve", 1e-9, 0.5)
    builds = _Builds(monkeypatch)
    for i in range(MAX_TRAINING_EVENTS + 4):
        with pytest.raises((BudgetExceededError, PrivacyParameterError)):
            ledger.charge_training_step("eve", 5.0 + i / 1000, 0.001, DELTA, replace_one=True)
    assert len(builds.sigmas) <= MAX_TRAINING_EVENTS, len(builds.sigmas)
    with pytest.raises(PrivacyParameterError, match="distinct"):
        ledger.charge_training_step("eve", 7.0, 0.001, DELTA, replace_one=True)
    assert ledger.spent("eve") == (0.0, 0.0)


def test_a_small_noise_add_remove_run_is_not_composed_by_the_pld(monkeypatch):
    """Attack (time): the PLD's noise floor was checked on replace-one runs only; an add/remove run of
    sigma 0.2 in the same history (a ledger a worker without a hidden count shares) was composed by the
    PLD (seconds, hundreds of MiB). Must hold: no PLD below PLD_MIN_NOISE; the sigma / 2 bound charged."""
    _Builds(monkeypatch, refuse_below=replace_one.PLD_MIN_NOISE)
    acc = Accountant("rdp")
    acc.step(0.2, 1.0)
    acc.step(1.0, 0.01, replace_one=True)
    assert acc.get_epsilon(DELTA) == _rdp_epsilon([[0.2, 1.0, 1], [0.5, 0.01, 1]], DELTA)


def test_the_cached_composition_equals_the_library_accountant():
    """Guard: the one-step PLDs kept per (sigma, q) compose to exactly what dp_accounting's PLDAccountant
    answers for the same replace-one history."""
    lib = dp_lib()
    for runs in ([[1.0, 0.01, 100]], [[1.0, 0.01, 50], [2.0, 1.0, 2]]):
        acc = lib.pld.PLDAccountant(lib.NeighboringRelation.REPLACE_ONE,
                                    value_discretization_interval=replace_one.PLD_DISCRETIZATION)
        acc.compose(lib.ComposedDpEvent([lib.SelfComposedDpEvent(
            lib.PoissonSampledDpEvent(q, lib.GaussianDpEvent(s)), c) for s, q, c in runs]))
        want = float(acc.get_epsilon(DELTA))
        assert replace_one._pld_epsilon(lib, runs, DELTA) == want
        assert replace_one._pld_epsilon(lib, runs, DELTA) == want  # (cached)
    assert pld_cache.one_step_pld(1.0, 0.01, True, 1e-3)._pmf_remove._pessimistic_estimate  # (an upper bound)


@pytest.mark.slow
def test_the_pld_accountants_add_remove_steps_compose_outside_the_lock_to_the_library_value(tmp_path, monkeypatch):
    """Attack (starvation, a worker with accountant="pld"): each add/remove step built its PLDs at the
    library's 1e-4 interval (1-4 s) under the ledger's lock. Must hold: no build under the lock; the charge
    is exactly dp_accounting's PLDAccountant of the history."""
    lib = dp_lib()
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.set_budget("eve", 1e6, 0.5)
    builds = _Builds(monkeypatch, lock=ledger._lock)
    runs = [(1.0371, 0.01), (1.0371, 0.01), (2.0371, 0.5)]
    for s, q in runs:
        ledger.charge_training_step("eve", s, q, DELTA, mechanism="pld")
    assert builds.sigmas and not builds.under_lock, builds.under_lock
    acc = lib.pld.PLDAccountant()
    acc.compose(lib.ComposedDpEvent([sgm_event(1.0371, 0.01, 2), sgm_event(2.0371, 0.5, 1)]))
    assert ledger.spent("eve")[0] == pytest.approx(float(acc.get_epsilon(DELTA)), rel=1e-12)


@pytest.mark.slow
def test_a_history_split_past_the_run_limit_is_charged_above_its_whole_cost():
    """Guard (under-charge): runs split so that PLD_MAX_RUNS sends the charge to the sigma / 2 bound, or
    mixing both relations: each charge is at least the optimistic replace-one PLD of the whole history
    (the min() is of two whole-history bounds, never a mix per run)."""
    runs = [(1.0 + i / 100, 0.05, 20) for i in range(replace_one.PLD_MAX_RUNS + 1)]
    for split in (2, replace_one.PLD_MAX_RUNS + 1):
        acc = Accountant("rdp")
        for i, (s, q, c) in enumerate(runs[:split]):
            acc.step(s, q, c, replace_one=bool(i % 2))
        assert acc.get_epsilon(DELTA) >= _optimistic(runs[:split]) * (1 - 1e-9)


@pytest.mark.parametrize("sigma", [MAX_ACCOUNTED_NOISE, MAX_ACCOUNTED_NOISE * 3])
def test_a_noise_multiplier_past_the_clamp_is_over_charged(sigma):
    """Guard: sigma above MAX_ACCOUNTED_NOISE is accounted at it, never below its own cost."""
    acc = Accountant("rdp")
    acc.step(sigma, 1.0, 5, replace_one=True)
    assert acc.get_epsilon(DELTA) >= _optimistic([(sigma, 1.0, 5)])


def test_a_scientist_neither_triggers_nor_reads_the_owners_past_bound_note(hook, caplog):
    """Attack (the count): the owner's note names the record count past max_records. A scientist sends the
    owner's policy message on that data. Must hold: refused (PermissionDeniedError) with no note logged and
    nothing of the count in the reply or a search; the owner's own change logs it."""
    srv = quota_worker(hook, "rt-hcr2-note", "rt-hcr2-scientist-token", None)
    x = torch.rand(8, 3)
    srv.load(x, tags=("#c", "#data"), private=True)
    srv.load(torch.rand(8, 1), tags=("#c", "#target"), private=True)
    srv.enable_dp("c", hide_count=True, max_records=8, budgets={"sci": (1.0, 1e-3)})
    x.data = torch.rand(73, 3)  # (grown past the bound after enable_dp)
    s = open_session(srv, "rt-hcr2-scientist-token")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="veil.dp.bound_note"):
        reply = request(srv, s, AdminPolicyMessage("#c", "dp-only"))
        assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError", reply
        assert not shows_number(str(reply.message), "73"), reply.message
        found = request(srv, s, m.SearchMessage(["#data"])).descriptors
        assert [tuple(d.shape) for d in found] == [(0, 3)]
        assert not [r for r in caplog.records if r.name == "veil.dp.bound_note"]
        srv.set_policy("#c", "dp-only")
    assert [r.getMessage() for r in caplog.records if r.name == "veil.dp.bound_note"][0].count("73 records") == 1
