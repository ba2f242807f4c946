"""Red team (session 66): what a serving owner stores in a party's serving state with ``open``, ``fail``, ``close``
and the request-id lists of ``claim``/``fail``/``requeue`` (``veil/serving/protocol.py``, ``service_state.py``).

A service's state lives outside the object store: no session quota charges it, and a closed service stays in the
worker's table (its clients may still fetch results) until its owner's room for services reclaims it, after the
owner's connection is gone. Any scientist may open services (64 names per user).

Hole found (resources): ``open`` kept its ``info`` map as sent (a 20 MB tensor in it, under a 1 MiB session quota),
its client list and its name whatever their size, and ``fail``/``close`` kept the owner's message per request; all of
it stayed after the owner disconnected: 64 services of a 256 MB frame each per user. The id lists of ``claim``,
``fail`` and ``requeue`` were walked whatever their length under the serving lock. Fixed in the shared checks of the
serving actions (``service_state.checked_open``, ``checked_reason``, ``_request_ids``): a service's name, clients
and description hold at most ``MAX_OPEN_CHARS`` characters together, the description only plain values (no tensor,
no object reference); a message or reason keeps at most ``MAX_REASON_CHARS``; an action names at most
``MAX_REQUEST_IDS`` ids. Each refusal is one line and leaves nothing stored; serving goes on.

Harness: a ``WebsocketServerWorker`` in process (requests through ``serve_bytes``, a network connection's path) with
a scientist token (the would-be model owner, under a 1 MiB quota) and a serving client token.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.serving import names
from veil.serving.protocol import ServingMessage
from veil.serving.service_state import MAX_OPEN_CHARS, MAX_REASON_CHARS, MAX_REQUEST_IDS
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import uid  # noqa: E402
from server_sessions import open_session, request  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

OWNER = "rt66s-owner-token-0123456789abcdef0123"
CLIENT = "rt66s-client-token-0123456789abcdef012"
INFO = {"input_shape": [1, 3], "output_shape": [1, 3], "base": 2, "precision_fractional": 16, "parties": ["p"]}


@pytest.fixture
def party(hook):
    tokens = sy.TokenTable()
    tokens.add(OWNER, "mo", "scientist")
    tokens.add(CLIENT, "cl", "client")
    srv = WebsocketServerWorker(hook, id=uid("rt66s"), port=0, tokens=tokens)
    srv.monitor.max_session_bytes = 1 << 20
    return srv


def _ask(srv, session, action, name, *args):
    return request(srv, session, ServingMessage(action, name, list(args)))


def _refused(reply, *words) -> str:
    assert type(reply) is m.ErrorReply and reply.error == "ServingError", reply
    text = str(reply.message)
    assert "\n" not in text and len(text) < 300, text
    for w in words:
        assert w in text, text
    return text


def _state_chars(srv) -> int:
    """Characters (and tensor entries) the worker's serving table holds in names, clients and descriptions."""
    def size(v):
        if isinstance(v, torch.Tensor):
            return v.numel()
        if isinstance(v, str):
            return len(v)
        if isinstance(v, (list, tuple)):
            return sum(size(x) for x in v)
        if isinstance(v, dict):
            return sum(size(k) + size(x) for k, x in v.items())
        return 1
    return sum(len(n) + size(svc.clients) + size(svc.info) + len(svc.reason) + size(list(svc.outputs.values()))
               for (_, n), svc in names.table(srv).items())


def _served(srv, owner, client, name="m") -> None:
    """A whole query through the service: the client's share, the owner's batch, 2 x it, fetched; compared with
    plain torch."""
    x = torch.tensor([[5, -7, 11]], dtype=torch.int64)
    rid = new_id() % 2**62
    assert type(_ask(srv, client, "submit", f"@mo/{name}", rid, x)) is m.ObjectsReply
    (listed,) = [r for r in _ask(srv, owner, "pending", name).objects if r[0] == rid]
    oid = new_id()
    assert _ask(srv, owner, "claim", name, [rid], oid).objects == [1]
    out = new_id()
    reply = request(srv, owner, m.CommandMessage(ALLOWLIST.by_func(torch.mul).name, (m.ObjectRef(oid), 2), {},
                                                 [out], False))
    assert type(reply) is m.OkReply, reply
    assert _ask(srv, owner, "respond", name, [rid], [1], m.ObjectRef(out)).objects == []
    assert torch.equal(_ask(srv, client, "fetch", f"@mo/{name}", rid).objects[0], x * 2)


@pytest.mark.parametrize("what", ["tensor in info", "huge info", "huge client list", "huge name", "deep info",
                                  "object reference in info"])
def test_open_keeps_no_unbounded_state_beyond_the_owners_session(party, what):
    """Attack: a scientist under a 1 MiB quota opens services whose description holds a 5 Mi-entry tensor, 1 Mi
    characters of text, a 1 Mi-character client list or name, a description nested 20 deep, or an object
    reference, then disconnects. Must hold: each open is refused in one line, nothing is kept (after the session's
    end the worker's serving table holds nothing of it); an honest service then opens and serves, values as torch's."""
    owner, client = open_session(party, OWNER), open_session(party, CLIENT)
    big = "x" * (MAX_OPEN_CHARS + 1)
    deep: list = [1]
    for _ in range(20):
        deep = [deep]
    name, clients, info = "m", ["cl"], dict(INFO)
    if what == "tensor in info":
        info["blob"] = torch.ones(5 * 2**20)
    elif what == "huge info":
        info["note"] = big
    elif what == "huge client list":
        clients = ["cl", big]
    elif what == "huge name":
        name = big
    elif what == "deep info":
        info["deep"] = deep
    else:
        info["ref"] = m.ObjectRef(new_id())
    text = _refused(_ask(party, owner, "open", name, clients, info))
    assert "xxxx" not in text
    party.end_session(owner)
    assert _state_chars(party) == 0 and not names.table(party)
    owner = open_session(party, OWNER)
    assert _ask(party, owner, "open", "m", ["cl"], dict(INFO)).objects == ["mo"]
    _served(party, owner, client)


def test_a_failed_requests_message_and_a_close_reason_are_kept_bounded(party):
    """Attack: the owner fails a client's request with a 1 Mi-character message (64 services x 1024 requests of
    those stayed until fetched), or with a list of 2^20 numbers as the message, and closes with a 1 Mi-character
    reason. Must hold: the client reads at most ``MAX_REASON_CHARS`` of each (the start of what the owner wrote);
    serving goes on in a new service."""
    owner, client = open_session(party, OWNER), open_session(party, CLIENT)
    assert _ask(party, owner, "open", "m", ["cl"], dict(INFO)).objects == ["mo"]
    x = torch.zeros(1, 3, dtype=torch.int64)
    assert type(_ask(party, client, "submit", "@mo/m", 7, x)) is m.ObjectsReply
    assert _ask(party, owner, "fail", "m", [7], "because " + "y" * 2**20).objects == []
    got = _ask(party, client, "fetch", "@mo/m", 7)
    assert type(got) is m.ErrorReply and got.error == "RequestFailedError", got
    assert "because y" in got.message and got.message.count("y") <= MAX_REASON_CHARS, len(got.message)
    assert type(_ask(party, client, "submit", "@mo/m", 9, x)) is m.ObjectsReply
    assert _ask(party, owner, "fail", "m", [9], [12345] * 2**20).objects == []
    got = _ask(party, client, "fetch", "@mo/m", 9)
    assert type(got) is m.ErrorReply and "[12345, 12345" in got.message, got
    assert got.message.count("12345") <= MAX_REASON_CHARS // 7 + 1, len(got.message)
    assert type(_ask(party, client, "submit", "@mo/m", 8, x)) is m.ObjectsReply
    assert _ask(party, owner, "close", "m", "closing " + "z" * 2**20).objects == []
    got = _ask(party, client, "fetch", "@mo/m", 8)
    assert type(got) is m.ErrorReply and "closing z" in got.message, got
    assert got.message.count("z") <= MAX_REASON_CHARS, len(got.message)
    assert _state_chars(party) < 4 * MAX_REASON_CHARS + 1000
    assert _ask(party, owner, "open", "m2", ["cl"], dict(INFO)).objects == ["mo"]
    _served(party, owner, client, "m2")


@pytest.mark.parametrize("action", ["claim", "fail", "requeue"])
def test_an_owner_action_names_a_bounded_number_of_request_ids(party, action):
    """Attack: an owner action naming 2 million request ids (walked under the serving lock, every client waiting).
    Must hold: refused in one line before any is looked at; the queued request is untouched; serving goes on."""
    owner, client = open_session(party, OWNER), open_session(party, CLIENT)
    assert _ask(party, owner, "open", "m", ["cl"], dict(INFO)).objects == ["mo"]
    assert type(_ask(party, client, "submit", "@mo/m", 7, torch.zeros(1, 3, dtype=torch.int64))) is m.ObjectsReply
    rids = [7] + list(range(10, 2_000_010))
    args = {"claim": (rids, new_id()), "fail": (rids, "gone"), "requeue": (rids,)}[action]
    _refused(_ask(party, owner, action, "m", *args), f"at most {MAX_REQUEST_IDS}")
    assert [r[0] for r in _ask(party, owner, "pending", "m").objects] == [7]
    assert _ask(party, owner, "fail", "m", [7], "done").objects == []
    _served(party, owner, client)
