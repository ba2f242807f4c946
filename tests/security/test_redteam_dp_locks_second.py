"""Red team, second pass on today's DP fixes: the per-user release lock and the charge outside the worker's turn
(0c8caf9, c6277c2), Accountant.merge_runs and DPDataOwner's lock (ef82882, b4ddc86, 0e93d6f).

Attacks, each asserting what must hold:

- a release of Alice's waits for her lock outside the turn while another of hers holds it (a slow charge, a
  long DP-SGD lot). That wait looked at nothing: the command ran past the owner's --max-command-seconds, and
  a session that disconnected or was revoked meanwhile was still charged when the lock came free. Must hold:
  the waiting command stops at its deadline in one line, charged nothing;
- the budget query (``veil.dp.budget``) still read the ledger inside the worker's turn: while a charge held
  the ledger (a statement on a stalled server, up to the watchdog's ~10 s), one budget query held every
  session's command. Must hold: another user's ordinary command is answered meanwhile;
- a reader of an Accountant's epsilon (``DPDataOwner.epsilon``, a progress display) racing a release: it
  composed the old history, the release stepped and cleared the cache, and the reader then stored the old
  epsilon in the cleared cache: the owner's reported spend stayed below the truth until the next release.
  Must hold: the epsilon read after the release is that of the whole history;
- the PATE parameter check itself squared sigma with ``**``: a sigma of 1e200 raised a bare OverflowError
  (no PrivacyParameterError, no line saying what is wrong). Must hold: refused in one line;
- regression guards: merging runs never lowers epsilon (compared with dp-accounting composing the unmerged,
  alternating history); one user's lock entry goes when her last release ends, whichever way it ends.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import veil as sy

from tests.security.test_redteam_govdb_third_second import _NetworkDP


# --------------------------------------------------------------------------- waiting for a user's lock


def test_a_release_waiting_for_its_users_lock_stops_at_its_deadline_uncharged(hook, tmp_path):
    """Alice's lock is held (another release of hers, until the test lets it go: up to 120 s); her release on a
    second session waits for it. The owner's limit is 0.5 s a command. Must hold: the waiting release fails at
    about its deadline (within 10 s: slack for a loaded machine), while the lock is still held, says so in one
    line, and is charged nothing (her budget is untouched when the lock comes free)."""
    net = _NetworkDP(hook, tmp_path, str(tmp_path / "ledger.sqlite3"))
    settings, held, release = net.settings, threading.Event(), threading.Event()

    def hold_alice():
        with settings.user_lock("alice"):
            held.set()
            release.wait(120)

    holder = threading.Thread(target=hold_alice, daemon=True)
    try:
        x = torch.arange(20.0).send(net.client("alice"))
        net.worker.max_command_seconds = 0.5
        holder.start()
        assert held.wait(5)
        started = time.monotonic()
        with pytest.raises(Exception) as caught:
            sy.dp.remote_query(x, "count", epsilon=1.0)
        waited = time.monotonic() - started
        still_held = holder.is_alive() and not release.is_set()  # (it ended while the lock was still held)
        release.set()
        holder.join(10)
        time.sleep(0.3)  # (a waiter that outlived its deadline would charge now)
        assert still_held and waited < 10.0, f"the release waited {waited:.1f} s for the lock, past its 0.5 s limit"
        assert "limit" in str(caught.value) and "\n" not in str(caught.value).strip(), caught.value
        assert settings.ledger.spent("alice") == pytest.approx((0.0, 0.0))
        net.worker.max_command_seconds = None
        assert sy.dp.remote_query(x, "count", epsilon=1.0).epsilon == pytest.approx(1.0)  # still served
        assert not settings._user_locks, "a lock of a user with no release in flight was kept"
    finally:
        release.set()
        net.close()


# --------------------------------------------------------------------------- the budget query and the turn


def test_a_budget_query_does_not_hold_the_worker_while_the_ledger_is_busy(hook, tmp_path):
    """A charge holds the ledger (its statement on a stalled server) until Bob is answered, up to 120 s; Alice asks
    for her remaining budget meanwhile, then Bob sends a tensor. Must hold: Bob's command is answered while the
    ledger is still held (one waiting behind it is answered only after it), and Alice's query is answered
    (right) after it."""
    net = _NetworkDP(hook, tmp_path, str(tmp_path / "ledger.sqlite3"))
    settings, held, answers = net.settings, threading.Event(), {}
    bob_answered, let_go = threading.Event(), []
    alice, bob = net.client("alice"), net.client("bob")

    def busy_ledger():
        with settings.ledger._lock:
            held.set()
            let_go.append(bob_answered.wait(120))

    def alice_budget():
        try:
            answers["alice"] = sy.dp.remaining_budget(alice)
        except Exception as e:  # noqa: BLE001 - reported below
            answers["alice"] = e

    try:
        torch.zeros(1).send(bob)  # (both connected first)
        busy = threading.Thread(target=busy_ledger, daemon=True)
        busy.start()
        assert held.wait(5)
        asking = threading.Thread(target=alice_budget, daemon=True)
        asking.start()
        time.sleep(0.3)  # (her query is in the worker, waiting for the ledger)
        started = time.monotonic()
        y = torch.arange(4.0).send(bob)
        waited = time.monotonic() - started
        bob_answered.set()
        asking.join(60)
        busy.join(60)
        assert let_go == [True], f"Bob's command waited {waited:.1f} s behind Alice's budget query"
        assert answers["alice"] == pytest.approx((10.0, 1e-5)), answers
        assert torch.equal(y.get(), torch.arange(4.0))
    finally:
        net.close()


# --------------------------------------------------------------------------- the accountant's epsilon cache


def test_an_epsilon_read_racing_a_release_does_not_stick_below_the_truth(monkeypatch):
    """A reader composes the owner's history (one release); a release steps it meanwhile (two); the reader
    finishes after. Must hold: the owner's epsilon read afterwards is that of both releases, as a fresh
    accountant of the same history gives."""
    from veil.dp import accountant as accountant_mod
    from veil.dp.accountant import Accountant
    from veil.dp.federated import DPDataOwner

    owner = DPDataOwner(torch.randn(8, 3), torch.zeros(8, dtype=torch.long), 1.0, 1.0, accountant="rdp")
    owner.accountant.step(1.1, 0.05)
    real_compute = accountant_mod._rdp_one_step
    composing, resume, calls = threading.Event(), threading.Event(), []

    def paused_in_reader(sigma, q):  # (its second call: the run's count is already read)
        if threading.current_thread().name == "epsilon-reader":
            calls.append(sigma)
            if len(calls) == 2:
                composing.set()
                assert resume.wait(10)
        return real_compute(sigma, q)

    monkeypatch.setattr(accountant_mod, "_rdp_one_step", paused_in_reader)
    reader = threading.Thread(target=owner.epsilon, args=(1e-5,), name="epsilon-reader", daemon=True)
    reader.start()
    assert composing.wait(10)
    owner.accountant.step(1.1, 0.05)  # the release, under the owner's lock (not the reader's)
    resume.set()
    reader.join(10)
    truth = Accountant("rdp")
    truth.step(1.1, 0.05, 2)
    assert owner.epsilon(1e-5) == pytest.approx(truth.get_epsilon(1e-5), rel=1e-12)


# --------------------------------------------------------------------------- regression guards


@pytest.mark.parametrize("mechanism", ["rdp", pytest.param("pld", marks=pytest.mark.slow)])  # (PLD: ~20 s)
def test_merging_runs_never_lowers_epsilon_below_the_unmerged_history(mechanism):
    """Alternating (sigma, q) pairs, merged into one run each, against dp-accounting composing the history as
    it happened (one event per release). Must hold: the merged epsilon is not below the unmerged one (RDP:
    equal; PLD: equal up to its discretisation, never less than 0.1 % below)."""
    from veil.dp.accountant import ACCOUNTANT_FACTORIES, Accountant, sgm_event, dp_lib

    pairs = [(1.1, 0.02), (2.0, 0.05), (1.1, 0.02), (0.9, 0.01), (2.0, 0.05)] * 4
    merged = Accountant(mechanism)
    for s, q in pairs:
        merged.step(s, q)
        merged.merge_runs()
    assert len(merged.history) == 3 and merged.steps == len(pairs)
    plain = ACCOUNTANT_FACTORIES[mechanism]()
    plain.compose(dp_lib().ComposedDpEvent([sgm_event(s, q, 1) for s, q in pairs]))
    unmerged = float(plain.get_epsilon(1e-5))
    if mechanism == "rdp":
        assert merged.get_epsilon(1e-5) == pytest.approx(unmerged, rel=1e-9)
    else:
        assert merged.get_epsilon(1e-5) >= unmerged * (1 - 1e-3)


def test_a_users_lock_entry_goes_when_her_release_fails(hook):
    """A release of Alice's refused at its charge (no budget left) and one whose query fails after it: each
    leaves no lock entry behind, and the next release of hers is not held up."""
    from veil.dp.errors import BudgetExceededError
    from veil.dp.worker_functions import _query
    from veil.dp.worker_owner import enable_dp

    w = sy.VirtualWorker(hook, id=f"dp-locks-2-{time.monotonic_ns()}")
    settings = enable_dp(w, budgets={"alice": (1.0, 1e-5)})
    w.requesting_user = lambda: "alice"
    x = torch.arange(10.0)
    _query(w, x, "count", 1.0)
    with pytest.raises(BudgetExceededError):
        _query(w, x, "count", 1.0)
    assert not settings._user_locks
    settings.set_budget("alice", 5.0, 1e-5)
    out: list = []  # (a lock left held would keep it waiting: on a thread, for 120 s at most)
    querying = threading.Thread(target=lambda: out.append(_query(w, x, "count", 1.0)), daemon=True)
    querying.start()
    querying.join(120)
    assert not querying.is_alive(), "the next release of hers was held up"
    assert float(out[0][1][0]) == pytest.approx(1.0)
    assert not settings._user_locks
    settings.ledger.close()


_HUGE_NOISE_CALLS = {
    "gnmax_independent": lambda pate, v: pate.gnmax_epsilon_data_independent(3, v, 1e-5),
    "gnmax_rdp": lambda pate, v: pate.gnmax_rdp_data_dependent(-5.0, v, pate.DEFAULT_ORDERS),
    "lnmax": lambda pate, v: pate.lnmax_epsilon(3, v, 1e-5),
}


@pytest.mark.parametrize("case", sorted(_HUGE_NOISE_CALLS))
def test_pate_accounting_refuses_a_noise_whose_square_overflows_in_one_line(case):
    """sigma / gamma = 1e200: finite and > 0, but its square is not a float. Must hold: PrivacyParameterError
    naming the parameter, in one line (was a bare OverflowError from the check's own ``** 2``)."""
    from veil.dp import pate
    from veil.dp.errors import PrivacyParameterError

    with pytest.raises(PrivacyParameterError) as caught:
        _HUGE_NOISE_CALLS[case](pate, 1e200)
    assert "\n" not in str(caught.value) and "finite" in str(caught.value)
