"""The owner's user management over the network (admin token): ``veil users list|revoke|restore``.

:class:`AdminUsersMessage` lists the principals (name, role, revoked; never a token), revokes one or
readmits one (veil/governance/revocation.py). Any other role is refused, audited as a refusal.

A network worker serves this message from the owner's admin session without waiting for the worker's turn
(:func:`serve_without_turn`): a revocation is in force when ``veil users revoke`` returns, however long the
command the worker is running (everything a revocation touches has its own lock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from veil.exceptions import PermissionDeniedError, SerializationError
from veil.messaging import messages as m
from veil.messaging.serde import deserialize
from veil.workers.base import BaseWorker, register_handler

ACTIONS = ("list", "revoke", "restore")
#: largest users frame decoded ahead of the worker's turn (a name and an action are a few dozen bytes)
OFF_TURN_MAX_BYTES = 4096


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


def serve_without_turn(worker: Any, data: Any, session: Any, decoded: tuple | None) -> bytes | None:
    """The reply to an admin session's users message, served on this thread while another request may hold
    the worker's turn (a network server's ``serve_bytes``); None for any other request or session, which
    waits for the turn as before."""
    if not session.has_role("admin") or session.revoked:
        return None
    if decoded is None and (not isinstance(data, (bytes, bytearray)) or len(data) > OFF_TURN_MAX_BYTES):
        return None
    local = worker._local
    local.session = session  # (decoded with the session's rights, handled as its request)
    try:
        if decoded is None:
            try:
                decoded = deserialize(data, worker._decode_ctx)
            except Exception:  # noqa: BLE001 - the handler thread answers it with the decoding error
                return None
        msg, sender, prelude = decoded
        if type(msg) is not AdminUsersMessage or prelude:
            return None
        return worker._serve_decoded(msg, sender, prelude)
    finally:
        local.session = None
