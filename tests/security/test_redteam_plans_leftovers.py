"""Red team of plans (veil/plans/) as a hostile data scientist sends and runs them on an owner's worker, and of
the rough edges a previous pass left: one test per finding (each a strict xfail on the code before the fix).

Holes found and fixed:
- a plan sent inline, as a command's argument rather than stored first, skipped the store's checks: it could
  write into its constants in place or return one of them (veil/plans/remote.py: ``_compiled`` checks both);
- plans baked in the batch size they were traced on: ``x.view(x.shape[0], -1)`` failed on the last, shorter batch
  of a ``fit``, and ``x.sum() / x.shape[0]`` divided it silently by the traced size (veil/plans/batch.py: a second
  trace on one more row; sizes that follow the rows become ``BatchSize`` arguments, a constant of the batch's
  size ``torch.full`` of it; anything else is refused at build time);
- a quota refusal inside a plan over protected data came back as ProtectedDataError (the scientist could not tell
  a memory limit from a failure); it is now the QuotaExceededError it is, in one line, without the amount the
  session would hold (after a value-sized op, that amount follows the values);
- ``ptr.fix_prec()`` of a value hidden from the requester (``reveal_to`` another party) was always refused: the
  value-free encoding used ``nan_to_num``, not a data-oblivious op. It is an encoding, not a release: it now runs
  under the oblivious guard, equals torch's ``round(x * scale)``, and its result stays hidden;
- ``fit`` kept every batch's loss as a tensor in a list (~1 KB a batch, uncharged): 10,000 epochs of 1-row batches
  grew it for as long as the command ran; the count is known up front, so it is now bounded (10,000,000 a call),
  charged to the quota before the first batch, and kept as one number each;
- ``fit(max_batches=k)`` stopped only the current epoch: each later epoch ran one more batch (FL rounds with
  ``steps_per_round`` took more steps than asked).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.plans import Plan, func2plan, training_plan
from veil.plans.batch import BatchDependentPlanError
from veil.plans.ops import BatchSize, PlanOp, PlanSpec, SlotRef

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plan_sessions  # noqa: E402
from server_sessions import request, run_command, send_tensor  # noqa: E402

TOKEN = "rt-plans-leftovers-token"
SECRET = plan_sessions.SECRET
_setup = functools.partial(plan_sessions.setup, token=TOKEN)
_get, _serving, _one_line = plan_sessions.get, plan_sessions.serving, plan_sessions.one_line
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("fresh_size_cache")]

ADD, MUL = ALLOWLIST.by_func(torch.add).name, ALLOWLIST.by_func(torch.mul).name
ADD_, CLONE = ALLOWLIST.by_func(torch.Tensor.add_).name, ALLOWLIST.by_func(torch.Tensor.clone).name


# ------------------------------------------------------------------ inline plans take the stored plans' checks

def _writes_constant():
    C = torch.zeros(4, 3)  # x is added into the constant, whose copy is returned
    return PlanSpec("acc", 1, 0, 3, [PlanOp(ADD_, (C, SlotRef(0)), {}, [1], False),
                                     PlanOp(CLONE, (SlotRef(1),), {}, [2], False)], SlotRef(2))


def _returns_constant():
    C = torch.zeros(4, 3)
    return PlanSpec("ret", 1, 0, 3, [PlanOp(ALLOWLIST.by_func(torch.Tensor.view_as).name, (C, SlotRef(0)), {}, [1],
                                            False)], SlotRef(1))


@pytest.mark.parametrize("make", [_writes_constant, _returns_constant])
def test_an_inline_plan_is_refused_like_the_same_plan_stored(hook, make):
    srv, s, xid = _setup(hook, f"rt-pl-inline-{make.__name__}", private=True)
    stored = request(srv, s, m.ObjectMessage([m.StoredObject(new_id(), make())]))
    assert type(stored) is m.ErrorReply and stored.error == "OperationNotAllowedError", stored
    for fn, args in (("veil.plan.run", ([m.ObjectRef(xid)], [])),
                     ("veil.plan.fit", (m.ObjectRef(xid), m.ObjectRef(xid), [], 2))):
        reply, _ = run_command(srv, s, fn, make(), *args)
        assert _one_line(reply).error == "OperationNotAllowedError", (fn, reply)
        assert reply.message == stored.message, (fn, reply)
    _serving(srv, s, xid)


# ------------------------------------------------------------------ the batch size follows the batch

class _Flat(nn.Module):
    """Sizes from the batch the way models write them: a view by x.size(0), a zero state of the batch's rows
    (made outside the traced tensors: a constant of the traced batch's size), a loss divided by x.shape[0]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(6, 1)

    def forward(self, x):
        h = x.view(x.size(0), -1) + torch.zeros(x.shape[0], 6)
        return self.lin(h)


def _sum_over_rows(out, y):
    return ((out - y) ** 2).sum() / out.shape[0]


def test_a_fit_over_a_short_last_batch_equals_torch(hook):
    w = sy.VirtualWorker(hook, id="rt-pl-batch-fit")
    x, y = torch.randn(10, 2, 3), torch.randn(10, 1)
    model, ref = _Flat(), _Flat()
    plan = training_plan(model, _sum_over_rows, lr=0.1).build(torch.zeros(4, 2, 3), torch.zeros(4, 1))
    ptr = plan.send(w)
    losses = ptr.fit(x.send(w), y.send(w), batch_size=4, epochs=1, shuffle=False).get()
    expected = []
    for start in (0, 4, 8):  # the last batch has 2 rows
        ref.zero_grad()
        loss = _sum_over_rows(ref(x[start:start + 4]), y[start:start + 4])
        loss.backward()
        with torch.no_grad():  # torch's SGD step (torch.optim's first step costs seconds of imports)
            for p in ref.parameters():
                p -= 0.1 * p.grad
        expected.append(loss.detach())
    assert torch.allclose(losses, torch.stack(expected), atol=1e-6), (losses, expected)
    for got, want in zip(ptr.get_state(), [p.detach() for p in ref.parameters()]):
        assert torch.allclose(got, want, atol=1e-6)


def test_a_plan_built_on_two_rows_runs_on_any_number_of_rows():
    @func2plan(args_shape=[(-1, 4)])
    def rows(x):
        return x.reshape(x.shape[0] * 2, 2).sum(1) / x.shape[0]

    for n in (1, 2, 7):
        x = torch.randn(n, 4)
        assert torch.allclose(rows(x), x.reshape(n * 2, 2).sum(1) / n)


def test_a_plan_depending_on_the_batch_in_another_way_is_refused_at_build_in_one_line():
    with pytest.raises(BatchDependentPlanError) as refused:
        Plan(lambda x: x * (1.0 / x.shape[0]), name="inverse").build(torch.ones(8, 3))
    text = str(refused.value)
    assert "'inverse'" in text and "batch" in text and "\n" not in text
    # declared fixed, it is traced once, as before
    fixed = Plan(lambda x: x * (1.0 / x.shape[0]), name="fixed").build(torch.ones(8, 3), fixed_batch=True)
    assert torch.allclose(fixed(torch.ones(8, 3)), torch.full((8, 3), 1 / 8))


@pytest.mark.parametrize("bad", [0, -1, 1 << 40, 2.5])
def test_a_hostile_batch_size_argument_is_refused_when_decoded(hook, bad):
    srv, s, xid = _setup(hook, f"rt-pl-batchwire-{bad}")
    ZEROS = ALLOWLIST.by_func(torch.zeros).name
    forged = BatchSize(1)
    object.__setattr__(forged, "scale", bad)  # (what a hostile client encodes)
    spec = PlanSpec("b", 1, 0, 2, [PlanOp(ZEROS, (forged, 3), {}, [1], False)], SlotRef(1))
    reply = request(srv, s, m.ObjectMessage([m.StoredObject(new_id(), spec)]))
    assert _one_line(reply).error == "SerializationError", reply
    # a batch size in a plan with no input to take it from
    none = PlanSpec("noin", 0, 0, 1, [PlanOp(ZEROS, (BatchSize(1),), {}, [0], False)], SlotRef(0))
    assert _one_line(request(srv, s, m.ObjectMessage([m.StoredObject(new_id(), none)]))).error == "SerializationError"
    # a plan whose first input has no rows to take it from: a one-line error, the worker serves on
    ok = PlanSpec("ok", 1, 0, 2, [PlanOp(ZEROS, (BatchSize(1), 3), {}, [1], False)], SlotRef(1))
    reply, _ = run_command(srv, s, "veil.plan.run", ok, [m.ObjectRef(send_tensor(srv, s, torch.tensor(1.0)))], [])
    assert _one_line(reply).error == "RemoteExecutionError", reply
    reply, (rid,) = run_command(srv, s, "veil.plan.run", ok, [m.ObjectRef(xid)], [])
    assert type(reply) is m.OkReply, reply
    assert torch.equal(request(srv, s, m.GetObjectsMessage([rid], False, None)).objects[0], torch.zeros(4, 3))
    _serving(srv, s, xid)


def test_fit_stops_at_max_batches_across_epochs_as_torch(hook):
    w = sy.VirtualWorker(hook, id="rt-pl-maxb")
    x, y = torch.randn(10, 2, 3), torch.randn(10, 1)
    model, ref = _Flat(), _Flat()
    ptr = training_plan(model, _sum_over_rows, lr=0.1).build(torch.zeros(4, 2, 3), torch.zeros(4, 1)).send(w)
    losses = ptr.fit(x.send(w), y.send(w), batch_size=4, epochs=3, shuffle=False, max_batches=2).get()
    for start in (0, 4):  # two steps in all, not two per epoch
        ref.zero_grad()
        _sum_over_rows(ref(x[start:start + 4]), y[start:start + 4]).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
    assert losses.shape == (2,), losses
    for got, want in zip(ptr.get_state(), [p.detach() for p in ref.parameters()]):
        assert torch.allclose(got, want, atol=1e-6)


def test_a_fit_whose_losses_would_outgrow_the_quota_is_refused_before_any_batch(hook):
    """A fit keeps one loss per batch until it ends: 10,000 epochs of 1-row batches grew a list of tensors at
    ~1 KB a batch, uncharged, for as long as the command ran."""
    import time

    secret = torch.randn(64, 1)
    srv, s, xid = _setup(hook, "rt-pl-fitlosses", 1 << 20, secret, private=True)
    SUM = ALLOWLIST.by_func(torch.Tensor.sum).name
    spec = PlanSpec("sum", 2, 0, 3, [PlanOp(SUM, (SlotRef(0),), {}, [2], False)], SlotRef(2))
    # (CPU time of this process: the command runs on this thread; wall time also counted its refusal row's write
    # and a loaded machine descheduling it)
    t0 = time.process_time()
    reply, _ = run_command(srv, s, "veil.plan.fit", spec, m.ObjectRef(xid), m.ObjectRef(xid), [], 1, 10_000, False)
    assert _one_line(reply).error == "QuotaExceededError", reply
    assert time.process_time() - t0 < 2.0
    # without a quota, one call runs at most MAX_FIT_BATCHES batches
    srv2, s2, xid2 = _setup(hook, "rt-pl-fitlosses-free", None, torch.zeros(2000, 1), private=True)
    t0 = time.process_time()
    reply, _ = run_command(srv2, s2, "veil.plan.fit", spec, m.ObjectRef(xid2), m.ObjectRef(xid2), [], 1, 10_000)
    assert _one_line(reply).error == "OperationNotAllowedError" and "10,000,000" in reply.message, reply
    assert time.process_time() - t0 < 2.0
    _serving(srv, s, xid, secret)
    _serving(srv2, s2, xid2, torch.zeros(2000, 1))


# ------------------------------------------------------------------ a quota refusal says so

def _over_quota_plan():
    MM = ALLOWLIST.by_func(torch.matmul).name
    return PlanSpec("big", 1, 0, 4, [PlanOp(MUL, (SlotRef(0), 2.0), {}, [1], False),
                                     PlanOp(MM, (SlotRef(1), SlotRef(1)), {}, [2], False),
                                     PlanOp(MUL, (SlotRef(2), SlotRef(1)), {}, [3], False)], SlotRef(3))


def test_a_quota_refusal_inside_a_plan_over_protected_data_is_the_quota_error(hook):
    secret = torch.randn(64, 64)
    srv, s, xid = _setup(hook, "rt-pl-quota", 1 << 16, secret, private=True)
    pid = new_id()
    assert type(request(srv, s, m.ObjectMessage([m.StoredObject(pid, _over_quota_plan())]))) is m.OkReply
    reply, _ = run_command(srv, s, "veil.plan.run", m.ObjectRef(pid), [m.ObjectRef(xid)], [])
    assert _one_line(reply).error == "QuotaExceededError", reply
    assert "limit" in reply.message and "tensor(" not in reply.message
    _serving(srv, s, xid, secret)


def test_a_plans_quota_refusal_says_nothing_of_a_value_sized_result(hook):
    """``nonzero(x > 0)`` has as many rows as x has positive values; an op on it over the quota must be refused
    in the same words whatever that count is (the amount the session would hold would follow it)."""
    NZ, GT = ALLOWLIST.by_func(torch.nonzero).name, ALLOWLIST.by_func(torch.gt).name
    OUTER = ALLOWLIST.by_func(torch.outer).name
    FLOAT, FLAT = ALLOWLIST.by_func(torch.Tensor.float).name, ALLOWLIST.by_func(torch.Tensor.flatten).name
    spec = PlanSpec("count", 1, 0, 6, [PlanOp(GT, (SlotRef(0), 0.0), {}, [1], False),
                                       PlanOp(NZ, (SlotRef(1),), {}, [2], False),
                                       PlanOp(FLAT, (SlotRef(2),), {}, [3], False),
                                       PlanOp(FLOAT, (SlotRef(3),), {}, [4], False),
                                       PlanOp(OUTER, (SlotRef(4), SlotRef(4)), {}, [5], False)], SlotRef(5))
    messages = []
    for positives in (300, 500):
        secret = torch.cat([torch.ones(positives), -torch.ones(512 - positives)])
        srv, s, xid = _setup(hook, f"rt-pl-count-{positives}", 1 << 18, secret, private=True)
        pid = new_id()
        assert type(request(srv, s, m.ObjectMessage([m.StoredObject(pid, spec)]))) is m.OkReply
        reply, _ = run_command(srv, s, "veil.plan.run", m.ObjectRef(pid), [m.ObjectRef(xid)], [])
        messages.append(_one_line(reply).message.replace(srv.id, "W"))
        assert reply.error == "QuotaExceededError", reply
        _serving(srv, s, xid, secret)
    assert messages[0] == messages[1], messages


# ------------------------------------------------------------------ fix_prec of a hidden value

def _hidden(srv, s, value):
    hid = new_id()
    obj = m.StoredObject(hid, value, ('#veil.cap.reveal_to=["carol"]',))
    assert type(request(srv, s, m.ObjectMessage([obj]))) is m.OkReply
    return hid


def test_fix_prec_of_a_hidden_value_encodes_it_as_torch_and_keeps_it_hidden(hook):
    srv, s, xid = _setup(hook, "rt-pl-fixprec")
    value = torch.tensor([1.5, -2.25, 0.0004, 123.456])
    hid = _hidden(srv, s, value)
    reply, (rid,) = run_command(srv, s, "veil.compat.encode", m.ObjectRef(hid), 10, 3)
    assert type(reply) is m.OkReply, reply
    entry = dict(srv.monitor.owner_entries())[rid]
    assert torch.equal(entry.obj, torch.round(value.double() * 1000).to(torch.int64)), entry.obj
    assert entry.reveal_to == ("carol",)
    got = request(srv, s, m.GetObjectsMessage([rid], False, None))
    assert type(got) is m.ErrorReply and got.error == "PermissionDeniedError", got
    shared, _ = run_command(srv, s, "veil.compat.share_own", rid, [srv.id, "nobody"], [new_id(), new_id()], n=0)
    assert type(shared) is m.ErrorReply and shared.error == "PermissionDeniedError", shared
    _serving(srv, s, xid)


def test_fix_prec_of_a_hidden_value_has_one_outcome_for_any_value(hook):
    srv, s, xid = _setup(hook, "rt-pl-fixprec-oblivious")
    outcomes = []
    for value in (torch.tensor([1.0]), torch.tensor([1e30]), torch.tensor([float("nan")]),
                  torch.tensor([-float("inf")])):
        reply, _ = run_command(srv, s, "veil.compat.encode", m.ObjectRef(_hidden(srv, s, value)), 10, 3)
        outcomes.append((type(reply).__name__, getattr(reply, "error", None)))
    assert outcomes == [("OkReply", None)] * 4, outcomes
    _serving(srv, s, xid)


# ------------------------------------------------------------------ what holds

def test_a_plan_failing_on_protected_values_quotes_none_of_them(hook):
    """An index out of range only for some values: the error names no value, and is the same word whether the
    bad index came from the data or not."""
    secret = torch.tensor([[0.0, 1.0, 7.0]])
    srv, s, xid = _setup(hook, "rt-pl-err", secret=secret, private=True)
    LONG, TAKE = ALLOWLIST.by_func(torch.Tensor.long).name, ALLOWLIST.by_func(torch.take).name
    spec = PlanSpec("take", 1, 0, 4, [PlanOp(LONG, (SlotRef(0),), {}, [1], False),
                                      PlanOp(TAKE, (torch.arange(3.0), SlotRef(1)), {}, [2], False),
                                      PlanOp(CLONE, (SlotRef(2),), {}, [3], False)], SlotRef(3))
    reply, _ = run_command(srv, s, "veil.plan.run", spec, [m.ObjectRef(xid)], [])
    assert _one_line(reply).error == "ProtectedDataError", reply
    assert "7" not in reply.message and "out of" not in reply.message
    _serving(srv, s, xid, secret)


def test_a_plan_over_hidden_values_cannot_branch_on_them(hook):
    srv, s, xid = _setup(hook, "rt-pl-hidden-plan")
    hid = _hidden(srv, s, torch.tensor([3.0, -1.0]))
    NZ = ALLOWLIST.by_func(torch.nonzero).name
    spec = PlanSpec("nz", 1, 0, 2, [PlanOp(NZ, (SlotRef(0),), {}, [1], False)], SlotRef(1))
    reply, _ = run_command(srv, s, "veil.plan.run", spec, [m.ObjectRef(hid)], [])
    assert _one_line(reply).error in ("PermissionDeniedError", "ProtectedDataError"), reply
    assert "3." not in reply.message
    _serving(srv, s, xid)


def test_dp_plans_stay_traced_on_one_record(hook):
    """A DP forward plan runs one record at a time: traced once on one record (a size from the batch is one
    record's: a zero state of x.shape[0] rows, a view by x.size(0)), its release equals torch's gradient."""
    from veil.dp import RemoteDPOwner

    w = sy.VirtualWorker(hook, id="rt-pl-dp")
    x = torch.randn(8, 2, 3)
    w.enable_dp({"toy": (x, x.sum((1, 2)).unsqueeze(1))}, budgets={"me": (float("inf"), 0.5)},
                max_grad_norm=1e3, noise_multiplier=1e-9)
    model = _Flat()
    owner = RemoteDPOwner(w, "toy", model, x[:4])
    released = owner.sanitized_gradient(model, None, None, 1.0)
    model.zero_grad()
    ((model(x) - x.sum((1, 2)).unsqueeze(1)) ** 2).sum(1).mean().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(released[name], p.grad, atol=1e-3), name


def test_fix_prec_ops_stay_the_local_encoding_for_the_requesters_own_values(hook):
    srv, s, xid = _setup(hook, "rt-pl-fixprec-own")
    own = send_tensor(srv, s, torch.tensor([0.5, -3.125]))
    reply, (rid,) = run_command(srv, s, "veil.compat.encode", m.ObjectRef(own), 10, 3)
    assert type(reply) is m.OkReply, reply
    got = request(srv, s, m.GetObjectsMessage([rid], False, None))
    assert torch.equal(got.objects[0], torch.tensor([500, -3125])), got
    _serving(srv, s, xid)

