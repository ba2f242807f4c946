"""Red team: the owner-side DP release paths (``veil.dp.query``, ``veil.dp.sanitized_gradient``,
``veil.dp.budget``) attacked by a scientist session of a network worker (raw messages through the
authenticated request path, ``serve_bytes``, in process).

The first five tests were holes when a session-45 attacker wrote them (strict xfails then), all in
``veil.dp.sanitized_gradient``: the owner's DP data passed as plan state (``params``) reached every record's
gradient and the free dry run's error text; ``hide_count`` was undone by the noise scale ``sigma C / (q n)``;
complex parameters got real noise only; the plan's ops were not sized against the session quota. Fixed:
owner data enters a DP release only as its data argument (``owner_guard.DP_DATA_ARGS``), trainable
parameters are real floating point, a hidden count is replaced by the owner's public ``nominal_count``, and
the plan is sized on the dry run and the lot computed in chunks that fit the quota. The others assert what held.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

from veil.ids import new_id
from veil.messaging import messages as m
from veil.plans.plan import Plan

from server_sessions import open_session, quota_worker, request

TOKEN = "redteam-dp-scientist-token"
C, SIGMA = 1.0, 1.0


class Owner:
    """A network worker with a DP dataset ``#c`` (data [n, 3], target [n, 1]) and one scientist session."""

    def __init__(self, hook, name: str, n: int = 40, quota: int | None = None, hide_count: bool = False,
                 budget: tuple = (10.0, 1e-3), seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.rand(n, 3, generator=g), torch.rand(n, 1, generator=g)
        self.srv = quota_worker(hook, name, TOKEN, quota)
        self.srv.load(self.x, tags=("#c", "#data"), private=True)
        self.srv.load(self.y, tags=("#c", "#target"), private=True)
        self.dp = self.srv.enable_dp("c", max_grad_norm=C, noise_multiplier=SIGMA, budgets={"sci": budget},
                                     hide_count=hide_count, max_records=n if hide_count else None)
        self.s = open_session(self.srv, TOKEN)
        reply = self.req(m.SearchMessage(["#c", "#data"]))
        self.data = m.ObjectRef(reply.descriptors[0].id)

    def req(self, msg, session=None):
        return request(self.srv, session or self.s, msg)

    def cmd(self, op: str, *args, n: int = 1, session=None):
        rids = [new_id() for _ in range(n)]
        return self.req(m.CommandMessage(op, args, {}, rids), session), rids

    def fetch(self, rids):
        reply = self.req(m.GetObjectsMessage(rids))
        assert type(reply) is m.ObjectsReply, reply
        return reply.objects

    def plan(self, module: nn.Module) -> m.ObjectRef:
        spec = Plan(module).build(torch.zeros(2, 3)).spec
        oid = new_id()
        assert type(self.req(m.ObjectMessage([m.StoredObject(oid, spec)]))) is m.OkReply
        return m.ObjectRef(oid)

    def query(self, name="count", eps=0.1, delta=0.0, mech="laplace", lo=None, hi=None, bins=None, rid=None,
              session=None, x=None):
        return self.cmd("veil.dp.query", x or self.data, name, eps, delta, mech, lo, hi, bins, rid, n=2,
                        session=session)

    def gradient(self, plan, params, trainable, loss="mse", q=1.0, sigma=None, rid=None):
        return self.cmd("veil.dp.sanitized_gradient", plan, "c", params, trainable, loss, q, sigma, rid)

    def spent(self) -> tuple:
        return self.dp.ledger.spent("sci")

    def still_serves(self) -> None:
        """A normal, charged DP count still works afterwards (and is charged exactly once)."""
        before = self.spent()[0]
        reply, rids = self.query(eps=0.01)
        assert type(reply) is m.OkReply, reply
        value, cost = self.fetch(rids)
        assert value.numel() == 1 and cost[0].item() == 0.01
        assert self.spent()[0] == pytest.approx(before + 0.01)


# ---------------------------------------------------------------- modules the attacker traces into plans

class ReadsState(nn.Module):
    """Output w . sec[0] + b: with b huge and an l1 loss, every record's gradient is exactly sec[0].

    ``sec`` is traced as a buffer (non-trainable state), then a pointer to the DP data is sent in its place.
    """

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.register_buffer("sec", torch.zeros(2, 3))
        self.register_buffer("b", torch.full((1,), 1e6))

    def forward(self, inp):
        return (self.w * self.sec[0]).sum(0, keepdim=True).unsqueeze(0) + self.b + inp.sum() * 0


class IndexesByState(nn.Module):
    """Indexes the (dummy) record by a value of the state: the IndexError quotes the index."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.register_buffer("sec", torch.zeros(2, 3))

    def forward(self, inp):
        return self.w * inp[0][(self.sec[0, 0] * 1e6).long()]


class Ignores(nn.Module):
    """A big model whose gradient is always zero: the release is pure noise of std sigma C / (q n)."""

    def __init__(self, size=200_000):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(size))
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, inp):
        return self.b + inp.sum(1, keepdim=True) * 0


class ComplexAbs(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=torch.complex64))

    def forward(self, inp):
        return (self.w * inp).abs().sum(1, keepdim=True)


class Repeats(nn.Module):
    """One op that allocates ~46 MiB per record (4e6 copies of a 3-vector)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, inp):
        return self.w * inp.repeat(1, 4_000_000).sum(1, keepdim=True)


class Poisoned(nn.Module):
    """NaN gradient for records with a value < 0.5, and an out-of-range index on every real record."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, inp):
        return (self.w * torch.sqrt(inp - 0.5)).sum(1, keepdim=True) + inp[0][(inp[0, 0] * 1e6).long()] * 0


# ---------------------------------------------------------------- holes


def test_dp_data_as_plan_state_does_not_come_back(hook):
    o = Owner(hook, "rt_dp_state", n=200)
    plan = o.plan(ReadsState())
    reply, rids = o.gradient(plan, [torch.zeros(3), o.data, torch.full((1,), 1e6)], [True, False, False], "l1",
                             q=1.0, rid="rt-state-0001")
    if type(reply) is m.OkReply:
        (released,) = o.fetch(rids)
        # std of the noise is sigma C / n = 0.005: a legitimate DP-SGD step cannot pin one record to 0.03
        assert not torch.allclose(released, o.x[0], atol=0.03), (released, o.x[0], o.spent())
    else:
        assert type(reply) is m.ErrorReply
    o.still_serves()


def test_dry_run_error_does_not_quote_dp_values(hook):
    o = Owner(hook, "rt_dp_dry")
    plan = o.plan(IndexesByState())
    secret = str(int(o.x[0, 0].item() * 1e6))
    reply, _ = o.gradient(plan, [torch.zeros(1), o.data], [True, False], q=0.5, rid="rt-dry-000001")
    assert o.spent() == (0.0, 0.0)  # the dry run is free...
    assert type(reply) is m.ErrorReply
    assert secret not in reply.message, reply.message  # ...so it must not speak of the data
    o.still_serves()


def test_hidden_count_does_not_leak_through_the_noise_scale(hook):
    n = 137
    o = Owner(hook, "rt_dp_count", n=n, hide_count=True)
    assert o.req(m.SearchMessage(["#c", "#data"])).descriptors[0].shape[0] == 0  # the count is hidden
    plan = o.plan(Ignores())
    sigma, q = 1e4, 1e-6
    params = [torch.zeros(200_000), torch.zeros(1)]
    reply, _ = o.gradient(plan, params, [True, True], q=q, sigma=sigma, rid="rt-count-0000")
    assert type(reply) is m.ErrorReply and "nominal_count" in reply.message and str(n) not in reply.message
    assert o.spent() == (0.0, 0.0)  # refused before any charge: no public count declared
    o.dp.nominal_count = 100
    reply, rids = o.gradient(plan, params, [True, True], q=q, sigma=sigma, rid="rt-count-0001")
    assert type(reply) is m.OkReply, reply
    assert o.spent()[0] < 1e-3  # essentially free
    (released,) = o.fetch(rids)
    estimate = sigma * C / (q * released.double().std().item())
    assert abs(estimate - 100) < 2 and abs(estimate - n) > 5, f"n={n} recovered as {estimate:.2f}"
    o.still_serves()


def test_complex_parameters_get_noise_in_every_component(hook):
    o = Owner(hook, "rt_dp_complex", budget=(20.0, 1e-3))
    plan = o.plan(ComplexAbs())
    w = torch.full((3,), 0.3 + 0.2j, dtype=torch.complex64)
    releases = []
    for i in range(2):
        reply, rids = o.gradient(plan, [w], [True], q=1.0, rid=f"rt-complex-{i:03d}")
        if type(reply) is not m.OkReply:
            assert type(reply) is m.ErrorReply
            o.still_serves()
            return  # refusing complex parameters is a fix too
        releases.append(o.fetch(rids)[0])
    assert releases[0].imag.abs().sum() > 0  # the attacker gets a non-trivial imaginary part
    assert not torch.equal(releases[0].imag, releases[1].imag), "the imaginary part is released without noise"
    o.still_serves()


def test_dp_plan_ops_are_sized_against_the_session_quota(hook):
    o = Owner(hook, "rt_dp_quota", quota=1 << 20)
    plan = o.plan(Repeats())
    reply, _ = o.cmd("veil.plan.run", plan, [torch.zeros(1, 3)], [torch.zeros(1)])
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply  # (as itself, not wrapped)
    reply, _ = o.gradient(plan, [torch.zeros(1)], [True], q=0.01, sigma=50.0, rid="rt-quota-0001")
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    o.still_serves()


# ---------------------------------------------------------------- what holds


def test_bad_privacy_parameters_are_refused_before_any_charge(hook):
    o = Owner(hook, "rt_dp_params")
    nan, inf = float("nan"), float("inf")
    bad_queries = [dict(eps=e) for e in (nan, inf, -inf, -1.0, 0.0, 5e-324, 1e-7, 1e4, True, "1")]
    bad_queries += [dict(delta=d) for d in (nan, -1e-5, 1e-5)]  # laplace needs delta=0
    bad_queries += [dict(mech="gaussian", delta=d) for d in (0.0, 1.0, inf, nan)]
    bad_queries += [dict(mech="exponential"), dict(name="max"), dict(name="sum"),
                    dict(name="sum", lo=1.0, hi=0.0), dict(name="sum", lo=nan, hi=1.0),
                    dict(name="sum", lo=0.0, hi=inf), dict(name="histogram", lo=0.0, hi=1.0, bins=0),
                    dict(name="histogram", lo=0.0, hi=1.0, bins=10**9), dict(rid="short"), dict(rid=7)]
    for kwargs in bad_queries:
        reply, _ = o.query(**kwargs)
        assert type(reply) is m.ErrorReply, (kwargs, reply)
    plan = o.plan(Ignores(4))
    params, trainable = [torch.zeros(4), torch.zeros(1)], [True, True]
    for q, sigma in ((nan, None), (0.0, None), (-0.5, None), (1.5, None), (inf, None), (True, None),
                     (0.5, nan), (0.5, -1.0), (0.5, 0.5), (0.5, inf)):
        reply, _ = o.gradient(plan, params, trainable, q=q, sigma=sigma)
        assert type(reply) is m.ErrorReply, (q, sigma, reply)
    reply, _ = o.gradient(plan, params, [1, 1])
    assert type(reply) is m.ErrorReply
    reply, _ = o.gradient(plan, params, trainable, loss="__import__")
    assert type(reply) is m.ErrorReply
    reply, _ = o.cmd("veil.dp.sanitized_gradient", plan, "nope", params, trainable, "mse", 0.5, None, None)
    assert type(reply) is m.ErrorReply and "not open to DP training" in reply.message
    assert o.spent() == (0.0, 0.0)
    o.still_serves()


def test_replays_are_refused_and_concurrent_requests_cannot_overspend(hook):
    o = Owner(hook, "rt_dp_race", budget=(1.0, 1e-3))
    reply, rids = o.query(eps=0.1, rid="rt-replay-001")
    assert type(reply) is m.OkReply
    first = o.fetch(rids)[0]
    for _ in range(2):  # the same frame again, and the same id on the other release path
        reply, _ = o.query(eps=0.1, rid="rt-replay-001")
        assert type(reply) is m.ErrorReply and reply.error == "ReplayedRequestError", reply
    reply, _ = o.gradient(o.plan(Ignores(4)), [torch.zeros(4), torch.zeros(1)], [True, True], q=0.01,
                          sigma=50.0, rid="rt-replay-001")
    assert type(reply) is m.ErrorReply and reply.error == "ReplayedRequestError", reply
    assert o.spent()[0] == pytest.approx(0.1) and first.numel() == 1

    # 8 sessions of the same user race for 0.9 epsilon in 0.3 pieces: exactly 3 are answered
    outcomes, sessions = [], [open_session(o.srv, TOKEN) for _ in range(8)]
    start = threading.Barrier(8)

    def go(i):
        start.wait()
        reply, _ = o.query(eps=0.3, rid=f"rt-race-{i:04d}", session=sessions[i])
        outcomes.append(reply.error if type(reply) is m.ErrorReply else "ok")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert sorted(outcomes) == ["BudgetExceededError"] * 5 + ["ok"] * 3, outcomes
    assert o.spent()[0] == pytest.approx(1.0)
    reply, _ = o.query(eps=0.01)
    assert type(reply) is m.ErrorReply and reply.error == "BudgetExceededError"
    budget_reply, rb = o.cmd("veil.dp.budget")
    assert type(budget_reply) is m.OkReply
    left_eps, _, spent_eps, _ = o.fetch(rb)[0].tolist()
    assert left_eps == pytest.approx(0.0, abs=1e-9) and spent_eps == pytest.approx(1.0)


def test_poisoned_plans_give_a_finite_charged_release_not_an_error(hook):
    """NaN gradients and per-record exceptions on the real records (but not on the zero dummy) change
    neither success nor finiteness: the release is charged and finite."""
    o = Owner(hook, "rt_dp_poison")
    plan = o.plan(Poisoned())
    for i in range(2):
        reply, rids = o.gradient(plan, [torch.ones(3)], [True], q=1.0, sigma=4.0, rid=f"rt-poison-{i:03d}")
        assert type(reply) is m.OkReply, reply
        (released,) = o.fetch(rids)
        assert released.shape == (3,) and bool(torch.isfinite(released).all())
    assert o.spent()[0] > 0
    o.still_serves()


def test_dp_data_answers_only_dp_releases_and_errors_stay_value_free(hook, monkeypatch):
    o = Owner(hook, "rt_dp_only")
    assert type(o.req(m.GetObjectsMessage([o.data.id], False))) is m.ErrorReply
    for op, args in (("torch.mul", (o.data, 1.0)), ("veil.plan.run", (o.plan(Ignores(4)), [o.data], [])),
                     ("veil.plan.load_state", ([torch.zeros(40, 3)], [o.data]))):
        reply, _ = o.cmd(op, *args)
        assert type(reply) is m.ErrorReply and "differential-privacy" in reply.message, (op, reply)
    # a release that fails after the charge says nothing about the data (a mechanism failing with the
    # values in its text: charged, refused value-free)
    from veil.dp import core

    def failing(values, *a, **k):
        raise RuntimeError(f"mechanism failed on {values}")

    monkeypatch.setattr(core, "_release", failing)
    reply, _ = o.query("sum", eps=1e-6, lo=0.0, hi=1e308)
    monkeypatch.undo()
    assert type(reply) is m.ErrorReply and reply.error == "DPReleaseError"
    assert "tensor(" not in reply.message and o.spent()[0] == pytest.approx(1e-6)
    o.still_serves()


def test_a_lot_summed_in_chunks_is_the_clipped_mean(hook, monkeypatch):
    """The chunked release (a session quota's chunks, or 3 records at a time) equals the clipped per-record
    gradients' mean computed by plain torch (the owner's noise made negligible for the comparison)."""
    from veil.dp import worker_functions

    o = Owner(hook, "rt_dp_chunks", n=40, quota=64 << 20, budget=(1e20, 1e-3))
    o.dp.noise_multiplier = 1e-9
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -2.0, 5.0]]))
        model.bias.fill_(0.5)
    plan = o.plan(model)
    params = [model.weight.detach().clone(), model.bias.detach().clone()]
    grads = []
    for xi, yi in zip(o.x, o.y):
        model.zero_grad()
        nn.functional.mse_loss(model(xi[None]), yi[None]).backward()
        g = torch.cat([model.weight.grad.reshape(-1), model.bias.grad.reshape(-1)])
        grads.append(g * min(1.0, C / g.norm().item()))
    expected = torch.stack(grads).sum(0) / len(o.x)
    seen = []
    real = worker_functions._records_per_chunk
    monkeypatch.setattr(worker_functions, "_records_per_chunk", lambda *a: seen.append(real(*a)) or seen[-1])
    for i, chunk in enumerate((None, 3)):
        if chunk is not None:
            monkeypatch.setattr(worker_functions, "_records_per_chunk", lambda *a: 3)
        reply, rids = o.gradient(plan, params, [True, True], q=1.0, rid=f"rt-chunks-{i:03d}")
        assert type(reply) is m.OkReply, reply
        (released,) = o.fetch(rids)
        assert torch.allclose(released, expected, atol=1e-5), (chunk, released, expected)
    assert seen and seen[0] >= 1  # the quota's chunk was computed (from the dry run and the gradients' size)
    o.still_serves()
