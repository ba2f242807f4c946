"""The owner's user management over the network (admin token): ``veil users list|revoke|restore``.

:class:`AdminUsersMessage` lists the principals (name, role, revoked; never a token), revokes one or
readmits one (veil/governance/revocation.py). Any other role is refused, audited as a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from veil.exceptions import PermissionDeniedError, SerializationError
from veil.messaging import messages as m
from veil.workers.base import BaseWorker, register_handler

ACTIONS = ("list", "revoke", "restore")


@dataclass
class AdminUsersMessage:
    """``action``: ``list``, ``revoke`` or ``restore`` (``name``: the principal)."""

    TYPE: ClassVar[int] = 65
    action: str = "list"
    name: str | None = None


m.register_message(AdminUsersMessage)


@register_handler(AdminUsersMessage)
def _handle_admin_users(worker: BaseWorker, msg: AdminUsersMessage, sender: str) -> Any:
    from veil.governance import revocation

    current = getattr(worker, "current_session", None)
    session = current() if current is not None else None
    if session is None or not session.has_role("admin") or getattr(worker, "tokens", None) is None:
        raise PermissionDeniedError(f"worker {worker.id!r}: managing users needs the data owner's admin token")
    if msg.action not in ACTIONS:
        raise SerializationError(f"unknown users action {msg.action!r} ({', '.join(ACTIONS)})")
    if msg.action == "list":
        return m.ObjectsReply(revocation.users(worker))
    if not isinstance(msg.name, str) or not msg.name:
        raise SerializationError(f"{msg.action} needs a user name")
    if msg.action == "revoke":
        return m.ObjectsReply([revocation.revoke(worker, msg.name, by=session.user)])
    revocation.readmit(worker, msg.name, by=session.user)
    return m.ObjectsReply([0])
