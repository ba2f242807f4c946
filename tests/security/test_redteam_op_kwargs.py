"""Red team (finding of session 43, fixed): a borrowing step told to write through ``out=`` in its public ``op_kwargs``.

``borrows_only`` (veil/workers/virtual.py) reads a request made only of ``BORROWS`` steps in place: the
decoded tensors ARE the requester's buffers. The claim is that such steps write into no argument and
return fresh tensors. ``beaver_combine`` forwards its requester-chosen ``op_kwargs`` to the bilinear op
(``fn(e, left, **op_kwargs)``), so ``op_kwargs={"out": T}`` with ``T`` one of the request's own tensors
makes the op write into ``T`` -- the requester's buffer -- and return it as ``z_i``, which the worker
then stores. With a review-policy dataset as ``c_i`` the requester reads the owner's data straight
out of its own buffer: no ``.get()``, no review, no audit row of a release.
"""

from __future__ import annotations

import secrets

import pytest
import torch

import veil as sy
from veil.exceptions import ReviewPendingError
from veil.ids import new_id
from veil.mpc.party import WIRE_PREFIX
from veil.tensors.remote_ops import _ref
from veil.workers.monitor import Purpose

BIG = 1 << 16  # int64 entries: 512 KiB, far above ADOPT_MIN_BYTES (the request goes in parts)


def _review_worker(hook):
    w = sy.VirtualWorker(hook, id=f"s43-out-{secrets.token_hex(3)}")
    secret = torch.randint(-2**40, 2**40, (BIG,))
    w.load(secret.clone(), tags=("#rev",), private=True, policy="review")
    (ptr,) = w.search(["#rev"])
    with pytest.raises(ReviewPendingError):  # baseline: a derived value waits for the owner's approval
        (ptr * 1).get()
    return w, ptr, secret


def _combine_with_out(me, w, ptr):
    a = torch.zeros(BIG, dtype=torch.int64)
    f = torch.ones(BIG, dtype=torch.int64)
    e = torch.ones(BIG, dtype=torch.int64)
    b = torch.ones(BIG, dtype=torch.int64)
    sink = torch.zeros(BIG, dtype=torch.int64)
    out_id = new_id()
    # z = mul(e, b, out=sink); z += mul(a, f, out=sink) (= 0, also z: sink becomes 0); z += c (the dataset)
    args = [a, b, _ref(ptr), e, f]
    kwargs = {"op": "mul", "first": False, "op_kwargs": {"out": sink}}
    me.defer(w, [WIRE_PREFIX + "beaver_combine", args, kwargs, [out_id], False])
    try:
        me.flush(w)
    except Exception:  # noqa: BLE001  (whatever the worker says, the test reads the requester's buffer)
        pass
    return sink, out_id


def test_beaver_combine_out_kwarg_never_writes_into_the_requesters_buffer(hook):
    me = hook.local_worker
    w, ptr, secret = _review_worker(hook)
    sink, _ = _combine_with_out(me, w, ptr)
    # the requester's own buffer must not have been written by the worker (and so not hold the review data)
    assert not torch.equal(sink, secret), "review-policy data read without approval through a borrowed out= buffer"
    assert torch.equal(sink, torch.zeros(BIG, dtype=torch.int64))


def test_no_stored_object_shares_memory_with_a_borrowed_out_buffer(hook):
    me = hook.local_worker
    w, ptr, secret = _review_worker(hook)
    sink, out_id = _combine_with_out(me, w, ptr)
    lo, hi = sink.untyped_storage().data_ptr(), sink.untyped_storage().data_ptr() + sink.untyped_storage().nbytes()
    for space in w.monitor._store._spaces.values():
        for oid, entry in space.items():
            t = entry.obj
            if isinstance(t, torch.Tensor) and t.numel():
                p = t.untyped_storage().data_ptr()
                assert p + t.untyped_storage().nbytes() <= lo or p >= hi, f"stored object {oid} views the requester's buffer"


def test_control_the_same_request_with_a_non_borrowing_command_keeps_its_copy(hook):
    """Control (passes today): the same ``out=`` request riding with one torch op is copied whole, so the
    worker writes into its own copy and the requester's buffer stays zero. Fails if ``borrows_only``
    accepted a batch with any command outside BORROWS."""
    me = hook.local_worker
    w, ptr, secret = _review_worker(hook)
    me.defer(w, ["Tensor.add", [torch.ones(4)], {"other": 1.0}, [new_id()], False])
    sink, out_id = _combine_with_out(me, w, ptr)
    assert torch.equal(sink, torch.zeros(BIG, dtype=torch.int64))


def test_bilinear_op_arguments_are_a_convolutions_geometry_only():
    from veil.mpc.ring import OP_KWARG_MAX, op_arguments

    assert op_arguments("conv2d", {"stride": [2, 1], "padding": 1, "groups": 1}) == \
        {"stride": (2, 1), "padding": 1, "groups": 1}
    assert op_arguments("conv2d", [["dilation", [1]]]) == {"dilation": (1,)}  # a dealing spec's pairs
    assert op_arguments("matmul", {}) == {}
    hostile = [("mul", {"out": torch.zeros(2)}), ("matmul", {"out": None}), ("conv2d", {"bias": 1}),
               ("conv2d", {"padding": OP_KWARG_MAX + 1}), ("conv2d", {"stride": -1}), ("conv2d", {"stride": True}),
               ("conv2d", {"stride": [1, 1, 1]}), ("conv2d", {"stride": 1.5}), ("conv2d", {3: 1}),
               ("conv2d", "stride"), ("conv2d", None), ("mul", {"stride": 1})]
    for op, kwargs in hostile:
        with pytest.raises(ValueError):
            op_arguments(op, kwargs)


def test_the_combine_refuses_out_and_the_worker_keeps_serving(hook):
    """The requester hears why (one line), and the same worker still combines correctly afterwards."""
    me = hook.local_worker
    w = sy.VirtualWorker(hook, id=f"opkw-{secrets.token_hex(3)}")
    a, b, c, e, f = (torch.randint(-2**40, 2**40, (8,)) for _ in range(5))
    sink = torch.zeros(8, dtype=torch.int64)
    me.defer(w, [WIRE_PREFIX + "beaver_combine", [a, b, c, e, f], {"op": "mul", "first": False,
                                                                   "op_kwargs": {"out": sink}}, [new_id()], False])
    with pytest.raises(Exception, match="takes no argument 'out'"):
        me.flush(w)
    assert torch.equal(sink, torch.zeros(8, dtype=torch.int64))
    oid = new_id()
    me.defer(w, [WIRE_PREFIX + "beaver_combine", [a, b, c, e, f], {"op": "mul", "first": True, "op_kwargs": {}},
                 [oid], False])
    me.flush(w)
    got = w.monitor.resolve(w.principal(me.id), oid, Purpose.REVEAL).obj
    assert torch.equal(got, c + e * b + a * f + e * f)  # party 0's share, as torch computes it


@pytest.mark.parametrize("op", ["mul", "matmul"])
def test_the_combine_refuses_opened_values_whose_products_would_outgrow_the_dealt_product(hook, op):
    """Finding (session 43): the opened e and f come with the request; e of shape (M, 1) against a dealt
    (N,) factor broadcast (or multiplied out) to M x N entries before any check: a session made a party
    allocate far beyond its quota for the moment of the step. Now refused before anything is computed."""
    me = hook.local_worker
    w = sy.VirtualWorker(hook, id=f"opkw-{secrets.token_hex(3)}")
    n = 4096
    a, b, c = (torch.randint(-2**40, 2**40, (1, n) if op == "matmul" else (n,)) for _ in range(3))
    e = torch.randint(-2**40, 2**40, (n, 1))  # n x n = 16.8M entries (128 MiB) if it went through
    f = torch.randint(-2**40, 2**40, (1, n) if op == "matmul" else (n,))
    me.defer(w, [WIRE_PREFIX + "beaver_combine", [a, b, c, e, f], {"op": op, "first": True, "op_kwargs": {}},
                 [new_id()], False])
    with pytest.raises(Exception, match="does not have the dealt product's shape"):
        me.flush(w)
    x = torch.arange(4.0).send(w)  # the worker serves on
    assert torch.equal((x + 1).get(), torch.arange(4.0) + 1)
