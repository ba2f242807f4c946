"""Red team of the least-attacked wire entry points: MAC key registration (``veil.mpc.register_mac_key``),
a peer's ``END_ACCOUNT``, ``RemoteGetMessage``, and skeleton result ids, with every token.

* read by another door: a scientist registered the owner's private tensor as its MAC key at the
  provider (``CommandMessage(MAC_KEY, ("k", ObjectRef(owner_data)))``): the worker function got a copy
  of the owner's value and kept it, outside the reference monitor, as the key every MAC dealt for that
  session is computed with (fixed: a MAC key is a value the requester sends, never a stored object
  derived from the owner's data);
* roles: peers and client tokens never register keys; only a peer ends an account, its own;
* other sessions' state: one session's key id does not reach another's key; an id another session holds
  reads as "not found", word for word as an unknown one;
* what a session leaves behind: its MAC keys go when it ends;
* resources: a skeleton use naming 200 000 result ids is refused before it runs, one line;
* read past memory: a failed `out=` resize of a tensor decoded from a frame (a storage that cannot grow) kept
  its new shape, and a get of it serialized the worker's heap beyond its 16 bytes (fixed: on a failed command,
  a resolved tensor spanning past its storage is emptied and its id freed, veil/workers/storage_overrun.py).
"""

import pytest
import torch

from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.mpc import material
from veil.mpc.providers.worker_dealer import MAC_KEY
from veil.workers.accounts import END_ACCOUNT
from veil.workers.websocket_auth import authenticate

from network_helpers import OTHER, PEER, get_as, in_process_server, store_as

CLIENT = "fresh-wire-client-token"
R = m.ObjectRef


def _servers(hook, name):
    """A server with sessions of a scientist, a second scientist, a peer and a client token."""
    server, tokens, scientist = in_process_server(hook, name)
    tokens.add(OTHER, "other", role="scientist")
    tokens.add(PEER, "bob", role="peer")
    tokens.add(CLIENT, "clinic", role="client")
    others = [authenticate(tokens, [t]) for t in (OTHER, PEER, CLIENT)]
    for session in others:
        server.sessions[session.id] = session
    return server, scientist, *others


def _send(server, session, msg, sender="forged"):
    return deserialize(server.serve_bytes(serialize(msg, sender=sender), session))[0]


def _cmd(op, args, kwargs=None):
    return m.CommandMessage(op, tuple(args), kwargs or {}, [], False)


def _keys_of(session):
    return {k[1]: v for k, v in material.MAC_KEYS.items() if k[0] == session.id}


def _one_line_error(reply, error=None):
    assert type(reply) is m.ErrorReply and "\n" not in reply.message, reply
    if error is not None:
        assert reply.error == error, reply


def test_a_mac_key_is_never_the_owners_data(hook):
    server, scientist, *_ = _servers(hook, "fw-mac-owner")
    secret = torch.tensor(123456789, dtype=torch.int64)
    owner = server.load(secret.clone(), tags=("#secret",))
    for msg in (_cmd(MAC_KEY, ["k", R(owner)]), _cmd(MAC_KEY, [], {"key_id": "k2", "alpha": R(owner)}),
                _cmd(MAC_KEY, ["k3", [R(owner)]])):
        _one_line_error(_send(server, scientist, msg))
    store_as(server, scientist, 4, torch.tensor(5, dtype=torch.int64))
    derived = _send(server, scientist, m.CommandMessage("Tensor.add", (R(owner), R(4)), {}, [6], False))
    assert derived == m.OkReply()
    _one_line_error(_send(server, scientist, _cmd(MAC_KEY, ["k4", R(6)])))  # computed from it: the same
    assert _keys_of(scientist) == {}
    assert torch.equal(server.monitor.owner_objects()[owner], secret)
    assert _send(server, scientist, _cmd(MAC_KEY, ["mine", torch.tensor(7)])) == m.OkReply()  # serves on
    assert _keys_of(scientist) == {"mine": torch.tensor(7)}
    server.end_session(scientist)


def test_mac_keys_by_role_per_session_and_gone_with_it(hook):
    server, scientist, other, peer, client = _servers(hook, "fw-mac-roles")
    for session, error in ((peer, "PermissionDeniedError"), (client, "PermissionDeniedError")):
        _one_line_error(_send(server, session, _cmd(MAC_KEY, ["k", torch.tensor(1)])), error)
        assert _keys_of(session) == {}
    for bad in (["k" * 65, torch.tensor(1)], ["", torch.tensor(1)], ["k", torch.ones(4, dtype=torch.int64)],
                ["k", torch.tensor(1.5)], [3, torch.tensor(1)], ["k", "1"]):
        _one_line_error(_send(server, scientist, _cmd(MAC_KEY, bad)), "ProviderError")
    assert _send(server, scientist, _cmd(MAC_KEY, ["k", torch.tensor(11)])) == m.OkReply()
    assert _send(server, other, _cmd(MAC_KEY, ["k", torch.tensor(22)])) == m.OkReply()  # same id, its own key
    assert _keys_of(scientist) == {"k": torch.tensor(11)} and _keys_of(other) == {"k": torch.tensor(22)}
    server.end_session(scientist)
    assert _keys_of(scientist) == {} and _keys_of(other) == {"k": torch.tensor(22)}
    server.end_session(other)
    assert _keys_of(other) == {}


def test_end_account_with_every_token_frees_only_the_peers_own(hook):
    server, scientist, other, peer, client = _servers(hook, "fw-end-account")
    store_as(server, scientist, 1, torch.arange(3.0))
    owner = server.load(torch.arange(4.0))
    for session in (scientist, other, peer, client):  # no account named: refused, one line
        _one_line_error(_send(server, session, _cmd(END_ACCOUNT, [])), "PermissionDeniedError")
    tag = "bob#0123456789abcdef"
    assert _send(server, peer, _cmd(END_ACCOUNT, []), sender=tag) == m.OkReply()
    assert _send(server, peer, _cmd(END_ACCOUNT, []), sender=tag) == m.OkReply()  # replay: nothing more
    _one_line_error(_send(server, peer, _cmd(END_ACCOUNT, [R(1)]), sender=tag))
    _one_line_error(_send(server, scientist, _cmd(END_ACCOUNT, [R(owner)]), sender=tag))  # a forged tag
    assert torch.equal(get_as(server, scientist, 1), torch.arange(3.0))
    assert torch.equal(server.monitor.owner_objects()[owner], torch.arange(4.0))


def test_remote_get_by_every_token_reads_and_changes_nothing(hook):
    server, scientist, other, peer, client = _servers(hook, "fw-remote-get")
    store_as(server, scientist, 1, torch.arange(3.0))
    owner = server.load(torch.arange(4.0))
    held, unknown = _send(server, other, m.RemoteGetMessage(1)), _send(server, other, m.RemoteGetMessage(999))
    _one_line_error(held, "ObjectNotFoundError")
    assert held.message.replace(" 1 ", " N ") == unknown.message.replace(" 999 ", " N ")  # no existence oracle
    for session in (peer, client):
        _one_line_error(_send(server, session, m.RemoteGetMessage(1)), "PermissionDeniedError")
    for oid in (1, owner):  # not pointers: nothing replaced
        _one_line_error(_send(server, scientist, m.RemoteGetMessage(oid)))
    for bad in (-1, "1", [1], None, 2**63 - 1):
        reply = deserialize(server.serve_bytes(serialize(m.RemoteGetMessage(bad), sender="f"), scientist))[0]
        _one_line_error(reply)
    assert torch.equal(get_as(server, scientist, 1), torch.arange(3.0))
    assert torch.equal(server.monitor.owner_objects()[owner], torch.arange(4.0))


@pytest.mark.parametrize("lane", ["inline", "thread"])
def test_a_skeleton_use_with_a_flood_of_result_ids_is_refused_before_it_runs(hook, lane):
    server, scientist, *_ = _servers(hook, f"fw-skel-{lane}")
    store_as(server, scientist, 1, torch.arange(3.0))
    data = serialize(m.SkeletonCommand(0, [1], list(range(100, 200_100)), ["Tensor.neg_", [R(0)], {}, False]),
                     sender="f")
    reply, decoded = server.try_inline(data, scientist) if lane == "inline" else (None, None)
    reply = deserialize(reply if reply is not None else server.serve_bytes(data, scientist, decoded=decoded))[0]
    _one_line_error(reply)
    assert torch.equal(get_as(server, scientist, 1), torch.arange(3.0))  # the in-place op never ran
    assert type(get_as(server, scientist, 100)) is m.ErrorReply


@pytest.mark.parametrize("shape,lane", [((4,), "inline"), ((2, 2), "thread")])
def test_a_failed_resize_never_makes_a_tensor_read_past_its_storage(hook, shape, lane):
    """A tensor received over the wire lives in a storage that cannot grow; ``torch.add(big, 1, out=it)`` fails,
    but torch sets the new shape before it tries to grow the storage: a get of that object then read ``2^18``
    floats of the worker's heap from a 16-byte storage (other sessions' and the owner's memory)."""
    server, scientist, other, *_ = _servers(hook, f"fw-overrun-{len(shape)}")
    store_as(server, scientist, 1, torch.ones(shape))
    store_as(server, other, 1, torch.full((4096,), 7.25))
    grow = serialize(m.CommandMessage("torch.add", (torch.zeros(2**18), 1.0), {"out": R(1)}, [], False), sender="f")
    reply, decoded = server.try_inline(grow, scientist) if lane == "inline" else (None, None)
    _one_line_error(deserialize(reply if reply is not None else server.serve_bytes(grow, scientist, decoded=decoded))[0])
    held = get_as(server, scientist, 1)
    if type(held) is not m.ErrorReply:  # kept: its own value, nothing beyond it
        assert held.shape == shape and torch.equal(held, torch.ones(shape)), held.shape
    store_as(server, scientist, 2, torch.ones(3))  # the worker serves on
    assert torch.equal(get_as(server, other, 1), torch.full((4096,), 7.25))


def test_no_tensor_spanning_past_its_storage_is_ever_serialized():
    """The second line behind the handler's drop: whatever leaves a tensor past its storage (a failed ``out=``
    resize of a storage that cannot grow), its bytes beyond are never serialized; honest tensors are."""
    from veil.messaging.serde import deserialize, serialize
    from veil.exceptions import SerializationError

    t = torch.frombuffer(bytearray(16), dtype=torch.float32)  # (a storage that cannot grow, as a frame's)
    with pytest.raises(RuntimeError):
        torch.add(torch.zeros(2**12), 1, out=t)
    assert t.numel() == 2**12 and t.untyped_storage().nbytes() == 16  # (torch kept the new shape)
    with pytest.raises(SerializationError, match="past its storage"):  # (torch refuses views of it itself)
        serialize(m.ObjectsReply([t]))
    honest = torch.arange(12.0).view(3, 4)
    for view in (honest, honest.t(), honest[:, ::2], honest[1:], torch.zeros(3).expand(4, 3)):
        assert torch.equal(deserialize(serialize(m.ObjectsReply([view])))[0].objects[0], view)
