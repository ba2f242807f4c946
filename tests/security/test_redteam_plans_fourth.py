"""Fourth red-team pass over plans on workers (veil/plans/: the interpreter, batch.py, remote.py, fit; aliasing;
the monitor's quota for plan results), as a hostile scientist sending raw plans and commands to an owner's
worker, and as a PySyft user training with ``fit``. One test per finding (each a strict xfail on the code
before its fix), then guards for what held.

Holes found and fixed:
- every run of a plan over data under review stored its whole listing (up to ~75 KB) in the result's op graph,
  uncharged: results of inline plans (or of a freed result's descendants) held many times the session quota
  (veil/governance/provenance.py: ``graph_nbytes`` is charged with each result; a stored plan's listing is made
  once and shared by all its runs); the same for the requester's own tensor written in place by such runs (its
  graph keeps up to 64 listings: what it grows by is charged after the command);
- a ``fit`` (or a run) cut part-way by the worker's deadline, a quota or an op's error left the requester's model
  half-updated: some parameters one SGD step ahead of the others, gradients left set
  (veil/plans/step_undo.py: the state is put back as the last whole step left it);
- ``aliasing._FRESH`` lacked ``take``/``gather``/``index_select``/``masked_select``: a plan returning a selection of
  its constants was refused as if it returned the constant itself (their ATen schemas return no alias);
- errors in the requester's own arguments of ``fit`` (batch size, epochs, rows of data and target, how many state
  tensors) and of ``fix_prec`` (a precision past the ring) came back as ProtectedDataError on owner data: they
  now say what is wrong (their text depends on the request and on shapes only; the owner's row count is not
  quoted);
- ``func2plan`` ran the user's function twice at build (the batch-size check's second trace): a function that
  reads no size, count or list of the rows, and catches no op's error, cannot differ on another batch, so it is
  now traced once (veil/plans/trace.py: ``Tracer.read_sizes``); any other is traced twice and checked as before.

Left as it is: a plan's refused-or-not outcome can follow the size of a value-sized intermediate (``nonzero``) of
private or reviewed data, but the result's shape already tells that size (a direct ``nonzero`` command's
descriptor does); values hidden from the requester are refused such ops up front (the oblivious guard).
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
from veil.plans import func2plan, interpreter, training_plan
from veil.plans.batch import BatchDependentPlanError
from veil.plans.ops import PlanOp, PlanSpec, SlotRef
from veil.workers import cancellation

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plan_sessions  # noqa: E402
from server_sessions import request, run_command, send_tensor  # noqa: E402

TOKEN = "rt-plans-fourth-token"
SECRET = plan_sessions.SECRET
_setup = functools.partial(plan_sessions.setup, token=TOKEN)
_get, _serving, _one_line = plan_sessions.get, plan_sessions.serving, plan_sessions.one_line
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("fresh_size_cache")]

ADD, ADD_ = ALLOWLIST.by_func(torch.add).name, ALLOWLIST.by_func(torch.Tensor.add_).name
CLONE, SUM = ALLOWLIST.by_func(torch.Tensor.clone).name, ALLOWLIST.by_func(torch.Tensor.sum).name
MM = ALLOWLIST.by_func(torch.matmul).name


# ------------------------------------------------------------------ a result's op graph is charged

def _long_plan(name):
    """200 adds of the data to itself, then its sum: a listing of 200 lines in every result's op graph."""
    ops = [PlanOp(ADD, (SlotRef(0), SlotRef(0)), {"alpha": 1.0}, [1 + i], False) for i in range(200)]
    ops.append(PlanOp(SUM, (SlotRef(200),), {}, [201], False))
    return PlanSpec(name, 1, 0, 202, ops, SlotRef(201))


def _listings_held(srv):
    """Bytes of the distinct plan listings the stored objects' op graphs hold (each counted once)."""
    seen = {}
    for _, entry in srv.monitor.owner_entries():
        for node in (entry.meta.get("graph") or {}).values():
            plan = node.get("plan")
            if isinstance(plan, list):
                seen[id(plan)] = sys.getsizeof(plan) + sum(sys.getsizeof(line) for line in plan)
    return sum(seen.values())


@pytest.mark.parametrize("descendants", [False, True])
def test_plan_results_op_graphs_count_against_the_session_quota(hook, descendants):
    """Runs of inline plans over data under review (each a new listing), kept as they are or as a derived
    result whose plan result is freed: the listings they hold never pass what the session is charged, and the
    session is refused once its quota is spent."""
    quota = 1 << 18
    srv, s, xid = _setup(hook, f"rt-pl4-graph-{descendants}", quota, policy="review")
    refused = None
    for i in range(120):
        reply, (rid,) = run_command(srv, s, "veil.plan.run", _long_plan(f"p{i}"), [m.ObjectRef(xid)], [])
        if type(reply) is m.ErrorReply:
            refused = reply
            break
        if descendants:
            kept, _ = run_command(srv, s, ADD, m.ObjectRef(rid), 0.0)
            if type(kept) is m.ErrorReply:
                refused = kept
                break
            assert type(request(srv, s, m.DeleteMessage([rid]))) is m.OkReply
        held = _listings_held(srv)
        assert held <= srv.monitor.session_bytes(s.id), (i, held, srv.monitor.session_bytes(s.id))
    assert refused is not None, "120 listings held under a 256 KiB quota"
    assert _one_line(refused).error == "QuotaExceededError", refused
    assert srv.monitor.session_bytes(s.id) <= quota
    _serving(srv, s, xid)


def _writes_state_plan(name):
    """The long plan, its sum added into the requester's state in place (the state's graph gains its listing)."""
    spec = _long_plan(name)
    spec.n_state, spec.n_slots = 1, 204
    for op in spec.ops:  # (slot 1 is the state now: the adds move up one)
        op.args = tuple(SlotRef(a.slot + 1 if a.slot else 0) if isinstance(a, SlotRef) else a for a in op.args)
        op.out_slots = [o + 1 for o in op.out_slots]
    spec.ops.append(PlanOp(ADD_, (SlotRef(1), SlotRef(202)), {}, [1], False))
    spec.ops.append(PlanOp(CLONE, (SlotRef(202),), {}, [203], False))
    spec.outputs = SlotRef(203)
    return spec


def test_a_state_written_by_many_plans_is_charged_its_graph(hook):
    """The requester's own tensor written in place by runs of inline plans over data under review: its op graph
    keeps up to 64 of their listings; they count against the session quota like a result's."""
    quota = 1 << 18
    srv, s, xid = _setup(hook, "rt-pl4-graph-inplace", quota, policy="review")
    state = send_tensor(srv, s, torch.zeros(()))
    refused = None
    for i in range(80):
        reply, (rid,) = run_command(srv, s, "veil.plan.run", _writes_state_plan(f"w{i}"), [m.ObjectRef(xid)],
                                    [m.ObjectRef(state)])
        if type(reply) is m.ErrorReply:
            refused = reply
            break
        assert type(request(srv, s, m.DeleteMessage([rid]))) is m.OkReply
        held = _listings_held(srv)
        assert held <= srv.monitor.session_bytes(s.id), (i, held, srv.monitor.session_bytes(s.id))
    assert refused is not None and _one_line(refused).error == "QuotaExceededError", refused
    _serving(srv, s, xid)


def test_runs_of_one_stored_plan_share_its_listing(hook):
    srv, s, xid = _setup(hook, "rt-pl4-graph-shared", policy="review")
    pid = new_id()
    assert type(request(srv, s, m.ObjectMessage([m.StoredObject(pid, _long_plan("stored"))]))) is m.OkReply
    for _ in range(3):
        reply, _ = run_command(srv, s, "veil.plan.run", m.ObjectRef(pid), [m.ObjectRef(xid)], [])
        assert type(reply) is m.OkReply, reply
    listings = {id(n["plan"]) for _, e in srv.monitor.owner_entries() for n in (e.meta.get("graph") or {}).values()
                if "plan" in n}
    assert len(listings) == 1, listings
    _serving(srv, s, xid)


# ------------------------------------------------------------------ a cut step leaves no half-updated model

class _CutAfter(cancellation.CancelToken):
    """The worker's deadline, passed at the ``k``-th check (one check per plan op with CHECK_EVERY = 1)."""

    def __init__(self, k):
        super().__init__()
        self.left = k

    def check(self):
        self.left -= 1
        if self.left < 0:
            raise sy.exceptions.CommandTimeoutError("cut by the test's deadline")


def _torch_steps(model, x, y, lr, batch):
    """The parameters after each whole SGD step of plain torch (index 0: before the first)."""
    model = _copy(model)
    after = [[p.detach().clone() for p in model.parameters()]]
    for start in range(0, len(x), batch):
        loss = nn.functional.mse_loss(model(x[start:start + batch]), y[start:start + batch])
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
                p.grad = None
        after.append([p.detach().clone() for p in model.parameters()])
    return after


def _copy(model):
    twin = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    twin.load_state_dict(model.state_dict())
    return twin


def test_a_fit_cut_part_way_leaves_the_model_as_a_whole_number_of_torch_steps(hook, monkeypatch):
    """Cut at every op of a 3-step fit in turn: the parameters the requester gets back are torch's after some
    whole number of SGD steps (never some layers a step ahead of others), and no gradient is left set."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(12, 3), torch.randn(12, 2)
    expected = _torch_steps(model, x, y, 0.1, 4)
    w = sy.VirtualWorker(hook, id="rt-pl4-cut")
    plan = training_plan(_copy(model), nn.functional.mse_loss, 0.1, args_shape=[(-1, 3), (-1, 2)])
    ptr = plan.send(w)
    xp, yp = x.send(w), y.send(w)
    monkeypatch.setattr(interpreter, "CHECK_EVERY", 1)
    start = [t.detach().clone() for t in expected[0]]
    seen = set()
    for k in range(0, 200):
        ptr.load_state(start)
        try:
            with cancellation.running(_CutAfter(k)):
                ptr.fit(xp, yp, batch_size=4, epochs=1, shuffle=False)
        except sy.exceptions.CommandTimeoutError:
            finished = False
        else:
            finished = True
        got = ptr.get_state()
        steps = [j for j, want in enumerate(expected)
                 if all(torch.allclose(g, e, atol=1e-6) for g, e in zip(got, want))]
        assert steps, f"cut at check {k}: the model is no whole number of torch steps"
        seen.add(steps[0])
        stored = {oid: e.obj for oid, e in w.monitor.owner_entries()}
        assert all(stored[p.id_at_location].grad is None for p in ptr.state), f"cut at check {k}: grads left"
        if finished:
            assert steps == [3]
            break
    assert seen == {0, 1, 2, 3}, seen


# ------------------------------------------------------------------ selections of a constant are fresh tensors

_C = torch.arange(12.0).reshape(4, 3)
_SELECTIONS = {
    "take": (torch.take, lambda i: (_C, i), torch.tensor([0, 5, 11])),
    "gather": (torch.gather, lambda i: (_C, 0, i), torch.tensor([[3, 2, 1]])),
    "index_select": (torch.index_select, lambda i: (_C, 0, i), torch.tensor([2, 0])),
    "masked_select": (torch.masked_select, lambda i: (_C, i), _C > 6),
}


@pytest.mark.parametrize("name", sorted(_SELECTIONS))
def test_a_plan_may_return_a_selection_of_its_constant_and_writes_to_it_stay_there(hook, name):
    """torch allocates these results (their ATen schemas return no alias): a plan returning one is not refused
    as returning its constant, and an in-place write into a stored result leaves the next run's constant as
    it was (compared with torch)."""
    func, args, index = _SELECTIONS[name]
    schema = getattr(torch.ops.aten, name).default._schema
    assert all(r.alias_info is None for r in schema.returns), schema
    spec = PlanSpec(name, 1, 0, 2, [PlanOp(ALLOWLIST.by_func(func).name, args(SlotRef(0)), {}, [1], False)],
                    SlotRef(1))
    srv, s, xid = _setup(hook, f"rt-pl4-fresh-{name}")
    pid = new_id()
    stored = request(srv, s, m.ObjectMessage([m.StoredObject(pid, spec)]))
    assert type(stored) is m.OkReply, stored
    idx = send_tensor(srv, s, index)
    want = func(*args(index))
    firsts = []
    for _ in range(2):
        reply, (rid,) = run_command(srv, s, "veil.plan.run", m.ObjectRef(pid), [m.ObjectRef(idx)], [])
        assert type(reply) is m.OkReply, reply
        firsts.append(rid)
        wrote, _ = run_command(srv, s, ADD_, m.ObjectRef(rid), 100.0, n=0)
        assert type(wrote) is m.OkReply, wrote
    for rid in firsts:
        assert torch.equal(_get(srv, s, rid).objects[0], want + 100), name
    _serving(srv, s, xid)


def test_a_selection_written_out_into_a_constant_is_still_refused(hook):
    """What holds: ``out=`` makes a selection write into its argument; into a constant, the plan is refused."""
    C, OUT = torch.zeros(2, 3), torch.zeros(2, 3)
    spec = PlanSpec("sel-out", 1, 0, 2, [PlanOp(ALLOWLIST.by_func(torch.index_select).name, (C, 0, SlotRef(0)),
                                                {"out": OUT}, [1], False)], SlotRef(1))
    srv, s, xid = _setup(hook, "rt-pl4-fresh-out")
    stored = request(srv, s, m.ObjectMessage([m.StoredObject(new_id(), spec)]))
    assert _one_line(stored).error == "OperationNotAllowedError", stored
    _serving(srv, s, xid)


# ------------------------------------------------------------------ the requester's argument errors say what is wrong

def _training_spec():
    model = nn.Linear(3, 1)
    return training_plan(model, nn.functional.mse_loss, 0.1, args_shape=[(-1, 3), (-1, 1)]), model


@pytest.mark.parametrize("bad", ["batch_size", "epochs", "rows", "state", "max_batches"])
def test_fit_argument_errors_on_owner_data_say_what_is_wrong(hook, bad):
    plan, model = _training_spec()
    srv, s, xid = _setup(hook, f"rt-pl4-args-{bad}", private=True)
    target = send_tensor(srv, s, torch.zeros(3 if bad == "rows" else 4, 1))
    state = [m.ObjectRef(send_tensor(srv, s, p.detach().clone())) for p in model.parameters()]
    args = {"batch_size": 2, "epochs": 1, "state": state, "max_batches": None}
    args.update({"batch_size": 0} if bad == "batch_size" else {"epochs": 0} if bad == "epochs"
                else {"state": state[:1]} if bad == "state" else {"max_batches": -1} if bad == "max_batches" else {})
    reply, _ = run_command(srv, s, "veil.plan.fit", plan.spec, m.ObjectRef(xid), m.ObjectRef(target),
                           args["state"], args["batch_size"], args["epochs"], False, False, [], args["max_batches"])
    assert _one_line(reply).error == "RemoteExecutionError", reply
    words = {"batch_size": "batch_size", "epochs": "epochs", "rows": "different numbers of rows",
             "state": "state tensors", "max_batches": "max_batches"}[bad]
    assert words in reply.message and "tensor(" not in reply.message and "4" not in reply.message, reply
    _serving(srv, s, xid)


def _hidden(srv, s, value):
    hid = new_id()
    obj = m.StoredObject(hid, value, ('#veil.cap.reveal_to=["carol"]',))
    assert type(request(srv, s, m.ObjectMessage([obj]))) is m.OkReply
    return hid


@pytest.mark.parametrize("whose", ["hidden", "private"])
def test_fix_prec_with_a_precision_past_the_ring_says_so_on_any_value(hook, whose):
    srv, s, xid = _setup(hook, f"rt-pl4-prec-{whose}", private=True)
    messages = set()
    for value in (torch.tensor([1.0]), torch.tensor([float("nan")])):
        oid = _hidden(srv, s, value) if whose == "hidden" else srv.load(value, tags=("#v",), private=True)
        reply, _ = run_command(srv, s, "veil.compat.encode", m.ObjectRef(oid), 10, 30)
        assert _one_line(reply).error != "ProtectedDataError", reply
        assert "10^30" in reply.message and "ring" in reply.message, reply
        messages.add(reply.message)
    assert len(messages) == 1, messages
    _serving(srv, s, xid)


# ------------------------------------------------------------------ func2plan runs its body once

def test_func2plan_runs_a_function_that_reads_no_size_once(hook):
    """PySyft traces a function once: its side effects (a call counter) happen once; the plan still follows
    any batch size (compared with torch on 5 rows and on 1)."""
    calls = []

    @func2plan(args_shape=[(-1, 3)])
    def affine(x):
        calls.append(1)
        return torch.relu(x * 2.0 - 1.0).sum(1)

    assert len(calls) == 1, calls
    for rows in (5, 1):
        x = torch.randn(rows, 3)
        assert torch.allclose(affine(x), torch.relu(x * 2.0 - 1.0).sum(1))


def test_a_plan_traced_once_fails_loudly_where_its_function_would_have_branched(hook):
    """An error the function catches did not happen on the example (nothing read a size: traced once): on a
    batch where the op fails, the plan fails at that op, in one line, never a silently different result (as a
    plan whose second trace fails keeps its example's batch)."""
    calls = []

    @func2plan(args_shape=[(-1, 3)])
    def pairs(x):
        calls.append(1)
        try:
            return x.view(2, 3).sum(0)
        except RuntimeError:
            return x.sum(0)

    assert len(calls) == 1
    x = torch.randn(2, 3)
    assert torch.allclose(pairs(x), x.sum(0))
    with pytest.raises(sy.exceptions.RemoteExecutionError, match="failed at Tensor.view"):
        pairs(torch.randn(3, 3))


@pytest.mark.parametrize("how", ["shape", "len", "unbind", "caught"])
def test_a_function_that_may_depend_on_the_batch_size_is_still_traced_twice(hook, how):
    """What holds: a function that reads a size, a count, a list as long as the rows, or catches an op's error
    on its example (which may follow the rows) is traced again on one more row; one that depends on the rows in
    a way a worker cannot replay is refused, one that can follows the batch."""
    calls = []

    def body(x):
        calls.append(1)
        if how == "shape":
            return x.sum() / x.shape[0]
        if how == "len":
            return x * float(len(x))
        if how == "unbind":
            return sum(x.unbind(0))
        try:  # (fails on the example's 2 rows, not on 3)
            return x.view(3, 3).sum(0)
        except RuntimeError:
            return x.sum(0)

    if how == "shape":
        plan = func2plan(args_shape=[(-1, 3)])(body)
        x = torch.randn(5, 3)
        assert torch.allclose(plan(x), x.sum() / 5)
    else:
        with pytest.raises(BatchDependentPlanError):
            func2plan(args_shape=[(-1, 3)])(body)
    assert len(calls) == 2, calls
