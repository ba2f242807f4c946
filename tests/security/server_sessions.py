"""Requests through a real network worker's request path, in process: a ``WebsocketServerWorker`` whose
authenticated sessions are served by ``serve_bytes`` (what a connection's requests take, without the socket).
Shared by the sizing tests (``test_output_bounds.py`` and its red-team files)."""

from __future__ import annotations

from typing import Any

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.serde import deserialize, serialize
from veil.workers.websocket_auth import authenticate
from veil.workers.websocket_server import WebsocketServerWorker


def quota_worker(hook: Any, worker_id: str, token: str, quota: int | None) -> WebsocketServerWorker:
    """A worker that takes scientist ``token``, with a session quota of ``quota`` bytes."""
    tokens = sy.TokenTable()
    tokens.add(token, "sci", "scientist")
    srv = WebsocketServerWorker(hook, id=worker_id, port=0, tokens=tokens)
    srv.monitor.max_session_bytes = quota
    return srv


def open_session(srv: WebsocketServerWorker, token: str) -> Any:
    session = authenticate(srv.tokens, [token])
    srv.sessions[session.id] = session
    return session


def request(srv: WebsocketServerWorker, session: Any, msg: Any) -> Any:
    """The decoded reply to ``msg``."""
    return deserialize(srv.serve_bytes(serialize(msg, sender="client"), session))[0]


def send_tensor(srv: WebsocketServerWorker, session: Any, t: Any, tags: tuple = (), description: str = "") -> int:
    """Stores ``t`` (with ``tags`` and ``description``) for the session; its id."""
    oid = new_id()
    reply = request(srv, session, m.ObjectMessage([m.StoredObject(oid, t, tuple(tags), description)]))
    assert type(reply) is m.OkReply, reply
    return oid


def run_command(srv: WebsocketServerWorker, session: Any, op: str, *args: Any, n: int = 1, grad: bool = False,
                **kwargs: Any) -> tuple:
    """``(reply, result ids)`` of ``op(*args, **kwargs)`` stored under ``n`` fresh ids."""
    rids = [new_id() for _ in range(n)]
    return request(srv, session, m.CommandMessage(op, args, kwargs, rids, grad)), rids


def computed(srv: WebsocketServerWorker, session: Any, op: str, *args: Any, grad: bool = False,
             **kwargs: Any) -> m.ObjectRef:
    """A reference to the one result of ``op(*args, **kwargs)``, which must succeed."""
    reply, (rid,) = run_command(srv, session, op, *args, grad=grad, **kwargs)
    assert type(reply) is m.OkReply, (op, reply)
    return m.ObjectRef(rid)


def answers_next_command(srv: WebsocketServerWorker, session: Any) -> None:
    """The worker still runs the session's next command and answers with torch's value."""
    import torch

    t = send_tensor(srv, session, torch.ones(3))
    reply, (rid,) = run_command(srv, session, ALLOWLIST.by_func(torch.add).name, m.ObjectRef(t), 1.0)
    assert type(reply) is m.OkReply, reply
    got = request(srv, session, m.GetObjectsMessage([rid], False, None))
    assert torch.equal(got.objects[0], torch.full((3,), 2.0)), got


def session_helpers(token: str, grad: bool = False) -> tuple:
    """``(open a session, request, send -> ObjectRef, command, computed)`` for a test module whose sessions all
    present ``token`` and run commands with grad tracking ``grad``, each called as ``f(srv, session, ...)``."""

    def session(srv: WebsocketServerWorker) -> Any:
        return open_session(srv, token)

    def send(srv: WebsocketServerWorker, sess: Any, t: Any) -> m.ObjectRef:
        return m.ObjectRef(send_tensor(srv, sess, t))

    def command(srv: WebsocketServerWorker, sess: Any, op: str, *args: Any, n: int = 1, **kwargs: Any) -> tuple:
        return run_command(srv, sess, op, *args, n=n, grad=grad, **kwargs)

    def result(srv: WebsocketServerWorker, sess: Any, op: str, *args: Any, **kwargs: Any) -> m.ObjectRef:
        return computed(srv, sess, op, *args, grad=grad, **kwargs)

    return session, request, send, command, result
