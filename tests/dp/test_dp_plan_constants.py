"""DP plans with constant-creating ops (torch.full, zeros, ones, arange, *_like): accepted when their sizes and
fill values are plain numbers or the model's own tensors, refused when they come from the record."""

import pytest
import torch
import torch.nn as nn

import veil as sy
from veil.dp import PrivacyParameterError, RemoteDPOwner
from veil.dp.plan_grads import LOSSES, check_forward_plan, per_sample_gradients
from veil.exceptions import OperationNotAllowedError
from veil.messaging.allowlist import ALLOWLIST
from veil.plans.ops import PlanOp, PlanSpec, SlotRef
from veil.plans.plan import Plan
from veil.workers import output_bounds


def _worker(hook, name, n=8):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    w = sy.VirtualWorker(hook, id=name)
    w.enable_dp({"toy": (x, y)}, budgets={"me": (float("inf"), 0.5)}, max_grad_norm=1e3, noise_multiplier=1e-9)
    return w, x, y


class ConstantsNet(nn.Module):
    """Every constant-creating form a model writes: sizes from the batch, plain numbers, its own buffers."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.register_buffer("shift", torch.tensor(0.25))
        self.register_buffer("width", torch.tensor(3))

    def forward(self, x):
        h = x * torch.arange(1, 4, dtype=torch.float32) + torch.zeros(x.shape[0], self.width)
        h = h * torch.ones_like(x) - torch.full((x.shape[0], 3), 0.5)
        return self.lin(h) + torch.full_like(x[:, :1], self.shift) + torch.zeros_like(x[:, :1])


def test_a_dp_plan_creating_constants_gives_plain_torchs_gradient(hook):
    w, x, y = _worker(hook, "dpc_ok")
    model = ConstantsNet()
    owner = RemoteDPOwner(w, "toy", model, x[:4])  # (traced on one record: x.shape[0] is one record's)
    released = owner.sanitized_gradient(model, None, None, 1.0)
    model.zero_grad()
    ((model(x) - y) ** 2).sum(1).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(released[name], p.grad, atol=1e-4, rtol=1e-4)


def test_creation_ops_are_sized_with_the_models_numbers():
    model = ConstantsNet()
    plan = Plan(model, name="consts").build(torch.zeros(1, 3))
    state = [t for t in plan.state_tensors()]
    sized = []

    def size_check(name, func, args, kwargs):  # the sizing a session quota does (output_bounds.Budget)
        sized.append((name, output_bounds.new_bytes(func, args, kwargs, name)))

    compiled = check_forward_plan(plan.spec, len(state))
    per_sample_gradients(compiled, state, [t.requires_grad for t in state], torch.zeros(1, 3), torch.zeros(1, 1),
                         LOSSES["mse"], strict=True, size_check=size_check)
    assert ("torch.full_like", 4) in sized and ("torch.zeros", 12) in sized


X, W, N = SlotRef(0), SlotRef(1), SlotRef(2)  # the record, a weight [1, 3], an integer buffer (0-dim)


def _op(f, args, out, kwargs=None):
    return PlanOp(ALLOWLIST.by_func(f).name, args, kwargs or {}, [out], True)


def _record_sized_spec(name, creation):
    """x -> (x * weight) * creation(...).sum(): ``creation`` is the op list making slot 5 from the record."""
    ops = [_op(torch.sum, (X,), 3), _op(torch.Tensor.long, (SlotRef(3),), 4), *creation,
           _op(torch.sum, (SlotRef(5),), 6), _op(torch.mul, (X, W), 7), _op(torch.mul, (SlotRef(7), SlotRef(6)), 8)]
    return PlanSpec(name, 1, 2, 12, ops, SlotRef(8))


ADVERSARIAL = {
    "fill from the record": [_op(torch.full_like, (X, SlotRef(3)), 5)],
    "size from the record": [_op(torch.zeros, (2, SlotRef(4)), 5)],
    "arange to the record": [_op(torch.arange, (SlotRef(4),), 5)],
    "full of a record-sized shape": [_op(torch.full, ((SlotRef(4), 1), 0.5), 5)],
    # the record added in place into a view of a copy of the buffer, the copy then used as a size
    "size through a view": [_op(torch.mul, (N, 1), 9), _op(torch.Tensor.view, (SlotRef(9), -1), 10),
                            _op(torch.Tensor.add_, (SlotRef(10), SlotRef(4)), 10),
                            _op(torch.arange, (SlotRef(9),), 5)],
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_a_creation_op_sized_or_filled_from_the_record_is_refused(case):
    spec = _record_sized_spec(case, ADVERSARIAL[case])
    with pytest.raises(PrivacyParameterError, match="computed from the record"):
        check_forward_plan(spec, 2)


def test_a_record_sized_plan_is_refused_by_the_worker_before_any_charge(hook):
    w, x, _ = _worker(hook, "dpc_adv")
    model = nn.Linear(3, 1)
    owner = RemoteDPOwner(w, "toy", model, x[:1])
    spec = _record_sized_spec("evil", ADVERSARIAL["size through a view"])
    owner._plan = Plan.from_spec(spec, [torch.ones(1, 3), torch.tensor(2)], "evil").send(w)._handle
    state = [torch.ones(1, 3, requires_grad=True), torch.tensor(2)]
    with pytest.raises(PrivacyParameterError, match="computed from the record"):
        _release(owner, state)
    assert sy.dp.remaining_budget(w, spent=True) == (0.0, 0.0)


def _release(owner, state):
    from veil.dp.remote import _request_id
    from veil.tensors import remote_ops

    return remote_ops.call(ALLOWLIST.by_name("veil.dp.sanitized_gradient"),
                           (owner._plan, "toy", state, [True, False], "mse", 0.5, None, _request_id()), {},
                           location=owner.worker).get()


class StatefulNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x):
        self.seen.add_(x.sum(1))  # every record would see the records run before it
        return self.lin(x) * self.seen


def test_a_plan_writing_into_its_buffers_is_refused_before_any_charge(hook):
    w, x, _ = _worker(hook, "dpc_state")
    model = StatefulNet()
    with pytest.raises(PrivacyParameterError, match="writes into its parameters or buffers"):
        RemoteDPOwner(w, "toy", model, x[:1]).sanitized_gradient(model, None, None, 0.5)
    assert sy.dp.remaining_budget(w, spent=True) == (0.0, 0.0)


def test_tracing_a_tensor_read_as_a_number_says_what_to_write_instead():
    class FillNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.tensor(0.5))

        def forward(self, x):
            return x + torch.full((1, 3), self.c)

    with pytest.raises(OperationNotAllowedError, match=r"read as a Python number.*full_like\(x, t\)"):
        Plan(FillNet(), name="fill").build(torch.zeros(1, 3))
