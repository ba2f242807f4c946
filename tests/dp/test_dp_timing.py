"""A poisoned record costs what a clean one costs: the same ATen ops, in the same order.

Not a wall-clock test: a TorchDispatchMode records every ATen op of a DP-SGD
step (local, owner-side, worker plan release) for a clean lot and for the same
lot with one record whose gradient is NaN/inf, or whose forward pass raises.
Identical traces mean a data-independent control flow: no branch, no early
exit, no host sync on the values (the sanitization is ``torch.where`` /
``nan_to_num_`` over every row).
"""

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import veil as sy
from veil.dp import DPOptimizer, GradSampleModule, core
from veil.dp.federated import DPDataOwner
from veil.dp.errors import PrivacyParameterError
from veil.dp.plan_grads import LOSSES, check_forward_plan, per_sample_gradients, values_may_raise


class Trace(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def traced(fn):
    with Trace() as t:
        out = fn()
    return t.ops, out


class SqrtNet(nn.Module):
    """``lin(x) * sqrt(5 - x0)``: NaN gradient exactly for a record with x0 > 5."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x) * torch.sqrt(5.0 - x[:, :1])


class IndexNet(nn.Module):
    """``w[x1]``: raises for a record whose x1 is out of range."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.w[x[:, 1].long()].unsqueeze(1) + self.lin(x)


def _lot(n, poison=None):
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, 3, generator=g) * 2
    if poison == "nan":
        x[n // 2, 0] = 9.0
    elif poison == "huge":
        x[n // 2, 2] = 3e38  # the gradient overflows float32
    elif poison == "index":
        x[n // 2, 1] = 296.0
    return x, x.sum(1, keepdim=True)


def _local_step(x, y, fused):
    torch.manual_seed(0)
    net = SqrtNet()
    gsm = GradSampleModule(net, loss_reduction="sum", criterion=nn.MSELoss(reduction="sum") if fused else None)
    opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), 1.0, 1.0, expected_batch_size=len(x))

    def step():
        opt.zero_grad()
        loss = gsm.dp_loss(gsm(x), y) if fused else (gsm(x) - y).pow(2).sum()
        loss.backward()

    ops, _ = traced(step)
    bad = not all(bool(torch.isfinite(p.grad_sample).all()) for p in net.parameters())  # not traced
    ops2, _ = traced(opt.step)
    return ops + ops2, bad, [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_local_dp_sgd_step_runs_the_same_ops_for_a_poisoned_lot(fused, poison):
    clean_ops, clean_bad, _ = _local_step(*_lot(40), fused)
    bad_ops, bad_bad, params = _local_step(*_lot(40, poison), fused)
    assert bad_bad and not clean_bad  # not vacuous: the poisoned lot had a non-finite per-sample gradient
    assert all(torch.isfinite(p).all() for p in params)  # ...which the step sanitized
    assert bad_ops == clean_ops and len(clean_ops) > 50


def _plan(model_cls):
    torch.manual_seed(0)
    plan = sy.Plan(model_cls()).build(torch.zeros(2, 3))
    state = plan.state_tensors()
    return check_forward_plan(plan.spec, len(state)), state, plan.spec


def _worker_release(model_cls, x, y):
    compiled, state, _ = _plan(model_cls)

    def release():
        samples = per_sample_gradients(compiled, state, [True] * len(state), x, y, LOSSES["mse"])
        return core.privatize(samples, list(state), 1.0, 1.0, float(len(x)))

    return traced(release)


@pytest.mark.parametrize("n", [8, 40])  # record by record, and vmap
@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_a_worker_plan_release_runs_the_same_ops_for_a_nan_record(n, poison):
    clean_ops, _ = _worker_release(SqrtNet, *_lot(n))
    bad_ops, out = _worker_release(SqrtNet, *_lot(n, poison))
    assert all(torch.isfinite(t).all() for t in out)
    assert bad_ops == clean_ops


def _remove_block(longer, shorter):
    """Whether ``longer`` is ``shorter`` with one contiguous block inserted; returns the block's length."""
    i = next((k for k, (a, b) in enumerate(zip(longer, shorter)) if a != b), len(shorter))
    extra = len(longer) - len(shorter)
    return extra if longer[:i] + longer[i + extra:] == shorter else None


@pytest.mark.parametrize("n", [8, 40])
def test_a_record_whose_forward_raises_costs_a_full_record_plus_its_partial_forward(n):
    _, _, spec = _plan(IndexNet)
    assert values_may_raise(spec) and not values_may_raise(_plan(SqrtNet)[2])  # so 40 records go one by one too
    clean_ops, _ = _worker_release(IndexNet, *_lot(n))
    bad_ops, out = _worker_release(IndexNet, *_lot(n, "index"))
    assert all(torch.isfinite(t).all() for t in out)
    one_record = len(clean_ops) // n  # (the noise and clipping make this an overestimate)
    block = _remove_block(bad_ops, clean_ops)
    # identical but for the ops the failing record ran before raising (a prefix of one forward pass)
    assert block is not None and 0 < block < one_record


def test_owner_side_release_runs_the_same_ops_for_a_nan_record():
    def release(x, y):
        owner = DPDataOwner(x, y, max_grad_norm=1.0, noise_multiplier=1.0)
        model = SqrtNet()
        mse = lambda o, t: (o - t).pow(2).flatten(1).sum(1)  # noqa: E731
        return traced(lambda: owner.sanitized_gradient(model, model.state_dict(), mse, sample_rate=1.0))

    clean_ops, _ = release(*_lot(40))
    bad_ops, out = release(*_lot(40, "nan"))
    assert all(torch.isfinite(t).all() for t in out.values())
    assert bad_ops == clean_ops


class _Probe(nn.Module):
    """``lin(x) + 0 * body(x)``: a plan whose one odd op is ``body``."""

    def __init__(self, body):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.body = body

    def forward(self, x):
        return self.lin(x) + self.body(x) * 0


def _set_mask(x):
    h = x.clone()
    h[h > 0.5] = 0.0
    return h.sum()


VALUE_SIZED = {  # op -> a body whose result size (or work) follows x's values
    "Tensor.__getitem__": lambda x: x[x > 0.5].sum(),
    "Tensor.__setitem__": _set_mask,
    "torch.nn.functional.one_hot": lambda x: torch.nn.functional.one_hot((x[:, 0] * 5).long()).sum(),
    "torch.where": lambda x: torch.where(x[:, 0] > 0.5)[0].sum(),
    "torch.repeat_interleave": lambda x: torch.repeat_interleave(x[:, 0], (x[:, 0] * 9).long()).sum(),
    "torch.masked_select": lambda x: torch.masked_select(x, x > 0.5).sum(),
    "torch.nonzero": lambda x: torch.nonzero(x > 0.5).sum(),
    "torch.unique": lambda x: torch.unique(x).sum(),
}


def _dry_run(body):
    compiled, state, _ = _plan(lambda: _Probe(body))
    zeros = torch.zeros(1, 3), torch.zeros(1, 1)
    return per_sample_gradients(compiled, state, [True] * len(state), *zeros, LOSSES["mse"], strict=True)


@pytest.mark.parametrize("op", sorted(VALUE_SIZED))
def test_the_dry_run_refuses_an_op_whose_result_size_follows_the_values(op):
    """Records running the same ops is not enough when an op's *output size* is a value (a mask's count,
    a repeat count, the number of classes seen): every later op's work, so the release's time, follows one
    record. The dry run (a zero record, before any charge) refuses such an op, naming it; fixed-shape
    versions of the same computations pass (so the check is about sizes, not op names)."""
    with pytest.raises(Exception) as info:
        _dry_run(VALUE_SIZED[op])
    cause = info.value.__cause__
    assert isinstance(cause, PrivacyParameterError) and f"uses {op} (" in str(cause), info.value
    fixed = lambda x: (torch.where(x > 0.5, x, 0).sum() + x[:, torch.tensor([0, 2])].sum()  # noqa: E731
                       + torch.nn.functional.one_hot((x[:, 0] * 5).long().clamp(0, 4), 5).sum()
                       + torch.repeat_interleave(x[:, 0], 3).sum() + torch.where(x > 0.5, 1.0, 0.0).sum())
    assert len(_dry_run(fixed)) == 2


class Logits3(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("n", [8, 40])  # record by record, and vmap
@pytest.mark.parametrize("label", [5.0, -1.0, -100.0])
def test_a_cross_entropy_label_outside_the_logits_runs_the_same_ops_and_counts_zero(n, label):
    """The worker's ``cross_entropy`` loss on a label the plan has no logit for used to raise: under vmap
    the whole lot was redone record by record (its time told whether any record has a rare label). Must
    hold: the same ATen ops as the clean lot, that record's gradient is zero, the others are unchanged."""
    compiled, state, _ = _plan(Logits3)
    x = torch.rand(n, 3, generator=torch.Generator().manual_seed(n))
    y = (torch.arange(n) % 3).float().unsqueeze(1)
    bad = y.clone()
    bad[n // 2, 0] = label

    def grads(target):
        return traced(lambda: per_sample_gradients(compiled, state, [True] * len(state), x, target,
                                                   LOSSES["cross_entropy"]))

    clean_ops, clean = grads(y)
    bad_ops, got = grads(bad)
    assert bad_ops == clean_ops
    keep = torch.arange(n) != n // 2
    for c, g in zip(clean, got):
        assert torch.equal(g[n // 2], torch.zeros_like(g[n // 2])) and c[n // 2].abs().sum() > 0
        assert torch.allclose(g[keep], c[keep])
