"""Red team of skeleton commands (``veil/workers/skeletons.py``, message type 9), second pass.

A skeleton is a short form of a CommandMessage kept per connection. Attacks beyond
tests/network/test_skeletons.py:

* memory: a definition's keyword *names* were not bounded (only values were): one 8 MiB name per
  definition, 1024 definitions per connection, kept until it closes (fixed: names are short strings
  too); the whole table of a connection stays a few MiB;
* audit: a refusal of the command a skeleton stands for was audited as ``SkeletonCommand`` on the
  inline lane but ``CommandMessage`` on the handler thread (fixed: both write the CommandMessage's row;
  refusals of the definition itself stay ``SkeletonCommand`` rows);
* the owner's rules on every use, both lanes: in-place writes to owner data, DP-only data, private
  data's results, result ids that collide with the session's or the owner's objects;
* roles: a peer connection keeps no skeleton;
* deletions in the same request: a use after its object was freed is "not found", the definition stays.
"""

import tracemalloc

import pytest
import torch

from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers import skeletons
from veil.workers.websocket_auth import authenticate

from network_helpers import PEER, get_as, in_process_server, store_as

R = m.ObjectRef


def _skel(k, ids, out, define=None, prelude=None) -> bytes:
    return serialize(m.SkeletonCommand(k, ids, out, define), sender="forged", prelude=prelude)


def _cmd(op, args, out) -> bytes:
    return serialize(m.CommandMessage(op, tuple(args), {}, out, False), sender="forged")


def _serve(server, session, data):
    reply, decoded = server.try_inline(data, session)
    if reply is None:
        reply = server.serve_bytes(data, session, decoded=decoded)
    return deserialize(reply)[0]


def _rows_of(server, request):
    """The audit rows one request writes: (action, outcome, object ids, detail without the worker's name)."""
    before = len(server.db.audit_entries())
    reply = request()
    rows = [(r["action"], r["outcome"], tuple(r["object_ids"]), r["detail"].replace(server.id, "W"))
            for r in server.db.audit_entries()[before:]]
    return reply, rows


def test_a_long_keyword_name_is_refused_and_not_kept(hook):
    server, _, session = in_process_server(hook, "rts-key")
    store_as(server, session, 1, torch.ones(3))
    name = "k" * (1 << 20)
    reply = _serve(server, session, _skel(0, [1], [2], define=["Tensor.neg", [R(0)], {name: 1}, False]))
    assert type(reply) is m.ErrorReply and reply.error == "SerializationError"
    assert session.skeletons == {}
    assert not skeletons.definable([R(0)], {name: 1})  # the client sends that command in full instead
    assert _serve(server, session, _skel(0, [1], [2], define=["Tensor.neg", [R(0)], {}, False])) == m.OkReply()
    assert torch.equal(get_as(server, session, 2), -torch.ones(3))


def test_a_connections_table_is_bounded(hook):
    """The largest definitions the parser takes, as many as a connection may hold: a few MiB, not more."""
    server, _, session = in_process_server(hook, "rts-table")
    store_as(server, session, 1, torch.ones(2))
    long = skeletons.MAX_SKELETON_STR
    half = skeletons.MAX_SKELETON_ARGS // 2
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for k in range(skeletons.MAX_SKELETONS):
            args = [R(0)] + [f"{k}a{j}".ljust(long, "x") for j in range(half - 1)]
            kwargs = {f"{k}k{j}".ljust(long, "y"): "z" * long for j in range(half)}
            _serve(server, session, _skel(k, [1], [10 + k], define=["Tensor.neg", args, kwargs, False]))
        held = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert len(session.skeletons) == skeletons.MAX_SKELETONS
    assert held < 16 << 20, f"{held >> 20} MiB for one connection's skeletons"
    reply = _serve(server, session, _skel(skeletons.MAX_SKELETONS, [1], [5],
                                          define=["Tensor.neg", [R(0)], {}, False]))
    assert type(reply) is m.ErrorReply and len(session.skeletons) == skeletons.MAX_SKELETONS


@pytest.mark.parametrize("lane", ["inline", "thread"])
def test_a_use_is_refused_and_audited_exactly_as_its_command(hook, lane):
    """Owner data written in place, DP-only data computed on: the same reply and the same audit rows
    for the skeleton use as for the CommandMessage, on both lanes."""
    server, _, session = in_process_server(hook, f"rts-audit-{lane}")
    if lane == "thread":
        server._slow_sessions.add(session.id)
    data = torch.arange(4.0)
    owner = server.load(data.clone(), tags=("#d",))
    dp = server.load(torch.ones(4), policy="dp-only")
    store_as(server, session, 1, torch.ones(4))
    cases = [("Tensor.add_", [owner, 1], [0]), ("Tensor.sum", [dp], [20]), ("Tensor.mul", [dp, 1], [21])]
    for k, (op, ids, out) in enumerate(cases):
        define = [op, [R(i) for i in range(len(ids))], {}, False]
        got = _rows_of(server, lambda: _serve(server, session, _skel(k, ids, out, define=define)))
        want = _rows_of(server, lambda: _serve(server, session, _cmd(op, [R(i) for i in ids], out)))
        assert got == want and type(got[0]) is m.ErrorReply and got[1], (op, got, want)
        # a second use, definition kept: still the same
        again = _rows_of(server, lambda: _serve(server, session, _skel(k, ids, out)))
        assert again == want, (op, again, want)
    assert torch.equal(server.monitor.owner_objects()[owner], data)
    for oid in (20, 21):
        assert type(get_as(server, session, oid)) is m.ErrorReply


def test_the_result_of_private_data_is_released_as_the_commands(hook):
    server, _, session = in_process_server(hook, "rts-private")
    private = server.load(torch.full((3,), 7.0), private=True)
    assert _serve(server, session, _skel(0, [private], [31], define=["Tensor.neg", [R(0)], {}, False])) == m.OkReply()
    assert _serve(server, session, _cmd("Tensor.neg", [R(private)], [32])) == m.OkReply()
    got = _rows_of(server, lambda: get_as(server, session, 31))
    want = _rows_of(server, lambda: get_as(server, session, 32))
    assert type(got[0]) is type(want[0]) and [r[:2] for r in got[1]] == [r[:2] for r in want[1]]
    assert type(get_as(server, session, private)) is m.ErrorReply


@pytest.mark.parametrize("lane", ["inline", "thread"])
def test_result_ids_never_overwrite_and_must_be_ids(hook, lane):
    server, _, session = in_process_server(hook, f"rts-ids-{lane}")
    if lane == "thread":
        server._slow_sessions.add(session.id)
    owner = server.load(torch.arange(3.0))
    store_as(server, session, 1, torch.ones(3))
    assert _serve(server, session, _skel(0, [1], [2], define=["Tensor.neg", [R(0)], {}, False])) == m.OkReply()
    for out in ([1], [owner], ["x"], [[5]], [None], [-3], [1.5], [True]):
        reply = _serve(server, session, _skel(0, [1], out))
        assert type(reply) is m.ErrorReply, out
    assert torch.equal(get_as(server, session, 1), torch.ones(3))
    assert torch.equal(server.monitor.owner_objects()[owner], torch.arange(3.0))
    assert _serve(server, session, _skel(0, [1], [3])) == m.OkReply()  # the worker serves on
    assert torch.equal(get_as(server, session, 3), -torch.ones(3))


def test_a_peer_connection_keeps_no_skeleton(hook):
    server, tokens, scientist = in_process_server(hook, "rts-peer")
    tokens.add(PEER, "bob", role="peer")
    peer = authenticate(tokens, [PEER])
    server.sessions[peer.id] = peer
    store_as(server, scientist, 1, torch.ones(2))
    reply, rows = _rows_of(server, lambda: _serve(server, peer, _skel(0, [1], [2],
                                                                       define=["Tensor.neg", [R(0)], {}, False])))
    assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError"
    assert peer.skeletons == {} and [r[:2] for r in rows] == [("SkeletonCommand", "refused")]
    assert type(get_as(server, scientist, 2)) is m.ErrorReply


@pytest.mark.parametrize("lane", ["inline", "thread"])
def test_a_use_after_its_object_was_freed_is_not_found_and_the_definition_stays(hook, lane):
    server, _, session = in_process_server(hook, f"rts-freed-{lane}")
    if lane == "thread":
        server._slow_sessions.add(session.id)
    store_as(server, session, 1, torch.ones(2))
    store_as(server, session, 2, torch.ones(2))
    assert _serve(server, session, _skel(0, [1], [3], define=["Tensor.neg", [R(0)], {}, False])) == m.OkReply()
    reply = _serve(server, session, _skel(0, [1], [4], prelude=[1]))  # freed by its own prelude, then used
    assert type(reply) is m.ErrorReply and reply.error == "ObjectNotFoundError"
    reply = _serve(server, session, _skel(0, [1], [4], prelude=[2, 3]))  # a prelude of several deletions
    assert type(reply) is m.ErrorReply and reply.error == "ObjectNotFoundError"
    for oid in (1, 2, 3, 4):
        assert type(get_as(server, session, oid)) is m.ErrorReply
    store_as(server, session, 5, torch.full((2,), 3.0))
    assert _serve(server, session, _skel(0, [5], [6])) == m.OkReply()
    assert torch.equal(get_as(server, session, 6), torch.full((2,), -3.0))


@pytest.mark.parametrize("lane", ["inline", "thread"])
@pytest.mark.parametrize("depth", [200, 1000])
def test_deeply_nested_ids_on_the_short_decoder_are_an_error_reply(hook, lane, depth):
    """A use decoded by ``decode_skeleton_use`` (msgpack's own types, no depth guard of its own) with ids or
    result ids nested ~1000 deep: an error reply (a RecursionError while quoting the id at worst), no crash."""
    from veil.messaging.skeleton_frames import _SKELETON_HEAD

    server, _, session = in_process_server(hook, f"rts-deep-{lane}-{depth}")
    if lane == "thread":
        server._slow_sessions.add(session.id)
    store_as(server, session, 1, torch.ones(2))
    assert _serve(server, session, _skel(0, [1], [2], define=["Tensor.neg", [R(0)], {}, False])) == m.OkReply()
    deep = b"\x91" * depth + b"\x05"
    head = _SKELETON_HEAD + b"\xa1c" + b"\x90" + b"\x00"  # sender "c", empty prelude, skeleton 0
    for data in (head + b"\x91" + deep + b"\x91\x03" + b"\xc0",  # ids nested
                 head + b"\x91\x01" + b"\x91" + deep + b"\xc0"):  # result ids nested
        assert type(_serve(server, session, data)) is m.ErrorReply
    assert _serve(server, session, _skel(0, [1], [3])) == m.OkReply()
    assert torch.equal(get_as(server, session, 3), -torch.ones(2))


def test_a_refused_definition_writes_the_same_rows_on_both_lanes_as_its_command(hook):
    """An op off the allowlist: the same reply and rows (an allowlist refusal writes none, as for a
    CommandMessage) whichever lane, and nothing kept."""
    rows = {}
    for lane in ("inline", "thread", "command"):
        server, _, session = in_process_server(hook, "rts-define")  # the same worker name: comparable details
        if lane == "thread":
            server._slow_sessions.add(session.id)
        store_as(server, session, 1, torch.ones(2))
        data = _cmd("builtins.eval", [R(1)], [2]) if lane == "command" else \
            _skel(0, [1], [2], define=["builtins.eval", [R(0)], {}, False])
        reply, rows[lane] = _rows_of(server, lambda: _serve(server, session, data))
        rows[lane] = (reply, rows[lane])
        assert type(reply) is m.ErrorReply and reply.error == "OperationNotAllowedError" and session.skeletons == {}
    assert rows["inline"] == rows["thread"] == rows["command"]
