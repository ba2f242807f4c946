"""Red team of plans (veil/plans/) on the holes the last plans pass left alone: what a plan sees of its ops'
warnings, the copies a run takes of the owner data it writes, and the op-graph charge of many state tensors
written over data under review. One test per finding (each a strict xfail on the code before its fix, run against
``git archive`` of the parent commit), then guards for what held.

Holes found and fixed:
- a traced function could branch on whether an op warned (``warnings.catch_warnings(record=True)``, or
  ``simplefilter("error")`` and an ``except UserWarning``) and still be traced once: the plan silently replayed
  the branch its example took (``std`` of one row warns) on every batch; the tracer now runs each op under a
  fixed filter state, keeps its warnings from the function and shows them once the build is done
  (veil/plans/trace.py);
- a requester's plan reached the owner's process through its ops' warnings: under an "error" filter a warning
  that follows the values (``masked_select(out=)`` resized by the count it selects) failed the run on some data
  only, a bit about owner data per run; under "default" each distinct text was a line in the owner's log and an
  entry in a warnings registry, as many as the requester cares to vary shapes; a plan's run now drops its ops'
  warnings (veil/plans/remote.py: ``_quiet_run``);
- a run whose plan writes owner data passed to it copied that data twice: the handler's copy for the worker
  function, then step_undo's copy of the copy (held against the quota: a run that fits was refused); the
  handler's copies are the command's own, seen by no one after a failed run, and are no longer copied again
  (veil/workers/output_bounds.py: ``own_copies``);
- each of many state tensors a plan writes over data under review was charged every node made for the run's
  inputs (~39 KB each for 48 state tensors: 3.8 MB for a first run whose graphs held ~0.15 MB, refused under a
  2 MiB quota): those nodes are shared by the graphs of everything the run writes and are now charged once; what
  a graph holds alone (its node, the copies and marker its cut to 64 nodes makes) is charged to it
  (veil/governance/provenance.py: ``stamp``).
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import pytest
import torch

from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.plans import Plan
from veil.plans.ops import PlanOp, PlanSpec, SlotRef

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plan_sessions  # noqa: E402
from server_sessions import request, run_command, send_tensor  # noqa: E402

TOKEN = "rt-plans-warnings-token"
SECRET = plan_sessions.SECRET
_setup = functools.partial(plan_sessions.setup, token=TOKEN)
_get, _serving, _one_line = plan_sessions.get, plan_sessions.serving, plan_sessions.one_line
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("fresh_size_cache")]

ADD_, SUM = ALLOWLIST.by_func(torch.Tensor.add_).name, ALLOWLIST.by_func(torch.sum).name
GT, ZEROS = ALLOWLIST.by_func(torch.gt).name, ALLOWLIST.by_func(torch.zeros).name
SELECT, VIEW = ALLOWLIST.by_func(torch.masked_select).name, ALLOWLIST.by_func(torch.Tensor.view).name
MSE = ALLOWLIST.by_func(torch.nn.functional.mse_loss).name


# ------------------------------------------------------------------ a traced function never sees an op's warning

def _branches_on_a_warning(how):
    """The std over rows, or the mean where computing it warned (one row: no degrees of freedom)."""
    def body(x):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always" if how == "record" else "error")
            try:
                spread = x.std(0)
            except UserWarning:
                return x.mean(0)
        return x.mean(0) if seen else spread
    return body


@pytest.mark.parametrize("how", ["record", "error"])
def test_a_traced_function_cannot_branch_on_whether_an_op_warned(hook, how):
    """Built on one row (where ``std`` warns), the plan does what the function does on a batch where no op
    warns: ``std`` of a 4-row batch as torch computes it, never the mean its example's warning chose; the
    warning still reaches the caller, once the build is done."""
    with pytest.warns(UserWarning, match="degrees of freedom"):
        plan = Plan(_branches_on_a_warning(how)).build(torch.randn(1, 3))
    x = torch.randn(4, 3)
    assert torch.allclose(plan(x), x.std(0)), (plan(x), x.std(0))


def test_an_ops_warning_still_follows_the_callers_filters_at_build(hook):
    """What holds: under the caller's "error" filter, an op's warning fails the build, as the function run
    eagerly fails (the trace keeps it from the function, not from the caller)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="degrees of freedom"):
            Plan(lambda x: x.std(0)).build(torch.randn(1, 3))


# ------------------------------------------------------------------ a plan's warnings never reach the owner's process

def _selects_into(k):
    """The owner's positive values selected into a plan-made buffer of ``k`` elements (resized, with a warning,
    when the count differs), returned summed."""
    ops = [PlanOp(GT, (SlotRef(0), 0.0), {}, [1], False),
           PlanOp(ZEROS, ((k,),), {}, [2], False),
           PlanOp(SELECT, (SlotRef(0), SlotRef(1)), {"out": SlotRef(2)}, [2], False),
           PlanOp(SUM, (SlotRef(2),), {}, [3], False)]
    return PlanSpec(f"select-{k}", 1, 0, 4, ops, SlotRef(3))


@pytest.mark.parametrize("action", ["error", "always"])
def test_a_plans_warnings_never_reach_the_owners_process(hook, action):
    """The owner's worker runs under a strict filter ("error") or records every warning ("always"): a plan
    over the owner's data whose ``out=`` is resized (a warning) when the count of positive values is not 5
    (it is 9) runs as the one whose buffer fits, and no warning of it reaches the worker's process."""
    srv, s, xid = _setup(hook, f"rt-plw-owner-{action}")
    with warnings.catch_warnings(record=True) as reached:
        warnings.simplefilter(action)
        replies = [run_command(srv, s, "veil.plan.run", _selects_into(k), [m.ObjectRef(xid)], [])[0]
                   for k in (9, 5)]
    assert [type(r) for r in replies] == [m.OkReply, m.OkReply], replies
    assert not [w for w in reached if "resized" in str(w.message)], [str(w.message) for w in reached]
    _serving(srv, s, xid)


def test_a_plans_warning_under_the_owners_strict_filter_leaves_its_value_as_torch(hook):
    """Under the owner's "error" filter, a plan whose op warns (``mse_loss`` of a column against a row
    broadcasts) failed with the warning's text; it runs, and computes what torch computes."""
    srv, s, xid = _setup(hook, "rt-plw-mse")
    a, b = torch.randn(4, 1), torch.randn(4)
    spec = PlanSpec("mse", 2, 0, 3, [PlanOp(MSE, (SlotRef(0), SlotRef(1)), {}, [2], False)], SlotRef(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reply, (rid,) = run_command(srv, s, "veil.plan.run", spec,
                                    [m.ObjectRef(send_tensor(srv, s, a)), m.ObjectRef(send_tensor(srv, s, b))], [])
    assert type(reply) is m.OkReply, reply
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.nn.functional.mse_loss(a, b)
    assert torch.allclose(_get(srv, s, rid).objects[0], expected)
    _serving(srv, s, xid)


# ------------------------------------------------------------------ owner data a run writes is copied once

def _adds_into_input(fail=False, state=False):
    """1 added in place into the input (and into the state), then its sum; with ``fail``, a view the input's
    shape cannot take after the writes."""
    ops = [PlanOp(ADD_, (SlotRef(0), 1.0), {}, [0], False)]
    if state:
        ops.append(PlanOp(ADD_, (SlotRef(1), 1.0), {}, [1], False))
    if fail:
        ops.append(PlanOp(VIEW, (SlotRef(0), (7,)), {}, [1 + state], False))
    ops.append(PlanOp(SUM, (SlotRef(0),), {}, [2 + state], False))
    return PlanSpec("adds", 1, int(state), 3 + state, ops, SlotRef(2 + state))


def test_owner_data_a_run_writes_is_copied_once(hook, monkeypatch):
    """600 KB of owner data under a 1 MiB quota, written in place by the plan: the worker function's copy of it
    fits, a second copy beside it (step_undo's) would not; the run takes the one copy and sums as torch."""
    taken = plan_sessions.snapshot_spy(monkeypatch)
    big = torch.arange(150_000.0)
    srv, s, xid = _setup(hook, "rt-plw-once", 1 << 20, secret=big)
    reply, (rid,) = run_command(srv, s, "veil.plan.run", _adds_into_input(), [m.ObjectRef(xid)], [])
    assert type(reply) is m.OkReply, reply
    assert not any(taken), taken
    _serving(srv, s, xid, expected=big)


def test_a_failed_run_still_puts_back_the_requesters_state_beside_owner_data(hook):
    """What holds: a run writing the requester's state and the owner's data, then failing, leaves the state as
    it was (all or nothing) and the owner's data unchanged."""
    srv, s, xid = _setup(hook, "rt-plw-undo")
    state = send_tensor(srv, s, torch.zeros(3))
    reply, _ = run_command(srv, s, "veil.plan.run", _adds_into_input(fail=True, state=True), [m.ObjectRef(xid)],
                           [m.ObjectRef(state)])
    _one_line(reply)
    assert torch.equal(_get(srv, s, state).objects[0], torch.zeros(3))
    _serving(srv, s, xid)


# ------------------------------------------------------------------ many state tensors written over reviewed data

def _graphs_nbytes(srv):
    """Bytes the stored objects' op graphs hold, each Python object counted once however many graphs share it
    (the graph dicts, their nodes, and what the nodes hold: strings, lists, plan listings)."""
    seen: set = set()

    def size(obj):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        total = sys.getsizeof(obj)
        if isinstance(obj, dict):
            total += sum(size(v) for v in obj.values())
        elif isinstance(obj, (list, tuple)):
            total += sum(size(v) for v in obj)
        return total

    return sum(size(e.meta.get("graph") or {}) for _, e in srv.monitor.owner_entries())


def _adds_data_into_every_state(n_state):
    """The data's sum added in place into each of ``n_state`` state tensors; returns the first's sum."""
    total = 1 + n_state
    ops = [PlanOp(SUM, (SlotRef(0),), {}, [total], False)]
    ops += [PlanOp(ADD_, (SlotRef(1 + i), SlotRef(total)), {}, [1 + i], False) for i in range(n_state)]
    ops.append(PlanOp(SUM, (SlotRef(1),), {}, [total + 1], False))
    return PlanSpec("every-state", 1, n_state, total + 2, ops, SlotRef(total + 1))


def test_many_state_tensors_written_over_reviewed_data_are_charged_what_their_graphs_hold(hook):
    """48 state tensors written by each run of a plan over data under review: the nodes made for the run's inputs
    are one set shared by the 48 graphs, charged once (not ~39 KB to each: 3.8 MB for the first run, refused
    under a 2 MiB quota); over four runs, what the graphs hold never passes what the session is charged."""
    srv, s, xid = _setup(hook, "rt-plw-charge", 2 << 20, policy="review")
    n = 48
    state = [send_tensor(srv, s, torch.zeros(())) for _ in range(n)]
    spec = _adds_data_into_every_state(n)
    for i in range(4):
        reply, (rid,) = run_command(srv, s, "veil.plan.run", spec, [m.ObjectRef(xid)], [m.ObjectRef(t) for t in state])
        if i == 0:
            assert type(reply) is m.OkReply, reply
        elif type(reply) is not m.OkReply:
            assert _one_line(reply).error == "QuotaExceededError", reply
        assert _graphs_nbytes(srv) <= srv.monitor.session_bytes(s.id), (i, _graphs_nbytes(srv),
                                                                        srv.monitor.session_bytes(s.id))
    assert type(request(srv, s, m.DeleteMessage(state))) is m.OkReply  # (room for the still-serving check)
    _serving(srv, s, xid)
