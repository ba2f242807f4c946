"""Plans: traced op lists, checked against eager torch locally and on workers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil as sy
from veil.exceptions import OperationNotAllowedError, VeilError
from veil.messaging import messages as m
from veil.plans import Plan, func2plan, training_plan
from veil.plans.ops import PlanOp, PlanSpec, SlotRef


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1))


def test_func2plan_builds_and_runs_locally_and_remotely(alice):
    @func2plan(args_shape=[(-1, 3)])
    def plan(x):
        return torch.relu(x * 2 - 1).sum(dim=1), x.mean()

    assert plan.is_built and [o.op for o in plan.spec.ops][:2] == ["Tensor.mul", "Tensor.sub"]
    x = torch.randn(5, 3)
    expected = (torch.relu(x * 2 - 1).sum(dim=1), x.mean())
    local = plan(x)
    assert all(torch.allclose(a, b) for a, b in zip(local, expected))
    ptr = plan.send(alice)
    out = ptr(x.send(alice))
    assert isinstance(out[0], sy.PointerTensor)  # results stay remote
    assert all(torch.allclose(a.get(), b) for a, b in zip(out, expected))


def test_build_later():
    plan = Plan(lambda x, y: x @ y + 1, name="affine")
    assert not plan.is_built
    a, b = torch.randn(2, 3), torch.randn(3, 4)
    plan.build(a, b)
    assert plan.is_built and torch.allclose(plan(a, b), a @ b + 1)


def test_module_plan_matches_forward(alice):
    model = _mlp()
    plan = Plan(model, args_shape=[(-1, 13)])
    x = torch.randn(7, 13)
    assert torch.allclose(plan(x), model(x))
    assert torch.allclose(plan.send(alice)(x.send(alice)).get(), model(x), atol=1e-6)


def test_training_plan_fit_equals_torch_sgd(alice):
    model, ref = _mlp(), _mlp()
    x, y = torch.randn(40, 13), torch.randn(40, 1)
    plan = training_plan(model, F.mse_loss, lr=0.01, args_shape=[(-1, 13), (-1, 1)])
    ptr = plan.send(alice)
    me = alice.hook.local_worker
    before = me.stats.messages
    losses = ptr.fit(x.send(alice), y.send(alice), batch_size=8, epochs=2, shuffle=False)
    assert me.stats.messages - before == 3  # two sends + one fit for two whole epochs
    opt = torch.optim.SGD(ref.parameters(), lr=0.01)
    expected_losses = []
    for _ in range(2):
        for i in range(0, 40, 8):
            opt.zero_grad()
            loss = F.mse_loss(ref(x[i:i + 8]), y[i:i + 8])
            loss.backward()
            opt.step()
            expected_losses.append(loss.item())
    assert torch.allclose(losses.get(), torch.tensor(expected_losses), atol=1e-5)
    for got, exp in zip(ptr.get_state(), ref.parameters()):
        assert torch.allclose(got, exp, atol=1e-5)


def test_training_plan_single_step_and_load_state(alice):
    model = _mlp()
    plan = training_plan(model, F.mse_loss, lr=0.1, args_shape=[(-1, 13), (-1, 1)])
    ptr = plan.send(alice)
    zeros = [torch.zeros_like(t) for t in plan.state_tensors()]
    ptr.load_state(zeros)
    assert all(torch.equal(t, z) for t, z in zip(ptr.get_state(), zeros))
    x, y = torch.randn(4, 13), torch.randn(4, 1)
    loss = ptr(x.send(alice), y.send(alice))
    assert torch.allclose(loss.get(), F.mse_loss(torch.zeros(4, 1), y))


def test_training_plan_step_equals_torch_sgd_exactly(alice):
    """The plan's update is SGD's own arithmetic (add_(grad, alpha=-lr)): the same weights to the bit."""
    model, ref = _mlp(), _mlp()
    x, y = torch.randn(24, 13), torch.randn(24, 1)
    plan = training_plan(model, F.mse_loss, lr=0.01, args_shape=[(-1, 13), (-1, 1)])
    ptr = plan.send(alice)
    ptr.fit(x.send(alice), y.send(alice), batch_size=8, epochs=1, shuffle=False)
    opt = torch.optim.SGD(ref.parameters(), lr=0.01)
    for i in range(0, 24, 8):
        opt.zero_grad()
        F.mse_loss(ref(x[i:i + 8]), y[i:i + 8]).backward()
        opt.step()
    assert all(torch.equal(got, exp) for got, exp in zip(ptr.get_state(), ref.parameters()))


def test_train_round_is_one_request_and_equals_load_fit_get(alice):
    """load_state + fit + mean loss + new state in one request, with the results of the four-step path."""
    x, y = torch.randn(40, 13), torch.randn(40, 1)
    px, py = x.send(alice), y.send(alice)
    start = [t + 0.5 for t in training_plan(_mlp(1), F.mse_loss, lr=0.01, args_shape=[(-1, 13), (-1, 1)])
             .state_tensors()]
    a = training_plan(_mlp(), F.mse_loss, lr=0.01, args_shape=[(-1, 13), (-1, 1)]).send(alice)
    b = training_plan(_mlp(), F.mse_loss, lr=0.01, args_shape=[(-1, 13), (-1, 1)]).send(alice)
    a.load_state(start)
    losses = a.fit(px, py, batch_size=8, epochs=2, seed=3)
    mean, state = losses.mean().get(), a.get_state()
    me = alice.hook.local_worker
    before = me.stats.messages
    got_mean, got_state = b.train_round(start, px, py, batch_size=8, epochs=2, seed=3)
    assert me.stats.messages - before == 1
    assert torch.equal(got_mean, mean) and all(torch.equal(g, s) for g, s in zip(got_state, state))
    assert all(torch.equal(g, s) for g, s in zip(b.get_state(), state))  # the state stays on the worker


def test_train_round_raises_the_failing_op(alice):
    """A failure inside the round's batch is raised at the call, naming the op (the round's ids are freed)."""
    ptr = training_plan(_mlp(), F.mse_loss, lr=0.01, args_shape=[(-1, 13), (-1, 1)]).send(alice)
    x, y = torch.randn(8, 13).send(alice), torch.randn(7, 1).send(alice)
    with pytest.raises(VeilError, match="veil.plan.fit"):
        ptr.train_round([t.detach() for t in ptr.get_state()], x, y, batch_size=4)
    x2, y2 = torch.randn(8, 13).send(alice), torch.randn(8, 1).send(alice)
    mean, state = ptr.train_round([t.detach() for t in ptr.get_state()], x2, y2, batch_size=4)
    assert torch.isfinite(mean) and len(state) == 6


def test_untraceable_op_is_refused():
    with pytest.raises(OperationNotAllowedError, match="cannot trace"):
        Plan(lambda x: torch.fft.fft(x), args_shape=[(2,)])


def test_worker_refuses_plan_with_forbidden_op(alice):
    me = alice.hook.local_worker
    spec = PlanSpec("evil", 1, 0, 2, [PlanOp("torch.load", (SlotRef(0),), {}, [1], True)], SlotRef(1))
    with pytest.raises(OperationNotAllowedError, match="torch.load"):
        me.send_msg(m.ObjectMessage([m.StoredObject(12345, spec)]), alice)
    assert 12345 not in alice._objects
    spec = PlanSpec("oob", 1, 0, 2, [PlanOp("torch.relu", (SlotRef(7),), {}, [1], True)], SlotRef(1))
    with pytest.raises(Exception, match="slot"):
        me.send_msg(m.ObjectMessage([m.StoredObject(12346, spec)]), alice)


def test_plan_spec_roundtrips_the_wire():
    from veil.messaging.serde import decode_value, encode_value

    @func2plan(args_shape=[(-1, 2)])
    def plan(x):
        return x[:, 0:1] * torch.tensor([2.0])

    back = decode_value(encode_value(plan.spec))
    assert [o.op for o in back.ops] == [o.op for o in plan.spec.ops] and back.outputs == plan.spec.outputs
