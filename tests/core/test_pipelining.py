"""Pipelining: commands needing no reply ride on the next message; results are unchanged."""

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from veil.exceptions import ObjectNotFoundError, RemoteExecutionError


@pytest.fixture
def piped(alice):
    alice.pipelining = True
    yield alice
    alice.pipelining = False


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 1))


def test_pipelined_training_matches_local_with_fewer_messages(piped):
    local, remote = _mlp(), _mlp()
    x, y = torch.randn(32, 13), torch.randn(32, 1)
    lopt, ropt = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (local, remote))
    remote.send(piped)
    px, py = x.send(piped), y.send(piped)
    me = piped.hook.local_worker
    me.stats.reset()
    for i in range(0, 32, 8):
        lopt.zero_grad()
        F.mse_loss(local(x[i:i + 8]), y[i:i + 8]).backward()
        lopt.step()
        ropt.zero_grad()
        F.mse_loss(remote(px[i:i + 8]), py[i:i + 8]).backward()
        ropt.step()
    assert me.stats.messages <= 4 * 8  # unpipelined: ~20 per step for this model
    remote.get()
    for a, b in zip(local.parameters(), remote.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_deferred_error_surfaces_at_next_synchronous_call(piped):
    p = torch.tensor([1.0, 2.0]).send(piped)
    q = torch.tensor([1.0, 2.0, 3.0]).send(piped)
    bad = p.clone()
    bad.__dict__["_meta"] = ((3,), torch.float32, False)  # lie about the shape: meta says fine
    torch.add(bad, q)  # deferred: no error yet
    with pytest.raises((RemoteExecutionError, ObjectNotFoundError), match="deferred command"):
        (p * 2).get()
    assert torch.equal((p + 1).get(), torch.tensor([2.0, 3.0]))  # the worker keeps serving


def test_pipelined_pointers_are_still_garbage_collected(piped):
    me = piped.hook.local_worker
    me.flush_deletes()
    base = len(piped._objects)
    x = torch.randn(64)
    for _ in range(300):
        p = x.send(piped)
        q = (p * 2 + 1).sum()
        del p, q
    gc.collect()
    me.flush_deletes()
    assert len(piped._objects) == base


# ---------------------------------------------------------------- pipelining on by default (issue 19)

import secrets  # noqa: E402

import veil as sy  # noqa: E402
from veil.exceptions import PermissionDeniedError, ProtectedDataError, SerializationError  # noqa: E402
from veil.messaging import messages as m  # noqa: E402
from veil.messaging.serde import serialize  # noqa: E402
from veil.workers import base, outbox  # noqa: E402


def test_pipelining_is_on_by_default_and_a_training_step_needs_no_reply(hook):
    w = sy.VirtualWorker(hook, id="pipe_default")
    assert w.pipelining is True
    local, remote = _mlp(), _mlp()
    x, y = torch.randn(16, 13), torch.randn(16, 1)
    lopt, ropt = (torch.optim.SGD(mm.parameters(), lr=0.05) for mm in (local, remote))
    remote.send(w)
    px, py = x.send(w), y.send(w)
    me = hook.local_worker
    for i in range(0, 16, 4):
        if i == 4:  # the first zero_grad asked whether the fresh parameters had gradients
            me.flush(w)
            me.stats.reset()
        for model, opt, xs, ys in ((local, lopt, x, y), (remote, ropt, px, py)):
            opt.zero_grad()
            F.mse_loss(model(xs[i:i + 4]), ys[i:i + 4]).backward()
            opt.step()
    assert me.stats.messages == 0  # forward, backward, .grad (predicted) and the update are all deferred
    w.flush()
    assert me.stats.messages == 1  # one frame, one reply
    remote.get()
    for a, b in zip(local.parameters(), remote.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_opt_out_sends_each_command_alone(alice):
    alice.pipelining = False
    try:
        p = torch.ones(3).send(alice)
        me = alice.hook.local_worker
        before = me.stats.messages
        q = p + 1
        r = q * 2
        assert me.stats.messages - before == 2
        assert torch.equal(r.get(), torch.full((3,), 4.0))
    finally:
        alice.pipelining = True


def test_gradient_prediction_only_for_leaves_the_loss_reaches(alice):
    used = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.tensor([3.0], requires_grad=True)
    pu, pn = used.send(alice), unused.send(alice)
    loss = (pu * pu).sum()
    loss.backward()
    me = alice.hook.local_worker
    before = me.stats.messages
    g = pu.grad  # predicted: no round trip
    assert isinstance(g, sy.PointerTensor) and me.stats.messages == before
    assert pn.grad is None  # not reached by the loss: asked, and the worker says None
    assert torch.equal(g.get(), 2 * used.detach())


def test_failed_deferred_command_names_its_op_and_dependents_never_run(alice):
    p = torch.tensor([1.0, 2.0]).send(alice)
    q = torch.tensor([1.0, 2.0, 3.0]).send(alice)
    bad = p.clone()
    bad.__dict__["_meta"] = ((3,), torch.float32, False)  # lie about the shape: meta says fine
    r = torch.add(bad, q)  # deferred: fails on the worker
    s = r * 2  # depends on the missing result
    t = p + 10  # independent, but queued after the failure
    me = alice.hook.local_worker
    with pytest.raises(RemoteExecutionError, match=r"deferred command 'torch.add' \(#2 of 4 in the batch\)"):
        alice.flush()
    held = set(alice._objects)
    assert not {r.id_at_location, s.id_at_location, t.id_at_location} & held  # nothing ran after it
    sent = me.stats.messages
    with pytest.raises(ObjectNotFoundError, match="never created.*torch.add"):
        s + 1  # refused here: no command runs on a missing result
    with pytest.raises(ObjectNotFoundError, match="never created"):
        t.get()
    assert me.stats.messages == sent
    assert torch.equal((p + 1).get(), torch.tensor([2.0, 3.0]))  # the worker keeps serving


def _owned(worker, value):
    tag = "#pipe" + secrets.token_hex(4)
    oid = worker.load(value.clone(), tags=(tag,))
    (ptr,) = sy.search(worker, [tag])
    return oid, ptr


def test_commands_on_owner_data_stay_synchronous(alice):
    oid, owner = _owned(alice, torch.tensor([1.0, 2.0]))
    with pytest.raises(PermissionDeniedError, match="would modify"):
        owner.add_(1)  # raised at the op, not at some later synchronization
    me = alice.hook.local_worker
    before = me.stats.messages
    doubled = owner * 2
    assert me.stats.messages == before + 1
    assert torch.equal((doubled + 1).get(), torch.tensor([3.0, 5.0]))  # results are the client's: pipelined
    assert torch.equal(alice._objects[oid], torch.tensor([1.0, 2.0]))


def _raw(worker, msg, prelude):
    """Sends a hand-made frame (a hostile client) and returns the decoded reply."""
    from veil.messaging.serde import deserialize

    return deserialize(worker._recv_msg(serialize(msg, sender="me", prelude=prelude)))[0]


def test_hostile_batch_failing_on_owner_data_is_value_free_and_stops_the_batch(alice):
    secret = torch.tensor([123456789, 987654])
    oid, _ = _owned(alice, secret)
    mine = torch.tensor([0, 1]).send(alice)
    alice.flush()
    ids = [base_id for base_id in (9_000_001, 9_000_002, 9_000_003)]
    prelude = [
        ["torch.index_select", [m.ObjectRef(mine.id_at_location), 0, m.ObjectRef(oid)], {}, [ids[0]], False],
        ["Tensor.add_", [m.ObjectRef(oid), 1], {}, [0], False],  # a write into owner data, after the failure
        ["torch.add", [m.ObjectRef(mine.id_at_location), 1], {}, [ids[1]], False],
    ]
    reply = _raw(alice, m.GetObjectsMessage([mine.id_at_location], False, None), prelude)
    assert type(reply) is m.ErrorReply and reply.error == "ProtectedDataError"
    assert "123456789" not in reply.message and "987654" not in reply.message
    assert "index_select" in reply.message and "#1 of 3" in reply.message
    assert torch.equal(alice._objects[oid], secret)  # nothing changed
    assert not set(ids) & set(alice._objects)  # nothing after the failure ran
    # the write alone is refused on its own, also inside a batch
    reply = _raw(alice, m.DeleteMessage([]), [prelude[1]])
    assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError"
    assert torch.equal(alice._objects[oid], secret)
    assert torch.equal((mine + 1).get(), torch.tensor([1, 2]))  # still serves


def test_hostile_batch_of_thousands_runs_each_command_under_the_monitor(alice):
    p = torch.ones(4).send(alice)
    alice.flush()
    n = 3000
    ids = list(range(7_000_001, 7_000_001 + n))
    prelude = [["torch.add", [m.ObjectRef(p.id_at_location), 1.0], {}, [i], False] for i in ids]
    reply = _raw(alice, m.DeleteMessage([]), prelude)
    assert type(reply) is m.OkReply
    held = alice._objects
    assert all(torch.equal(held[i], torch.full((4,), 2.0)) for i in ids)
    reply = _raw(alice, m.DeleteMessage([]), ids)  # deletions ride in the same prelude format
    assert type(reply) is m.OkReply and not set(ids) & set(alice._objects)
    # more items than a worker accepts in one batch: refused before anything runs
    too_many = [["torch.add", [m.ObjectRef(p.id_at_location), 1.0], {}, [i], False]
                for i in range(8_000_001, 8_000_002 + base.MAX_PRELUDE_ITEMS)]
    reply = _raw(alice, m.DeleteMessage([]), too_many)
    assert type(reply) is m.ErrorReply and reply.error == "SerializationError" and "limit" in reply.message
    assert not any(8_000_001 <= i <= 8_000_001 + base.MAX_PRELUDE_ITEMS for i in alice._objects)
    assert torch.equal((p * 3).get(), torch.full((4,), 3.0))


def test_client_queues_beyond_the_worker_limit_go_in_chunks(alice, monkeypatch):
    monkeypatch.setattr(base, "MAX_PRELUDE_ITEMS", 50)  # what the worker accepts ...
    monkeypatch.setattr(outbox, "MAX_PRELUDE_ITEMS", 50)  # ... and what the client sends at once
    p = torch.ones(2).send(alice)
    made = [p + i for i in range(120)]  # 120 deferred commands > 50 per frame
    assert torch.equal(made[-1].get(), torch.full((2,), 120.0))
    assert torch.equal(made[60].get(), torch.full((2,), 61.0))


def test_serialization_error_of_a_queued_command_is_raised_at_sync_and_marks_it_lost(alice):
    p = torch.ones(2).send(alice)
    q = p + 1
    me = alice.hook.local_worker
    me.defer(alice, ["torch.add", [m.ObjectRef(q.id_at_location), object()], {}, [4242], False])
    with pytest.raises(SerializationError):
        alice.flush()
    with pytest.raises(ObjectNotFoundError, match="never created"):
        q.get()  # the whole frame never left: its results are lost too, and said so


def test_a_dropped_pointer_queues_its_deletion_once(hook):
    """Each freed id rides once in the next prelude (it was queued twice: one extra discard per
    result on the worker, and an append outside the queue lock)."""
    w = sy.VirtualWorker(hook, id="pipe_delete_once")
    me = hook.local_worker
    p = torch.ones(3).send(w)
    me.flush(w)
    oid = p.id_at_location
    del p
    gc.collect()
    queued = me._pending_deletes[id(w)][1]
    assert queued.count(oid) == 1
    me.flush(w)
    assert oid not in w._objects
