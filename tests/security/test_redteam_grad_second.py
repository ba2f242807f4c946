"""Second-pass red team of the autograd quota fixes (veil/workers/output_bounds.py ``_backward_bound`` and
``_saved_old_value``, ``GraphSaves.settle``, ``ObjectStore.put``'s gradient charge, ``fit``'s leaf check).

Holes found:
- ``backward(create_graph=1)`` (an int, or a stored ``tensor(True)``) passed the ``is True`` check: torch reads
  any truthy value as ``create_graph``, and its graph of gradients was built, charged to no one, under a quota;
- a gradient stored under a new id (``grad.__get__``) was charged twice, as the leaf's gradient and as the new
  object (an honest session was refused fetching a pointer to its own 400 kB gradient under 1 MiB), ``x.grad = g``
  of a stored ``g`` charged ``g`` again to ``x`` (refused at the next command), and an in-place op's result stored
  under a new id (``y = x.add_(1)``) charged ``x`` twice;
- an in-place op on a tracked tensor with its result stored under a new id (``y.pow_(1)`` -> 100): the copy of the
  old value its graph saved was charged to that id, which on delete went into ``y``'s one lingering charge (once
  per object): every later round held one more copy, charged nothing (GraphSaves.settle read a new id as a new
  result);
- ``fit`` with a view (no grad) among its state or extra tensors, written in place with grad on: refused after
  the batch, but the view kept the batch's graph (``detach_`` cannot drop a view's), uncharged, once per view;
- without a quota, ``backward(create_graph=True)`` leaves each leaf and its gradient's graph in a reference cycle
  torch keeps past the session (commands and plan steps): every session's leaves, gradients and saved tensors
  stayed in the worker (a 1M-element leaf: ~15 MB more per ended session, never freed).

Fixed: any ``create_graph`` but None/False is refused under a quota (output_bounds/grad_cycles.wants_graph); a
tensor the session is charged already (a gradient, or one stored under another id) is charged once, and stays
charged while it lives once an id of it is deleted (veil/workers/store.py ``charged_already``/``named``,
monitor.discard); what an in-place op's graph saves is charged on the saved tensors whatever id its result is
stored under (output_bounds._stores_new); ``fit`` writes a view through an alias autograd does not see as a view
(veil/plans/remote.py); a session's ``create_graph`` leaves drop their gradients when it ends
(veil/workers/grad_cycles.py).

Held (guards): ``lerp_`` with a tracked weight (which saves a copy, though listed among the ops that save none)
is refused once the room is gone (its result is sized); honest ``backward``s give torch's gradients.
"""

import gc
import sys
import warnings
import weakref
from pathlib import Path

import torch

from veil.messaging import messages as m

from grad_sessions import (MUL, QUOTA, SUM, R, delete, ok, quota_refusal, quota_server, saved_bytes, send,
                           still_serves, tracked)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
from network_helpers import TOKEN, get_as, in_process_server, store_as  # noqa: E402



def _all_freed_once_deleted(server, s, other, ids) -> None:
    """Deleting ``ids`` frees what is left of the session's charge; another session is still served."""
    delete(server, s, ids)
    gc.collect()
    assert server.monitor.session_bytes(s.id) < 4096, server.monitor.session_bytes(s.id)
    still_serves(server, other)
    server.end_session(s)


def _refused_often_never_past_the_quota(server, s, other, y, attempt) -> None:
    """12 rounds of ``attempt(k)`` (its reply): each runs or is refused in one line, what ``y``'s graph saves
    never passes the quota, at least 6 are refused, and another session is still served."""
    refused = 0
    for k in range(12):
        reply = attempt(k)
        if reply != m.OkReply():
            quota_refusal(reply)
            refused += 1
        assert saved_bytes(y) <= server.monitor.session_bytes(s.id) <= QUOTA
    assert refused >= 6
    still_serves(server, other)
    server.end_session(s)


def test_create_graph_given_as_a_truthy_non_bool_is_refused_under_a_quota(hook):
    """``create_graph=1`` and a stored ``tensor(True)`` are read by torch as True: refused as ``create_graph=True``
    is, and no graph of gradients is built (before: both ran, x.grad had a grad_fn)."""
    server, s, other = quota_server(hook, "gs-cg-truthy")
    ok(server, s, "torch.ones", (1000,), [1])
    ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    ok(server, s, "Tensor.sigmoid", (R(1),), [2])
    ok(server, s, SUM, (R(2),), [3])
    store_as(server, s, 4, torch.tensor(True))
    x = server.monitor.owner_objects()[1]
    for kwargs in ({"create_graph": 1}, {"create_graph": R(4), "retain_graph": True}):
        reply = send(server, s, "Tensor.backward", (R(3),), [], kwargs)
        assert type(reply) is m.ErrorReply and "create_graph" in reply.message and "\n" not in reply.message, reply
        assert x.grad is None or x.grad.grad_fn is None
    reply = send(server, s, "Tensor.backward", (R(3), None, True, 1), [])  # positional
    assert type(reply) is m.ErrorReply and "create_graph" in reply.message, reply
    ok(server, s, "Tensor.backward", (R(3),), [], {"create_graph": False})  # the honest one still runs
    w = torch.ones(1000, requires_grad=True)
    w.sigmoid().sum().backward()
    assert torch.equal(x.grad, w.grad) and x.grad.grad_fn is None
    still_serves(server, other)
    server.end_session(s)


def test_lerp_with_a_tracked_weight_never_holds_past_the_quota(hook):
    """Held: ``y.lerp_(end, w)`` with a tracked weight saves a copy of y's old value (``lerp_`` is listed among the
    in-place ops that save none): still refused once the room is gone, what it saved never past the quota."""
    server, s, other = quota_server(hook, "gs-lerp")
    n = 50_000
    y = tracked(server, s, 1, n)
    ok(server, s, "torch.zeros", (1,), [10])
    ok(server, s, "Tensor.requires_grad_", (R(10),), [0])
    ok(server, s, "Tensor.expand", (R(10), [n]), [11])  # a tracked weight of n elements costing 256 bytes
    ok(server, s, "Tensor.expand", (R(10), [n]), [12])  # (the end)
    _refused_often_never_past_the_quota(server, s, other, y,
                                        lambda k: send(server, s, "Tensor.lerp_", (R(1), R(12), R(11)), [0]))


def test_a_gradient_stored_under_a_new_id_is_charged_once(hook):
    """``x.grad`` of a 400 kB leaf, fetched as a pointer (``grad.__get__``) under a 1 MiB quota: stored without a
    second charge (before: refused, 1.2 MB charged for 800 kB held). With ``x`` deleted the gradient stays
    charged while its new id holds it; deleting that frees the charge."""
    server, s, other = quota_server(hook, "gs-grad-get")
    n = 100_000
    ok(server, s, "torch.ones", (n,), [1])
    ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    ok(server, s, SUM, (R(1),), [2])
    ok(server, s, "Tensor.backward", (R(2),), [])
    held = server.monitor.session_bytes(s.id)
    ok(server, s, "Tensor.grad.__get__", (R(1),), [3])
    ok(server, s, MUL, (R(3), 2.0), [0], {"out": R(3)})  # (named by a command, written in place: not charged again)
    assert server.monitor.session_bytes(s.id) <= held + 4096
    assert torch.equal(get_as(server, s, 3), torch.full((n,), 2.0))
    delete(server, s, [1, 2])
    gc.collect()
    assert server.monitor.session_bytes(s.id) >= n * 4  # (the gradient is alive: its id holds it)
    _all_freed_once_deleted(server, s, other, [3])


def test_a_stored_tensor_set_as_a_gradient_is_charged_once(hook):
    """``x.grad = g`` of a stored 400 kB ``g``, then a command naming ``x``: ``g`` is not charged again (before:
    1.2 MB charged for 800 kB held, past a 1 MiB quota). Deleted by its id while ``x.grad`` holds it, ``g``
    stays charged; with ``x`` deleted too, everything is freed."""
    server, s, other = quota_server(hook, "gs-grad-set")
    n = 100_000
    ok(server, s, "torch.ones", (n,), [1])
    ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    ok(server, s, "torch.full", ((n,), 2.0), [2])
    held = server.monitor.session_bytes(s.id)
    ok(server, s, "Tensor.grad.__set__", (R(1), R(2)), [])
    ok(server, s, SUM, (R(1),), [3])  # (a command naming x: its gradients are looked at)
    assert server.monitor.session_bytes(s.id) <= held + 4096 <= QUOTA
    ok(server, s, "Tensor.backward", (R(3),), [])  # accumulates into g in place: torch's values
    assert torch.equal(get_as(server, s, 2), torch.full((n,), 3.0))
    delete(server, s, [2, 3])
    gc.collect()
    assert server.monitor.session_bytes(s.id) >= 2 * n * 4  # (x and the gradient it holds)
    _all_freed_once_deleted(server, s, other, [1])


def test_a_fit_view_written_with_grad_keeps_no_graph(hook):
    """``fit`` with a one-element view (no grad) as extra, which the step writes with grad on from a 200 kB
    sigmoid: refused after the batch as a whole tensor is, and the view keeps no graph (before: it kept the
    batch's graph, 200 kB a view uncharged: six views held 1.2 MB beside the session's charge)."""
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef

    server, s, other = quota_server(hook, "gs-fit-view")
    n = 50_000
    ok(server, s, "torch.zeros", (n,), [1])
    ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    ok(server, s, "torch.zeros", (2, 1), [2])
    ok(server, s, "torch.zeros", (2,), [3])
    ok(server, s, "torch.zeros", (8,), [4])  # the base of the views
    step = PlanSpec("v", 3, 1, 8, [PlanOp(MUL, (SlotRef(3), 2.0), {}, [4], True),
                                   PlanOp("Tensor.sigmoid", (SlotRef(4),), {}, [5], True),
                                   PlanOp(SUM, (SlotRef(5),), {}, [6], True),
                                   PlanOp("Tensor.add_", (SlotRef(2), SlotRef(6)), {}, [], True),
                                   PlanOp(SUM, (SlotRef(0),), {}, [7], True)], SlotRef(7))
    views = []
    for k in range(6):
        ok(server, s, "Tensor.narrow", (R(4), 0, k, 1), [10 + k])
        views.append(server.monitor.owner_objects()[10 + k])
        reply = send(server, s, "veil.plan.fit", (step, R(2), R(3), [R(1)], 2), [20 + k],
                      {"shuffle": False, "extra": [R(10 + k)]})
        assert type(reply) is m.ErrorReply and "grad tracking" in reply.message and "\n" not in reply.message, reply
        assert views[-1].grad_fn is None and not views[-1].requires_grad
        assert saved_bytes(*views) <= server.monitor.session_bytes(s.id) <= QUOTA
    written = torch.zeros(8)  # (the batch's write stays, as a whole tensor's does: torch's value)
    written[:6] = (torch.zeros(n) * 2.0).sigmoid().sum()
    assert torch.equal(get_as(server, s, 4), written)
    still_serves(server, other)
    server.end_session(s)


def test_create_graph_without_a_quota_is_freed_when_the_session_ends(hook):
    """No quota: ``backward(create_graph=True)`` runs with torch's values, and once the session ends its leaves
    (stored, and one it deleted before) and their gradients' graphs are freed (before: torch's reference cycle
    kept every session's leaves for good)."""
    from veil.workers.websocket_auth import authenticate

    server, tokens, _ = in_process_server(hook, "gs-cg-cycle")
    left = []
    for _ in range(2):
        s = authenticate(tokens, [TOKEN])
        server.sessions[s.id] = s
        store_as(server, s, 1, torch.linspace(-1.0, 1.0, 1000))
        ok(server, s, "torch.ones", (1000,), [5])
        for x in (1, 5):
            ok(server, s, "Tensor.requires_grad_", (R(x),), [0])
        ok(server, s, MUL, (R(1), R(5)), [6])
        ok(server, s, "Tensor.sigmoid", (R(6),), [2])
        ok(server, s, SUM, (R(2),), [3])
        ok(server, s, "Tensor.backward", (R(3),), [], {"create_graph": True})
        objects = server.monitor.owner_objects()
        w = torch.linspace(-1.0, 1.0, 1000, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w.sigmoid().sum().backward(create_graph=True)
        assert torch.allclose(objects[1].grad, w.grad) and objects[1].grad.grad_fn is not None
        left += [weakref.ref(objects[1]), weakref.ref(objects[5])]
        del objects, w
        delete(server, s, [5, 6])  # (a leaf the session no longer names)
        server.end_session(s)
    gc.collect()
    assert not [r for r in left if r() is not None]


def test_an_in_place_result_under_a_new_id_is_charged_once(hook):
    """``x.add_(1)`` stored under a second id names the same 400 kB tensor: charged once (before: twice, 800 kB);
    with its first id deleted it stays charged while the second names it, and deleting both frees the charge."""
    server, s, other = quota_server(hook, "gs-alias")
    n = 100_000
    ok(server, s, "torch.zeros", (n,), [1])
    held = server.monitor.session_bytes(s.id)
    ok(server, s, "Tensor.add_", (R(1), 1.0), [2])
    ok(server, s, SUM, (R(2),), [4])  # (a command naming the second id does not charge it again either)
    assert server.monitor.session_bytes(s.id) <= held + 4096
    ok(server, s, "torch.zeros", (n,), [3])  # (room that the second charge took)
    delete(server, s, [1])
    assert server.monitor.session_bytes(s.id) >= 2 * n * 4
    assert torch.equal(get_as(server, s, 2), torch.ones(n))
    _all_freed_once_deleted(server, s, other, [2, 3, 4])


def test_a_plans_create_graph_without_a_quota_is_freed_when_the_session_ends(hook):
    """The same through a plan step (``veil.plan.run``, no quota): torch's values, and the leaf is freed once the
    session ends (before: kept for good)."""
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef
    from veil.workers.websocket_auth import authenticate

    server, tokens, _ = in_process_server(hook, "gs-cg-plan")
    s = authenticate(tokens, [TOKEN])
    server.sessions[s.id] = s
    store_as(server, s, 1, torch.linspace(-1.0, 1.0, 1000))
    ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    plan = PlanSpec("cg", 0, 1, 3, [PlanOp("Tensor.sigmoid", (SlotRef(0),), {}, [1], True),
                                    PlanOp(SUM, (SlotRef(1),), {}, [2], True),
                                    PlanOp("Tensor.backward", (SlotRef(2),), {"create_graph": True}, [], True)],
                    SlotRef(2))
    ok(server, s, "veil.plan.run", (plan, [], [R(1)]), [2])
    x = server.monitor.owner_objects()[1]
    w = torch.linspace(-1.0, 1.0, 1000, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w.sigmoid().sum().backward(create_graph=True)
    assert torch.allclose(x.grad, w.grad) and x.grad.grad_fn is not None
    left = weakref.ref(x)
    del x
    server.end_session(s)
    gc.collect()
    assert left() is None


def test_in_place_ops_stored_under_new_ids_never_hold_past_the_quota(hook):
    """``y.pow_(1)`` of a tracked 50 000-element ``y``, its result stored under a new id and deleted, 12 times: each
    saves a copy of y's old value in y's graph, which stays charged (before: charged to the new id, then folded
    into y's one lingering charge on delete: every round after the first held 200 kB more, charged nothing)."""
    server, s, other = quota_server(hook, "gs-pow-ids")
    y = tracked(server, s, 1, 50_000)

    def pow_then_delete(k: int):
        reply = send(server, s, "Tensor.pow_", (R(1), 1.0), [100 + k])
        if reply == m.OkReply():
            delete(server, s, [100 + k])
        return reply

    _refused_often_never_past_the_quota(server, s, other, y, pow_then_delete)
