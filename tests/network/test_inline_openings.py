"""SMPC openings on a network worker's event loop (no thread hop), only while their shares are small.

In-process server, no sockets: ``serve_inline`` is what the connection handler calls first; a
None answer sends the request to a handler thread (``serve_bytes``). Results are compared with
plain torch on the same tensors, and both paths must answer alike.
"""

import torch

from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.mpc.party import WIRE_PREFIX, OpenMessage
from veil.workers.websocket_auth import authenticate
from veil.workers.inline_lane import INLINE_MAX_SHARE_BYTES, _inline_kind

from network_helpers import TOKEN, in_process_server


def _server(hook):
    server, _, session = in_process_server(hook, "inline-open-srv")
    return server, session


def _store(server, session, tensors: dict) -> None:
    objs = [m.StoredObject(oid, t) for oid, t in tensors.items()]
    assert deserialize(server.serve_bytes(serialize(m.ObjectMessage(objs), sender="c"), session))[0] == m.OkReply()


def _open(ids, prelude=None) -> bytes:
    return serialize(OpenMessage("beaver_mask", tuple(m.ObjectRef(i) for i in ids), {}), sender="c", prelude=prelude)


def _ring(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-2**62, 2**62, (n,), generator=g) for _ in range(4)]


def test_openings_of_small_shares_run_inline_and_match_torch(hook):
    server, session = _server(hook)
    x, y, a, b = _ring(1000, 1)
    _store(server, session, {1: x, 2: y, 3: a, 4: b})
    reply = server.serve_inline(_open([1, 2, 3, 4]), session)
    assert reply is not None  # small shares: answered on the loop
    e, f = deserialize(reply)[0].objects
    assert torch.equal(e, x - a) and torch.equal(f, y - b)
    # a deferred party step in front of the opening (it names results of the step before it)
    step = [WIRE_PREFIX + "beaver_mask", [m.ObjectRef(1), m.ObjectRef(2), m.ObjectRef(3), m.ObjectRef(4)], {},
            [5, 6], False]
    reply = server.serve_inline(_open([5, 6, 3, 4], prelude=[step]), session)
    assert reply is not None
    e2, f2 = deserialize(reply)[0].objects
    assert torch.equal(e2, x - a - a) and torch.equal(f2, y - b - b)


def test_openings_of_large_shares_take_a_handler_thread_with_the_same_answer(hook):
    server, session = _server(hook)
    n = INLINE_MAX_SHARE_BYTES // 8  # four shares of this many int64 entries: 4x the limit
    x, y, a, b = _ring(n, 2)
    _store(server, session, {1: x, 2: y, 3: a, 4: b})
    request = _open([1, 2, 3, 4])
    assert server.serve_inline(request, session) is None
    e, f = deserialize(server.serve_bytes(request, session))[0].objects
    assert torch.equal(e, x - a) and torch.equal(f, y - b)


def _kind(data: bytes):
    msg, _, prelude = deserialize(data)
    return _inline_kind(msg, prelude)


def test_only_openings_and_party_steps_are_protocol_requests():
    refs = (m.ObjectRef(1), m.ObjectRef(2), m.ObjectRef(3), m.ObjectRef(4))
    assert _kind(serialize(OpenMessage("beaver_mask", refs, {}), sender="c")) == "protocol"
    # not openable: the handler thread refuses it with the precise error
    assert _kind(serialize(OpenMessage("beaver_combine", refs, {}), sender="c")) is None
    assert _kind(serialize(OpenMessage("nope", refs, {}), sender="c")) is None
    # worker functions in front of an opening (dealing, plans) may call peers or loop: never inline
    for op in ("veil.plan.run", WIRE_PREFIX + "nope", "veil.dealer.deal"):
        prelude = [[op, [], {}, [], False]]
        assert _kind(serialize(OpenMessage("beaver_mask", refs, {}), sender="c", prelude=prelude)) is None
    # a party step is not a plain op: a CommandMessage of one keeps its handler thread (as before)
    cmd = m.CommandMessage(WIRE_PREFIX + "beaver_mask", refs, {}, [5, 6], False)
    assert _kind(serialize(cmd, sender="c")) is None


def test_the_monitor_sizes_only_what_the_session_may_name(hook):
    server, session = _server(hook)
    other = authenticate(server.tokens, [TOKEN])
    server.sessions[other.id] = other
    _store(server, session, {1: torch.zeros(1000, dtype=torch.int64)})
    server._local.session = session
    try:
        assert server.monitor.stored_bytes(server.principal("c"), [1, 2, "x"]) == 8000
    finally:
        server._local.session = None
    server._local.session = other
    try:
        assert server.monitor.stored_bytes(server.principal("c"), [1]) == 0  # another session's object
    finally:
        server._local.session = None


def test_a_session_struck_out_on_plain_ops_still_opens_small_shares_inline(hook):
    server, session = _server(hook)
    x, y, a, b = _ring(1000, 3)
    _store(server, session, {1: x, 2: y, 3: a, 4: b})
    server._slow_sessions.add(session.id)  # as after three long plain ops (test_wire_frames covers how)
    assert server.serve_inline(serialize(m.GetObjectsMessage([1], False), sender="c"), session) is None
    reply = server.serve_inline(_open([1, 2, 3, 4]), session)
    assert reply is not None
    e, f = deserialize(reply)[0].objects
    assert torch.equal(e, x - a) and torch.equal(f, y - b)
    server._slow_protocol.add(session.id)  # openings that ran long three times: handler threads from then on
    assert server.serve_inline(_open([1, 2, 3, 4]), session) is None
    server.end_session(session)
    assert session.id not in server._slow_protocol
