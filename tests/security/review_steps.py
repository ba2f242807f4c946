"""Small steps the review-before-release red teams share: ids, a pending request's id, release audit rows, an
owner holding data under review, destinations that misbehave when a move arrives, and worker-function steps and
MPC openings run on that owner."""

from __future__ import annotations

import re
import time

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError, ReviewPendingError
from veil.ids import new_id
from veil.messaging import messages as m

#: the owner's data under review in the move/approval red teams
SECRET = torch.tensor([[1.5, -2.25, 3.0], [4.0, 5.5, -6.75]])


def shows_number(text: str, number: str) -> bool:
    """Whether ``text`` shows ``number`` (say "-27") as a number, not as digits inside a worker's id drawn from the
    clock (``uid``: "owner-27846...") or a request's random id."""
    return re.search(rf"(?<![\w-]){re.escape(number)}(?!\d)", text) is not None


def uid(prefix: str) -> str:
    """A worker id no other test uses."""
    return f"{prefix}-{time.monotonic_ns()}"


def pending_id(fn) -> str:
    """The request id of the ReviewPendingError ``fn()`` must raise."""
    with pytest.raises(ReviewPendingError) as info:
        fn()
    return info.value.request_id


def release_rows(worker, rid: str, outcome: str = "allowed") -> list:
    """The audit log's ``release`` rows of request ``rid`` with ``outcome``."""
    from veil.governance.state import governance

    return [r for r in governance(worker).db.audit_entries()
            if r["action"] == "release" and r["outcome"] == outcome and rid in r["detail"]]


def review_owner(hook, prefix: str):
    """An in-process owner holding :data:`SECRET` (tag ``#d``) under the review policy."""
    w = sy.VirtualWorker(hook, id=uid(prefix))
    w.load(SECRET.clone(), tags=("#d",), policy="review")
    return w


def send(hook, worker, msg):
    """``msg`` sent to ``worker`` by the local (scientist's) worker."""
    return hook.local_worker.send_msg(msg, worker)


class KeepsAndRefuses(sy.VirtualWorker):
    """A hostile destination: it stores what arrives, then answers that the id was already in use."""

    def _handle(self, msg, sender):
        reply = super()._handle(msg, sender)
        if type(msg) is m.ObjectMessage:
            raise PermissionDeniedError(f"object id {msg.objects[0].id} is already in use on worker {self.id!r}")
        return reply


class CallsBack(sy.VirtualWorker):
    """A destination that runs ``on_arrival()`` when an ObjectMessage arrives, before handling it."""

    on_arrival = None

    def _handle(self, msg, sender):
        if type(msg) is m.ObjectMessage and self.on_arrival is not None:
            self.on_arrival()
        return super()._handle(msg, sender)


#: x as the scientist computes it from the reviewed SECRET (int64, as the ring holds it)
X4 = (SECRET * 4).long()


class Ref(int):
    """An object id the step helpers send as an ObjectRef (plain ints are public arguments)."""


def as_argument(a):
    """``a`` as a worker function's argument: a Ref or pointer as an ObjectRef, lists item by item."""
    if isinstance(a, Ref):
        return m.ObjectRef(int(a))
    if hasattr(a, "id_at_location"):
        return m.ObjectRef(a.id_at_location)
    if type(a) is list:
        return [as_argument(v) for v in a]
    return a


def owner_step(owner, name: str, *args, n: int = 1, wrap=m.ObjectRef) -> list:
    """Runs worker function ``name`` on ``owner`` now (not deferred); ``wrap`` of the ids of its ``n`` results."""
    ids = [new_id() for _ in range(n)]
    send(owner.hook, owner, m.CommandMessage(name, tuple(as_argument(a) for a in args), {}, ids))
    return [wrap(i) for i in ids]


def owner_open(owner, name: str, *args) -> list:
    """The objects an MPC open step ``name`` gives the scientist from ``owner``."""
    from veil.mpc.party import OpenMessage

    return send(owner.hook, owner, OpenMessage(name, tuple(as_argument(a) for a in args), {})).objects


def claimed_service_request(hook, prefix: str) -> tuple:
    """``(worker, scientist session, client session, id of the reviewed x, query, batch id)``: a network worker in
    process holding ``X4[:1]`` under review (tag ``#x``), where the scientist opened service ``"m"`` for client
    ``"cli"`` and claimed its request 7 (``query``) into ``batch``."""
    from veil.serving.protocol import ServingMessage
    from veil.workers.websocket_server import WebsocketServerWorker

    from server_sessions import open_session, request

    owner_token, client_token = f"rt-{prefix}-serving-owner", f"rt-{prefix}-serving-client"
    tokens = sy.TokenTable()
    tokens.add(owner_token, "sci", "scientist")
    tokens.add(client_token, "cli", "client")
    srv = WebsocketServerWorker(hook, id=uid(f"{prefix}-serve"), port=0, tokens=tokens)
    xid = srv.load(X4[:1].clone(), tags=("#x",), policy="review")
    sci, cli = open_session(srv, owner_token), open_session(srv, client_token)
    info = {"input_shape": [1, 3], "max_rows": 4}
    assert type(request(srv, sci, ServingMessage("open", "m", [["cli"], info]))) is m.ObjectsReply
    query = torch.tensor([[1, 2, 3]])
    assert type(request(srv, cli, ServingMessage("submit", "m", [7, query]))) is m.ObjectsReply
    batch = new_id()
    assert request(srv, sci, ServingMessage("claim", "m", [[7], batch])).objects == [1]
    return srv, sci, cli, xid, query, batch
