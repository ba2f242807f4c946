"""Deferred skeleton uses run straight from their ids (``handlers.run_use``), as the lane's synchronous ones.

A use ``[k, ids, return_ids]`` of a defined skeleton in a batch of a full-rights session builds no
ObjectRef and no command fields: the reference monitor resolves each id of each use (``resolve_ids``)
and ``handlers._run_resolved`` runs it, skipping the owner's checks only when none applies (plain client
tensors, compute purpose, no provenance recorded). Every test compares a batch of uses with the same
batch of deferred CommandMessages: results against plain PyTorch; refusals (another session's object,
DP-only data, owner data written in place) by reply, audit rows and what the batch stored; data under
review by the entries' lineage. A spy checks the uses took the prepared path.
"""

import pytest
import torch

from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers import handlers
from veil.workers.websocket_auth import authenticate

from network_helpers import TOKEN, base_args, get_as as _get, in_process_server, store_as as _store

R = m.ObjectRef
ADD = ["Tensor.add", [R(0), R(1)], {}, False]


def _serve(server, session, prelude):
    data = serialize(m.DeleteMessage([]), sender="c", prelude=prelude)
    reply, decoded = server.try_inline(data, session)
    if reply is None:
        reply = server.serve_bytes(data, session, decoded=decoded)
    return deserialize(reply)[0]


def _rows(server, session, ids):
    return [(r["action"], r["outcome"], r["detail"], tuple(r["object_ids"])) for r in server.db.audit_entries()
            if r["session"] == session.id and set(r["object_ids"]) & set(ids)]


@pytest.fixture
def prepared_runs(monkeypatch):
    """How many deferred uses ran through ``handlers.run_use`` (the prepared path)."""
    runs = []
    real = handlers.run_use

    def spy(*args):
        runs.append(args[3].op)
        return real(*args)

    monkeypatch.setattr(handlers, "run_use", spy)
    return runs


def _define(server, session, k, define, ids):
    """Defines skeleton ``k`` with a first use (result under 90_000 + k) and checks it ran."""
    assert _serve(server, session, [[k, ids, [90_000 + k], define]]) == m.OkReply()


def test_prepared_deferred_uses_give_the_results_of_plain_pytorch(hook, prepared_runs):
    server, _, session = in_process_server(hook, "dprep-results")
    x, y, w = torch.randn(8, 13), torch.randn(8, 13), torch.randn(13, 5)
    for oid, t in ((1, x), (2, y), (3, w)):
        _store(server, session, oid, t)
    cases = [  # (definition, ids, expected)
        (ADD, [1, 2], x + y),
        (["torch.add", [R(0), R(1)], {"alpha": -2.5}, False], [2, 1], torch.add(y, x, alpha=-2.5)),
        (["Tensor.mul", [R(0), 3.0], {}, False], [1], x * 3.0),
        (["torch.matmul", [R(0), R(1)], {}, True], [1, 3], x @ w),
        (["Tensor.sub", [R(1), R(0)], {}, False], [1, 2], y - x),  # slots in another order than the arguments
        (["Tensor.__getitem__", [R(0), slice(2, 5)], {}, False], [1], x[2:5]),
    ]
    for k, (define, ids, _) in enumerate(cases):
        _define(server, session, k, define, ids)
    assert prepared_runs == []  # definitions take the expanding path
    # one batch of prepared uses, a deletion and a plain command between them
    batch = [[k, ids, [100 + k]] for k, (_, ids, _) in enumerate(cases)]
    batch[2:2] = [90_000, ["Tensor.neg", [R(100)], {}, [99], False]]
    assert _serve(server, session, batch) == m.OkReply()
    assert prepared_runs == [define[0] for define, _, _ in cases]
    for k, (define, _, expected) in enumerate(cases):
        assert torch.allclose(_get(server, session, 100 + k), expected), define
    assert torch.allclose(_get(server, session, 99), -(x + y))
    assert type(_get(server, session, 90_000)) is m.ErrorReply  # deleted in order
    # in place (result id 0) on the session's own object, twice in one batch
    _store(server, session, 4, x.clone())
    _define(server, session, 20, ["Tensor.add_", [R(0), R(1)], {}, False], [4, 2])
    assert _serve(server, session, [[20, [4, 2], [0]], [20, [4, 2], [0]]]) == m.OkReply()
    assert torch.allclose(_get(server, session, 4), x + y + y + y)  # add_ three times (x + 3 * y rounds otherwise)


def test_another_sessions_object_stops_the_batch_as_a_deferred_command_does(hook, prepared_runs):
    server, tokens, mine = in_process_server(hook, "dprep-iso")
    other = authenticate(tokens, [TOKEN])
    server.sessions[other.id] = other
    secret = torch.randn(5)
    _store(server, other, 7, secret)
    _store(server, mine, 1, torch.ones(5))
    _define(server, mine, 0, ADD, [1, 1])
    by_use = _serve(server, mine, [[0, [1, 1], [2]], [0, [1, 7], [3]], [0, [1, 1], [4]]])
    rows_use = _rows(server, mine, [7])
    by_command = _serve(server, mine, [["Tensor.add", [R(1), R(1)], {}, [12], False],
                                       ["Tensor.add", [R(1), R(7)], {}, [13], False],
                                       ["Tensor.add", [R(1), R(1)], {}, [14], False]])
    assert prepared_runs == ["Tensor.add", "Tensor.add"]  # the third was skipped
    assert type(by_use) is m.ErrorReply and by_use.error == "ObjectNotFoundError"
    assert "deferred command 'Tensor.add' (#2 of 3 in the batch)" in by_use.message
    assert (by_use.error, by_use.message) == (by_command.error, by_command.message)
    assert len(rows_use) == 1 and _rows(server, mine, [7]) == rows_use * 2  # the same refusal row
    assert torch.equal(_get(server, mine, 2), torch.ones(5) * 2)  # the use before it ran
    for oid in (3, 4):
        assert type(_get(server, mine, oid)) is m.ErrorReply  # nothing stored for it or after it
    assert torch.equal(_get(server, other, 7), secret)
    # a failing command after a prepared use is named as itself
    _store(server, mine, 8, torch.ones(2, 3))
    reply = _serve(server, mine, [[0, [1, 1], [20]], ["Tensor.matmul", [R(1), R(8)], {}, [21], False]])
    assert type(reply) is m.ErrorReply and "deferred command 'Tensor.matmul' (#2 of 2 in the batch)" in reply.message


def test_dp_only_data_is_refused_and_audited_as_a_deferred_command(hook, prepared_runs):
    server, _, session = in_process_server(hook, "dprep-dp")
    dataset = server.load(torch.randn(6), policy="dp-only")
    _store(server, session, 1, torch.ones(6))
    _define(server, session, 0, ADD, [1, 1])
    by_use = _serve(server, session, [[0, [1, dataset], [3]]])
    rows_use = _rows(server, session, [dataset])
    by_command = _serve(server, session, [["Tensor.add", [R(1), R(dataset)], {}, [4], False]])
    assert prepared_runs == ["Tensor.add"]
    assert type(by_use) is m.ErrorReply and by_use.error == "PermissionDeniedError"
    assert (by_use.error, by_use.message) == (by_command.error, by_command.message)
    assert rows_use and _rows(server, session, [dataset]) == rows_use * 2
    assert all(type(_get(server, session, oid)) is m.ErrorReply for oid in (3, 4))


def test_owner_data_is_never_written_in_place_by_a_deferred_use(hook, prepared_runs):
    server, _, session = in_process_server(hook, "dprep-write")
    data = torch.arange(5.0)
    owned = server.load(data.clone())
    _store(server, session, 1, torch.ones(5))
    _store(server, session, 2, torch.ones(5))
    _define(server, session, 0, ["Tensor.add_", [R(0), R(1)], {}, False], [2, 1])
    by_use = _serve(server, session, [[0, [owned, 1], [0]]])
    by_command = _serve(server, session, [["Tensor.add_", [R(owned), R(1)], {}, [0], False]])
    assert prepared_runs == ["Tensor.add_"]
    assert type(by_use) is m.ErrorReply and by_use.error == "PermissionDeniedError"
    assert (by_use.error, by_use.message) == (by_command.error, by_command.message)
    assert torch.equal(_get(server, session, owned), data) and torch.equal(_get(server, session, 2), torch.ones(5) * 2)


def test_results_of_data_under_review_carry_the_lineage_a_deferred_commands_carry(hook, prepared_runs):
    server, _, session = in_process_server(hook, "dprep-review")
    reviewed = server.load(torch.randn(4), policy="review")
    _store(server, session, 1, torch.ones(4))
    _define(server, session, 0, ADD, [1, 1])
    assert _serve(server, session, [[0, [reviewed, 1], [3]], [0, [1, 1], [5]]]) == m.OkReply()
    assert _serve(server, session, [["Tensor.add", [R(reviewed), R(1)], {}, [4], False]]) == m.OkReply()
    assert prepared_runs == ["Tensor.add", "Tensor.add"]
    principal = server.principal_of(session)
    by_use, by_command = (server.monitor._find(principal, oid) for oid in (3, 4))
    assert by_use.meta.keys() == by_command.meta.keys() and by_use.meta
    assert by_use.provenance == by_command.provenance == frozenset({reviewed})
    fetched = [_get(server, session, oid) for oid in (3, 4)]
    assert all(type(f) is m.ErrorReply for f in fetched) and fetched[0].error == fetched[1].error
    assert torch.equal(_get(server, session, 5), torch.ones(4) * 2)  # plain objects still come back


def test_a_failed_prepared_use_over_the_network_stops_its_batch_and_is_raised_at_the_next_synchronization(
        spawn, connect):
    from veil.exceptions import ObjectNotFoundError

    alice = connect(spawn("alice", base_args()))
    a, b = torch.ones(2, 3).send(alice), torch.ones(5, 7).send(alice)
    bad = torch.ones(2, 3).send(alice)
    (b @ torch.ones(7, 5).send(alice)).get()  # the matmul's skeleton is defined and prepared on the worker
    alice.flush()
    bad.__dict__["_meta"] = ((7, 5), torch.float32, False)  # the client believes a shape the worker does not have
    before = a * 3.0
    broken = b @ bad  # a prepared use: shapes agree here, not on the worker
    after = a * 3.0  # the same skeleton as `before`, queued after the failure: skipped
    with pytest.raises(Exception, match=r"deferred command 'Tensor.matmul' \(#2 of 3 in the batch\)"):
        alice.flush()
    assert torch.equal(before.get(), torch.full((2, 3), 3.0))
    for lost in (broken, after):
        with pytest.raises(ObjectNotFoundError, match="never created"):
            lost.get()
    assert torch.equal((a * 3.0).get(), torch.full((2, 3), 3.0))  # the worker serves on
