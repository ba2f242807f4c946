"""Red team of tensors spanning past their storage that hide inside stored objects, and of the MAC key cap.

Holes found and fixed:
- a tensor in a plan's outputs themselves (not a slot) came back as the very constant every run: an in-place write
  into the stored result (the owner's data under review added to it) reached the constant, and the next run, on
  the scientist's own zeros, returned the owner's values unreviewed (fixed: ``aliasing.returns_constant`` counts
  tensors in the outputs; refused when the plan arrives);
- a stored plan read the gradient of its own constant (a constant the wire marks ``requires_grad``, handed back
  itself by ``type_as``): ``backward`` in a run over data under review left the owner's values in it, kept with
  the plan, and the next run, on the scientist's own zeros, returned them unreviewed (fixed: a plan reading the
  gradient of a constant or a view of one is refused when it arrives, veil/plans/aliasing.py, remote.py);
- a stored plan made its own constant the gradient of a tensor it created (``x.grad = constant``), then the
  ``out=`` of an op that failed to grow it (the constant, decoded from a frame, lives in a storage that cannot
  grow): the plan kept a constant past its storage, outside the handler's check (it looked at resolved tensors
  only), and the next run cloned it, handing back the worker's heap beyond its 16 bytes as an honest tensor (fixed:
  ``x.grad = v`` counts as a write into ``v`` in the plan's aliasing walk, so writing a constant through a
  gradient is refused when the plan arrives, veil/plans/aliasing.py; and on a failed command the handler empties
  every tensor a resolved object holds past its storage, a plan's constants and gradients included, and frees
  that object's id, veil/workers/storage_overrun.py);
- ``register_mac_key`` counted a session's keys and inserted without a lock: threads of one session racing
  passed the 64-key cap (fixed: the count and the insert are one step under a lock, veil/mpc/material.py).

Held (guards): a storage that can grow left past its end by a resize that overflows; a stored tensor's gradient
written through by a failing plan (the step's undo puts it back).
"""

import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.serde import deserialize, serialize
from veil.mpc import material
from veil.plans.ops import PlanOp, PlanSpec, SlotRef
from veil.workers.storage_overrun import drop_overruns

from network_helpers import get_as, in_process_server, store_as

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plan_sessions  # noqa: E402
from server_sessions import request, run_command, send_tensor  # noqa: E402

R = m.ObjectRef
GRAD_SET, GRAD_GET = "Tensor.grad.__set__", "Tensor.grad.__get__"
ZEROS_LIKE, ADD, ADD_, CLONE, MUL, SUM, TYPE_AS = (ALLOWLIST.by_func(f).name for f in (
    torch.zeros_like, torch.add, torch.Tensor.add_, torch.Tensor.clone, torch.mul, torch.Tensor.sum,
    torch.Tensor.type_as))


def _send(server, session, msg):
    return deserialize(server.serve_bytes(serialize(msg, sender="f"), session))[0]


def _run(server, session, plan, inputs, rid):
    return _send(server, session, m.CommandMessage("veil.plan.run", (plan, inputs, []), {}, [rid], False))


def _one_line_error(reply):
    assert type(reply) is m.ErrorReply and "\n" not in reply.message, reply


def _overrun(t: torch.Tensor, numel: int = 64) -> torch.Tensor:
    """``t`` (a storage that cannot grow) left spanning ``numel`` elements by a failed ``out=`` resize."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's warning that out= was resized)
        try:
            torch.add(torch.zeros(numel), 1, out=t)
        except RuntimeError:
            pass
    return t


def test_a_plan_constant_made_a_gradient_never_reads_past_its_storage(hook):
    """Run 1 (input 1 larger than the constant): ``x.grad = constant; torch.add(big, 1, out=x.grad)`` fails and left
    the stored plan's constant spanning 64 floats of a 16-byte storage; run 2 (the inputs swapped) cloned it: 60
    floats of the worker's heap in the reply."""
    server, _, scientist = in_process_server(hook, "so-const-grad")
    plan = PlanSpec("grow", 2, 0, 6, [
        PlanOp(ZEROS_LIKE, (SlotRef(0),), {}, [2], False),
        PlanOp(GRAD_SET, (SlotRef(2), torch.ones(4)), {}, [], False),
        PlanOp(GRAD_GET, (SlotRef(2),), {}, [3], False),
        PlanOp(CLONE, (SlotRef(3),), {}, [4], False),
        PlanOp(ADD, (SlotRef(1), 1.0), {"out": SlotRef(3)}, [5], False),
    ], SlotRef(4))
    store_as(server, scientist, 1, torch.zeros(4))
    store_as(server, scientist, 2, torch.zeros(64))
    stored = _send(server, scientist, m.ObjectMessage([m.StoredObject(10, plan)]))
    for rid, ref in ((12, R(10)), (13, plan)):  # stored, or sent inline with the command
        _one_line_error(_run(server, scientist, ref, [R(1), R(2)], 11))
        second = _run(server, scientist, ref, [R(2), R(1)], rid)
        if second == m.OkReply():
            leaked = get_as(server, scientist, rid)
            assert leaked.numel() <= 4 and torch.equal(leaked, torch.ones(leaked.shape)), leaked
        else:
            _one_line_error(second)
    _one_line_error(stored)  # refused when it arrives: it writes its constant through a gradient
    assert torch.equal(get_as(server, scientist, 2), torch.zeros(64))  # the worker serves on
    server.end_session(scientist)


def test_a_stored_plan_never_keeps_the_owners_gradient_for_the_next_run(hook):
    """A constant the wire marks ``requires_grad`` (``type_as`` hands the plan the constant itself): ``backward`` in a
    run over data under review left the owner's values in the constant's ``.grad``, kept with the stored plan; the
    next run, on the scientist's own zeros, read it back unreviewed."""
    srv, s, xid = plan_sessions.setup(hook, "so-constant-grad-review", token="so-review-token", policy="review")
    constant = torch.ones(plan_sessions.SECRET.shape, requires_grad=True)
    plan = PlanSpec("p", 1, 0, 6, [
        PlanOp(TYPE_AS, (constant, SlotRef(0)), {}, [5], True),
        PlanOp(MUL, (SlotRef(5), SlotRef(0)), {}, [1], True),
        PlanOp(SUM, (SlotRef(1),), {}, [2], True),
        PlanOp("Tensor.backward", (SlotRef(2),), {}, [], True),
        PlanOp(GRAD_GET, (SlotRef(5),), {}, [3], False),
        PlanOp(CLONE, (SlotRef(3),), {}, [4], False),
    ], SlotRef(4))
    stored = request(srv, s, m.ObjectMessage([m.StoredObject(10, plan)]))
    own = send_tensor(srv, s, torch.zeros(plan_sessions.SECRET.shape))
    for ref in (R(10), plan):
        run_command(srv, s, "veil.plan.run", ref, [R(xid)], [])
        reply, (rid,) = run_command(srv, s, "veil.plan.run", ref, [R(own)], [])
        if reply == m.OkReply():
            got = plan_sessions.get(srv, s, rid)
            assert type(got) is m.ErrorReply or not torch.equal(got.objects[0], plan_sessions.SECRET), got
    _one_line_error(stored)  # refused when it arrives: it reads a gradient kept with the plan
    plan_sessions.serving(srv, s, xid)


def test_a_constant_in_a_plans_outputs_never_carries_a_write_to_the_next_run(hook):
    """A tensor in the outputs themselves (not a slot) came back as the very constant every run: the scientist added
    the owner's data under review into the stored result in place, and the next run, on its own zeros, returned
    the owner's values unreviewed."""
    srv, s, xid = plan_sessions.setup(hook, "so-constant-output", token="so-output-token", policy="review")
    plan = PlanSpec("p", 1, 0, 2, [PlanOp(ADD, (SlotRef(0), 1.0), {}, [1], False)],
                    [SlotRef(1), torch.zeros(plan_sessions.SECRET.shape)])
    stored = request(srv, s, m.ObjectMessage([m.StoredObject(10, plan)]))
    own = send_tensor(srv, s, torch.zeros(plan_sessions.SECRET.shape))
    for base, ref in ((100, R(10)), (200, plan)):  # stored, or sent inline with the command
        ids = [base + 1, base + 2]
        if request(srv, s, m.CommandMessage("veil.plan.run", (ref, [R(own)], []), {}, ids, False)) == m.OkReply():
            request(srv, s, m.CommandMessage(ADD_, (R(ids[1]), R(xid)), {}, [0], False))
        ids = [base + 11, base + 12]
        if request(srv, s, m.CommandMessage("veil.plan.run", (ref, [R(own)], []), {}, ids, False)) == m.OkReply():
            got = plan_sessions.get(srv, s, ids[1])
            assert type(got) is m.ErrorReply or not torch.equal(got.objects[0], plan_sessions.SECRET), got
    _one_line_error(stored)  # refused when it arrives: it returns one of its constants
    plan_sessions.serving(srv, s, xid)


class _Monitor:
    def __init__(self):
        self.freed = []

    def discard(self, principal, oid, only=None):
        self.freed.append(oid)
        return True


class _Entry:
    def __init__(self, obj):
        self.obj = obj


def test_a_failed_op_empties_what_stored_objects_hold_past_their_storage():
    """The handler's check after a failed command reaches past the resolved tensors: a plan's constants, a tensor's
    gradient and the gradient's own; the objects holding one are freed, honest ones left as they were."""
    constant = _overrun(torch.frombuffer(bytearray(16), dtype=torch.float32))
    plan = PlanSpec("p", 1, 0, 2, [PlanOp(ADD, (SlotRef(0), [constant]), {}, [1], False)], SlotRef(1))
    weight = torch.zeros(4, requires_grad=True)
    weight.grad = torch.frombuffer(bytearray(16), dtype=torch.float32)
    _overrun(weight.grad)
    chained, inner = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    chained.grad = inner
    inner.grad = torch.frombuffer(bytearray(16), dtype=torch.float32)
    _overrun(inner.grad)
    honest, honest_plan = torch.arange(4.0), PlanSpec("q", 1, 0, 2, [PlanOp(ADD, (SlotRef(0), torch.ones(2)), {},
                                                                            [1], False)], SlotRef(1))
    found = {i: _Entry(o) for i, o in enumerate([plan, weight, chained, honest, honest_plan, "other"], 1)}
    monitor = _Monitor()
    assert drop_overruns(monitor, None, found) == [1, 2, 3] == monitor.freed
    assert constant.numel() == 0 and weight.grad.numel() == 0 and inner.grad.numel() == 0
    assert torch.equal(honest, torch.arange(4.0)) and torch.equal(honest_plan.ops[0].args[1], torch.ones(2))


def test_a_gradient_written_through_by_a_failing_plan_reads_nothing_beyond(hook):
    """A stored tensor's gradient set to a tensor decoded from a frame, then the ``out=`` of a plan's failing op:
    put back by the step's undo (or its holder freed), never left spanning past its storage."""
    server, _, scientist = in_process_server(hook, "so-grad")
    store_as(server, scientist, 1, torch.zeros(4, requires_grad=True))
    store_as(server, scientist, 2, torch.full((4,), 3.0))
    store_as(server, scientist, 3, torch.zeros(64))
    assert _send(server, scientist, m.CommandMessage(GRAD_SET, (R(1), R(2)), {}, [], False)) == m.OkReply()
    plan = PlanSpec("g", 2, 0, 4, [PlanOp(GRAD_GET, (SlotRef(0),), {}, [2], False),
                                   PlanOp(ADD, (SlotRef(1), 1.0), {"out": SlotRef(2)}, [3], False)], SlotRef(3))
    _one_line_error(_run(server, scientist, plan, [R(1), R(3)], 11))
    for oid, msg in ((21, m.CommandMessage(GRAD_GET, (R(1),), {}, [21], False)),
                     (22, m.CommandMessage(CLONE, (R(2),), {}, [22], False))):
        if _send(server, scientist, msg) == m.OkReply():  # (or refused: its holder was freed)
            got = get_as(server, scientist, oid)
            assert got.numel() == 0 or torch.equal(got, torch.full((4,), 3.0)), got
    assert torch.equal(get_as(server, scientist, 3), torch.zeros(64))
    server.end_session(scientist)


def test_a_growable_storage_left_past_its_end_by_an_overflowing_resize_is_never_read(hook):
    """A tensor the worker allocated (its storage can grow) given as ``out=`` of a result whose byte count overflows:
    torch sets the shape, then fails computing the bytes; the handler's check frees it all the same."""
    server, _, scientist = in_process_server(hook, "so-overflow")
    store_as(server, scientist, 1, torch.zeros(1))
    for oid, shape in ((2, [2**31, 1]), (3, [1, 2**31])):
        assert _send(server, scientist, m.CommandMessage("Tensor.expand", (R(1), shape), {}, [oid], False)) \
            == m.OkReply()
    assert _send(server, scientist, m.CommandMessage(ZEROS_LIKE, (R(1),), {}, [4], False)) == m.OkReply()
    _one_line_error(_send(server, scientist, m.CommandMessage(ADD, (R(2), R(3)), {"out": R(4)}, [], False)))
    reply = _send(server, scientist, m.CommandMessage(CLONE, (R(4),), {}, [5], False))
    if reply == m.OkReply():
        assert torch.equal(get_as(server, scientist, 5), torch.zeros(1))
    else:
        _one_line_error(reply)
    server.end_session(scientist)


class _SlowKey(torch.Tensor):
    """A key whose copy takes a moment: the window between the count and the insert, widened."""

    def clone(self, *args, **kwargs):
        time.sleep(0.02)
        return self.as_subclass(torch.Tensor).clone()


def test_threads_of_one_session_racing_never_pass_the_mac_key_cap():
    scope = f"race-{time.monotonic_ns()}"
    cap = material.MAX_MAC_KEYS_PER_SCOPE
    try:
        with material.provider_scope(scope):
            for i in range(cap - 4):
                material.register_mac_key(f"k{i}", torch.tensor(i))
        errors = []

        def register(i):
            with material.provider_scope(scope):
                try:
                    material.register_mac_key(f"r{i}", torch.tensor(i).as_subclass(_SlowKey))
                except material.ProviderError as e:
                    errors.append(e)

        threads = [threading.Thread(target=register, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(k[0] == scope for k in material.MAC_KEYS) == cap and len(errors) == 12
    finally:
        material.drop_provider_scope(scope)
