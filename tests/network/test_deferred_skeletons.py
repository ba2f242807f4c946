"""Deferred skeleton uses: pipelined commands in a batch as "skeleton k, these ids, these result ids" (#19).

A deferred command of flat pointer arguments rides in a batch as ``[k, ids, return_ids]`` (its first
use on a connection carries the definition: ``[k, ids, return_ids, definition]``); the worker expands
it with the session's table into the command's fields, which run exactly as a deferred command.

Red team: forged or undefined numbers, the wrong arity, malformed items, an op off the allowlist, a
client-role session, another connection's numbers, an in-process worker: each fails the batch at that
item (named, earlier commands ran, later ones skipped), stores nothing, and the worker serves on. Results
are compared with plain PyTorch; a failure is raised at the next synchronization, naming the op.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from veil.exceptions import ObjectNotFoundError
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers import outbox, skeletons
from veil.workers.websocket_auth import authenticate

from network_helpers import TOKEN, get_as as _get, in_process_server, store_as as _store

R = m.ObjectRef
NEG = ["Tensor.neg", [R(0)], {}, False]
ADD = ["Tensor.add", [R(0), R(1)], {}, False]


def _batch(prelude) -> bytes:
    return serialize(m.DeleteMessage([]), sender="forged-sender", prelude=prelude)


def _serve(server, session, data):
    reply, decoded = server.try_inline(data, session)
    if reply is None:
        reply = server.serve_bytes(data, session, decoded=decoded)
    return deserialize(reply)[0]


def _refusals(server, session) -> list:
    return [r for r in server.db.audit_entries() if r["outcome"] == "refused" and r["session"] == session.id]


def test_deferred_uses_give_the_commands_results_inline_and_on_the_handler_thread(hook):
    server, _, session = in_process_server(hook, "dskel-srv")
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    _store(server, session, 1, x)
    _store(server, session, 2, y)
    # definitions ride with their first use; a plain command and a deletion may sit between uses
    batch = [[1000, [1, 2], [3], ADD], [1000, [3, 3], [4]], ["Tensor.mul", [R(4), 2.0], {}, [5], False],
             [999, [5], [6], NEG], 3, [999, [6], [7]]]
    assert _serve(server, session, _batch(batch)) == m.OkReply()
    assert torch.equal(_get(server, session, 7), (x + y + (x + y)) * 2.0)
    assert type(_get(server, session, 3)) is m.ErrorReply  # deleted in order
    # the handler thread's path (a session that left the inline lane), and a synchronous use of a
    # number a batch defined
    server._slow_sessions.add(session.id)
    assert server.try_inline(_batch([[1000, [1, 1], [8]]]), session)[0] is None
    assert _serve(server, session, _batch([[1000, [1, 1], [8]]])) == m.OkReply()
    sync = serialize(m.SkeletonCommand(999, [8], [9]), sender="c")
    assert _serve(server, session, sync) == m.OkReply()
    assert torch.equal(_get(server, session, 9), -(x + x))


def test_forged_numbers_and_malformed_uses_fail_the_batch_there_and_change_nothing_else(hook):
    server, _, session = in_process_server(hook, "dskel-forged-srv")
    x = torch.randn(3)
    _store(server, session, 1, x)
    assert _serve(server, session, _batch([[0, [1], [2], NEG]])) == m.OkReply()
    bad_items = [
        [7, [1], [50]],  # never defined on this connection
        [-1, [1], [50]],
        [skeletons.MAX_SKELETONS, [1], [50], NEG],  # out of range, even with a definition
        [0, [1, 1], [50]],  # arity
        [0, ["1"], [50]],
        [0, [1], "not-a-list"],
        [0, [1], [50], ["Tensor.mul", [R(0), R(0)], {}, False]],  # redefining 0
        [5, [1], [50], ["Tensor.neg", [[R(0)]], {}, False]],  # nested: not flat
        [5, [1], [50], ["os.system", [R(0)], {}, False]],  # off the allowlist
        [5, [1], [50], ["veil.plan.fit", [R(0)], {}, False]],  # a worker function
    ]
    for item in bad_items:
        before = set(server.monitor.owner_objects())
        # a command before the bad item runs, the one after it is skipped
        reply = _serve(server, session, _batch([[0, [1], [40]], item, [0, [1], [41]]]))
        assert type(reply) is m.ErrorReply and "(#2 of 3 in the batch)" in reply.message, item
        assert set(server.monitor.owner_objects()) - before == {40}, item
        assert type(_get(server, session, 50)) is m.ErrorReply and type(_get(server, session, 41)) is m.ErrorReply
        assert type(_serve(server, session, _batch([40]))) is m.OkReply
    assert set(session.skeletons) == {0}  # nothing new kept
    for prelude in ([[0, [1]]], [[0, [1], [2], NEG, 9]], [["0", [1], [2]]], [[0.5, [1], [2]]]):
        assert type(_serve(server, session, _batch(prelude))) is m.ErrorReply, prelude  # refused at decoding
    # the worker serves on; skeleton 0 still means neg
    assert _serve(server, session, _batch([[0, [1], [60]]])) == m.OkReply()
    assert torch.equal(_get(server, session, 60), -x)


def test_another_connections_numbers_and_objects_stay_out_of_reach(hook):
    server, tokens, mine = in_process_server(hook, "dskel-iso-srv")
    other = authenticate(tokens, [TOKEN])
    server.sessions[other.id] = other
    secret = torch.randn(4)
    _store(server, other, 7, secret)
    _store(server, mine, 1, torch.ones(4))
    assert _serve(server, other, _batch([[3, [7], [8], NEG]])) == m.OkReply()
    reply = _serve(server, mine, _batch([[3, [1], [9]]]))
    assert type(reply) is m.ErrorReply and "not defined" in reply.message and mine.skeletons == {}
    assert _serve(server, mine, _batch([[3, [1], [9], NEG]])) == m.OkReply()
    reply = _serve(server, mine, _batch([[3, [7], [10]]]))  # my skeleton on the other session's id
    assert type(reply) is m.ErrorReply and reply.error == "ObjectNotFoundError"
    assert any("7" in r["detail"] for r in _refusals(server, mine))
    assert torch.equal(_get(server, other, 7), secret) and torch.equal(_get(server, other, 8), -secret)
    assert type(_get(server, mine, 10)) is m.ErrorReply


def test_the_owners_data_is_guarded_on_every_deferred_use(hook):
    server, _, session = in_process_server(hook, "dskel-owner-srv")
    data = torch.arange(6.0)
    oid = server.load(data, tags=("#data",))
    assert _serve(server, session, _batch([[0, [oid], [21], NEG]])) == m.OkReply()
    assert torch.equal(_get(server, session, 21), -data)
    reply = _serve(server, session, _batch([[1, [oid, oid], [0], ["Tensor.add_", [R(0), R(1)], {}, False]]]))
    assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError"  # the write guard
    assert torch.equal(_get(server, session, oid), torch.arange(6.0))


def test_a_client_role_session_and_an_in_process_worker_refuse_deferred_uses(hook):
    server, tokens, scientist = in_process_server(hook, "dskel-roles-srv")
    tokens.add("dskel-client-token", "shop", role="client")
    client = authenticate(tokens, ["dskel-client-token"])
    server.sessions[client.id] = client
    _store(server, scientist, 1, torch.ones(2))
    reply = _serve(server, client, _batch([[0, [1], [2], NEG]]))
    assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError"
    assert client.skeletons == {} and _refusals(server, client)
    assert type(_get(server, scientist, 2)) is m.ErrorReply
    plain = hook.local_worker.__class__(hook, id="dskel-plain")
    reply = deserialize(plain._recv_msg(_batch([[0, [1], [2], NEG]])))[0]
    assert type(reply) is m.ErrorReply and "skeleton" in reply.message


def test_client_numbers_for_synchronous_and_deferred_definitions_never_meet():
    table = skeletons.ClientSkeletons(conn=None)
    a, b, c = object(), object(), object()
    k, definition = table.defer(a, lambda: NEG)
    assert (k, definition) == (skeletons.MAX_SKELETONS - 1, NEG)
    assert table.defer(a, lambda: pytest.fail("defined twice")) == (k, None)
    assert table.number(a) == (k, True)  # a synchronous use of a deferred definition
    assert table.number(b) == (0, False)
    table.taken()
    table.keep(b, 0)
    assert table.defer(b, lambda: pytest.fail("defined twice")) == (0, None)
    table.forget(k)  # its batch failed before the definition ran: defined afresh, under a new number
    assert table.defer(a, lambda: NEG) == (skeletons.MAX_SKELETONS - 2, NEG)
    table.next = table.last  # full
    assert table.defer(c, lambda: NEG) == (None, None) and table.number(c) == (None, False)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 1))


def _train(model, x, y, steps=12):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x[i % 4 * 8:i % 4 * 8 + 8]), y[i % 4 * 8:i % 4 * 8 + 8]).backward()
        opt.step()
    return model


def _sent_items(conn) -> list:
    """The prelude items of every request ``conn`` sends or posts from now on."""
    items = []
    for name in ("_recv_msg", "post"):
        real = getattr(conn, name)

        def spy(data, real=real):
            items.extend(deserialize(data if type(data) is bytes else b"".join(bytes(p) for p in data))[2])
            return real(data)

        setattr(conn, name, spy)
    return items


def test_the_pipelined_loops_weights_equal_the_synchronous_loops_and_plain_pytorch(plain_worker, connect, monkeypatch):
    monkeypatch.setattr(outbox, "PRELUDE_LIMIT", 16)  # several posted batches
    wp = plain_worker
    alice = connect(wp)
    x, y = torch.randn(32, 13), torch.randn(32, 1)
    local = _train(_mlp(), x, y)
    runs = {}
    for pipelining in (True, False):
        alice.pipelining = pipelining
        items = _sent_items(alice)
        model = _mlp().send(alice)
        runs[pipelining] = [p.detach().clone() for p in _train(model, x.send(alice), y.send(alice)).get().parameters()]
        uses = [i for i in items if type(i) is list and type(i[0]) is int]
        if pipelining:  # the loop's commands went as skeleton uses, each defined once
            assert len(uses) > 12 * 10 and sum(len(i) == 4 for i in uses) < 30
        else:
            assert not uses
    for a, b, c in zip(runs[True], runs[False], local.parameters()):
        assert torch.equal(a, b)
        assert torch.allclose(a, c, atol=1e-6)


def test_a_failed_deferred_use_is_raised_at_the_next_synchronization_and_its_definition_made_again(plain_worker, connect):
    wp = plain_worker
    alice = connect(wp)
    a, b = torch.ones(2, 3).send(alice), torch.ones(5, 7).send(alice)
    bad = torch.ones(2, 3).send(alice)
    alice.flush()
    bad.__dict__["_meta"] = ((5, 7), torch.float32, False)  # the client believes a shape the worker does not have
    before = a * 3.0
    broken = b @ bad.t()  # shapes agree here, not on the worker: fails there
    after = a.sub(0.25)  # a new skeleton, defined after the failing use: its definition never runs
    items = _sent_items(alice)
    # the batch: a * 3, bad.t(), the matmul, the sub
    with pytest.raises(Exception, match=r"deferred command 'Tensor.matmul' \(#3 of 4 in the batch\)"):
        alice.flush()
    assert [type(i[0]) for i in items if type(i) is list] == [int] * 4  # sent as skeleton uses
    assert torch.equal(before.get(), torch.full((2, 3), 3.0))
    for lost in (broken, after):
        with pytest.raises(ObjectNotFoundError, match="never created"):
            lost.get()
    items.clear()
    again = a.sub(0.25)  # the same signature: defined afresh under a new number, and it works
    assert torch.equal(again.get(), torch.full((2, 3), 0.75))
    assert [len(i) for i in items if type(i) is list] == [4]
