"""Small steps the review-before-release red teams share: ids, a pending request's id, release audit rows, an
owner holding data under review, and destinations that misbehave when a move arrives."""

from __future__ import annotations

import time

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError, ReviewPendingError
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
