"""Background dealing: a thread deals a plan's material while the online phase runs on the same parties."""

import threading

import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST, NO_RESULT, register_worker_function
from veil.mpc.providers.background import BackgroundDealingError
from veil.mpc.providers.base import MaterialExhaustedError
from veil.mpc.providers.worker_dealer import WorkerDealer, dealer_for

PROBE = "tests.requester_probe"


@pytest.fixture
def setup(hook):
    parties = [sy.VirtualWorker(hook, id=n) for n in ("alice", "bob")]
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    dealer = dealer_for(cp, hook.local_worker)
    yield parties, cp, dealer
    dealer.drop_ahead()
    dealer.on_exhausted, dealer.budget_bytes = "deal", 1 << 30


def _step(parties, cp, seed):
    """One online call on fresh inputs: a product (triple + truncation pair) and a ReLU (comparison)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    x, y = (t.fix_precision().share(*parties, crypto_provider=cp) for t in (a, b))
    return F.relu(x * y), F.relu(a * b)


def _check(out, expected):
    torch.testing.assert_close(out.get().float_precision(), expected, atol=1e-3, rtol=0)


def _plan(dealer, parties, cp):
    with dealer.record() as plan:
        _check(*_step(parties, cp, 0))
    return plan


def test_background_dealing_runs_with_the_online_phase(setup):
    parties, cp, dealer = setup
    plan = _plan(dealer, parties, cp)
    dealer.drop_ahead()
    dealer.on_exhausted = "raise"  # every item the calls take comes from the background thread
    job = dealer.deal_ahead(plan, repeat=6, background=True)
    for k in range(6):
        _check(*_step(parties, cp, k + 1))
    summary = job.wait()
    assert summary["items"] == 6 * plan.items and dealer.ahead_bytes == 0
    assert not job.running
    with pytest.raises(MaterialExhaustedError):  # exactly what was asked: nothing more
        _step(parties, cp, 99)


def test_endless_background_dealing_stays_within_the_budget(setup, monkeypatch):
    parties, cp, dealer = setup
    plan = _plan(dealer, parties, cp)
    dealer.drop_ahead()
    per_call = sum(c * dealer._bytes_per_item(k, kind, spec, p) for k, (kind, spec, p, c) in plan.needs.items())
    dealer.budget_bytes = int(2.5 * per_call)  # room for two calls and a half
    waiting = []
    request = WorkerDealer._request

    def spy(self, *args, **kwargs):
        got = request(self, *args, **kwargs)
        waiting.append(self.ahead_bytes)
        return got

    monkeypatch.setattr(WorkerDealer, "_request", spy)
    dealer.on_exhausted = "raise"
    with dealer.start_background(plan) as job:
        for k in range(8):
            _check(*_step(parties, cp, k + 1))
    assert not job.running and job.items >= 8 * plan.items
    assert waiting and max(waiting) <= dealer.budget_bytes
    assert dealer.ahead_bytes <= dealer.budget_bytes  # stopped: what was dealt stays for later calls
    _check(*_step(parties, cp, 50))  # one more call from the leftovers, no dealing
    assert dealer.stop_background() is None


def test_a_failing_dealer_surfaces_its_error_at_the_next_take(setup, monkeypatch):
    parties, cp, dealer = setup
    plan = _plan(dealer, parties, cp)
    dealer.drop_ahead()

    def unreachable(data):
        raise ConnectionError("crypto provider lost")

    monkeypatch.setattr(cp, "_recv_msg", unreachable)
    job = dealer.deal_ahead(plan, repeat=3, background=True)
    with pytest.raises(BackgroundDealingError, match="crypto provider lost") as info:
        _step(parties, cp, 1)
    assert isinstance(info.value.__cause__, ConnectionError)
    assert not job.running and job.stop() == {"items": 0, "bytes": 0}  # surfaced once: stop does not raise
    monkeypatch.undo()
    _check(*_step(parties, cp, 2))  # later takes deal on demand


def test_stop_raises_an_error_no_take_surfaced(setup, monkeypatch):
    parties, cp, dealer = setup
    plan = _plan(dealer, parties, cp)
    monkeypatch.setattr(cp, "_recv_msg", lambda data: (_ for _ in ()).throw(ConnectionError("gone")))
    job = dealer.start_background(plan)
    job._thread.join()  # the thread ended on its first request
    with pytest.raises(BackgroundDealingError, match="gone"):
        dealer.stop_background()
    assert dealer.stop_background() is None


def test_one_background_dealing_at_a_time_and_bad_arguments(setup):
    parties, cp, dealer = setup
    plan = _plan(dealer, parties, cp)
    with dealer.start_background(plan):
        with pytest.raises(RuntimeError, match="already"):
            dealer.start_background(plan)
    with pytest.raises(ValueError, match="repeat"):
        dealer.deal_ahead(plan, repeat=0, background=True)
    dealer.budget_bytes = 100
    with pytest.raises(ValueError, match="budget_bytes"):
        dealer.start_background(plan)


def _probe(worker, barrier, seen):
    """Records who this thread's request is from, before and after the other thread's request started."""
    before = (worker.requester(), worker.requesting_user(), worker.monitor.current_principal().user)
    barrier.wait(timeout=60)  # both requests are being handled at once
    after = (worker.requester(), worker.requesting_user(), worker.monitor.current_principal().user)
    barrier.wait(timeout=60)  # neither request ends before both read
    seen.append((before, after))


if PROBE not in ALLOWLIST._by_name:
    register_worker_function(PROBE, lambda worker, *a: _probe(worker, *_PROBE_STATE), shapes=NO_RESULT)
_PROBE_STATE: list = []


def test_requester_is_per_request_when_two_threads_handle_messages_at_once(hook):
    target = sy.VirtualWorker(hook, id="target")
    senders = [sy.VirtualWorker(hook, id=n) for n in ("sender_a", "sender_b")]
    barrier, seen = threading.Barrier(2), []
    _PROBE_STATE[:] = [barrier, seen]
    errors = []

    def send(sender):
        try:
            sender.send_msg(m.CommandMessage(PROBE, (), {}, [], False), target)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=send, args=(s,)) for s in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(seen) == 2
    for before, after in seen:
        assert before[0] in ("sender_a", "sender_b") and before == (before[0],) * 3
        assert after == before, "a request saw the other thread's requester"
    assert {before[0] for before, _ in seen} == {"sender_a", "sender_b"}
    assert target.requester() is None  # outside requests


def test_background_dealing_over_network_workers(connect_websocket, hook):
    parties = [connect_websocket(n) for n in ("alice", "bob")]
    cp = connect_websocket("dave")
    dealer = dealer_for(cp, hook.local_worker)
    plan = _plan(dealer, parties, cp)
    dealer.drop_ahead()
    dealer.on_exhausted = "raise"
    try:
        job = dealer.deal_ahead(plan, repeat=4, background=True)
        for k in range(4):
            _check(*_step(parties, cp, k + 1))
        assert job.wait()["items"] == 4 * plan.items
    finally:
        dealer.on_exhausted = "deal"
        dealer.drop_ahead()


def test_takes_fall_back_when_the_budget_is_full_of_material_nobody_takes(setup):
    parties, cp, dealer = setup
    plan = _plan(dealer, parties, cp)  # a triple, a truncation pair, comparison material per call
    dealer.drop_ahead()
    per_call = sum(c * dealer._bytes_per_item(k, kind, spec, p) for k, (kind, spec, p, c) in plan.needs.items())
    dealer.budget_bytes = int(1.5 * per_call)
    g = torch.Generator().manual_seed(7)
    values = torch.randn(40, generator=g)
    x = values.fix_precision().share(*parties, crypto_provider=cp)
    with dealer.start_background(plan) as job:
        for _ in range(4):  # ReLUs only: the triples and truncation pairs dealt for the plan stay unused
            _check(F.relu(x), F.relu(values))
        assert job.running  # still waiting for room, not failed
    assert not job.running and job.error is None
    dealer.on_exhausted = "raise"
    with dealer.start_background(plan):
        with pytest.raises(MaterialExhaustedError):
            for _ in range(4):
                F.relu(x)
