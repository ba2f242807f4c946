"""Second red team of the stored-overrun fixes (held tensors checked after a failed command, the fixed-mask and
MAC key tables under one lock).

Holes found and fixed:
- after every failed command the handler walked every tensor a resolved object holds: a stored plan's constants were
  gathered again from its op list and each one checked (~10 us a constant here), whatever the command was. A stored
  plan of 10^5 small constants (4 MB) named in a cheap command that fails (``torch.add(plan, 1)``, or a run that
  fails at its first op) cost the worker over a second of its turn per message, outside any deadline. Only a run
  reaches a plan's constants, and only those of the ops it ran: the interpreter notes how far runs got, and a walk
  checks the constants of those ops only, from a list gathered once per plan (veil/plans/interpreter.py,
  veil/workers/storage_overrun.py);
- the crypto provider capped a session's fixed masks by ring elements only (2^25): as one-element masks that is 2^25
  table entries in one session (~1.3 KB each here: ~40 GB), and each new one summed every session's masks
  under the tables' lock (each dealing slower than the last, every session's key registration and drop waiting).
  A session now keeps at most MAX_FIXED_MASKS_PER_SCOPE masks, and what each session holds is tallied as it
  changes, so the check under the lock is one look-up (veil/mpc/material.py);
- a chain of gradients could be built one level per command (``b.grad = c`` after ``a.grad = b``): 10^5 levels made
  every later command naming its root walk 10^5 tensors (after a failure, to empty overruns; under a quota, to
  charge them). A tensor handed out or set as a gradient gets no gradient of its own and its own is not handed out,
  and a tensor that has a gradient is set as none: chains stay at most two deep (veil/messaging/allowlist.py);
- a gradient was never charged to the session quota: a plan set a 4-element stored tensor's gradient and grew it
  through ``out=``, and six runs held six times what a 1 MiB quota left. The growth a command leaves in the tensors
  it names is charged as before, now down their chains of gradients too (veil/workers/store.py, ``charge_growth``;
  a gradient ``backward`` made is charged once a command names its tensor: before that it is sized only when made,
  against the room left then, and has its tensor's shape).

Held (guards): a view of a storage a failing plan step grew, left by the step as the gradient of an input's
gradient while the step's undo shrank that storage back, is never read past its storage (the handler's walk
emptied it; the step is now refused at that gradient's gradient); the threads of one session racing fixed-mask
dealings never pass the cap; gradients that point at each other are charged once and their walk ends.
"""

import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.serde import deserialize, serialize
from veil.mpc import material
from veil.plans.ops import PlanOp, PlanSpec, SlotRef
from veil.workers import storage_overrun

from network_helpers import get_as, in_process_server, store_as

sys.path.insert(0, str(Path(__file__).resolve().parent))

R = m.ObjectRef
GRAD_SET, GRAD_GET = "Tensor.grad.__set__", "Tensor.grad.__get__"
ADD, CLONE, VIEW, ZEROS_LIKE, SUM = (ALLOWLIST.by_func(f).name for f in (
    torch.add, torch.Tensor.clone, torch.Tensor.view, torch.zeros_like, torch.sum))

pytestmark = pytest.mark.filterwarnings("ignore")


def _send(server, session, msg):
    return deserialize(server.serve_bytes(serialize(msg, sender="f"), session))[0]


def _one_line_error(reply):
    assert type(reply) is m.ErrorReply and "\n" not in reply.message, reply


def _counting_check(monkeypatch) -> list:
    """Counts the tensors the handler's walk checks (storage_overrun's spans_past_storage calls)."""
    calls = []
    real = storage_overrun.spans_past_storage

    def counted(t):
        calls.append(1)
        return real(t)

    monkeypatch.setattr(storage_overrun, "spans_past_storage", counted)
    return calls


def test_failed_commands_check_a_stored_plans_constants_only_as_far_as_runs_reached(hook, monkeypatch):
    """A stored plan of many constants named in cheap failing commands: its constants are checked once, then only
    those of the ops a run reached since (before: every one of them per failed message; 10^5 constants took over
    a second of the worker's turn each)."""
    server, _, scientist = in_process_server(hook, "so2-walk")
    n = 3000
    plan = PlanSpec("many", 1, 0, 2, [PlanOp(ADD, (SlotRef(0), torch.full((2,), float(i))), {}, [1], False)
                                      for i in range(n)], SlotRef(1))
    assert _send(server, scientist, m.ObjectMessage([m.StoredObject(10, plan)])) == m.OkReply()
    store_as(server, scientist, 1, torch.arange(2.0))
    store_as(server, scientist, 2, torch.zeros(3))
    checked = _counting_check(monkeypatch)
    for rid in range(20, 30):  # a torch op given the plan: it fails before it reads anything
        _one_line_error(_send(server, scientist, m.CommandMessage(ADD, (R(10), 1.0), {}, [rid], False)))
    assert len(checked) <= n + 10, len(checked)  # (the first walk checks them all)
    checked.clear()
    for rid in range(30, 40):  # runs that fail at the first op (3 elements against 2)
        _one_line_error(_send(server, scientist, m.CommandMessage("veil.plan.run", (R(10), [R(2)], []), {}, [rid],
                                                                  False)))
    assert len(checked) <= 10 * 4, len(checked)
    reply = _send(server, scientist, m.CommandMessage("veil.plan.run", (R(10), [R(1)], []), {}, [40], False))
    assert reply == m.OkReply() and torch.equal(get_as(server, scientist, 40), torch.arange(2.0) + (n - 1))
    checked.clear()  # a whole run reached every constant: the next failure checks each once
    _one_line_error(_send(server, scientist, m.CommandMessage(ADD, (R(10), 1.0), {}, [41], False)))
    assert n <= len(checked) <= n + 2, len(checked)
    server.end_session(scientist)


def test_a_view_left_as_a_gradients_gradient_past_a_shrunk_storage_is_never_read(hook):
    """The step grows an input's storage (``out=`` of a larger result: the worker's own storage can grow), leaves a
    view of the grown storage as the gradient of another input's gradient, then fails: the step's undo shrinks the
    storage back to its 16 bytes, and that view spans 256. The handler's walk goes down the chain of gradients and
    empties it; cloned after, it reads nothing beyond."""
    server, _, scientist = in_process_server(hook, "so2-shrunk")
    store_as(server, scientist, 1, torch.zeros(64, requires_grad=True))
    store_as(server, scientist, 2, torch.zeros(64))
    assert _send(server, scientist, m.CommandMessage(GRAD_SET, (R(1), R(2)), {}, [], False)) == m.OkReply()
    assert _send(server, scientist, m.CommandMessage("torch.zeros", (4,), {}, [3], False)) == m.OkReply()
    store_as(server, scientist, 4, torch.full((64,), 2.0))
    plan = PlanSpec("shrink", 3, 0, 7, [
        PlanOp(ADD, (SlotRef(2), 1.0), {"out": SlotRef(1)}, [3], False),  # input 1 grows to 64 floats
        PlanOp(VIEW, (SlotRef(1), 64), {}, [4], False),
        PlanOp(GRAD_GET, (SlotRef(0),), {}, [5], False),
        PlanOp(GRAD_SET, (SlotRef(5), SlotRef(4)), {}, [], False),  # x.grad.grad = the grown view
        PlanOp(ADD, (SlotRef(2), torch.zeros(3)), {}, [6], False),  # fails: the step is undone
    ], SlotRef(6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _one_line_error(_send(server, scientist, m.CommandMessage("veil.plan.run", (plan, [R(1), R(3), R(4)], []),
                                                                  {}, [11], False)))
    reply = _send(server, scientist, m.CommandMessage(GRAD_GET, (R(2),), {}, [12], False))
    if reply == m.OkReply():
        reply = _send(server, scientist, m.CommandMessage(CLONE, (R(12),), {}, [13], False))
        if reply == m.OkReply():
            got = get_as(server, scientist, 13)
            assert got.numel() == 0 or (got.numel() <= 4 and torch.equal(got, torch.zeros(got.shape))), got
    assert torch.equal(get_as(server, scientist, 3), torch.zeros(4))  # the undo put the grown input back
    assert torch.equal(get_as(server, scientist, 4), torch.full((64,), 2.0))
    server.end_session(scientist)


def test_a_gradient_grown_by_a_plan_is_charged_to_the_session(hook):
    """A plan sets a 4-element stored tensor's gradient and grows it to 200 kB through ``out=``: charged to the
    session when the command ends (before: never; six runs held six times what a 1 MiB quota left)."""
    server, _, scientist = in_process_server(hook, "so2-grad-quota")
    quota = server.monitor.max_session_bytes = 2**20
    assert _send(server, scientist, m.CommandMessage("torch.zeros", (50_000,), {}, [1], False)) == m.OkReply()
    plan = PlanSpec("grow-grad", 2, 0, 4, [
        PlanOp(ZEROS_LIKE, (SlotRef(0),), {}, [2], False),
        PlanOp(GRAD_SET, (SlotRef(0), SlotRef(2)), {}, [], False),
        PlanOp(ADD, (SlotRef(1), 1.0), {"out": SlotRef(2)}, [3], False),  # the gradient grows to 200 kB
        PlanOp(SUM, (SlotRef(3),), {}, [3], False),
    ], SlotRef(3))
    assert _send(server, scientist, m.ObjectMessage([m.StoredObject(5, plan)])) == m.OkReply()
    mine = []
    for i in range(6):
        store_as(server, scientist, 100 + i, torch.zeros(4, requires_grad=True))
        mine.append(server.monitor.owner_objects()[100 + i])
        _send(server, scientist, m.CommandMessage("veil.plan.run", (R(5), [R(100 + i), R(1)], []), {}, [200 + i],
                                                  False))
    held = sum(t.grad.untyped_storage().nbytes() for t in mine if t.grad is not None) + 200_000
    assert held <= quota, held
    server.end_session(scientist)


def test_gradients_that_point_at_each_other_are_charged_once_and_the_walk_ends():
    from veil.workers.store import _grad_bytes

    a, b = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    a.grad, b.grad = b.detach(), a.detach()  # (distinct objects over each other's storage)
    c, d = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    c.grad = d
    d.grad = c
    got = []
    walker = threading.Thread(target=lambda: got.extend([_grad_bytes(a), _grad_bytes(c)]), daemon=True)
    walker.start()
    walker.join(5)
    assert got == [16, 16]


def test_a_chain_of_gradients_stays_two_deep(hook, monkeypatch):
    """Built one level per command (``b.grad = c`` after ``a.grad = b``, or a tensor that has a gradient set as one),
    a chain of gradients made every later command naming its root walk all of it (a failed one, to empty what lies
    past its storage; any one under a quota, to charge it): 10^5 levels, 10^5 tensors per command."""
    server, _, scientist = in_process_server(hook, "so2-chain")
    for oid in range(1, 6):
        store_as(server, scientist, oid, torch.zeros(4, requires_grad=True))

    def set_grad(x, v):
        return _send(server, scientist, m.CommandMessage(GRAD_SET, (R(x), R(v)), {}, [], False))

    assert set_grad(1, 2) == m.OkReply()
    _one_line_error(set_grad(2, 3))  # down from the root: a gradient gets none of its own
    assert set_grad(3, 4) == m.OkReply()  # (3 is no gradient)
    _one_line_error(set_grad(1, 3))  # up from the bottom: a tensor that has a gradient is set as none
    _one_line_error(set_grad(4, 5))
    assert _send(server, scientist, m.CommandMessage(GRAD_GET, (R(1),), {}, [20], False)) == m.OkReply()
    assert torch.equal(get_as(server, scientist, 20), torch.zeros(4))  # (an honest gradient reads as before)
    checked = _counting_check(monkeypatch)
    _one_line_error(_send(server, scientist, m.CommandMessage(ADD, (R(1), torch.zeros(3)), {}, [21], False)))
    assert len(checked) <= 2, len(checked)
    server.end_session(scientist)


def _deal_fixed(fixed_id: str, shape=(1,)) -> None:
    _, _, derive = material._fixed_mask((fixed_id, shape))
    derive([], None)


def test_a_session_keeps_a_bounded_number_of_fixed_masks():
    """One-element masks: the element cap (2^25) let a session keep 2^25 table entries."""
    scope = f"fixed-count-{time.monotonic_ns()}"
    cap = material.MAX_FIXED_MASKS_PER_SCOPE
    try:
        with material.provider_scope(scope):
            for i in range(cap):
                _deal_fixed(f"fixed-operand-{i:08d}")
            with pytest.raises(material.ProviderError, match="fixed masks"):
                _deal_fixed("fixed-operand-one-more")
        assert sum(k[0] == scope for k in material.FIXED_MASKS) == cap
        assert material.drop_provider_scope(scope) == cap
        with material.provider_scope(scope):  # dropped with its session: its room is free again
            _deal_fixed("fixed-operand-after-drop", (2, 3))
        assert material.FIXED_MASKS[(scope, "fixed-operand-after-drop")].shape == (2, 3)
    finally:
        material.drop_provider_scope(scope)


def test_a_sessions_fixed_mask_room_is_its_own_and_its_elements_stay_capped(monkeypatch):
    """The tally per session: another session's masks take none of its room; racing threads of one session never
    pass the element cap."""
    monkeypatch.setattr(material, "MAX_FIXED_ELEMENTS", 100)
    mine, other = (f"fixed-room-{name}-{time.monotonic_ns()}" for name in ("mine", "other"))
    try:
        with material.provider_scope(other):
            _deal_fixed("fixed-operand-other-0", (90,))
        refused = []

        def deal(i):
            with material.provider_scope(mine):
                try:
                    _deal_fixed(f"fixed-operand-race-{i:04d}", (30,))
                except material.ProviderError:
                    refused.append(i)

        threads = [threading.Thread(target=deal, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(refused) == 5 and sum(t.numel() for k, t in material.FIXED_MASKS.items() if k[0] == mine) == 90
    finally:
        material.drop_provider_scope(mine)
        material.drop_provider_scope(other)
