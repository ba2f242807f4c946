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
import warnings
from pathlib import Path

import torch

from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.serde import deserialize, serialize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
from network_helpers import TOKEN, get_as, in_process_server, store_as  # noqa: E402

R = m.ObjectRef
SUM, MUL, EMBEDDING = (ALLOWLIST.by_func(f).name for f in (torch.Tensor.sum, torch.mul, torch.nn.functional.embedding))
QUOTA = 2**20


def _send(server, session, op, args, ids, kwargs=None):
    msg = m.CommandMessage(op, args, kwargs or {}, ids, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's own warning of create_graph's reference cycle)
        return deserialize(server.serve_bytes(serialize(msg, sender="f"), session))[0]


def _ok(server, session, op, args, ids, kwargs=None):
    reply = _send(server, session, op, args, ids, kwargs)
    assert reply == m.OkReply(), reply
    return reply


def _refused(reply) -> None:
    """The quota's refusal, in one line."""
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    assert "\n" not in reply.message


def _quota_server(hook, name):
    """A worker with a 1 MiB session quota, the attacking session, and a second session beside it."""
    from veil.workers.websocket_auth import authenticate

    server, tokens, session = in_process_server(hook, name)
    server.monitor.max_session_bytes = QUOTA
    other = authenticate(tokens, [TOKEN])
    server.sessions[other.id] = other
    return server, session, other


def _still_serves(server, other) -> None:
    """Another session computes and gets its values as torch gives them."""
    _ok(server, other, "torch.ones", (4,), [9001])
    _ok(server, other, MUL, (R(9001), 3.0), [9002])
    assert torch.equal(get_as(server, other, 9002), torch.full((4,), 3.0))


def _saved_bytes(*tensors) -> int:
    """Bytes of the distinct storages the autograd graphs of ``tensors`` save (walked node by node)."""
    storages, seen = {}, set()
    todo = [t.grad_fn for t in tensors if t is not None and t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                if isinstance(value, torch.Tensor) and value.layout is torch.strided:
                    storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        todo += [child for child, _ in node.next_functions]
    return sum(storages.values())


def _cheap_leaf(server, session, oid: int, n: int) -> None:
    """A leaf of ``n`` elements under ``oid`` that costs the quota 256 bytes (an expanded scalar)."""
    _ok(server, session, "torch.zeros", (1,), [oid + 1])
    _ok(server, session, "Tensor.expand", (R(oid + 1), [n]), [oid])
    _ok(server, session, "Tensor.requires_grad_", (R(oid),), [0])


def _held_grads(server, ids) -> int:
    objects = server.monitor.owner_objects()
    grads = [objects[i].grad for i in ids if objects[i].is_leaf or objects[i].retains_grad]
    return sum(g.untyped_storage().nbytes() for g in grads if g is not None)


def _fill(server, session, oid: int, leave: int) -> None:
    """Stores a tensor that leaves the session about ``leave`` bytes of its quota."""
    used = server.monitor.session_bytes(session.id)
    _ok(server, session, "torch.zeros", ((QUOTA - used - leave) // 4,), [oid])


def test_create_graph_backward_never_holds_past_the_quota(hook):
    """Rounds of ``backward(create_graph=True, retain_graph=True)`` over a two-op chain: the graphs of gradients it
    builds never hold, with what the session is charged, more than its quota (before: 0.6 MB more each round)."""
    server, s, other = _quota_server(hook, "gc-create")
    n = 50_000
    _cheap_leaf(server, s, 1, n)
    _ok(server, s, "Tensor.sigmoid", (R(1),), [3])
    _ok(server, s, "Tensor.sigmoid", (R(3),), [4])
    _ok(server, s, SUM, (R(4),), [5])
    x = server.monitor.owner_objects()[1]
    forward = server.monitor.session_bytes(s.id)
    for _ in range(6):
        reply = _send(server, s, "Tensor.backward", (R(5),), [], {"create_graph": True, "retain_graph": True})
        if reply != m.OkReply():
            _refused(reply)
        held = _saved_bytes(x.grad) if x.grad is not None else 0
        assert forward + held <= QUOTA, held
    _still_serves(server, other)
    server.end_session(s)


def test_create_graph_backward_is_refused_in_a_plan_too(hook):
    """A plan's ``backward`` is sized as a command's: ``create_graph`` is refused the same way."""
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef

    server, s, other = _quota_server(hook, "gc-create-plan")
    _cheap_leaf(server, s, 1, 1000)
    plan = PlanSpec("cg", 1, 0, 3, [PlanOp("Tensor.sigmoid", (SlotRef(0),), {}, [1], True),
                                    PlanOp(SUM, (SlotRef(1),), {}, [2], True),
                                    PlanOp("Tensor.backward", (SlotRef(2),), {"create_graph": True}, [], True)],
                    SlotRef(2))
    reply = _send(server, s, "veil.plan.run", (plan, [R(1)], []), [20])
    assert type(reply) is m.ErrorReply and "create_graph" in reply.message and "\n" not in reply.message, reply
    assert server.monitor.owner_objects()[1].grad is None
    _still_serves(server, other)
    server.end_session(s)


def test_plain_backward_still_gives_torchs_gradients_under_a_quota(hook):
    """The honest ``backward`` (and a leaf's, with a gradient given) runs and gives torch's values."""
    server, s, _ = _quota_server(hook, "gc-honest")
    w = torch.linspace(-1, 1, 1000, requires_grad=True)
    store_as(server, s, 1, w.detach().clone())
    _ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    _ok(server, s, "Tensor.sigmoid", (R(1),), [2])
    _ok(server, s, SUM, (R(2),), [3])
    _ok(server, s, "Tensor.backward", (R(3),), [])
    w.sigmoid().sum().backward()
    _ok(server, s, "Tensor.grad.__get__", (R(1),), [4])
    assert torch.allclose(get_as(server, s, 4), w.grad)
    _ok(server, s, "torch.full", ((1000,), 2.0), [5])
    _ok(server, s, "Tensor.backward", (R(1),), [], {"gradient": R(5)})  # a leaf's own backward accumulates
    w.backward(torch.full((1000,), 2.0))
    _ok(server, s, "Tensor.grad.__get__", (R(1),), [6])
    assert torch.allclose(get_as(server, s, 6), w.grad)
    server.end_session(s)


def test_a_leafs_own_backward_is_sized_before_it_runs(hook):
    """Six cheap 200 000-element leaves made while the room was there, then ``x.backward(g)`` of each: refused once
    the room is gone (before: all six ran, 4.8 MB of gradients under a 1 MiB quota)."""
    server, s, other = _quota_server(hook, "gc-leaf-root")
    n = 200_000
    _ok(server, s, "torch.zeros", (1,), [1])
    _ok(server, s, "Tensor.expand", (R(1), [n]), [2])
    leaves = [100 * (k + 1) for k in range(6)]
    for x in leaves:
        _cheap_leaf(server, s, x, n)
    for x in leaves:
        reply = _send(server, s, "Tensor.backward", (R(x),), [], {"gradient": R(2)})
        if reply != m.OkReply():
            _refused(reply)
        assert _held_grads(server, leaves) <= server.monitor.session_bytes(s.id) <= QUOTA
    assert _held_grads(server, leaves) >= n * 4  # (the first fitted)
    _still_serves(server, other)
    server.end_session(s)


def test_backward_into_a_non_leaf_input_is_sized_before_it_runs(hook):
    """``y = x.expand(200 000)`` of a 1-element leaf ``x``, six times, then ``y.sum().backward(inputs=[y])`` of each:
    refused once the room is gone (before: sized as ``x``'s 4 bytes, a second 800 kB gradient passed the quota)."""
    server, s, other = _quota_server(hook, "gc-inputs")
    n = 200_000
    _ok(server, s, "torch.zeros", (1,), [1])
    _ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    views = [100 * (k + 1) for k in range(6)]
    for y in views:
        _ok(server, s, "Tensor.expand", (R(1), [n]), [y])
        _ok(server, s, SUM, (R(y),), [y + 1])
    for y in views:
        reply = _send(server, s, "Tensor.backward", (R(y + 1),), [], {"inputs": [R(y)]})
        if reply != m.OkReply():
            _refused(reply)
        assert _held_grads(server, views) <= server.monitor.session_bytes(s.id) <= QUOTA
    assert _held_grads(server, views) >= n * 4  # (the first fitted)
    _still_serves(server, other)
    server.end_session(s)


def test_in_place_ops_on_a_tracked_tensor_never_hold_past_the_quota(hook):
    """40 ``pow_`` on a tracked 100 000-element tensor: each saves a copy of the old value in the graph, which is
    charged (and refused once the room is gone); what the graph saves never passes the quota (before: 16 MB)."""
    server, s, other = _quota_server(hook, "gc-in-place")
    n = 100_000
    _ok(server, s, "torch.zeros", (1,), [1])
    _ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    _ok(server, s, "Tensor.expand", (R(1), [n]), [2])
    _ok(server, s, MUL, (R(2), 1.0), [3])
    y = server.monitor.owner_objects()[3]
    refused = 0
    for _ in range(40):
        reply = _send(server, s, "Tensor.pow_", (R(3), 1.0), [0])
        if reply != m.OkReply():
            _refused(reply)
            refused += 1
        assert _saved_bytes(y) <= server.monitor.session_bytes(s.id) <= QUOTA
    assert refused > 30
    _still_serves(server, other)
    # deleted, its graph goes and so does the charge (nothing else holds it)
    del y
    assert deserialize(server.serve_bytes(serialize(m.DeleteMessage([3]), sender="f"), s))[0] == m.OkReply()
    import gc

    gc.collect()
    assert server.monitor.session_bytes(s.id) < 4096, server.monitor.session_bytes(s.id)
    server.end_session(s)


def test_an_in_place_op_without_grad_is_not_sized_for_a_copy(hook):
    """An honest update under ``no_grad`` (``w.sub_``: no graph, no copy) runs with little room left, and gives torch's
    values."""
    server, s, _ = _quota_server(hook, "gc-no-grad")
    n = 100_000
    _ok(server, s, "torch.ones", (n,), [1])
    _ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    _fill(server, s, 2, 50_000)
    reply = deserialize(server.serve_bytes(serialize(m.CommandMessage("Tensor.sub_", (R(1), 0.5), {}, [0], False),
                                                     sender="f"), s))[0]
    assert reply == m.OkReply(), reply
    assert torch.equal(get_as(server, s, 1), torch.full((n,), 0.5))
    server.end_session(s)


def test_a_sparse_embedding_gradient_never_holds_past_its_charge(hook):
    """A 1 x 1 weight looked up 50 000 times with ``sparse=True``: its gradient holds a row per lookup. Refused, or
    charged what it holds (before: 600 kB held for a 256-byte charge, once more per leaf)."""
    server, s, other = _quota_server(hook, "gc-sparse")
    lookups = 50_000
    _ok(server, s, "torch.zeros", ((lookups,),), [2], {"dtype": torch.int64})
    held = []
    for k in range(4):
        w = 100 * (k + 1)
        _ok(server, s, "torch.zeros", (1, 1), [w])
        _ok(server, s, "Tensor.requires_grad_", (R(w),), [0])
        reply = _send(server, s, EMBEDDING, (R(2), R(w)), [w + 1], {"sparse": True})
        if reply != m.OkReply():
            _refused(reply)
            continue
        _ok(server, s, SUM, (R(w + 1),), [w + 2])
        assert deserialize(server.serve_bytes(serialize(m.DeleteMessage([w + 1]), sender="f"), s))[0] == m.OkReply()
        reply = _send(server, s, "Tensor.backward", (R(w + 2),), [])
        if reply != m.OkReply():
            _refused(reply)
        grad = server.monitor.owner_objects()[w].grad
        if grad is not None:
            held.append(grad._values().untyped_storage().nbytes() + grad._indices().untyped_storage().nbytes())
        assert sum(held) + lookups * 8 <= server.monitor.session_bytes(s.id) <= QUOTA, held
    _still_serves(server, other)
    server.end_session(s)


def test_a_view_keeps_its_base_charged_after_the_base_is_deleted(hook):
    """Held: a one-element view of a 400 kB tensor is charged its whole storage, so deleting the base leaves the
    session charged what the view keeps alive, until the view goes too."""
    server, s, other = _quota_server(hook, "gc-view")
    _ok(server, s, "torch.ones", (100_000,), [1])
    _ok(server, s, "Tensor.narrow", (R(1), 0, 0, 1), [2])
    assert deserialize(server.serve_bytes(serialize(m.DeleteMessage([1]), sender="f"), s))[0] == m.OkReply()
    assert server.monitor.session_bytes(s.id) >= 400_000
    assert torch.equal(get_as(server, s, 2), torch.ones(1))
    _refused(_send(server, s, "torch.zeros", (200_000,), [3]))  # (the room it holds is not free)
    assert deserialize(server.serve_bytes(serialize(m.DeleteMessage([2]), sender="f"), s))[0] == m.OkReply()
    assert server.monitor.session_bytes(s.id) < 4096
    _ok(server, s, "torch.zeros", (200_000,), [3])
    _still_serves(server, other)
    server.end_session(s)


def _delete(server, session, ids) -> None:
    assert deserialize(server.serve_bytes(serialize(m.DeleteMessage(ids), sender="f"), session))[0] == m.OkReply()


def _tracked(server, s, oid: int, n: int) -> torch.Tensor:
    """A tracked (non-leaf) ``n``-element tensor under ``oid``: ``x.expand(n) * 1`` of a 1-element leaf."""
    _ok(server, s, "torch.zeros", (1,), [oid + 1])
    _ok(server, s, "Tensor.requires_grad_", (R(oid + 1),), [0])
    _ok(server, s, "Tensor.expand", (R(oid + 1), [n]), [oid + 2])
    _ok(server, s, MUL, (R(oid + 2), 1.0), [oid])
    return server.monitor.owner_objects()[oid]


def test_a_plans_in_place_op_on_a_stored_tensor_stays_charged_after_its_result_goes(hook):
    """A plan's ``pow_`` on a stored tracked tensor saves its old value in that tensor's graph, not its result's: the
    charge stays while that graph holds it (before: carried by the result, deleted each run: 20 runs held 4 MB
    under a 1 MiB quota)."""
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef

    server, s, other = _quota_server(hook, "gc-plan-in-place")
    y = _tracked(server, s, 1, 50_000)
    plan = PlanSpec("p", 1, 0, 2, [PlanOp("Tensor.pow_", (SlotRef(0), 1.0), {}, [], True),
                                   PlanOp(SUM, (SlotRef(0),), {}, [1], False)], SlotRef(1))
    for k in range(20):
        reply = _send(server, s, "veil.plan.run", (plan, [R(1)], []), [100 + k])
        if reply == m.OkReply():
            _delete(server, s, [100 + k])
        else:
            assert type(reply) is m.ErrorReply and "\n" not in reply.message, reply
        assert _saved_bytes(y) <= server.monitor.session_bytes(s.id) <= QUOTA
    _still_serves(server, other)
    server.end_session(s)


def test_a_fit_never_carries_a_batchs_graph_in_its_state(hook):
    """``fit`` keeps its state and extra tensors from one batch to the next: an in-place op with grad on made them
    carry every batch's graph (``pow_`` on a tracked state: 200 batches held 8 MB, charged 0). A tracked state is
    refused before any batch; an extra buffer a batch makes tracked is refused after it, a leaf again."""
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef

    server, s, other = _quota_server(hook, "gc-fit")
    n = 10_000
    y = _tracked(server, s, 1, n)
    _ok(server, s, "torch.zeros", (200, 1), [10])
    _ok(server, s, "torch.zeros", (200,), [11])
    step = PlanSpec("f", 2, 1, 4, [PlanOp("Tensor.pow_", (SlotRef(2), 1.0), {}, [], True),
                                   PlanOp(SUM, (SlotRef(0),), {}, [3], True)], SlotRef(3))
    reply = _send(server, s, "veil.plan.fit", (step, R(10), R(11), [R(1)], 1), [20], {"shuffle": False})
    assert type(reply) is m.ErrorReply and "leaves" in reply.message and "\n" not in reply.message, reply
    assert _saved_bytes(y) <= server.monitor.session_bytes(s.id) <= QUOTA
    _ok(server, s, "torch.ones", (n,), [12])
    _ok(server, s, "Tensor.requires_grad_", (R(12),), [0])
    _ok(server, s, "torch.zeros", (n,), [13])  # a buffer without grad, written by each batch with grad on
    step = PlanSpec("g", 3, 1, 6, [PlanOp(MUL, (SlotRef(3), 2.0), {}, [4], True),
                                   PlanOp("Tensor.add_", (SlotRef(2), SlotRef(4)), {}, [], True),
                                   PlanOp(SUM, (SlotRef(0),), {}, [5], True)], SlotRef(5))
    reply = _send(server, s, "veil.plan.fit", (step, R(10), R(11), [R(12)], 1), [21],
                  {"shuffle": False, "extra": [R(13)]})
    assert type(reply) is m.ErrorReply and "grad tracking" in reply.message and "\n" not in reply.message, reply
    buffer = server.monitor.owner_objects()[13]
    assert buffer.is_leaf and not buffer.requires_grad and torch.equal(buffer.detach(), torch.full((n,), 2.0))
    _still_serves(server, other)
    server.end_session(s)


def test_an_in_place_op_that_saves_no_copy_is_not_sized_for_one(hook):
    """``relu_`` on a tracked tensor saves its result (the tensor itself): it runs with little room left, where
    ``pow_`` (which saves a copy) is refused; the gradient through it is torch's."""
    server, s, _ = _quota_server(hook, "gc-relu")
    n = 100_000
    y = _tracked(server, s, 1, n)
    _fill(server, s, 10, 50_000)
    _refused(_send(server, s, "Tensor.pow_", (R(1), 2.0), [0]))
    _ok(server, s, "Tensor.relu_", (R(1),), [0])
    _delete(server, s, [10])
    _ok(server, s, SUM, (R(1),), [11])
    _ok(server, s, "Tensor.backward", (R(11),), [])
    x = torch.zeros(1, requires_grad=True)
    (x.expand(n) * 1).relu_().sum().backward()
    assert torch.equal(server.monitor.owner_objects()[2].grad, x.grad) and y.grad_fn is not None
    server.end_session(s)


def test_a_plans_result_is_charged_the_gradient_it_comes_with(hook):
    """A plan returns ``h = x.expand(50 000)`` after ``h.sum().backward(inputs=[h])``: its 200 kB gradient comes with
    it, charged with it (before: 256 bytes a run, 8 runs held 1.6 MB under a 1 MiB quota, any number of runs more)."""
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef

    server, s, other = _quota_server(hook, "gc-plan-result-grad")
    n = 50_000
    _ok(server, s, "torch.zeros", (1,), [1])
    _ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    plan = PlanSpec("p", 1, 0, 3, [PlanOp("Tensor.expand", (SlotRef(0), [n]), {}, [1], True),
                                   PlanOp(SUM, (SlotRef(1),), {}, [2], True),
                                   PlanOp("Tensor.backward", (SlotRef(2),), {"inputs": [SlotRef(1)]}, [], True)],
                    SlotRef(1))
    ran = []
    for k in range(8):
        reply = _send(server, s, "veil.plan.run", (plan, [R(1)], []), [100 + k])
        if reply != m.OkReply():
            _refused(reply)
            continue
        ran.append(100 + k)
        assert torch.equal(server.monitor.owner_objects()[100 + k].grad, torch.ones(n))
        assert _held_grads(server, ran) <= server.monitor.session_bytes(s.id) <= QUOTA
    assert len(ran) >= 2
    _delete(server, s, ran)
    assert server.monitor.session_bytes(s.id) < 4096
    _still_serves(server, other)
    server.end_session(s)
