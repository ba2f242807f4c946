"""Red team: sizing a command's results on ``meta`` before its op runs (``veil/workers/output_bounds.py``, e4ecef9).

The goal of the change: with ``--max-session-mb`` set, a session cannot make the worker allocate much more
than its quota for one request; a request that would is refused (QuotaExceededError) *before* the op
allocates. As in ``test_output_bounds.py``, sizes are chosen so that the unchecked op cannot allocate at all
(terabytes): the allocator's ``RuntimeError: ... can't allocate`` (wrapped in a RemoteExecutionError reply)
proves the op ran and tried to allocate, where a QuotaExceededError proves it was refused first. Requests go
through a real ``WebsocketServerWorker`` session (``serve_bytes``), in process. Nothing here allocates more than
a few MiB for real.

Findings (the tests named here failed at e4ecef9; fixed in session 44, see ``output_bounds``' docstring):

1. ``test_a_size_given_as_a_stored_scalar_tensor_is_sized_before_the_op_runs``: a size, fill value or ``k``
   given as a stored 0-dim tensor (``torch.zeros(t)``, ``torch.full((2**40,), t)``, ``torch.arange(t)``,
   ``x.repeat(t)``, ``torch.full_like(expanded, t)``, ``topk(expanded, t)``, ``F.pad(x, (2**40, 0), value=t)``)
   makes the meta run fail (``.item()`` of a meta tensor), the op is let through as "value-dependent" and
   allocates terabytes. ``torch.full((2**40,), t)`` is not even value-dependent: its size is a plain int.
2. ``test_a_value_dependent_size_the_requester_chooses_is_bounded``: ``F.one_hot(t)`` without ``num_classes``,
   ``repeat_interleave(x, tensor)`` - the requester's own values pick an unbounded size, the meta run fails,
   the op is let through.
3. ``test_a_value_dependent_op_over_a_broadcast_is_bounded``: ``masked_select`` of a (2^20, 1) and a (2^20,)
   mask (8 MiB stored) allocates its 2^40-element broadcast; the "charged afterwards" fallback has no bound
   below the broadcast numel.
4. ``test_an_out_argument_resized_by_the_op_is_sized``: ``torch.add(col, row, out=y)`` / ``torch.zeros(n,
   out=y)`` with ``y`` a small tensor the session computed: on meta the result *is* the (meta) ``out`` input,
   so it counts 0 bytes, but the real op resizes ``y``'s storage to the broadcast (4 TiB).
5. ``test_an_op_whose_intermediate_dwarfs_its_result_is_refused``: only results are sized. Losses over a
   broadcast (``l1_loss``/``mse_loss`` of (2^20, 1) and (2^20,): 4 TiB of differences for a scalar), and
   reductions/contractions of an expanded view the session stored for 256 bytes (``median``,
   ``tensordot``, ``allclose``) materialize the full logical tensor.
6. ``test_a_plan_cannot_hold_more_than_the_quota_in_intermediates``: each plan op is sized against the room
   the session has left, but the interpreter keeps every intermediate slot alive until the plan ends: N ops
   of (just under) the remaining room each hold N times it at once.
7. ``test_the_size_cache_does_not_keep_what_requesters_send``: signatures keep ``str`` arguments as they
   came; even a refused/failed op's signature is cached (``_UNKNOWN``). 4096 entries of up to a 256 MiB frame
   each, shared by every session of the process and charged to none, kept after the session ends.

The other tests pin properties that held (views, in-place ops, tuple results near a full quota; sizing is
value independent; signatures keep int/bool/float apart).
"""

from __future__ import annotations

import weakref

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.workers import output_bounds

from server_sessions import quota_worker, session_helpers  # noqa: E402

TOKEN = "rt44-ob-scientist"
QUOTA = 64 << 20
N = 1 << 20
TB = 1 << 40

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("fresh_size_cache")]


@pytest.fixture
def worker(hook):
    return quota_worker(hook, "rt-ob-alice", TOKEN, QUOTA)


_session, _req, _send, _command, _computed = session_helpers(TOKEN, grad=False)


def _assert_refused_unallocated(reply, op):
    assert type(reply) is m.ErrorReply, (op, reply)
    assert "can't allocate" not in reply.message, f"{op} ran and tried to allocate terabytes: {reply.message[:200]}"
    assert reply.error == "QuotaExceededError" or "QuotaExceededError" in reply.message, (op, reply)


# 1 ---------------------------------------------------------------------------------------------------------------

_SCALAR_CASES = {
    "zeros(t)": ("torch.zeros", lambda e: ((e["t"],), {})),
    "ones(t)": ("torch.ones", lambda e: ((e["t"],), {})),
    "arange(t)": ("torch.arange", lambda e: ((e["t"],), {})),
    "full((2**40,), t)": ("torch.full", lambda e: (((TB,), e["t"]), {})),
    "repeat(x, t)": ("Tensor.repeat", lambda e: ((e["x"], e["t"]), {})),
    "full_like(expanded, t)": ("torch.full_like", lambda e: ((e["big"], e["t"]), {})),
    "topk(expanded, t20)": ("torch.topk", lambda e: ((e["big"], e["t20"]), {})),
    "pad(x, (2**40, 0), value=t)": ("torch.nn.functional.pad", lambda e: ((e["x"], (TB, 0)), {"value": e["t"]})),
}


@pytest.mark.parametrize("case", list(_SCALAR_CASES))
def test_a_size_given_as_a_stored_scalar_tensor_is_sized_before_the_op_runs(worker, case):
    """A 0-dim tensor the session stored (its own value, 2**40) stands where torch takes a number. On meta it
    has no value (``.item()`` raises), new_bytes answers _UNKNOWN and the op is let through: the real op reads
    the value and allocates terabytes. Fix: under a quota, an op that cannot be sized is refused (or a
    requester-readable 0-dim tensor is read as its number before the meta run)."""
    op, build = _SCALAR_CASES[case]
    s = _session(worker)
    small = _send(worker, s, torch.ones(1))
    env = {"t": _send(worker, s, torch.tensor(TB)), "t20": _send(worker, s, torch.tensor(N)),
           "x": _send(worker, s, torch.ones(4)), "big": _computed(worker, s, "Tensor.expand", small, N, N)}
    args, kwargs = build(env)
    reply, _ = _command(worker, s, op, *args, n=2 if op == "torch.topk" else 1, **kwargs)
    _assert_refused_unallocated(reply, case)


# 2 ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["torch.nn.functional.one_hot", "torch.repeat_interleave"])
def test_a_value_dependent_size_the_requester_chooses_is_bounded(worker, op):
    """``one_hot(t)`` with no ``num_classes`` (size: ``t.max() + 1``) and ``repeat_interleave(x, repeats)``
    (size: ``repeats.sum()``) fail on meta, so they are let through, with sizes the requester picks freely
    (2**40 here): the "charged afterwards" fallback charges nothing the worker could allocate. Fix: refuse,
    under a quota, value-dependent ops without a shape-only upper bound (or require ``num_classes`` /
    ``output_size``)."""
    s = _session(worker)
    t = _send(worker, s, torch.tensor([TB]))
    args = (t,) if op.endswith("one_hot") else (_send(worker, s, torch.ones(1)), t)
    reply, _ = _command(worker, s, op, *args)
    _assert_refused_unallocated(reply, op)


# 3 ---------------------------------------------------------------------------------------------------------------

def test_a_value_dependent_op_over_a_broadcast_is_bounded(worker):
    """``masked_select(col, mask)`` broadcasts a (2^20, 1) tensor and a (2^20,) mask (8 MiB stored) to 2^40
    elements; its output size depends on the mask, so the meta run fails and the op runs: 4 TiB. Its bound
    is shape-only (the broadcast numel times the element size): a fix sizes value-dependent ops by such a
    bound (``nonzero``: numel x ndim x 8, ``masked_select``/bool ``__getitem__``: broadcast numel...)."""
    s = _session(worker)
    col = _send(worker, s, torch.ones(N, 1))
    mask = _send(worker, s, torch.ones(N, dtype=torch.bool))
    reply, _ = _command(worker, s, "torch.masked_select", col, mask)
    _assert_refused_unallocated(reply, "torch.masked_select")


# 4 ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["add(col, row, out=y)", "zeros(2**40, out=y)"])
def test_an_out_argument_resized_by_the_op_is_sized(worker, case):
    """``out=`` names a tensor the session computed (resizable storage, 16 bytes). On meta the op resizes the
    meta copy of ``out`` and returns it: it *is* an input, so new_bytes counts 0. The real op resizes ``y``'s
    storage to the full result (4 TiB). Fix: count an input's storage growth (compare each meta input's
    ``untyped_storage().nbytes()`` before and after), or refuse ``out=`` under a quota."""
    s = _session(worker)
    y = _computed(worker, s, "torch.zeros", 4)
    if case.startswith("add"):
        col, row = _send(worker, s, torch.ones(N, 1)), _send(worker, s, torch.ones(N))
        reply, _ = _command(worker, s, "torch.add", col, row, out=y)
    else:
        reply, _ = _command(worker, s, "torch.zeros", TB, out=y)
    _assert_refused_unallocated(reply, case)


# 5 ---------------------------------------------------------------------------------------------------------------

_INTERMEDIATE_CASES = {
    "l1_loss(col, row)": ("torch.nn.functional.l1_loss", lambda e: (e["col"], e["row"])),
    "mse_loss(col, row)": ("torch.nn.functional.mse_loss", lambda e: (e["col"], e["row"])),
    "median(expanded)": ("torch.median", lambda e: (e["big"],)),
    "tensordot(expanded, expanded)": ("torch.tensordot", lambda e: (e["big"], e["big"])),
    "allclose(expanded, expanded)": ("torch.allclose", lambda e: (e["big"], e["big"])),
}


@pytest.mark.parametrize("case", list(_INTERMEDIATE_CASES))
def test_an_op_whose_intermediate_dwarfs_its_result_is_refused(worker, case):
    """Only results are sized, but the goal is the transient allocation of one request. A loss over a
    broadcast returns a scalar after materializing the (2^20 x 2^20) differences; ``median``, ``tensordot``
    and ``allclose`` of an expanded view (stored for 256 bytes: a view is charged its storage) copy or compare
    the full 2^40-element logical tensor. Fix: also bound by the inputs' broadcast / logical numel times the
    element size (what an elementwise or reducing kernel may materialize), not only the outputs' storage."""
    op, build = _INTERMEDIATE_CASES[case]
    s = _session(worker)
    env = {"col": _send(worker, s, torch.ones(N, 1)), "row": _send(worker, s, torch.ones(N))}
    env["big"] = _computed(worker, s, "Tensor.expand", _send(worker, s, torch.ones(1)), N, N)
    reply, _ = _command(worker, s, op, *build(env))
    _assert_refused_unallocated(reply, case)


# 6 ---------------------------------------------------------------------------------------------------------------

def test_a_plan_cannot_hold_more_than_the_quota_in_intermediates(worker, monkeypatch):
    """Each plan op is checked against what the session has left, one at a time, but nothing is charged
    while the plan runs and the interpreter keeps every slot alive to the end: 96 ops of 64 KiB each (each
    fits a 1 MiB quota) hold 6 MiB at once. Observed by wrapping the interpreter's sized call to track the
    live bytes of the results (weak references: nothing kept alive by the test). Fix: charge a plan run's
    predicted results cumulatively (or free slots after their last use and charge what is live)."""
    from veil.plans import interpreter
    from veil.plans.plan import func2plan

    quota = 1 << 20
    worker.monitor.max_session_bytes = quota
    live: list = []
    peak = [0]
    original = interpreter._sized

    def observed(func, name, size_check):
        call = original(func, name, size_check)

        def run(*args, **kwargs):
            result = call(*args, **kwargs)
            if isinstance(result, torch.Tensor):
                live.append((weakref.ref(result), result.untyped_storage().nbytes()))
            peak[0] = max(peak[0], sum(n for r, n in live if r() is not None))
            return result
        return run

    monkeypatch.setattr(interpreter, "_sized", observed)

    @func2plan(args_shape=[(1 << 14,)])
    def many(x):
        ys = [x + float(i) for i in range(96)]
        return ys[-1].sum()

    s = _session(worker)
    oid = new_id()
    assert type(_req(worker, s, m.ObjectMessage([m.StoredObject(oid, many.spec)]))) is m.OkReply
    x = _send(worker, s, torch.ones(1 << 14))
    reply, _ = _command(worker, s, "veil.plan.run", m.ObjectRef(oid), [x], [])
    refused = type(reply) is m.ErrorReply and "QuotaExceededError" in (reply.error + reply.message)
    assert refused or peak[0] <= quota, (
        f"the plan held {peak[0] / 2**20:.1f} MiB of intermediates at once under a {quota / 2**20:.0f} MiB quota")


# 7 ---------------------------------------------------------------------------------------------------------------

def test_the_size_cache_does_not_keep_what_requesters_send(worker):
    """A ``str`` argument goes into the signature as it came, and the signature is cached even when the op
    cannot run (``_UNKNOWN``): eight 1 MiB strings from a 1 MiB-quota session stay in the process-wide cache
    (up to 4096 x the 256 MiB frame limit), charged to no one, after the session ended. Fix: leave strings
    longer than a few dozen characters (and the items' total size) out of signatures (``_Unkeyable``)."""
    worker.monitor.max_session_bytes = 1 << 20
    s = _session(worker)
    x = _send(worker, s, torch.ones(4))
    for i in range(8):
        _command(worker, s, "torch.add", x, 1, alpha="A" * (1 << 20) + str(i))
    worker.end_session(s)
    kept = sum(len(v) for key in list(output_bounds._cache) for item in key if type(item) is tuple
               for v in item if type(v) is str)
    assert kept <= 64 << 10, f"the size cache keeps {kept / 2**20:.1f} MiB of a finished session's strings"


# pinned properties -----------------------------------------------------------------------------------------------

def test_views_in_place_ops_and_tuple_results_are_not_refused_near_a_full_quota(worker):
    """No false refusal: with 60 of 64 MiB held, a view, an in-place op on the big tensor and ``sort`` (two
    results) of a small one pass; only what is really new is counted."""
    s = _session(worker)
    held = _send(worker, s, torch.zeros(15 << 20))  # 60 MiB
    small = _send(worker, s, torch.randn(1 << 10))
    for op, args, n in (("Tensor.add_", (held, 1.0), 1), ("Tensor.t", (small,), 1), ("torch.sort", (small,), 2),
                        ("torch.split", (small, 256), 4), ("Tensor.expand", (small, 64, 1 << 10), 1)):
        if op == "Tensor.add_":  # an in-place op's result is its input: return id 0
            reply = _req(worker, s, m.CommandMessage(op, args, {}, [0], False))
        else:
            reply, _ = _command(worker, s, op, *args, n=n)
        assert type(reply) is m.OkReply, (op, reply)
    assert output_bounds.new_bytes(torch.Tensor.add_, (torch.zeros(15 << 20), 1.0), {}) == 0


def test_the_size_does_not_depend_on_values():
    """Meta runs see shapes only: the same prediction for any value (nothing learnt about a secret input)."""
    for a, b in ((torch.zeros(8, 8), torch.randn(8, 8)), (torch.zeros(8, dtype=torch.long), torch.arange(8))):
        for func, extra in ((torch.sort, ()), (torch.cumsum, (0,)), (torch.outer, "self"), (torch.kron, "self")):
            if extra == "self" and a.dim() != 1 and func is torch.outer:
                continue
            xa = (a, a) if extra == "self" else (a, *extra)
            xb = (b, b) if extra == "self" else (b, *extra)
            assert output_bounds.new_bytes(func, xa, {}) == output_bounds.new_bytes(func, xb, {})


def test_signatures_keep_int_bool_and_float_apart():
    """A cached size is not reused for an argument that only compares equal (True == 1 == 1.0)."""
    def sig(name, args, kwargs):
        return output_bounds._signature("session-a", name, args, kwargs)

    keys = {sig("Tensor.repeat", (torch.ones(2), v), {}) for v in (1, True, 1.0)}
    assert len(keys) == 3
    assert sig("torch.zeros", ([1, 2],), {}) != sig("torch.zeros", ((1, 2),), {})
    assert sig("torch.sum", (torch.ones(2, 3),), {"dim": 0}) != sig("torch.sum", (torch.ones(2, 3), 0), {})
    # sessions keep their own sizes (no timing channel between them through a shared cache)
    assert output_bounds._signature("session-b", "torch.zeros", (4,), {}) != sig("torch.zeros", (4,), {})
