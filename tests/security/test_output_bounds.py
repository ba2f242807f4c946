"""A session quota refuses a command whose results would not fit before its op allocates them
(``veil/workers/output_bounds.py``).

Before, a result was charged once it existed: ``torch.zeros(n)`` or a broadcast of two long vectors was
allocated in full before the quota refused it (README, memory quota). The sizes here are chosen so that
the unchecked op cannot even allocate (terabytes): a QuotaExceededError (not the allocator's RuntimeError)
shows the command was refused before it ran. Requests go through a real ``WebsocketServerWorker`` session
(``serve_bytes``), in process.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.ids import new_id
from veil.messaging import messages as m
from veil.workers import output_bounds

from server_sessions import open_session, quota_worker, request, run_command, send_tensor  # noqa: E402

TOKEN = "ob44-scientist"
QUOTA = 16 << 20


@pytest.fixture
def worker(hook):
    return quota_worker(hook, "ob-alice", TOKEN, QUOTA)


def _session(srv):
    return open_session(srv, TOKEN)


_req, _send = request, send_tensor


def _command(srv, session, op, *args, **kwargs):
    """The reply (OkReply: stored under the returned id) and the result's id."""
    reply, (rid,) = run_command(srv, session, op, *args, **kwargs)
    return reply, rid


def _get(srv, session, oid):
    reply = _req(srv, session, m.GetObjectsMessage([oid], False))
    assert type(reply) is m.ObjectsReply, reply
    return reply.objects[0]


@pytest.mark.parametrize("op,args", [
    ("torch.zeros", ((1 << 40),)),  # 4 TiB of float32
    ("torch.ones", ((1 << 20, 1 << 20),)),
    ("torch.arange", (0, 2.0 ** 42)),
])
def test_a_huge_creation_is_refused_before_it_allocates(worker, op, args):
    s = _session(worker)
    reply, _ = _command(worker, s, op, *args)
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    assert op in reply.message and "--max-session-mb" in reply.message
    x = torch.arange(6.0)
    assert torch.equal(_get(worker, s, _send(worker, s, x)), x)  # the worker still serves the session


def test_a_huge_broadcast_or_outer_product_of_stored_vectors_is_refused_before_it_allocates(worker):
    s = _session(worker)
    col = _send(worker, s, torch.ones(1 << 20, 1))  # 4 MiB each: within the quota
    row = _send(worker, s, torch.ones(1 << 20))
    for op, args in (("torch.add", (m.ObjectRef(col), m.ObjectRef(row))),  # 4 TiB
                     ("torch.outer", (m.ObjectRef(row), m.ObjectRef(row)))):
        reply, _ = _command(worker, s, op, *args)
        assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", (op, reply)
    assert worker.monitor.session_bytes(s.id) == 2 * (4 << 20)  # nothing of the refused results was kept


def test_results_that_fit_are_computed_as_torch_does(worker):
    s = _session(worker)
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    ra, rb = _send(worker, s, a), _send(worker, s, b)
    reply, rid = _command(worker, s, "torch.matmul", m.ObjectRef(ra), m.ObjectRef(rb))
    assert type(reply) is m.OkReply, reply
    assert torch.allclose(_get(worker, s, rid), a @ b)
    v = torch.randn(4, 1)
    reply, rid = _command(worker, s, "Tensor.expand", m.ObjectRef(_send(worker, s, v)), 4, 1 << 20)  # a view
    assert type(reply) is m.OkReply, reply
    assert torch.equal(_get(worker, s, rid), v.expand(4, 1 << 20))
    reply, rid = _command(worker, s, "torch.nonzero", m.ObjectRef(ra))  # data-dependent shape: charged afterwards
    assert type(reply) is m.OkReply, reply
    assert torch.equal(_get(worker, s, rid), torch.nonzero(a))


def test_a_result_that_fits_only_without_what_the_session_holds_is_refused(worker):
    s = _session(worker)
    _send(worker, s, torch.zeros(3 << 20))  # 12 MiB of the 16
    reply, _ = _command(worker, s, "torch.zeros", (1 << 20) + 64)  # just over 4 MiB more: over
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    reply, _ = _command(worker, s, "torch.zeros", 1 << 20)  # 4 MiB: fits exactly
    assert type(reply) is m.OkReply, reply


_OPS = [
    (torch.add, 2), (torch.mul, 2), (torch.matmul, 2), (torch.outer, 2), (torch.cat, "list"), (torch.stack, "list"),
    (torch.exp, 1), (torch.cumsum, "dim"), (torch.sum, "dim"), (torch.transpose, "t"), (torch.flatten, 1),
    (torch.diag, 1), (torch.kron, 2), (torch.tile, "reps"),
]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, len(_OPS) - 1), st.integers(1, 6), st.integers(1, 6), st.booleans())
def test_the_meta_size_is_the_size_torch_allocates(k, n, p, column):
    """The sizing agrees with what the op really allocates (new storage bytes; views and inputs: 0)."""
    func, kind = _OPS[k]
    x = torch.randn(n, p) if func not in (torch.outer, torch.diag) else torch.randn(n)
    y = torch.randn(n, 1) if column and func in (torch.add, torch.mul) else (
        torch.randn(p, n) if func is torch.matmul else torch.randn(n) if func is torch.outer else torch.randn(n, p))
    args = {1: (x,), 2: (x, y), "list": ([x, x],), "dim": (x, 0), "t": (x, 0, 1), "reps": (x, (2, 3))}[kind]
    predicted = output_bounds.new_bytes(func, args, {})
    out = func(*args)
    real = 0 if out._base is not None or any(out is a for a in args) else out.untyped_storage().nbytes()
    assert predicted == real, (func.__name__, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])


def test_a_plan_op_whose_result_would_not_fit_is_refused_before_it_allocates(worker, hook):
    """Plans are requester code too: an op inside a plan (traced on 2 entries, run on 2^20: a 4 TiB
    ``outer``) is sized first."""
    from veil.plans.plan import func2plan

    @func2plan(args_shape=[(2,)])
    def huge(x):
        return torch.outer(x, x).sum()

    s = _session(worker)
    spec_id = _send_plan(worker, s, huge)
    xid = _send(worker, s, torch.ones(1 << 20))
    reply, _ = _command(worker, s, "veil.plan.run", m.ObjectRef(spec_id), [m.ObjectRef(xid)], [])
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply  # (as itself, not wrapped)
    assert "can't allocate" not in reply.message


def _send_plan(srv, session, plan) -> int:
    oid = new_id()
    reply = _req(srv, session, m.ObjectMessage([m.StoredObject(oid, plan.spec)]))
    assert type(reply) is m.OkReply, reply
    return oid


def test_bad_arguments_get_the_ops_own_error_under_a_quota(worker):
    """An op that fails on meta for its arguments (a shape mismatch) is not run, and the client gets the
    error the op gives without a quota, not a quota refusal; one whose size needs values gets the refusal."""
    s = _session(worker)
    a, b = _send(worker, s, torch.randn(3)), _send(worker, s, torch.randn(4))
    reply, _ = _command(worker, s, "torch.add", m.ObjectRef(a), m.ObjectRef(b))
    worker.monitor.max_session_bytes = None
    plain, _ = _command(worker, s, "torch.add", m.ObjectRef(a), m.ObjectRef(b))
    assert type(reply) is m.ErrorReply and reply.error == plain.error == "RemoteExecutionError", (reply, plain)
    assert "torch.add failed" in reply.message and "must match" in plain.message
    worker.monitor.max_session_bytes = QUOTA
    t = _send(worker, s, torch.tensor(3))
    reply, _ = _command(worker, s, "torch.zeros", m.ObjectRef(t))
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError" and "cannot size" in reply.message
