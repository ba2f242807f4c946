"""Governance messages: scientists file and list their release requests; the owner decides.

Scientist messages (any authenticated user, about their own requests only):
- :class:`RequestReleaseMessage`: file (or annotate) the request for one object.
- :class:`ListRequestsMessage`: the caller's requests and their states.

Owner messages (admin token):
- :class:`AdminRequestsMessage`: list / show (with op graph and preview) / approve / deny.
- :class:`AdminPolicyMessage`: change a dataset's policy at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from veil.dp.bound_note import warn_past_bound
from veil.exceptions import PermissionDeniedError, SerializationError
from veil.governance.policy import set_policy
from veil.governance.release import decide_outside_turn, needs_review
from veil.governance.requests import STATES, ReviewQueue
from veil.messaging import messages as m
from veil.workers import cancellation
from veil.workers.audit_writer import rows_held_by_reply
from veil.workers.base import BaseWorker, register_handler


@dataclass
class RequestReleaseMessage:
    TYPE: ClassVar[int] = 80
    id: int = 0
    reason: str = ""
    user: str | None = None


@dataclass
class ListRequestsMessage:
    TYPE: ClassVar[int] = 81
    user: str | None = None


@dataclass
class AdminRequestsMessage:
    """``action``: ``list`` (``state`` filters), ``show``, ``approve`` or ``deny`` (``message``)."""

    TYPE: ClassVar[int] = 82
    action: str = "list"
    request_id: str | None = None
    message: str = ""
    state: str | None = None


@dataclass
class AdminPolicyMessage:
    TYPE: ClassVar[int] = 83
    target: Any = None  # object id, tag or dataset name
    policy: str = ""


for _cls in (RequestReleaseMessage, ListRequestsMessage, AdminRequestsMessage, AdminPolicyMessage):
    m.register_message(_cls)


def _session(worker: BaseWorker) -> Any:
    current = getattr(worker, "current_session", None)
    return current() if current is not None else None


def _user(worker: BaseWorker, claimed: Any, sender: str) -> tuple[str, str]:
    """(user, session id): on a network worker the claimed user must be one the connection proved."""
    session = _session(worker)
    if session is not None:
        return session.claim_user(claimed), session.id
    return (claimed if isinstance(claimed, str) and claimed else sender), "-"


def _require_admin(worker: BaseWorker) -> str:
    session = _session(worker)
    if session is None:
        return "owner"  # in-process: whoever holds the worker object is its owner
    if not session.has_role("admin"):
        raise PermissionDeniedError(f"worker {worker.id!r}: this request needs the data owner's admin token")
    return session.user


@register_handler(RequestReleaseMessage)
def _handle_request_release(worker: BaseWorker, msg: RequestReleaseMessage, sender: str) -> Any:
    if type(msg.id) is not int or not isinstance(msg.reason, str):
        raise SerializationError("RequestReleaseMessage needs an object id and a reason string")
    user, session = _user(worker, msg.user, sender)
    from veil.workers.monitor import Purpose

    # the same rules as .get() (who may name it, who may reveal it), checked by the reference monitor
    with rows_held_by_reply():  # (its allowed row: nothing leaves, the reply waits for it out of the turn)
        entry = worker.monitor.resolve(worker.principal(sender).acting_as(user), msg.id, Purpose.REVEAL,
                                       "release request filed")
    if not needs_review(worker, msg.id, entry, user):
        return m.ObjectsReply([{"id": None, "state": "not needed", "reason": msg.reason}])
    # (filed outside the worker's turn: a lost COMMIT's lookup held every other session's command)
    _, filed = decide_outside_turn(worker, msg.id, entry, user, session, reason=msg.reason or None)
    return m.ObjectsReply([filed.to_user() if filed is not None else {"id": None, "state": "allowed"}])


@register_handler(ListRequestsMessage)
def _handle_list_requests(worker: BaseWorker, msg: ListRequestsMessage, sender: str) -> Any:
    user, _ = _user(worker, msg.user, sender)
    return m.ObjectsReply([r.to_user() for r in ReviewQueue(worker).list(principal=user, graphs=False)])


def owner_view(worker: BaseWorker, req: Any, with_preview: bool) -> dict:
    d = req.to_dict()
    if with_preview:
        d["preview"] = ReviewQueue(worker).preview(req.id)
    return d


@register_handler(AdminRequestsMessage)
def _handle_admin_requests(worker: BaseWorker, msg: AdminRequestsMessage, sender: str) -> Any:
    by = _require_admin(worker)
    queue = ReviewQueue(worker)
    if msg.action == "list":
        if msg.state is not None and msg.state not in STATES:
            raise SerializationError(f"unknown request state {msg.state!r}; expected one of {', '.join(STATES)}")
        # (no graphs: `veil requests list` shows none, and 500 of them could make a reply of 128 MB; `show` has it)
        return m.ObjectsReply([owner_view(worker, r, False) for r in queue.list(msg.state, graphs=False)])
    if not isinstance(msg.request_id, str):
        raise SerializationError("this action needs a request id")
    if msg.action == "show":
        return m.ObjectsReply([owner_view(worker, queue.get(msg.request_id), True)])
    # a decision is the owner's database only: outside the worker's turn (a lost COMMIT's lookup, or a release
    # decision holding the governance lock across one, held every other session's command: lock_order.py)
    if msg.action == "approve":
        with cancellation.outside_turn():
            decided = queue.approve(msg.request_id, by=by, message=str(msg.message))
        return m.ObjectsReply([owner_view(worker, decided, False)])
    if msg.action == "deny":
        with cancellation.outside_turn():
            decided = queue.deny(msg.request_id, str(msg.message), by=by)
        return m.ObjectsReply([owner_view(worker, decided, False)])
    raise SerializationError(f"unknown requests action {msg.action!r} (list, show, approve, deny)")


@register_handler(AdminPolicyMessage)
def _handle_admin_policy(worker: BaseWorker, msg: AdminPolicyMessage, sender: str) -> Any:
    by = _require_admin(worker)
    if not isinstance(msg.policy, str) or not isinstance(msg.target, (int, str)):
        raise SerializationError("AdminPolicyMessage needs a target (id, tag or name) and a policy")
    try:
        changed = set_policy(worker, msg.target, msg.policy, by=by)
    except ValueError as e:
        raise SerializationError(str(e)) from None
    warn_past_bound(worker, changed, msg.policy)  # (the owner's log: data past a hidden count's bound)
    return m.ObjectsReply(changed)

