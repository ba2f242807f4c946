"""Small steps the review-before-release red teams share: ids, a pending request's id, release audit rows, an
owner holding data under review, destinations that misbehave when a move arrives, and worker-function steps and
MPC openings run on that owner."""

from __future__ import annotations

import time

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError, ReviewPendingError
from veil.ids import new_id
from veil.messaging import messages as m

#: the owner's data under review in the move/approval red teams
SECRET = torch.tensor([[1.5, -2.25, 3.0], [4.0, 5.5, -6.75]])


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
