"""The command lane's prepared skeleton uses (``handlers.run_use``, ``handlers._run_resolved``'s plain branch).

A use of a defined skeleton skips building its CommandMessage: the op is looked up once per skeleton,
the reference monitor resolves each id of each use (``ReferenceMonitor.resolve_ids``), and a use whose
inputs are plain client tensors runs without the checks that cannot apply to them. Every test compares
a use with the same CommandMessage: results against plain PyTorch, and refusals (another session's
object, DP-only data, owner data written in place, data under review) by reply and audit row.
"""

import torch

from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers.monitor import MIN_TENSOR_BYTES
from veil.workers.websocket_auth import authenticate

from network_helpers import TOKEN, get_as as _get, in_process_server, store_as as _store

R = m.ObjectRef


def _serve(server, session, data):
    reply, decoded = server.try_inline(data, session)
    if reply is None:
        reply = server.serve_bytes(data, session, decoded=decoded)
    return deserialize(reply)[0]


def _use(server, session, k, ids, out, define=None):
    return _serve(server, session, serialize(m.SkeletonCommand(k, ids, out, define), sender="c"))


def _command(server, session, op, args, out, kwargs=None, grad=False):
    return _serve(server, session, serialize(m.CommandMessage(op, tuple(args), kwargs or {}, out, grad), sender="c"))


def _rows(server, session, ids):
    """The audit rows naming any of ``ids`` for ``session``, without their times."""
    return [(r["action"], r["outcome"], r["detail"], tuple(r["object_ids"])) for r in server.db.audit_entries()
            if r["session"] == session.id and set(r["object_ids"]) & set(ids)]


def _defined_and_prepared(server, session, k, define, ids, out):
    """Defines skeleton ``k`` with a first use, then returns the reply of a second (prepared) use."""
    first = [0 if oid == 0 else 90_000 + 100 * k + i for i, oid in enumerate(out)]  # (0: in place)
    assert _use(server, session, k, ids, first, define=define) == m.OkReply()
    reply = _use(server, session, k, ids, out)
    assert session.skeletons[k].prepared, "the use did not take the prepared lane"
    return reply


def test_prepared_uses_give_the_results_of_plain_pytorch(hook):
    server, _, session = in_process_server(hook, "lane-results")
    x, y, w = torch.randn(8, 13), torch.randn(8, 13), torch.randn(13, 5)
    for oid, t in ((1, x), (2, y), (3, w)):
        _store(server, session, oid, t)
    cases = [  # (definition, ids, expected)
        (["Tensor.add", [R(0), R(1)], {}, False], [1, 2], x + y),
        (["torch.add", [R(0), R(1)], {"alpha": -2.5}, False], [2, 1], torch.add(y, x, alpha=-2.5)),
        (["Tensor.mul", [R(0), 3.0], {}, False], [1], x * 3.0),
        (["torch.matmul", [R(0), R(1)], {}, False], [1, 3], x @ w),
        (["Tensor.sub", [R(1), R(0)], {}, False], [1, 2], y - x),  # slots in another order than the arguments
        (["Tensor.add", [R(0), R(0)], {}, True], [2], y + y),  # one id in two places, grad mode on
    ]
    for k, (define, ids, expected) in enumerate(cases):
        assert _defined_and_prepared(server, session, k, define, ids, [100 + k]) == m.OkReply()
        assert torch.allclose(_get(server, session, 100 + k), expected), define
        assert torch.allclose(_get(server, session, 90_000 + 100 * k), expected)  # the defining use, the same
    # two results (values, indices) under two ids, as torch.max returns them
    reply = _defined_and_prepared(server, session, 10, ["torch.max", [R(0), 1], {}, False], [1], [201, 202])
    assert reply == m.OkReply()
    values, indices = torch.max(x, 1)
    assert torch.equal(_get(server, session, 201), values) and torch.equal(_get(server, session, 202), indices)
    # in place on the session's own object (result id 0: the input itself)
    _store(server, session, 4, x.clone())
    assert _defined_and_prepared(server, session, 11, ["Tensor.add_", [R(0), R(1)], {}, False], [4, 2], [0]) \
        == m.OkReply()
    assert torch.allclose(_get(server, session, 4), x + y + y)  # the defining use and this one


def test_result_entries_carry_the_capabilities_a_commands_results_carry(hook):
    server, _, session = in_process_server(hook, "lane-entries")
    _store(server, session, 1, torch.randn(4))
    owned = server.load(torch.arange(4.0), tags=("#data",))
    principal = server.principal_of(session)
    for k, ids in enumerate(([1, 1], [1, owned])):  # client inputs (prepared lane), then owner data (checked path)
        assert _defined_and_prepared(server, session, k, ["Tensor.add", [R(0), R(1)], {}, False], ids, [10 + k]) \
            == m.OkReply()
        assert _command(server, session, "Tensor.add", [R(i) for i in ids], [20 + k]) == m.OkReply()
        by_use, by_command = (server.monitor._find(principal, oid) for oid in (10 + k, 20 + k))
        fields = ("tags", "description", "allowed_users", "protected", "created_by", "meta", "reveal_to", "kind",
                  "provenance", "nbytes")
        assert {f: getattr(by_use, f) for f in fields} == {f: getattr(by_command, f) for f in fields}
        assert by_use.created_by == session.id and by_use.kind == "client" and by_use.nbytes == MIN_TENSOR_BYTES
        assert (by_use.tags, by_use.description, by_use.allowed_users, by_use.protected, by_use.meta,
                by_use.reveal_to) == ((), "", None, False, {}, None)  # each field where the Entry keeps it
    assert server.monitor._find(principal, 11).provenance == frozenset({owned})  # derived from the owner's data


def test_a_use_naming_another_sessions_object_is_refused_and_audited_as_a_command(hook):
    server, tokens, mine = in_process_server(hook, "lane-iso")
    other = authenticate(tokens, [TOKEN])
    server.sessions[other.id] = other
    secret = torch.randn(5)
    _store(server, other, 7, secret)
    _store(server, mine, 1, torch.ones(5))
    assert _defined_and_prepared(server, mine, 0, ["Tensor.add", [R(0), R(1)], {}, False], [1, 1], [2]) \
        == m.OkReply()
    by_use = _use(server, mine, 0, [1, 7], [3])
    rows_use = _rows(server, mine, [7])
    by_command = _command(server, mine, "Tensor.add", [R(1), R(7)], [4])
    assert type(by_use) is m.ErrorReply and by_use.error == "ObjectNotFoundError"
    assert (by_use.error, by_use.message) == (by_command.error, by_command.message)
    rows = _rows(server, mine, [7])
    assert len(rows_use) == 1 and rows == rows_use * 2  # one refusal row each, the same row
    for oid in (3, 4):
        assert type(_get(server, mine, oid)) is m.ErrorReply  # nothing stored
    assert torch.equal(_get(server, other, 7), secret)
    # two ids nobody here may name, slots in reverse argument order: the same one is refused first
    assert _defined_and_prepared(server, mine, 1, ["Tensor.sub", [R(1), R(0)], {}, False], [1, 1], [5]) \
        == m.OkReply()
    by_use = _use(server, mine, 1, [7, 8], [6])
    by_command = _command(server, mine, "Tensor.sub", [R(8), R(7)], [6])
    assert type(by_use) is m.ErrorReply and (by_use.error, by_use.message) == (by_command.error, by_command.message)
    assert "8" in by_use.message and _rows(server, mine, [8]) and not _rows(server, mine, [7])[2:]


def test_dp_only_data_is_refused_and_audited_as_a_command(hook):
    server, _, session = in_process_server(hook, "lane-dp")
    dataset = server.load(torch.randn(6), policy="dp-only")
    _store(server, session, 1, torch.ones(6))
    assert _defined_and_prepared(server, session, 0, ["Tensor.add", [R(0), R(1)], {}, False], [1, 1], [2]) \
        == m.OkReply()
    by_use = _use(server, session, 0, [1, dataset], [3])
    rows_use = _rows(server, session, [dataset])
    by_command = _command(server, session, "Tensor.add", [R(1), R(dataset)], [4])
    assert type(by_use) is m.ErrorReply and by_use.error == "PermissionDeniedError"
    assert (by_use.error, by_use.message) == (by_command.error, by_command.message)
    assert rows_use and _rows(server, session, [dataset]) == rows_use * 2
    assert all(type(_get(server, session, oid)) is m.ErrorReply for oid in (3, 4))


def test_owner_data_is_never_written_in_place_by_a_use(hook):
    server, _, session = in_process_server(hook, "lane-write")
    data = torch.arange(5.0)
    owned = server.load(data.clone())
    _store(server, session, 1, torch.ones(5))
    _store(server, session, 2, torch.ones(5))
    define = ["Tensor.add_", [R(0), R(1)], {}, False]
    assert _defined_and_prepared(server, session, 0, define, [2, 1], [0]) == m.OkReply()
    by_use = _use(server, session, 0, [owned, 1], [0])
    by_command = _command(server, session, "Tensor.add_", [R(owned), R(1)], [0])
    assert type(by_use) is m.ErrorReply and (by_use.error, by_use.message) == (by_command.error, by_command.message)
    assert torch.equal(_get(server, session, owned), data) and torch.equal(_get(server, session, 2), torch.ones(5) * 3)


def test_results_of_data_under_review_wait_for_approval_as_a_commands_do(hook):
    server, _, session = in_process_server(hook, "lane-review")
    reviewed = server.load(torch.randn(4), policy="review")
    _store(server, session, 1, torch.ones(4))
    assert _defined_and_prepared(server, session, 0, ["Tensor.add", [R(0), R(1)], {}, False], [1, 1], [2]) \
        == m.OkReply()
    assert _use(server, session, 0, [reviewed, 1], [3]) == m.OkReply()
    assert _command(server, session, "Tensor.add", [R(reviewed), R(1)], [4]) == m.OkReply()
    principal = server.principal_of(session)
    by_use, by_command = (server.monitor._find(principal, oid) for oid in (3, 4))
    assert by_use.meta.keys() == by_command.meta.keys() and by_use.provenance == by_command.provenance
    fetched = [_get(server, session, oid) for oid in (3, 4)]
    assert all(type(f) is m.ErrorReply for f in fetched) and fetched[0].error == fetched[1].error
    assert torch.equal(_get(server, session, 2), torch.ones(4) * 2)  # plain objects still come back
