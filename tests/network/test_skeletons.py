"""Skeleton commands (``veil/workers/skeletons.py``): a small synchronous command defined once per
connection, then sent as "skeleton k, these ids, these result ids" (issue #19).

Red team: a skeleton is only a short form of a CommandMessage. Forged or out-of-range numbers, a
skeleton of another connection, the wrong arity, a definition of an op off the allowlist or of a
worker function, malformed frames and a client-role session each get an error (refusals audited),
change nothing and leak nothing; the worker keeps serving. The monitor resolves every id of every
use. Results are compared with plain PyTorch. In-process server (no sockets) except the last tests,
which drive a real ``veil worker`` through the client's pointer path.
"""

import msgpack
import pytest
import torch

from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers import skeletons
from veil.workers.websocket_auth import authenticate
from veil.messaging.serde import WIRE_VERSION

from network_helpers import TOKEN, get_as as _get, in_process_server, store_as as _store

CLIENT_TOKEN = "skeleton-client-token"
R = m.ObjectRef


def _skel(k, ids, out, define=None, prelude=None) -> bytes:
    return serialize(m.SkeletonCommand(k, ids, out, define), sender="forged-sender", prelude=prelude)


def _serve(server, session, data):
    """What the connection handler does: inline first, else the handler thread with what was decoded."""
    reply, decoded = server.try_inline(data, session)
    if reply is None:
        reply = server.serve_bytes(data, session, decoded=decoded)
    return deserialize(reply)[0]


def _requests_of(conn) -> list:
    """The decoded requests ``conn`` sends from now on (the spy passes each one through)."""
    sent = []
    real = conn._recv_msg

    def spy(data):
        sent.append(deserialize(data)[0])
        return real(data)

    conn._recv_msg = spy
    return sent


def _refusals(server, session) -> list:
    return [r for r in server.db.audit_entries() if r["outcome"] == "refused" and r["session"] == session.id]


ADD = ["Tensor.add", [R(0), R(1)], {}, False]


def test_a_skeleton_gives_the_commands_results_inline_and_on_the_handler_thread(hook):
    server, _, session = in_process_server(hook, "skel-srv")
    x, y = torch.randn(8, 13), torch.randn(8, 13)
    _store(server, session, 1, x)
    _store(server, session, 2, y)
    assert _serve(server, session, _skel(0, [1, 2], [3], define=ADD)) == m.OkReply()
    assert _serve(server, session, _skel(0, [2, 2], [4], prelude=[3])) == m.OkReply()  # a use, after a deletion
    assert torch.equal(_get(server, session, 4), y + y) and type(_get(server, session, 3)) is m.ErrorReply
    # the same use on the handler thread (the path of a session that left the inline lane)
    server._slow_sessions.add(session.id)
    assert server.try_inline(_skel(0, [1, 2], [5]), session)[0] is None
    assert _serve(server, session, _skel(0, [1, 2], [5])) == m.OkReply()
    assert torch.equal(_get(server, session, 5), x + y)
    # constants, a repeated slot and kwargs are kept with the definition
    server._slow_sessions.clear()
    define = ["torch.add", [R(0), R(0)], {"alpha": 3}, False]
    assert _serve(server, session, _skel(1, [1], [6], define=define)) == m.OkReply()
    assert torch.equal(_get(server, session, 6), torch.add(x, x, alpha=3))


def test_forged_and_out_of_range_numbers_and_wrong_arity_change_nothing(hook):
    server, _, session = in_process_server(hook, "skel-forged-srv")
    x = torch.randn(3)
    _store(server, session, 1, x)
    assert _serve(server, session, _skel(0, [1, 1], [2], define=ADD)) == m.OkReply()
    before = dict(server.monitor.owner_objects())
    bad = [
        _skel(7, [1, 1], [3]),  # never defined on this connection
        _skel(-1, [1, 1], [3]),
        _skel(skeletons.MAX_SKELETONS, [1, 1], [3], define=ADD),  # out of range, even with a definition
        _skel(2**64 - 1, [1, 1], [3]),
        _skel(0, [1], [3]),  # arity: two slots
        _skel(0, [1, 1, 1], [3]),
        _skel(0, [1, "1"], [3]),
        _skel(0, [1, R(1)], [3]),
        _skel(0, [1, 1], "not-a-list"),
        _skel(0, [1, 1], [3], define=["Tensor.mul", [R(0), R(1)], {}, False]),  # redefining 0: refused
        _skel(1, [1], [3], define=["Tensor.neg", [R(1)], {}, False]),  # slots not numbered from 0
        _skel(1, [1], [3], define=["Tensor.neg", [[R(0)]], {}, False]),  # nested: not flat
        _skel(1, [1], [3], define=["Tensor.neg", [R(0)], {}, "yes"]),
        _skel(1, [1], [3], define=["Tensor.neg", [R(0)], {"x": torch.ones(2)}, False]),
        _skel(1, [1], [3], define=["Tensor.add", [R(0), "x" * 1000], {}, False]),
        _skel(1, [1], [3], define=["Tensor.add", [R(0)] + [1] * 20, {}, False]),
        _skel(1, [1], [3], define=["Tensor.neg", [R(0)], {}]),
    ]
    for data in bad:
        reply = _serve(server, session, data)
        assert type(reply) is m.ErrorReply, data
    assert server.monitor.owner_objects().keys() == before.keys()  # nothing stored, nothing freed
    assert 3 not in server.monitor.owner_objects() and set(session.skeletons) == {0}
    # skeleton 0 still means what it was defined as; the worker keeps serving
    assert _serve(server, session, _skel(0, [1, 1], [4])) == m.OkReply()
    assert torch.equal(_get(server, session, 4), x + x)


def test_ops_off_the_allowlist_and_worker_functions_cannot_be_defined(hook):
    server, _, session = in_process_server(hook, "skel-ops-srv")
    _store(server, session, 1, torch.ones(2))
    for name in ("os.system", "builtins.eval", "veil.plan.fit", 42):
        reply = _serve(server, session, _skel(0, [1], [2], define=[name, [R(0)], {}, False]))
        assert type(reply) is m.ErrorReply, name
    assert session.skeletons == {} and type(_get(server, session, 2)) is m.ErrorReply
    assert _serve(server, session, _skel(0, [1], [2], define=["Tensor.neg", [R(0)], {}, False])) == m.OkReply()
    assert torch.equal(_get(server, session, 2), -torch.ones(2))


def test_a_skeleton_of_another_connection_is_unknown_and_its_objects_stay_out_of_reach(hook):
    server, tokens, mine = in_process_server(hook, "skel-iso-srv")
    other = authenticate(tokens, [TOKEN])  # a second connection of the same user
    server.sessions[other.id] = other
    secret = torch.randn(4)
    _store(server, other, 7, secret)
    _store(server, mine, 1, torch.ones(4))
    assert _serve(server, other, _skel(0, [7], [8], define=["Tensor.neg", [R(0)], {}, False])) == m.OkReply()
    # the other connection's skeleton number means nothing here
    reply = _serve(server, mine, _skel(0, [1], [9]))
    assert type(reply) is m.ErrorReply and "not defined" in reply.message and mine.skeletons == {}
    # my own definition under the same number, used on the other session's ids: the monitor refuses, audited
    assert _serve(server, mine, _skel(0, [1], [9], define=["Tensor.neg", [R(0)], {}, False])) == m.OkReply()
    reply = _serve(server, mine, _skel(0, [7], [10]))
    assert type(reply) is m.ErrorReply and reply.error == "ObjectNotFoundError"
    assert any("7" in r["detail"] for r in _refusals(server, mine))
    assert "tensor" not in reply.message.lower() or str(secret[0].item()) not in reply.message
    # nothing of the other session was read into mine, deleted (one-deletion prelude) or overwritten
    assert type(_serve(server, mine, _skel(0, [1], [7], prelude=[7]))) is m.OkReply  # 7 is a fresh id of mine
    assert torch.equal(_get(server, other, 7), secret) and torch.equal(_get(server, mine, 7), -torch.ones(4))
    assert torch.equal(_get(server, other, 8), -secret)


def test_the_owners_data_is_resolved_and_guarded_on_every_use(hook):
    server, _, session = in_process_server(hook, "skel-owner-srv")
    data = torch.arange(6.0)
    oid = server.load(data, tags=("#data",))
    assert _serve(server, session, _skel(0, [oid], [21], define=["Tensor.neg", [R(0)], {}, False],
                                         prelude=[oid])) == m.OkReply()  # usable; its deletion ignored
    assert torch.equal(_get(server, session, 21), -data)
    reply = _serve(server, session, _skel(1, [oid], [0], define=["Tensor.add_", [R(0), R(0)], {}, False]))
    assert type(reply) is m.ErrorReply  # the write guard: owner data is never written in place
    assert torch.equal(_get(server, session, oid), torch.arange(6.0))
    private = server.load(torch.full((3,), 5.0), private=True)
    assert _serve(server, session, _skel(0, [private], [31])) == m.OkReply()  # computing on it is allowed ...
    command = serialize(m.CommandMessage("Tensor.neg", (R(private),), {}, [32], False), sender="c")
    assert _serve(server, session, command) == m.OkReply()
    reply = deserialize(server.serve_bytes(serialize(m.GetObjectsMessage([private], False), sender="c"), session))[0]
    assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError"  # ... its value does not leave
    # and its result is released (or not) exactly as the same CommandMessage's result
    derived = [type(_get(server, session, oid)) for oid in (31, 32)]
    assert derived[0] is derived[1]
    rows = [(r["action"], r["outcome"]) for r in server.db.audit_entries() if set(r["object_ids"]) & {31, 32}]
    assert len(rows) in (0, 2) and (not rows or rows[0] == rows[1])


def test_a_client_role_session_may_not_send_skeletons_and_keeps_none(hook):
    server, tokens, scientist = in_process_server(hook, "skel-roles-srv")
    tokens.add(CLIENT_TOKEN, "shop", role="client")
    client = authenticate(tokens, [CLIENT_TOKEN])
    server.sessions[client.id] = client
    _store(server, scientist, 1, torch.ones(2))
    reply = _serve(server, client, _skel(0, [1], [2], define=["Tensor.neg", [R(0)], {}, False]))
    assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError"
    assert client.skeletons == {} and _refusals(server, client)
    assert type(_get(server, scientist, 2)) is m.ErrorReply and torch.equal(_get(server, scientist, 1), torch.ones(2))
    # an in-process worker (no connection) does not take skeletons either
    plain = hook.local_worker.__class__(hook, id="skel-plain")
    assert type(deserialize(plain._recv_msg(_skel(0, [1], [2], define=ADD)))[0]) is m.ErrorReply


def test_malformed_skeleton_frames_get_an_error_and_the_worker_serves_on(hook):
    server, _, session = in_process_server(hook, "skel-bad-srv")
    _store(server, session, 1, torch.ones(2))
    good = _skel(0, [1, 1], [2], define=ADD)
    bad = [
        msgpack.packb([WIRE_VERSION, m.SkeletonCommand.TYPE, "c", [], 0, [1, 1]]),  # too few fields
        msgpack.packb([WIRE_VERSION, m.SkeletonCommand.TYPE, "c", [], 0, [1, 1], [2], None, 5]),  # too many
        msgpack.packb([WIRE_VERSION, m.SkeletonCommand.TYPE, "c", [], "0", [1, 1], [2], None]),
        msgpack.packb([WIRE_VERSION, m.SkeletonCommand.TYPE, "c", [], 0, None, [2], None]),
        msgpack.packb([WIRE_VERSION, m.SkeletonCommand.TYPE, "c", [], 0, [1, 1], [2], {"op": "x"}]),
        msgpack.packb([WIRE_VERSION, m.SkeletonCommand.TYPE, "c", [], 0, [1, 1], [2], [None, None, None, None]]),
        good[: len(good) // 2],  # truncated
        b"\xc1\x00\x00\x00\x10" + good,
    ]
    for data in bad:
        assert type(_serve(server, session, data)) is m.ErrorReply, data
    assert _serve(server, session, good) == m.OkReply()
    assert torch.equal(_get(server, session, 2), torch.full((2,), 2.0))


def test_the_client_uses_skeletons_with_plain_pytorch_results(plain_worker, connect):
    wp = plain_worker
    alice = connect(wp)
    alice.pipelining = False  # synchronous commands: the skeleton path
    x, y = torch.randn(8, 13), torch.randn(8, 13)
    px, py = x.send(alice), y.send(alice)
    sent = _requests_of(alice)
    outs = [px + py, px + py, px * 2.5, (px - py).relu(), px[1:3], px + py]
    assert [type(s) for s in sent] == [m.SkeletonCommand] * 7  # (sub, then relu)
    defined = [s for s in sent if type(s) is m.SkeletonCommand and s.define is not None]
    assert len(defined) == 5  # add (once), mul, sub, relu, getitem
    want = [x + y, x + y, x * 2.5, (x - y).relu(), x[1:3], x + y]
    for got, expected in zip(outs, want):
        assert torch.equal(got.get(), expected)
    # a new connection starts a new table (and a new session): it defines again
    alice.connect()
    pz = x.send(alice)
    sent.clear()
    assert torch.equal((pz + pz).get(), x + x)
    assert any(type(s) is m.SkeletonCommand and s.define is not None for s in sent)


def test_a_failed_first_use_leaves_the_skeleton_undefined_and_the_next_use_works(plain_worker, connect):
    wp = plain_worker
    alice = connect(wp)
    alice.pipelining = False
    x = torch.randn(3)
    px = x.send(alice)
    # a second pointer to the same object, then the object is freed: the first use of mul fails remotely
    alias = type(px)(alice, px.id_at_location, px.owner, (3,), torch.float32, garbage_collect_data=False)
    px.get()
    sent = _requests_of(alice)
    with pytest.raises(Exception, match="not found|unknown|no object"):
        alias * alias
    py = x.send(alice)
    assert torch.equal((py * py).get(), x * x)  # defined again under a fresh number: no stale definition
    numbers = [s.skeleton for s in sent if type(s) is m.SkeletonCommand]
    defines = [s.define is not None for s in sent if type(s) is m.SkeletonCommand]
    assert defines == [True, True] and numbers[0] != numbers[1]
