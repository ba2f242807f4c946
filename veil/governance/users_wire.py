"""The owner's user management over the network (admin token): ``veil users list|revoke|restore``.

:class:`AdminUsersMessage` lists the principals (name, role, revoked; never a token), revokes one or
readmits one (veil/governance/revocation.py). Any other role is refused, audited as a refusal.

A network worker serves this message from the owner's admin session without waiting for the worker's turn
(:func:`serve_without_turn`): a revocation is in force when ``veil users revoke`` returns, however long the
command the worker is running (everything a revocation touches has its own lock). It does not wait for one of
the worker's handler threads either (:func:`serve_users_message`, on :func:`owner_executor`): a scientist whose
long command holds the turn can fill those (each closed session's cleanup waits for the turn on one).
"""

from __future__ import annotations

import asyncio
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

from veil.exceptions import PermissionDeniedError, SerializationError
from veil.messaging import messages as m
from veil.messaging.serde import deserialize
from veil.workers.base import BaseWorker, register_handler

ACTIONS = ("list", "revoke", "restore")
#: largest users frame decoded ahead of the worker's turn (a name and an action are a few dozen bytes)
OFF_TURN_MAX_BYTES = 4096
#: most threads of a worker's owner_executor (made as needed): the owner's users messages and the revocation
#: sync. With the owner database frozen each revocation holds one until it is stored (it is in force before):
#: the owner's retries must still find a thread
OWNER_THREADS = 16
_EXECUTORS: "weakref.WeakKeyDictionary[Any, ThreadPoolExecutor]" = weakref.WeakKeyDictionary()


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


def owner_executor(worker: Any) -> ThreadPoolExecutor:
    """Threads for the owner's users messages and the revocation sync, apart from the worker's handler
    threads (``worker._executor``, which requests waiting for the turn and session cleanups can all hold)."""
    executor = _EXECUTORS.get(worker)
    if executor is None:
        executor = _EXECUTORS.setdefault(worker, ThreadPoolExecutor(
            max_workers=OWNER_THREADS, thread_name_prefix=f"veil-{worker.id}-owner"))
    return executor


def release_owner_executor(worker: Any) -> None:
    """A stopping worker's owner threads end (once what they run is done)."""
    executor = _EXECUTORS.pop(worker, None)
    if executor is not None:
        executor.shutdown(wait=True)


def _users_request(worker: Any, data: Any, session: Any, decoded: tuple | None) -> tuple[bool, tuple | None]:
    """``(is a users message of an admin session, decoded)``; decodes ``data`` (a few KiB at most, with the
    session's rights) when ``decoded`` is None; ``decoded`` stays None where decoding failed."""
    if not session.has_role("admin") or session.revoked:
        return False, decoded
    if decoded is None:
        if not isinstance(data, (bytes, bytearray)) or len(data) > OFF_TURN_MAX_BYTES:
            return False, None
        local = worker._local
        local.session = session
        try:
            decoded = deserialize(data, worker._decode_ctx)
        except Exception:  # noqa: BLE001 - the handler thread answers it with the decoding error
            return False, None
        finally:
            local.session = None
    return type(decoded[0]) is AdminUsersMessage and not decoded[2], decoded


async def serve_users_message(worker: Any, data: Any, session: Any,
                              decoded: tuple | None) -> tuple[bytes | None, tuple | None]:
    """On a network worker's event loop: an admin session's users message, served on
    :func:`owner_executor` without the turn: ``(reply, decoded)``; ``(None, decoded)`` for any other request,
    which takes a handler thread (with what was decoded here)."""
    wanted, decoded = _users_request(worker, data, session, decoded)
    if not wanted:
        return None, decoded
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(owner_executor(worker), serve_without_turn, worker, data, session,
                                      decoded), None


def serve_without_turn(worker: Any, data: Any, session: Any, decoded: tuple | None) -> bytes | None:
    """The reply to an admin session's users message, served on this thread while another request may hold
    the worker's turn (:func:`serve_users_message`, and a network server's ``serve_bytes``); None for any
    other request or session, which waits for the turn as before."""
    wanted, decoded = _users_request(worker, data, session, decoded)
    if not wanted:
        return None
    local = worker._local
    local.session = session  # (handled as the session's request)
    try:
        return worker._serve_decoded(*decoded)
    finally:
        local.session = None
