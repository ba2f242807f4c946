"""Red team of what autograd makes on a worker beside the objects a session stores, under a session quota
(veil/workers/grad_charges.py, veil/workers/output_bounds.py: ``backward``'s sizing, ``GraphSaves``).

Holes found:
- ``backward(create_graph=True)`` builds a graph of gradients that saves the intermediate gradients of every op it
  passes, charged to no one (only the leaves' gradients were). With ``retain_graph`` each round adds another set:
  a two-op chain of 50 000 elements held 0.6 MB more per round beside a constant 0.6 MB charge. torch itself keeps
  a leaf and its gradient's graph in a reference cycle Python's collector cannot break (it outlives the session);
- ``backward`` on a leaf (``x.backward(g)``) was sized 0, and ``backward(inputs=[y])`` for a non-leaf ``y`` only by
  the graph's leaves: cheap leaves (an expanded scalar costs 256 bytes) made while there was room got their
  gradients all the same once it was gone: six 800 kB gradients under a 1 MiB quota (charged once made, but held
  past the quota, as many as the session made leaves);
- an in-place op on a tensor autograd tracks (``y.pow_(2)``, ``clamp_``, ``abs_``) saves a copy of the tensor's
  old value in its graph: sized 0 (its result is its input) and charged to nothing (no new result to carry the
  charge): 40 ``pow_`` on a 100 000-element tensor held 16 MB under a 1 MiB quota;
- ``embedding(..., sparse=True)`` gives its weight a sparse gradient of one row per index (values and indices),
  charged as the weight's dense size: a 1 x 1 weight held a 50 000-row gradient (600 kB) charged 256 bytes, one
  more per leaf;
- a plan's in-place op on a stored tracked tensor saves the old value in that tensor's graph, but the charge was
  carried by the plan's result: deleted after each run, 20 runs held 4 MB under a 1 MiB quota;
- ``fit`` keeps its state and extra tensors across batches: an in-place op on them with grad on made them carry every
  batch's graph (``pow_`` on a tracked state: 200 batches held 8 MB, charged nothing);
- a plan's result came with the gradient ``backward(inputs=[result])`` gave it, uncharged (an expanded view: 256
  bytes charged a run for 200 kB held, 8 runs held 1.6 MB under a 1 MiB quota).

Fixed: ``create_graph`` and sparse gradients are refused under a quota (commands and plan steps alike); ``backward``
is sized for a leaf root and for ``inputs=``; an in-place op on a tracked tensor is sized for the copy it may save,
and what a command's graph saves with no new result to carry it (and all a plan's) is charged while the graph holds
it (veil/workers/output_bounds.py, ``GraphSaves.settle``); a sparse gradient is charged its values and indices
(veil/workers/grad_charges.py); ``fit`` refuses a tracked state, and a batch that makes one tracked
(veil/plans/remote.py); a stored object is charged the gradients it comes with (veil/workers/store.py, ``put``).

Held (guards): a view keeps its whole base charged after the base is deleted; honest ``backward`` and a ``no_grad``
in-place update run with torch's values.
"""

import sys
from pathlib import Path

import torch

from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.serde import deserialize, serialize

from grad_sessions import (MUL, QUOTA, SUM, R, delete, ok, quota_refusal, quota_server, saved_bytes, send,
                           still_serves, tracked)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
from network_helpers import get_as, store_as  # noqa: E402

EMBEDDING = ALLOWLIST.by_func(torch.nn.functional.embedding).name


def _cheap_leaf(server, session, oid: int, n: int) -> None:
    """A leaf of ``n`` elements under ``oid`` that costs the quota 256 bytes (an expanded scalar)."""
    ok(server, session, "torch.zeros", (1,), [oid + 1])
    ok(server, session, "Tensor.expand", (R(oid + 1), [n]), [oid])
    ok(server, session, "Tensor.requires_grad_", (R(oid),), [0])


def _held_grads(server, ids) -> int:
    objects = server.monitor.owner_objects()
    grads = [objects[i].grad for i in ids if objects[i].is_leaf or objects[i].retains_grad]
    return sum(g.untyped_storage().nbytes() for g in grads if g is not None)


def _fill(server, session, oid: int, leave: int) -> None:
    """Stores a tensor that leaves the session about ``leave`` bytes of its quota."""
    used = server.monitor.session_bytes(session.id)
    ok(server, session, "torch.zeros", ((QUOTA - used - leave) // 4,), [oid])


def _each_backward_fits(server, s, other, ids, n: int, call) -> None:
    """``backward(*args, **kwargs)`` with ``(args, kwargs) = call(oid)``, once for each of ``ids`` (``n``-element
    tensors): refused by the quota or charged, their gradients never past it, and the first fits."""
    for oid in ids:
        args, kwargs = call(oid)
        reply = send(server, s, "Tensor.backward", args, [], kwargs)
        if reply != m.OkReply():
            quota_refusal(reply)
        assert _held_grads(server, ids) <= server.monitor.session_bytes(s.id) <= QUOTA
    assert _held_grads(server, ids) >= n * 4  # (the first fitted)
    still_serves(server, other)
    server.end_session(s)


def test_create_graph_backward_never_holds_past_the_quota(hook):
    """Rounds of ``backward(create_graph=True, retain_graph=True)`` over a two-op chain: the graphs of gradients it
    builds never hold, with what the session is charged, more than its quota (before: 0.6 MB more each round)."""
    server, s, other = quota_server(hook, "gc-create")
    n = 50_000
    _cheap_leaf(server, s, 1, n)
    ok(server, s, "Tensor.sigmoid", (R(1),), [3])
    ok(server, s, "Tensor.sigmoid", (R(3),), [4])
    ok(server, s, SUM, (R(4),), [5])
    x = server.monitor.owner_objects()[1]
    forward = server.monitor.session_bytes(s.id)
    for _ in range(6):
        reply = send(server, s, "Tensor.backward", (R(5),), [], {"create_graph": True, "retain_graph": True})
        if reply != m.OkReply():
            quota_refusal(reply)
        held = saved_bytes(x.grad) if x.grad is not None else 0
        assert forward + held <= QUOTA, held
    still_serves(server, other)
    server.end_session(s)


def test_create_graph_backward_is_refused_in_a_plan_too(hook):
    """A plan's ``backward`` is sized as a command's: ``create_graph`` is refused the same way."""
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef

    server, s, other = quota_server(hook, "gc-create-plan")
    _cheap_leaf(server, s, 1, 1000)
    plan = PlanSpec("cg", 1, 0, 3, [PlanOp("Tensor.sigmoid", (SlotRef(0),), {}, [1], True),
                                    PlanOp(SUM, (SlotRef(1),), {}, [2], True),
                                    PlanOp("Tensor.backward", (SlotRef(2),), {"create_graph": True}, [], True)],
                    SlotRef(2))
    reply = send(server, s, "veil.plan.run", (plan, [R(1)], []), [20])
    assert type(reply) is m.ErrorReply and "create_graph" in reply.message and "\n" not in reply.message, reply
    assert server.monitor.owner_objects()[1].grad is None
    still_serves(server, other)
    server.end_session(s)


def test_plain_backward_still_gives_torchs_gradients_under_a_quota(hook):
    """The honest ``backward`` (and a leaf's, with a gradient given) runs and gives torch's values."""
    server, s, _ = quota_server(hook, "gc-honest")
    w = torch.linspace(-1, 1, 1000, requires_grad=True)
    store_as(server, s, 1, w.detach().clone())
    ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    ok(server, s, "Tensor.sigmoid", (R(1),), [2])
    ok(server, s, SUM, (R(2),), [3])
    ok(server, s, "Tensor.backward", (R(3),), [])
    w.sigmoid().sum().backward()
    ok(server, s, "Tensor.grad.__get__", (R(1),), [4])
    assert torch.allclose(get_as(server, s, 4), w.grad)
    ok(server, s, "torch.full", ((1000,), 2.0), [5])
    ok(server, s, "Tensor.backward", (R(1),), [], {"gradient": R(5)})  # a leaf's own backward accumulates
    w.backward(torch.full((1000,), 2.0))
    ok(server, s, "Tensor.grad.__get__", (R(1),), [6])
    assert torch.allclose(get_as(server, s, 6), w.grad)
    server.end_session(s)


def test_a_leafs_own_backward_is_sized_before_it_runs(hook):
    """Six cheap 200 000-element leaves made while the room was there, then ``x.backward(g)`` of each: refused once
    the room is gone (before: all six ran, 4.8 MB of gradients under a 1 MiB quota)."""
    server, s, other = quota_server(hook, "gc-leaf-root")
    n = 200_000
    ok(server, s, "torch.zeros", (1,), [1])
    ok(server, s, "Tensor.expand", (R(1), [n]), [2])
    leaves = [100 * (k + 1) for k in range(6)]
    for x in leaves:
        _cheap_leaf(server, s, x, n)
    _each_backward_fits(server, s, other, leaves, n, lambda x: ((R(x),), {"gradient": R(2)}))


def test_backward_into_a_non_leaf_input_is_sized_before_it_runs(hook):
    """``y = x.expand(200 000)`` of a 1-element leaf ``x``, six times, then ``y.sum().backward(inputs=[y])`` of each:
    refused once the room is gone (before: sized as ``x``'s 4 bytes, a second 800 kB gradient passed the quota)."""
    server, s, other = quota_server(hook, "gc-inputs")
    n = 200_000
    ok(server, s, "torch.zeros", (1,), [1])
    ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    views = [100 * (k + 1) for k in range(6)]
    for y in views:
        ok(server, s, "Tensor.expand", (R(1), [n]), [y])
        ok(server, s, SUM, (R(y),), [y + 1])
    _each_backward_fits(server, s, other, views, n, lambda y: ((R(y + 1),), {"inputs": [R(y)]}))


def test_in_place_ops_on_a_tracked_tensor_never_hold_past_the_quota(hook):
    """40 ``pow_`` on a tracked 100 000-element tensor: each saves a copy of the old value in the graph, which is
    charged (and refused once the room is gone); what the graph saves never passes the quota (before: 16 MB)."""
    server, s, other = quota_server(hook, "gc-in-place")
    n = 100_000
    ok(server, s, "torch.zeros", (1,), [1])
    ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    ok(server, s, "Tensor.expand", (R(1), [n]), [2])
    ok(server, s, MUL, (R(2), 1.0), [3])
    y = server.monitor.owner_objects()[3]
    refused = 0
    for _ in range(40):
        reply = send(server, s, "Tensor.pow_", (R(3), 1.0), [0])
        if reply != m.OkReply():
            quota_refusal(reply)
            refused += 1
        assert saved_bytes(y) <= server.monitor.session_bytes(s.id) <= QUOTA
    assert refused > 30
    still_serves(server, other)
    # deleted, its graph goes and so does the charge (nothing else holds it)
    del y
    delete(server, s, [3])
    import gc

    gc.collect()
    assert server.monitor.session_bytes(s.id) < 4096, server.monitor.session_bytes(s.id)
    server.end_session(s)


def test_an_in_place_op_without_grad_is_not_sized_for_a_copy(hook):
    """An honest update under ``no_grad`` (``w.sub_``: no graph, no copy) runs with little room left, and gives torch's
    values."""
    server, s, _ = quota_server(hook, "gc-no-grad")
    n = 100_000
    ok(server, s, "torch.ones", (n,), [1])
    ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    _fill(server, s, 2, 50_000)
    reply = deserialize(server.serve_bytes(serialize(m.CommandMessage("Tensor.sub_", (R(1), 0.5), {}, [0], False),
                                                     sender="f"), s))[0]
    assert reply == m.OkReply(), reply
    assert torch.equal(get_as(server, s, 1), torch.full((n,), 0.5))
    server.end_session(s)


def test_a_sparse_embedding_gradient_never_holds_past_its_charge(hook):
    """A 1 x 1 weight looked up 50 000 times with ``sparse=True``: its gradient holds a row per lookup. Refused, or
    charged what it holds (before: 600 kB held for a 256-byte charge, once more per leaf)."""
    server, s, other = quota_server(hook, "gc-sparse")
    lookups = 50_000
    ok(server, s, "torch.zeros", ((lookups,),), [2], {"dtype": torch.int64})
    held = []
    for k in range(4):
        w = 100 * (k + 1)
        ok(server, s, "torch.zeros", (1, 1), [w])
        ok(server, s, "Tensor.requires_grad_", (R(w),), [0])
        reply = send(server, s, EMBEDDING, (R(2), R(w)), [w + 1], {"sparse": True})
        if reply != m.OkReply():
            quota_refusal(reply)
            continue
        ok(server, s, SUM, (R(w + 1),), [w + 2])
        delete(server, s, [w + 1])
        reply = send(server, s, "Tensor.backward", (R(w + 2),), [])
        if reply != m.OkReply():
            quota_refusal(reply)
        grad = server.monitor.owner_objects()[w].grad
        if grad is not None:
            held.append(grad._values().untyped_storage().nbytes() + grad._indices().untyped_storage().nbytes())
        assert sum(held) + lookups * 8 <= server.monitor.session_bytes(s.id) <= QUOTA, held
    still_serves(server, other)
    server.end_session(s)


def test_a_view_keeps_its_base_charged_after_the_base_is_deleted(hook):
    """Held: a one-element view of a 400 kB tensor is charged its whole storage, so deleting the base leaves the
    session charged what the view keeps alive, until the view goes too."""
    server, s, other = quota_server(hook, "gc-view")
    ok(server, s, "torch.ones", (100_000,), [1])
    ok(server, s, "Tensor.narrow", (R(1), 0, 0, 1), [2])
    delete(server, s, [1])
    assert server.monitor.session_bytes(s.id) >= 400_000
    assert torch.equal(get_as(server, s, 2), torch.ones(1))
    quota_refusal(send(server, s, "torch.zeros", (200_000,), [3]))  # (the room it holds is not free)
    delete(server, s, [2])
    assert server.monitor.session_bytes(s.id) < 4096
    ok(server, s, "torch.zeros", (200_000,), [3])
    still_serves(server, other)
    server.end_session(s)


def test_a_plans_in_place_op_on_a_stored_tensor_stays_charged_after_its_result_goes(hook):
    """A plan's ``pow_`` on a stored tracked tensor saves its old value in that tensor's graph, not its result's: the
    charge stays while that graph holds it (before: carried by the result, deleted each run: 20 runs held 4 MB
    under a 1 MiB quota)."""
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef

    server, s, other = quota_server(hook, "gc-plan-in-place")
    y = tracked(server, s, 1, 50_000)
    plan = PlanSpec("p", 1, 0, 2, [PlanOp("Tensor.pow_", (SlotRef(0), 1.0), {}, [], True),
                                   PlanOp(SUM, (SlotRef(0),), {}, [1], False)], SlotRef(1))
    for k in range(20):
        reply = send(server, s, "veil.plan.run", (plan, [R(1)], []), [100 + k])
        if reply == m.OkReply():
            delete(server, s, [100 + k])
        else:
            assert type(reply) is m.ErrorReply and "\n" not in reply.message, reply
        assert saved_bytes(y) <= server.monitor.session_bytes(s.id) <= QUOTA
    still_serves(server, other)
    server.end_session(s)


def test_a_fit_never_carries_a_batchs_graph_in_its_state(hook):
    """``fit`` keeps its state and extra tensors from one batch to the next: an in-place op with grad on made them
    carry every batch's graph (``pow_`` on a tracked state: 200 batches held 8 MB, charged 0). A tracked state is
    refused before any batch; an extra buffer a batch makes tracked is refused after it, a leaf again."""
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef

    server, s, other = quota_server(hook, "gc-fit")
    n = 10_000
    y = tracked(server, s, 1, n)
    ok(server, s, "torch.zeros", (200, 1), [10])
    ok(server, s, "torch.zeros", (200,), [11])
    step = PlanSpec("f", 2, 1, 4, [PlanOp("Tensor.pow_", (SlotRef(2), 1.0), {}, [], True),
                                   PlanOp(SUM, (SlotRef(0),), {}, [3], True)], SlotRef(3))
    reply = send(server, s, "veil.plan.fit", (step, R(10), R(11), [R(1)], 1), [20], {"shuffle": False})
    assert type(reply) is m.ErrorReply and "leaves" in reply.message and "\n" not in reply.message, reply
    assert saved_bytes(y) <= server.monitor.session_bytes(s.id) <= QUOTA
    ok(server, s, "torch.ones", (n,), [12])
    ok(server, s, "Tensor.requires_grad_", (R(12),), [0])
    ok(server, s, "torch.zeros", (n,), [13])  # a buffer without grad, written by each batch with grad on
    step = PlanSpec("g", 3, 1, 6, [PlanOp(MUL, (SlotRef(3), 2.0), {}, [4], True),
                                   PlanOp("Tensor.add_", (SlotRef(2), SlotRef(4)), {}, [], True),
                                   PlanOp(SUM, (SlotRef(0),), {}, [5], True)], SlotRef(5))
    reply = send(server, s, "veil.plan.fit", (step, R(10), R(11), [R(12)], 1), [21],
                  {"shuffle": False, "extra": [R(13)]})
    assert type(reply) is m.ErrorReply and "grad tracking" in reply.message and "\n" not in reply.message, reply
    buffer = server.monitor.owner_objects()[13]
    assert buffer.is_leaf and not buffer.requires_grad and torch.equal(buffer.detach(), torch.full((n,), 2.0))
    still_serves(server, other)
    server.end_session(s)


def test_an_in_place_op_that_saves_no_copy_is_not_sized_for_one(hook):
    """``relu_`` on a tracked tensor saves its result (the tensor itself): it runs with little room left, where
    ``pow_`` (which saves a copy) is refused; the gradient through it is torch's."""
    server, s, _ = quota_server(hook, "gc-relu")
    n = 100_000
    y = tracked(server, s, 1, n)
    _fill(server, s, 10, 50_000)
    quota_refusal(send(server, s, "Tensor.pow_", (R(1), 2.0), [0]))
    ok(server, s, "Tensor.relu_", (R(1),), [0])
    delete(server, s, [10])
    ok(server, s, SUM, (R(1),), [11])
    ok(server, s, "Tensor.backward", (R(11),), [])
    x = torch.zeros(1, requires_grad=True)
    (x.expand(n) * 1).relu_().sum().backward()
    assert torch.equal(server.monitor.owner_objects()[2].grad, x.grad) and y.grad_fn is not None
    server.end_session(s)


def test_a_plans_result_is_charged_the_gradient_it_comes_with(hook):
    """A plan returns ``h = x.expand(50 000)`` after ``h.sum().backward(inputs=[h])``: its 200 kB gradient comes with
    it, charged with it (before: 256 bytes a run, 8 runs held 1.6 MB under a 1 MiB quota, any number of runs more)."""
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef

    server, s, other = quota_server(hook, "gc-plan-result-grad")
    n = 50_000
    ok(server, s, "torch.zeros", (1,), [1])
    ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    plan = PlanSpec("p", 1, 0, 3, [PlanOp("Tensor.expand", (SlotRef(0), [n]), {}, [1], True),
                                   PlanOp(SUM, (SlotRef(1),), {}, [2], True),
                                   PlanOp("Tensor.backward", (SlotRef(2),), {"inputs": [SlotRef(1)]}, [], True)],
                    SlotRef(1))
    ran = []
    for k in range(8):
        reply = send(server, s, "veil.plan.run", (plan, [R(1)], []), [100 + k])
        if reply != m.OkReply():
            quota_refusal(reply)
            continue
        ran.append(100 + k)
        assert torch.equal(server.monitor.owner_objects()[100 + k].grad, torch.ones(n))
        assert _held_grads(server, ran) <= server.monitor.session_bytes(s.id) <= QUOTA
    assert len(ran) >= 2
    delete(server, s, ran)
    assert server.monitor.session_bytes(s.id) < 4096
    still_serves(server, other)
    server.end_session(s)
