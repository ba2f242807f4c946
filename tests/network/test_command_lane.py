"""The hot lane of ``try_inline`` (``_serve_command``): a full-rights session's plain command runs
without the generic dispatch, and nothing else does; the monitor still resolves and checks every
object it names, refusals are audited, and the worker keeps serving after each bad request.

In-process server, no sockets (``serve_inline`` is what the connection handler calls first).
Results are compared with plain torch and with the handler-thread path (``serve_bytes``).
"""

import torch

from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers import base as worker_base
from veil.workers import handlers
from veil.workers.websocket_auth import authenticate

from network_helpers import get_as as _get, in_process_server, store_as as _store

CLIENT_TOKEN = "lane-client-token"


def _command(op, ids_in, ids_out, prelude=None) -> bytes:
    return serialize(m.CommandMessage(op, tuple(m.ObjectRef(i) for i in ids_in), {}, ids_out, False),
                     sender="forged-sender", prelude=prelude)


def _lane_runs(server, monkeypatch) -> list:
    """Records each request the lane serves (the spy calls through: behaviour is unchanged)."""
    served = []
    lane = type(server)._serve_command

    def spy(self, session, principal, msg, prelude):
        served.append(msg.op)
        return lane(self, session, principal, msg, prelude)

    monkeypatch.setattr(type(server), "_serve_command", spy)
    return served


def test_the_lane_matches_torch_and_the_handler_thread_path(hook, monkeypatch):
    server, _, session = in_process_server(hook, "lane-srv")
    served = _lane_runs(server, monkeypatch)
    x = torch.randn(8, 13)
    _store(server, session, 1, x)
    assert deserialize(server.serve_inline(_command("Tensor.add", [1, 1], [2]), session))[0] == m.OkReply()
    assert served == ["Tensor.add"]
    assert deserialize(server.serve_bytes(_command("Tensor.add", [1, 1], [3]), session))[0] == m.OkReply()
    assert torch.equal(_get(server, session, 2), x + x) and torch.equal(_get(server, session, 3), x + x)
    # a dropped result pointer in front (the synchronous client's one-deletion prelude), then the op
    assert deserialize(server.serve_inline(_command("torch.mul", [1, 1], [4], prelude=[2]), session))[0] == m.OkReply()
    assert torch.equal(_get(server, session, 4), x * x)
    assert type(_get(server, session, 2)) is m.ErrorReply  # deleted
    # deferred plain ops in front: they run first, in order
    step = ["Tensor.sub", [m.ObjectRef(4), m.ObjectRef(1)], {}, [5], False]
    assert deserialize(server.serve_inline(_command("Tensor.neg", [5], [6], prelude=[step]), session))[0] == m.OkReply()
    assert torch.equal(_get(server, session, 6), -(x * x - x))


def test_objects_of_another_session_are_unknown_on_the_lane_and_the_refusal_is_audited(hook, monkeypatch):
    server, tokens, mine = in_process_server(hook, "lane-iso-srv")
    other = authenticate(tokens, ["net-scientist-token"])  # a second connection of the same user
    server.sessions[other.id] = other
    served = _lane_runs(server, monkeypatch)
    _store(server, other, 7, torch.ones(3))
    reply = deserialize(server.serve_inline(_command("Tensor.add", [7, 7], [8]), mine))[0]
    assert served == ["Tensor.add"]  # it took the lane ...
    assert type(reply) is m.ErrorReply and reply.error == "ObjectNotFoundError"  # ... and the monitor refused
    rows = [r for r in server.db.audit_entries() if r["outcome"] == "refused" and r["session"] == mine.id]
    assert len(rows) == 1 and "7" in rows[0]["detail"]
    # deleting it through the one-deletion prelude leaves it alone; the worker keeps serving
    assert deserialize(server.serve_inline(_command("Tensor.neg", [], [9], prelude=[7]), mine))[0].error
    assert torch.equal(_get(server, other, 7), torch.ones(3))
    _store(server, mine, 10, torch.full((3,), 2.0))
    assert deserialize(server.serve_inline(_command("Tensor.add", [10, 10], [11]), mine))[0] == m.OkReply()
    assert torch.equal(_get(server, mine, 11), torch.full((3,), 4.0))


def test_the_owners_data_stays_protected_on_the_lane(hook):
    server, _, session = in_process_server(hook, "lane-owner-srv")
    data = torch.arange(6.0)
    oid = server.load(data, tags=("#data",))
    assert deserialize(server.serve_inline(_command("Tensor.neg", [oid], [21], prelude=[oid]), session))[0] \
        == m.OkReply()  # usable; the deletion of the owner's object was ignored
    assert torch.equal(_get(server, session, 21), -data) and server.monitor.session_bytes(session.id) > 0
    reply = deserialize(server.serve_inline(_command("Tensor.add_", [oid, oid], [0]), session))[0]
    assert type(reply) is m.ErrorReply  # the write guard: owner data is never written in place
    assert torch.equal(_get(server, session, oid), torch.arange(6.0))


def test_other_roles_worker_functions_and_replaced_handlers_do_not_take_the_lane(hook, monkeypatch):
    server, tokens, scientist = in_process_server(hook, "lane-roles-srv")
    tokens.add(CLIENT_TOKEN, "shop", role="client")
    client = authenticate(tokens, [CLIENT_TOKEN])
    server.sessions[client.id] = client
    served = _lane_runs(server, monkeypatch)
    # a client (serving) session: check_request refuses a torch op, audited; never on the lane
    reply = deserialize(server.serve_inline(_command("Tensor.add", [1, 1], [2]), client))[0]
    assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError" and served == []
    assert any(r["outcome"] == "refused" and r["session"] == client.id for r in server.db.audit_entries())
    # a worker function (cancellable, may call peers): its handler thread, decoded once
    fit = server.try_inline(_command("veil.plan.fit", [1], []), scientist)
    assert fit[0] is None and type(fit[1][0]) is m.CommandMessage and served == []
    # a deferred worker function in front of a plain op: the whole request takes its thread
    step = ["veil.plan.run", [], {}, [], False]
    assert server.try_inline(_command("Tensor.add", [1, 1], [3], prelude=[step]), scientist)[0] is None
    assert served == []
    # a replaced command handler is honoured (the lane is the stock handler's body only)
    seen = []

    def replaced(worker, msg, sender):
        seen.append(msg.op)
        return m.OkReply()

    monkeypatch.setitem(worker_base.HANDLERS, m.CommandMessage, replaced)
    assert deserialize(server.serve_inline(_command("Tensor.add", [1, 1], [4]), scientist))[0] == m.OkReply()
    assert seen == ["Tensor.add"] and served == []
    monkeypatch.setitem(worker_base.HANDLERS, m.CommandMessage, handlers._handle_command)
    # a session that ran long inline goes to handler threads: not the lane either
    server._slow_sessions.add(scientist.id)
    assert server.try_inline(_command("Tensor.add", [1, 1], [5]), scientist)[0] is None and served == []


def test_bad_commands_on_the_lane_get_an_error_and_the_worker_keeps_serving(hook):
    server, _, session = in_process_server(hook, "lane-bad-srv")
    _store(server, session, 1, torch.ones(2, 2))
    bad = [
        serialize(m.CommandMessage("os.system", (), {}, [2], False), sender="c"),  # not allowlisted
        serialize(m.CommandMessage("Tensor.add", (m.ObjectRef(1),), "not-a-map", [2], False), sender="c"),
        serialize(m.CommandMessage("Tensor.add", (m.ObjectRef(1), m.ObjectRef(1)), {}, [1], False), sender="c"),
        serialize(m.CommandMessage("Tensor.add", (m.ObjectRef(1), m.ObjectRef(1)), {}, [2, 3], False), sender="c"),
        serialize(m.CommandMessage(["Tensor.add"], (), {}, [2], False), sender="c"),
    ]
    for data in bad:  # answered inline, or (not a plain op) on its handler thread, as the server does
        reply, decoded = server.try_inline(data, session)
        if reply is None:
            reply = server.serve_bytes(data, session, decoded=decoded)
        assert type(deserialize(reply)[0]) is m.ErrorReply, data
    assert deserialize(server.serve_inline(_command("Tensor.add", [1, 1], [2]), session))[0] == m.OkReply()
    assert torch.equal(_get(server, session, 2), torch.full((2, 2), 2.0))
