"""Red team, second pass: TIMING of the DP-SGD release after commit 9714083 (attack class 5).

A hostile data scientist supplies the plan of a ``veil.dp.sanitized_gradient`` release and times it. The fix
under test: the strict dry run refuses ops whose output size follows values (``output_bounds.value_sized``:
a meta run, plus ``MASK_INDEXED``), plans whose ops may raise on values go record by record
(``plan_grads._may_raise``) so one raising record costs only itself, and the worker's ``cross_entropy``
masks an out-of-range label.

- Fixed: ``_may_raise`` looked for a value-raising tensor in ``args[1:]`` of an op such as ``floordiv``; for
  a *reflected* op (``Tensor.__rfloordiv__``, i.e. ``7 // d``) the divisor is ``args[0]``, so a plan dividing
  a constant by a record's value stayed on the vmap path, and one zero divisor redid the whole lot.
- Fixed: a comparison sort's work follows the values (``argsort`` of a constant vs a permuted row: ~35 vs
  ~190 ms per 1e6 entries here), same ops, same shapes; the dry run now refuses sorts and selections.
- Fixed (over-refusal): a constant boolean mask of the plan (``x[:, mask]``) selects a fixed count.
- Held: sizes given as a tensor (``repeat``, ``zeros``) are refused by the free dry run; float labels
  (fractional, negative, huge, NaN) under ``cross_entropy`` do not redo a lot; ordinary models (a CNN with
  max-pooling, a hand-unrolled recurrent cell, an embedding of the worker's own integer ids) are released.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from veil.dp import plan_grads
from veil.dp.per_sample import LOOP_MAX
from veil.ids import new_id
from veil.messaging import messages as m
from veil.plans.plan import Plan

from test_redteam_dp_timing import Logits3, Owner, _neighbours, _plan_work

LOT = LOOP_MAX + 8  # above LOOP_MAX: the lot goes through vmap when the plan looks safe


def _store_plan(owner: Owner, module: nn.Module, example: torch.Tensor) -> m.ObjectRef:
    spec = Plan(module).build(example).spec
    oid = new_id()
    assert type(owner.req(m.ObjectMessage([m.StoredObject(oid, spec)]))) is m.OkReply
    return m.ObjectRef(oid)


def _counted_release(monkeypatch, owner: Owner, plan: m.ObjectRef, module: nn.Module, loss: str = "mse"):
    """(reply, how many times the plan interpreter ran) for one release."""
    real_run = plan_grads.interpreter.run
    calls = []
    monkeypatch.setattr(plan_grads.interpreter, "run", lambda *a, **kw: calls.append(1) or real_run(*a, **kw))
    try:
        reply = owner.gradient(plan, module, loss=loss)
    finally:
        monkeypatch.setattr(plan_grads.interpreter, "run", real_run)
    return reply, len(calls)


# ------------------------------------------------------------------------------------------------ holes

class ReflectedFloorDiv(nn.Module):
    """``7 // d`` with ``d = long(10 x0) + 1``: 1 on the dry run's zero record, 0 for a record with
    x0 in (-0.2, -0.1]. Traced as ``Tensor.__rfloordiv__(d, 7)``: the divisor is the op's first argument."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        d = (x[:, :1] * 10).long() + 1
        return self.lin(x) + (7 // d).float() * 0


def test_a_reflected_integer_division_by_one_records_value_does_not_redo_the_lot(hook, monkeypatch):
    """Attack: the plan computes ``7 // d`` on an integer ``d`` derived from x0 (``d`` is 1 on the dry run's
    zero record, so the plan passes it). ``values_may_raise`` knows ``floordiv`` but looks for a slot in the
    op's arguments after the first; for the reflected ``Tensor.__rfloordiv__(d, 7)`` the divisor IS the first
    argument, so the plan is judged safe and a lot above ``LOOP_MAX`` goes through vmap. One record with
    x0 = -0.15 makes d = 0: integer ``ZeroDivisionError`` fails the batched pass and every record is
    recomputed one by one (plan runs ~ lot size + 3 instead of 3): the step's time says whether any record
    of the lot has x0 in (-0.2, -0.1]. Must hold (as for ``cross_entropy``/``bernoulli`` in the first pass):
    the poisoned lot runs the plan at most once more than the clean one, and both releases are charged and
    succeed."""
    runs = []
    for k in range(2):
        x = torch.full((LOT, 3), 0.5)
        if k:
            x[17, 0] = -0.15
        owner = Owner(hook, f"rt-dpt2-rfloordiv-{k}", x)
        net = ReflectedFloorDiv()
        reply, n = _counted_release(monkeypatch, owner, owner.plan(net), net)
        assert type(reply) is m.OkReply, reply
        runs.append(n)
    assert runs[1] <= runs[0] + 1, f"plan runs: {runs[0]} on the clean lot, {runs[1]} with one zero divisor"


class SortsByValue(nn.Module):
    """``argsort(x0 * perm)`` over a fixed random permutation of 1e6 entries: all-equal keys (x0 = 0) are
    sorted ~5x faster than a permuted row (x0 = 1). Same ops, same shapes, the gradient is w's alone."""

    def __init__(self, width: int = 1_000_000):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        g = torch.Generator().manual_seed(0)
        self.register_buffer("perm", torch.randperm(width, generator=g).float().unsqueeze(0))

    def forward(self, x):
        order = torch.argsort(x[:, :1].detach() * self.perm, dim=1)
        return order[:, :1].float() * 0 + x[:, :1] * self.w


@pytest.mark.parametrize("width", [1_000])
def test_a_sort_over_one_records_values_is_refused_before_any_charge(hook, monkeypatch, width):
    """Attack: the plan argsorts ``x0 * perm`` (a fixed random permutation, sent as a buffer). For x0 = 0 the
    keys are all equal and the sort is quick; for x0 = 1 they are a permutation and the sort does its full
    work (single thread, 1e6 entries: argsort 32 ms vs 191 ms, sort 35 vs 195, median 1.6 vs 7.9; an 8-record
    release 243 vs 358 ms, 11 of 11 pairs). Same ops, same shapes: ``value_sized`` and the dispatch traces
    cannot see it, and it is not the float-speed limit the README documents. Must hold: the free dry run
    refuses a sort or selection (sort, argsort, median, topk, kthvalue, quantile, mode) in a DP plan, on both
    neighbouring datasets, running the plan only on the zero record and charging nothing."""
    for k, x in enumerate(_neighbours(4, 0.0, 1.0)):
        owner = Owner(hook, f"rt-dpt2-sort-{k}", x)
        net = SortsByValue(width)
        reply, calls = _plan_work(monkeypatch, owner, owner.plan(net), net)
        assert type(reply) is m.ErrorReply and "sort or selection" in reply.message, reply
        assert len(calls) == 1  # the dry run only
        assert owner.dp.ledger.spent("sci") == (0.0, 0.0)


# ------------------------------------------------------------------------------------------- what holds

class RepeatByValue(nn.Module):
    """``ones(3).repeat(long(1000 x0))``: a size given as a tensor computed from the record."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        big = torch.ones(3).repeat((x[0, 0] * 100_000).long())
        return big.exp().sum() * 0 + x[:, :1] * self.w


class ZerosByValue(nn.Module):
    """``zeros(long(1e5 x0))``: a factory whose size is the record's value."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        big = torch.zeros((x[0, 0] * 100_000).long())
        return big.exp().sum() * 0 + x[:, :1] * self.w


@pytest.mark.parametrize("module", [RepeatByValue, ZerosByValue], ids=["repeat", "zeros"])
def test_a_size_given_as_a_computed_tensor_is_refused_before_any_charge(hook, monkeypatch, module):
    """Attack: not ``nonzero``/``masked_select`` (the first pass), but an ordinary shape argument fed by a
    0-dim tensor computed from the record (``Tensor.repeat(n)``, ``torch.zeros(n)``): on the real records the
    size is ``1e5 x0``, on the dry run's zero record it is 0. Held: the meta run cannot read the tensor's
    value, so the free dry run refuses the plan on both neighbouring datasets, runs it only on the zero
    record, and charges nothing."""
    for k, x in enumerate(_neighbours(4, 0.1, 0.9)):
        owner = Owner(hook, f"rt-dpt2-size-{module.__name__}-{k}", x)
        net = module()
        reply, calls = _plan_work(monkeypatch, owner, owner.plan(net), net)
        assert type(reply) is m.ErrorReply and "follow" in reply.message, reply
        assert len(calls) <= 1  # the dry run at most (a factory's size from the record: refused from the plan)
        assert owner.dp.ledger.spent("sci") == (0.0, 0.0)


@pytest.mark.parametrize("bad", [2.7, -1.0, 3.5, 1e30, float("nan")], ids=["fraction", "negative", "above",
                                                                          "huge", "nan"])
def test_a_float_label_outside_the_logits_does_not_redo_the_lot(hook, monkeypatch, bad):
    """Attack on the label masking: the protected targets are floats (the owner stored them so), and one
    record's label is fractional, negative, past the last logit, beyond int64 or NaN. The worker's loss
    casts to long and clamps: if any of these raised under vmap (or a NaN label made a NaN gradient through
    a different path) the whole lot would be redone. Held: the poisoned lot runs the plan no more often
    than the clean one, and both are charged releases."""
    runs = []
    for k in range(2):
        x, y = torch.full((LOT, 3), 0.5), torch.zeros(LOT, 1)
        if k:
            y[17, 0] = bad
        owner = Owner(hook, f"rt-dpt2-label-{k}-{bad}", x, y=y)
        net = Logits3()
        reply, n = _counted_release(monkeypatch, owner, owner.plan(net), net, loss="cross_entropy")
        assert type(reply) is m.OkReply, reply
        runs.append(n)
    assert runs[1] == runs[0], f"plan runs: {runs[0]} on the clean lot, {runs[1]} with label {bad}"


class SmallCNN(nn.Module):
    """A record of 48 values seen as a 3x4x4 image: conv, ReLU, max-pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 1)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv(x.reshape(-1, 3, 4, 4))), 2)
        return self.fc(h.flatten(1))


class UnrolledRNN(nn.Module):
    """An LSTM-style cell unrolled over 6 steps of 8 features (nn.LSTM itself is not on the plan allowlist)."""

    def __init__(self):
        super().__init__()
        self.ih, self.hh, self.out = nn.Linear(8, 16), nn.Linear(4, 16), nn.Linear(4, 1)

    def forward(self, x):
        seq = x.reshape(-1, 6, 8)
        h = torch.zeros(seq.shape[0], 4)
        c = torch.zeros(seq.shape[0], 4)
        for t in range(6):
            i, f, g, o = (self.ih(seq[:, t]) + self.hh(h)).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.out(h)


class IdEmbedding(nn.Module):
    """An embedding of the worker's own integer ids (vocabulary 10), mean-pooled, then linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 5)
        self.fc = nn.Linear(5, 1)

    def forward(self, x):
        return self.fc(self.emb(x.long()).mean(1))


@pytest.mark.parametrize("make,x", [
    (SmallCNN, lambda: torch.randn(12, 48)),
    (UnrolledRNN, lambda: torch.randn(12, 48)),
    (IdEmbedding, lambda: torch.randint(0, 10, (12, 6))),
], ids=["cnn-maxpool", "unrolled-lstm-cell", "embedding-of-integer-data"])
def test_ordinary_models_are_not_refused_by_the_timing_checks(hook, monkeypatch, make, x):
    """Over-refusal check: the value-size check runs every op of the dry run on meta and the record-by-record
    rule matches op names (``embedding`` is one). A CNN with max-pooling, an unrolled recurrent cell and an
    embedding of integer records must still be released (charged, a gradient per parameter, finite)."""
    torch.manual_seed(0)
    data = x()
    owner = Owner(hook, f"rt-dpt2-ok-{make.__name__}", data)
    net = make()
    plan = _store_plan(owner, net, data[:2])
    reply, n = _counted_release(monkeypatch, owner, plan, net)
    assert type(reply) is m.OkReply, reply
    assert n >= 2  # the dry run, then the records
    assert owner.dp.ledger.spent("sci") != (0.0, 0.0)


class SelectsFixedFeatures(nn.Module):
    """Feature selection by a fixed boolean mask, a constant of the plan (the same for every record):
    ``x[:, mask]`` keeps features 0 and 2, then a linear layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        return self.fc(x[:, torch.tensor([True, False, True])])


def test_a_fixed_feature_mask_written_in_the_plan_is_not_refused(hook, monkeypatch):
    """Over-refusal: ``x[:, mask]`` with a constant boolean mask is an ordinary way to select features. Its
    result size is the number of True entries of a constant written in the plan (identical for every
    record), not of anything a record holds, so it cannot carry a record's value into the release
    time. ``output_bounds.value_sized`` refuses any bool/uint8 index tensor, wherever it comes from. Must
    hold: the release succeeds and is charged."""
    data = torch.randn(12, 3)
    owner = Owner(hook, "rt-dpt2-ok-fixed-mask", data)
    net = SelectsFixedFeatures()
    plan = _store_plan(owner, net, data[:2])
    reply, n = _counted_release(monkeypatch, owner, plan, net)
    assert type(reply) is m.OkReply, reply
    assert owner.dp.ledger.spent("sci") != (0.0, 0.0)
