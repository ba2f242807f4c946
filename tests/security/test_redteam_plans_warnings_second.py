"""Second red team of the warnings a requester's code raises on a worker (after 18acfec: ``_quiet_run``), and of
the owner data copies a plan run no longer copies again. One test per finding (each a strict xfail on the code
before its fix, run against ``git archive`` of the parent commit), then guards for what held.

Holes found and fixed (one helper now runs all requester code: veil/workers/quiet_warnings.py):
- the "ignore" filter a plan run put first was process-wide: while a plan ran, an owner's strict filter did
  nothing on every other thread of the owner's process (its own warnings were dropped with the plan's);
- ... and it lived in whichever list was current when the run began: another thread's ``catch_warnings`` block
  (entered before the run, left during it) put back its saved list without it, and the rest of the plan's ops
  warned under the owner's filters again ("error": a value-dependent warning failed the run, one bit);
- the tracer's ``catch_warnings`` per op (18acfec) swapped the process's filter list and ``showwarning``: two
  threads tracing at once (one op inside the other's) left one thread's copy ("always" first) and its recorder to
  the whole process for good, every later warning appended to a list no one reads; ops are now traced with their
  warnings kept for this thread only (``quiet_warnings.capturing``);
- a direct torch command was never quieted: under the owner's "error" filter its warning failed the command
  (on the owner's data or the scientist's own), and under the default action each distinct text (shapes in
  it: ``mse_loss`` of a column against a row, ``out=`` resized) was a line in the owner's log and an entry kept
  in a module's ``__warningregistry__`` for as long as the worker runs (memory without bound);
- a DP release's per-record gradients ran the requester's plan with its warnings reaching the owner's filters:
  under "error" a warning failed every record, each then contributing zero (gradients unlike torch's).
"""

from __future__ import annotations

import functools
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from veil.dp import plan_grads
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.plans import interpreter
from veil.plans.ops import PlanOp, PlanSpec, SlotRef
from veil.plans.trace import trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plan_sessions  # noqa: E402
from server_sessions import run_command, send_tensor  # noqa: E402

TOKEN = "rt-plans-warnings-second-token"
_setup = functools.partial(plan_sessions.setup, token=TOKEN)
_get, _serving, _one_line = plan_sessions.get, plan_sessions.serving, plan_sessions.one_line
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("fresh_size_cache")]

ADD, ADD_, SUM = (ALLOWLIST.by_func(f).name for f in (torch.add, torch.Tensor.add_, torch.sum))
GT, ZEROS, MUL = (ALLOWLIST.by_func(f).name for f in (torch.gt, torch.zeros, torch.mul))
SELECT, VIEW = ALLOWLIST.by_func(torch.masked_select).name, ALLOWLIST.by_func(torch.Tensor.view).name
MSE = ALLOWLIST.by_func(torch.nn.functional.mse_loss).name


def _selects_into(k):
    """The owner's positive values (9 of them) selected into a plan-made buffer of ``k`` elements (resized, with
    a warning, when ``k`` is not 9), returned summed."""
    ops = [PlanOp(GT, (SlotRef(0), 0.0), {}, [1], False),
           PlanOp(ZEROS, ((k,),), {}, [2], False),
           PlanOp(SELECT, (SlotRef(0), SlotRef(1)), {"out": SlotRef(2)}, [2], False),
           PlanOp(SUM, (SlotRef(2),), {}, [3], False)]
    return PlanSpec(f"select-{k}", 1, 0, 4, ops, SlotRef(3))


def _run_plan(srv, s, spec, inputs, state=()):
    return run_command(srv, s, "veil.plan.run", spec, [m.ObjectRef(i) for i in inputs],
                       [m.ObjectRef(t) for t in state])


# ------------------------------------------------------------------ the drop is this thread's, and stays for the run

def test_an_owner_thread_keeps_its_strict_filter_while_a_plan_runs(hook, monkeypatch):
    """While a plan runs on a worker thread, the owner's own code on another thread warns under the owner's
    "error" filter: the warning is raised there, as without the plan (the plan's process-wide "ignore" dropped
    every thread's warnings while it ran); the plan still runs."""
    srv, s, xid = _setup(hook, "rt-plw2-thread")
    raised, real = [], interpreter.run

    def beside_the_owners_thread(*args, **kwargs):
        def owners_code():
            try:
                warnings.warn("the owner's own warning", UserWarning)
                raised.append(False)
            except UserWarning:
                raised.append(True)
        thread = threading.Thread(target=owners_code)
        thread.start()
        thread.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(interpreter, "run", beside_the_owners_thread)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reply, _ = _run_plan(srv, s, _selects_into(5), [xid])
    assert type(reply) is m.OkReply, reply
    assert raised == [True], raised
    _serving(srv, s, xid)


def test_a_plans_warnings_stay_dropped_when_another_threads_block_ends_mid_run(hook, monkeypatch):
    """Another thread's ``catch_warnings`` block, entered before a plan's run and left while it runs, puts back
    the list it saved: the rest of the plan's ops still run with their warnings dropped (a buffer of 5 for 9
    positive values: resized, a warning, which the owner's "error" filter made a failure)."""
    srv, s, xid = _setup(hook, "rt-plw2-block")
    real = interpreter.run
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the owner's filters, set before the worker served)
        assert type(_run_plan(srv, s, _selects_into(9), [xid])[0]) is m.OkReply
        block = warnings.catch_warnings()  # (on the owner's other thread: it saves the list current now)
        block.__enter__()

        def block_ends_mid_run(*args, **kwargs):
            block.__exit__(None, None, None)
            return real(*args, **kwargs)

        monkeypatch.setattr(interpreter, "run", block_ends_mid_run)
        reply, _ = _run_plan(srv, s, _selects_into(5), [xid])
    assert type(reply) is m.OkReply, reply
    _serving(srv, s, xid)


class _Pausing(torch.Tensor):
    """An example tensor whose first addition on a thread calls that thread's pause (in the trace's op)."""

    pauses: dict = {}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__add__", "add"):
            pause = cls.pauses.pop(threading.get_ident(), None)
            if pause is not None:
                pause()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def test_two_threads_tracing_at_once_leave_the_processs_warnings_as_they_were():
    """Two threads trace a plan at once, the second's op starting inside the first's and ending after it: the
    process's filter list and ``showwarning`` are its own after both (each op's ``catch_warnings`` put back the
    list and the recorder it saved: the first thread's copy, "always" first, and its recorder stayed for good,
    every later warning of the process appended to a list no one reads)."""
    filters, show = warnings.filters, warnings.showwarning
    before = [f for f in filters]
    inside = {k: threading.Event() for k in ("a", "b")}
    go = {k: threading.Event() for k in ("a", "b")}

    def build(key):
        def pause():
            inside[key].set()
            assert go[key].wait(10)
        _Pausing.pauses[threading.get_ident()] = pause
        trace(lambda x: x + 1, (torch.zeros(2).as_subclass(_Pausing),), [], f"pausing-{key}")

    threads = {k: threading.Thread(target=build, args=(k,)) for k in ("a", "b")}
    threads["a"].start()
    assert inside["a"].wait(10)
    threads["b"].start()
    assert inside["b"].wait(10)
    go["a"].set()
    threads["a"].join(10)
    go["b"].set()
    threads["b"].join(10)
    after_filters, after_show = warnings.filters, warnings.showwarning
    warnings.filters, warnings.showwarning = filters, show  # (pytest's own, for the tests after this one)
    assert after_filters is filters and after_show is show, (after_filters[:2], after_show)
    assert [f for f in filters if "Requester" not in getattr(f[2], "__name__", "")] == \
        [f for f in before if "Requester" not in getattr(f[2], "__name__", "")]


# ------------------------------------------------------------------ direct torch commands

def test_a_direct_command_runs_under_the_owners_strict_filter(hook):
    """Under the owner's "error" filter, ``mse_loss`` of a column against a row (a warning: broadcasting)
    failed as a command; it computes what torch computes, on the scientist's tensors and on the owner's."""
    srv, s, xid = _setup(hook, "rt-plw2-direct")
    a, b = torch.randn(4, 1), torch.randn(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reply, (rid,) = run_command(srv, s, MSE, m.ObjectRef(send_tensor(srv, s, a)),
                                    m.ObjectRef(send_tensor(srv, s, b)))
        on_owner, _ = run_command(srv, s, MSE, m.ObjectRef(send_tensor(srv, s, torch.randn(4, 1))),
                                  m.ObjectRef(xid))
    assert type(reply) is m.OkReply, reply
    assert type(on_owner) is m.OkReply, on_owner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.nn.functional.mse_loss(a, b)
    assert torch.allclose(_get(srv, s, rid).objects[0], expected)
    _serving(srv, s, xid)


def _registry_keys():
    """Every (module, key) kept in a module's ``__warningregistry__`` (its version marker left out)."""
    found = set()
    for name, module in list(sys.modules.items()):
        registry = getattr(module, "__dict__", {}).get("__warningregistry__")
        if isinstance(registry, dict):
            found |= {(name, k) for k in registry if k != "version"}
    return found


def test_distinct_warning_texts_of_commands_leave_nothing_in_the_owners_process(hook):
    """Under the default action (a worker's own), 12 commands whose warnings differ by a shape in their text
    (``mse_loss`` broadcasting, ``out=`` resized) show no line and keep no registry entry (each was one, for
    as long as the worker runs: as many as the scientist cares to send)."""
    srv, s, xid = _setup(hook, "rt-plw2-registry")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        before = _registry_keys()
        for n in range(2, 8):
            col, row = send_tensor(srv, s, torch.randn(n, 1)), send_tensor(srv, s, torch.randn(n))
            assert type(run_command(srv, s, MSE, m.ObjectRef(col), m.ObjectRef(row))[0]) is m.OkReply
            out = send_tensor(srv, s, torch.zeros(n + 1))
            assert type(run_command(srv, s, ADD, m.ObjectRef(row), 1.0, out=m.ObjectRef(out))[0]) is m.OkReply
        kept = _registry_keys() - before
    assert not shown, [str(w.message)[:60] for w in shown]
    assert not kept, sorted(map(str, kept))[:4]
    _serving(srv, s, xid)


# ------------------------------------------------------------------ DP per-record gradients

def _warning_forward():
    """(x * w - 0)**2 per element, with ``mse_loss`` of a [1, 3] row against a [3] target: a warning."""
    ops = [PlanOp(MUL, (SlotRef(0), SlotRef(1)), {}, [2], True),
           PlanOp(ZEROS, ((3,),), {}, [3], True),
           PlanOp(MSE, (SlotRef(2), SlotRef(3)), {"reduction": "none"}, [4], True)]
    return interpreter.compile_plan(PlanSpec("warns", 1, 1, 5, ops, SlotRef(4)))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_dp_per_record_gradients_are_torchs_under_the_owners_strict_filter(strategy):
    """Under the owner's "error" filter, a DP release's plan whose op warns on every record gave every record
    a zero gradient (its failure); the gradients are torch's."""
    torch.manual_seed(0)
    w, x, y = torch.randn(3), torch.randn(5, 3), torch.randn(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = plan_grads.per_sample_gradients(_warning_forward(), [w], [True], x, y,
                                                plan_grads.loss_by_name("mse"), strategy=strategy)
    expected = []
    for xi, yi in zip(x, y):
        wi = w.clone().requires_grad_(True)
        expected.append(torch.autograd.grad((((xi * wi) ** 2 - yi) ** 2).sum(), wi)[0])
    assert torch.allclose(grads[0], torch.stack(expected), atol=1e-5), (grads[0], torch.stack(expected))


# ------------------------------------------------------------------ guards: the copies a run no longer copies again

def test_a_failed_run_over_owner_data_given_twice_and_as_state_leaves_everything_as_it_was(hook):
    """What holds: the owner's tensor passed as both inputs and as state, beside the scientist's state, all
    written in place before the run fails: the scientist's state is as it was (its undo copy is taken: only the
    handler's copies of owner data go without), and the owner's tensor unchanged."""
    srv, s, xid = _setup(hook, "rt-plw2-twice")
    mine = send_tensor(srv, s, torch.zeros(4, 3))
    ops = [PlanOp(ADD_, (SlotRef(i), 1.0), {}, [i], False) for i in range(4)]
    ops += [PlanOp(ADD_, (SlotRef(3), SlotRef(0)), {}, [3], False),
            PlanOp(VIEW, (SlotRef(1), (7,)), {}, [4], False)]
    spec = PlanSpec("twice", 2, 2, 5, ops, SlotRef(4))
    reply, _ = _run_plan(srv, s, spec, [xid, xid], [xid, mine])
    _one_line(reply)
    assert torch.equal(_get(srv, s, mine).objects[0], torch.zeros(4, 3))
    _serving(srv, s, xid)
