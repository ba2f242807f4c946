"""Offline/online split of the worker dealer: dealing ahead, the budget, single use of material."""

import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.exceptions import VeilError
from veil.mpc import beaver
from veil.mpc.opening import count_openings
from veil.mpc.providers.base import MaterialExhaustedError
from veil.mpc.providers.worker_dealer import WorkerDealer, dealer_for


@pytest.fixture
def setup(hook):
    parties = [sy.VirtualWorker(hook, id=n) for n in ("alice", "bob")]
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    return parties, cp, dealer_for(cp, hook.local_worker)


def _served_ids(dealer, monkeypatch) -> list:
    """Records, for every item the dealer serves, the ids of all its shares at the parties."""
    served = []
    take = WorkerDealer._take

    def spy(self, kind, spec, parties):
        item = take(self, kind, spec, parties)
        served.append([(p, ptr.id_at_location) for p, shares in item.items() for ptr in shares])
        return item

    monkeypatch.setattr(WorkerDealer, "_take", spy)
    return served


def _step(parties, cp):
    a, b = torch.randn(50), torch.randn(50)
    x = a.fix_precision().share(*parties, crypto_provider=cp)
    y = b.fix_precision().share(*parties, crypto_provider=cp)
    return lambda: F.relu(x * y), a, b


def test_dealt_ahead_material_runs_the_online_phase_alone(setup):
    parties, cp, dealer = setup
    step, a, b = _step(parties, cp)
    with dealer.record() as plan:
        step()
    assert plan.items == 3  # a triple, a truncation pair, comparison material
    report = dealer.deal_ahead(plan, repeat=2)
    assert report["items"] == 6 and report["left_out"] == 0 and dealer.ahead_bytes == report["bytes"]
    requests = dealer.requests
    dealer.on_exhausted = "raise"
    try:
        for _ in range(2):
            out = step()
            torch.testing.assert_close(out.get().float_precision(), F.relu(a * b), atol=1e-3, rtol=0)
        assert dealer.requests == requests and dealer.ahead_bytes == 0  # no dealing online
        with pytest.raises(MaterialExhaustedError, match="deal_ahead more"):
            step()
    finally:
        dealer.on_exhausted = "deal"
    step()  # falls back to dealing on demand


def test_budget_bounds_material_held_ahead(setup):
    parties, cp, dealer = setup
    step, _, _ = _step(parties, cp)
    with dealer.record() as plan:
        step()
    dealer.budget_bytes = 20_000  # room for some items only
    try:
        report = dealer.deal_ahead(plan, repeat=10)
        assert 0 < report["items"] < 30 and report["left_out"] == 30 - report["items"]
        assert dealer.ahead_bytes <= dealer.budget_bytes
    finally:
        dealer.budget_bytes = 1 << 30
        dealer.drop_ahead()
    with pytest.raises(ValueError, match="on_exhausted"):
        WorkerDealer(cp, parties[0], on_exhausted="maybe")


def test_material_is_served_once_even_after_an_error(setup, monkeypatch):
    parties, cp, dealer = setup
    served = _served_ids(dealer, monkeypatch)
    step, _, _ = _step(parties, cp)
    with dealer.record() as plan:
        step()
    dealer.deal_ahead(plan, repeat=3)
    step()
    real_open = beaver.open_at_parties

    def failing_open(*args, **kwargs):  # the triple is taken, then the protocol fails
        raise RuntimeError("party unreachable")

    monkeypatch.setattr(beaver, "open_at_parties", failing_open)
    with pytest.raises(RuntimeError, match="unreachable"):
        step()
    monkeypatch.setattr(beaver, "open_at_parties", real_open)
    step()
    step()  # beyond the material dealt ahead: on demand
    ids = [i for item in served for i in item]
    assert len(served) >= 10 and len(ids) == len(set(ids)), "an item (or one of its shares) was served twice"


def test_seeds_come_from_the_os(monkeypatch, setup):
    import veil.mpc.prg as prg

    calls = []
    real = prg.secrets.token_bytes
    monkeypatch.setattr(prg.secrets, "token_bytes", lambda n: calls.append(n) or real(n))
    parties, cp, dealer = setup
    step, _, _ = _step(parties, cp)
    with count_openings():
        step()
    assert calls and all(n == prg.SEED_BYTES for n in calls)


def test_bad_repeat_is_refused(setup):
    _, _, dealer = setup
    with dealer.record() as plan:
        pass
    with pytest.raises(ValueError, match="repeat"):
        dealer.deal_ahead(plan, repeat=0)
    assert isinstance(MaterialExhaustedError("x"), VeilError)


def test_a_recorded_training_step_is_what_each_step_takes(setup):
    """Plain SGD folds the weight gradients' owed truncation into its update: the recorded plan must not pay
    it too, or every ``deal_ahead(plan)`` deals a truncation pair per weight that no step takes, kept at the
    parties for good (the MLP step of bench_mpc.py: +5.7 MB per party and step)."""
    from torch import nn

    parties, cp, dealer = setup
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    plain = [p.detach().clone() for p in model.parameters()]
    model.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5).fix_precision()
    x, t = torch.randn(4, 6), torch.randn(4, 2)
    sx, st = (v.fix_precision().share(*parties, crypto_provider=cp) for v in (x, t))

    def step():
        opt.zero_grad()
        F.mse_loss(model(sx), st).backward()
        opt.step()

    def spare():  # material dealt and not taken (on-demand dealing deals in growing batches: some is left)
        return {k: len(v) for k, v in dealer._spare.items() if v}

    with dealer.record() as plan:
        step()
    before = spare()
    dealer.deal_ahead(plan, repeat=3)
    dealer.on_exhausted = "raise"
    try:
        for _ in range(3):
            step()
        assert spare() == before  # the steps took all they were dealt ahead, no more and no less
    finally:
        dealer.on_exhausted = "deal"
    # the same four steps in plain torch
    ref = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        for p, v in zip(ref.parameters(), plain):
            p.copy_(v)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for _ in range(4):
        ref_opt.zero_grad()
        F.mse_loss(ref(x), t).backward()
        ref_opt.step()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.get().float_precision(), r.detach(), atol=2e-3, rtol=0)
