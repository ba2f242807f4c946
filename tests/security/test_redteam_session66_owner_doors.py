"""Red team (session 66): the owner's doors that few tests named: ``AdminLoadMessage`` (``worker.load`` done remotely
by the owner, ``veil/workers/websocket_admin.py``), ``ListRequestsMessage`` (a scientist's own release requests,
``veil/governance/wire.py``) and ``veil.peer.end_account`` (a peer ends its requesters' accounts).

Hole found (faults, then roles): ``AdminLoadMessage`` checked only that its object is a tensor and its tags a list. A
tag that was a map, a description that was a map, ``private="yes"`` and allowed users ``[1, None]`` were all stored
as the owner's data; from then on every scientist's search on the worker failed (``TypeError: unhashable type:
'slice'``) and the owner's console could not list its datasets. A string of allowed users (``allowed_users="alice"``,
as ``sy.private_tensor`` takes one user) became ``tuple("alice")``: the users ``a``, ``l``, ``i``, ``c`` and ``e``
could ``.get()`` the private data, and ``alice`` could not (``worker.load`` and ``client.load`` alike). Fixed in the
shared layer: the monitor's ``owner_load`` refuses tags, a description or allowed users that are not text (one line),
``worker.load`` and ``client.load`` read a string as one user, and the admin handler checks the wire fields as
``StoredObject``'s decoder does before anything is stored. Non-admin tokens were refused already (kept here).

Held (guards): ``ListRequestsMessage`` lists only the caller's own requests, names no object id, digest, graph or
source, and refuses a claimed user the connection did not prove, and client and peer tokens; ``end_account`` is a
peer's only (a scientist's or an untagged frame ends nothing).

Harness: a ``WebsocketServerWorker`` in process (requests through ``serve_bytes``, a network connection's path) with
the owner's admin token, two scientists, a serving client and a peer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.exceptions import ReviewPendingError
from veil.governance.wire import ListRequestsMessage
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers.accounts import END_ACCOUNT
from veil.workers.websocket_admin import AdminLoadMessage
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import shows_number, uid  # noqa: E402
from server_sessions import answers_next_command, open_session, request  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

ADMIN = "rt66o-admin-token-0123456789abcdef01234"
ALICE = "rt66o-alice-token-0123456789abcdef01234"
A = "rt66o-a-token-0123456789abcdef0123456789"
CLIENT = "rt66o-client-token-0123456789abcdef0123"
PEER = "rt66o-peer-token-0123456789abcdef012345"
SECRET = torch.tensor([31337.0, -271.5])


@pytest.fixture
def worker(hook):
    tokens = sy.TokenTable()
    for token, user, role in [(ADMIN, "owner", "admin"), (ALICE, "alice", "scientist"), (A, "a", "scientist"),
                              (CLIENT, "cl", "client"), (PEER, "pw", "peer")]:
        tokens.add(token, user, role)
    srv = WebsocketServerWorker(hook, id=uid("rt66o"), port=0, tokens=tokens)
    sessions = {name: open_session(srv, token) for name, token in
                [("admin", ADMIN), ("alice", ALICE), ("a", A), ("client", CLIENT), ("peer", PEER)]}
    return srv, sessions


def _one_line(reply, error: str) -> str:
    assert type(reply) is m.ErrorReply and reply.error == error, reply
    assert "\n" not in reply.message and len(reply.message) < 300, reply.message
    return reply.message


def _search(srv, session, *terms) -> list:
    reply = request(srv, session, m.SearchMessage(list(terms)))
    assert type(reply) is m.DescriptorsReply, reply
    return reply.descriptors


def _get(srv, session, oid):
    return request(srv, session, m.GetObjectsMessage([oid], False, None))


@pytest.mark.parametrize("field", ["map tag", "int tag", "map description", "private as text", "users not names",
                                   "users as one string"])
def test_a_malformed_admin_load_is_refused_and_every_search_still_works(worker, field):
    """Attack (faults): the owner's client (or anything holding the admin token) sends an AdminLoadMessage whose
    tags, description, private flag or allowed users are not what ``client.load`` sends. Before the fix each was
    stored as owner data, after which every scientist's search on the worker failed (or, for a string of users, each
    of its characters was a user allowed to get the data). Must hold: one-line refusal, nothing stored, a scientist's
    search still finds the owner's data and the console still lists it; the worker serves the next command."""
    from veil.governance.console.views import datasets

    srv, s = worker
    honest = request(srv, s["admin"], AdminLoadMessage(torch.arange(3.0), ["#d"], "honest", False, None))
    assert type(honest) is m.ObjectsReply, honest
    msg = AdminLoadMessage(SECRET.clone(), ["#d"], "x", True, ["alice"])
    if field == "map tag":
        msg.tags = ["#d", {"k": 1}]
    elif field == "int tag":
        msg.tags = ["#d", 7]
    elif field == "map description":
        msg.description = {"k": 1}
    elif field == "private as text":
        msg.private = "yes"
    elif field == "users not names":
        msg.allowed_users = [1, None]
    else:
        msg.allowed_users = "alice"
    before = len(srv.monitor.owner_objects())
    _one_line(request(srv, s["admin"], msg), "SerializationError")
    assert len(srv.monitor.owner_objects()) == before, "a refused load stored something"
    (found,) = _search(srv, s["alice"], "#d")
    assert found.id == honest.objects[0]
    assert torch.equal(_get(srv, s["alice"], found.id).objects[0], torch.arange(3.0))
    assert [row["id"] for row in datasets(srv)] == [found.id]
    answers_next_command(srv, s["alice"])


@pytest.mark.parametrize("through", ["worker.load", "AdminLoadMessage"])
def test_one_allowed_user_given_as_a_string_is_that_user(worker, through):
    """Attack (roles): the owner allows one user, ``"alice"``, as ``sy.private_tensor`` takes it. Before the fix
    ``worker.load`` (and ``client.load``, which sent ``list("alice")``) allowed users ``a``, ``l``, ``i``, ``c``, ``e``:
    scientist ``a`` got the private values and alice did not. Must hold: only alice gets them, equal to the tensor
    loaded; ``a`` is refused in one line that shows none of them."""
    srv, s = worker
    if through == "worker.load":
        oid = srv.load(SECRET.clone(), tags=("#p",), private=True, allowed_users="alice")
    else:  # what client.load sends for allowed_users="alice" (one user's name)
        from veil.workers.websocket_client import WebsocketClientWorker

        sent = []
        fake = type("Fake", (), {"hook": type("H", (), {"local_worker": type("L", (), {
            "send_msg": staticmethod(lambda msg, to: sent.append(msg) or m.ObjectsReply([0]))})()})()})()
        WebsocketClientWorker.load(fake, SECRET.clone(), tags=("#p",), private=True, allowed_users="alice")
        assert sent[0].allowed_users == ["alice"], sent[0].allowed_users
        reply = request(srv, s["admin"], sent[0])
        assert type(reply) is m.ObjectsReply, reply
        oid = reply.objects[0]
    text = _one_line(_get(srv, s["a"], oid), "PermissionDeniedError")
    assert not shows_number(text, "31337") and not shows_number(text, "-271"), text  # (not digits inside a random id)
    assert torch.equal(_get(srv, s["alice"], oid).objects[0], SECRET)


@pytest.mark.parametrize("who", ["alice", "client", "peer"])
def test_only_the_admin_token_loads_owner_data(worker, who):
    """Roles (held): a scientist, a serving client and a peer each send an AdminLoadMessage; refused in one line,
    nothing is stored as the owner's, the worker serves on."""
    srv, s = worker
    before = len(srv.monitor.owner_objects())
    _one_line(request(srv, s[who], AdminLoadMessage(torch.ones(2), ["#x"], "", False, None)), "PermissionDeniedError")
    assert len(srv.monitor.owner_objects()) == before
    assert not _search(srv, s["alice"], "#x")
    answers_next_command(srv, s["alice"])


def test_a_scientist_lists_only_its_own_requests_and_no_object_ids(worker):
    """Read by another door (held): alice and ``a`` each file a release request for a value derived from data under
    review. Each listing names only its caller's request, by its request id, state, reason, shape and dtype: no
    object id, digest, graph, source, preview or value; a claimed other user, the client and the peer are refused."""
    srv, s = worker
    oid = srv.load(SECRET.clone(), tags=("#r",), policy="review")
    filed = {}
    for who in ("alice", "a"):
        rid = new_id()
        reply = request(srv, s[who], m.CommandMessage("torch.mul", (m.ObjectRef(oid), 3), {}, [rid], False))
        assert type(reply) is m.OkReply, reply
        got = _get(srv, s[who], rid)
        assert type(got) is m.ErrorReply and got.error == ReviewPendingError.__name__, got
        filed[who] = rid
    for who in ("alice", "a"):
        listed = request(srv, s[who], ListRequestsMessage(None)).objects
        assert len(listed) == 1 and listed[0]["state"] == "pending", listed
        assert set(listed[0]) == {"id", "state", "reason", "shape", "dtype", "created", "decided", "message"}
        shown = repr(listed)
        for other in (oid, *filed.values()):
            assert str(other) not in shown
    assert listed[0]["id"] != request(srv, s["alice"], ListRequestsMessage(None)).objects[0]["id"]
    _one_line(request(srv, s["alice"], ListRequestsMessage("a")), "PermissionDeniedError")
    for who in ("client", "peer"):
        _one_line(request(srv, s[who], ListRequestsMessage("alice")), "PermissionDeniedError")
    assert request(srv, s["admin"], ListRequestsMessage(None)).objects == []  # (the owner's own: none)


def test_end_account_is_a_peers_only(worker):
    """Roles (held): a scientist, and a peer frame naming no account, asking ``veil.peer.end_account`` end nothing
    (one-line refusal); a peer ending an account it names frees only that account's unclaimed hand-offs."""
    srv, s = worker

    def end(session, sender):
        msg = m.CommandMessage(END_ACCOUNT, (), {}, [], False)
        return deserialize(srv.serve_bytes(serialize(msg, sender=sender), session))[0]

    kept, dropped = new_id(), new_id()
    for oid, tag in ((kept, "1" * 16), (dropped, "2" * 16)):
        reply = deserialize(srv.serve_bytes(serialize(m.ObjectMessage([m.StoredObject(oid, torch.arange(4))]),
                                                      sender=f"pw#{tag}"), s["peer"]))[0]
        assert type(reply) is m.OkReply, reply
    _one_line(end(s["alice"], "pw#" + "1" * 16), "PermissionDeniedError")
    _one_line(end(s["peer"], "pw"), "PermissionDeniedError")
    assert type(end(s["peer"], "pw#" + "2" * 16)) is m.OkReply
    assert torch.equal(_get(srv, s["alice"], kept).objects[0], torch.arange(4))
    assert type(_get(srv, s["alice"], dropped)) is m.ErrorReply
