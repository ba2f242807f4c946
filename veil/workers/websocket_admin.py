"""The data owner's remote view of a network worker (connections with an admin token).

Two message types, registered through the extension registries:

- :class:`AdminObjectsMessage`: ids of everything the worker holds, or the
  objects for given ids (pointers come back as non-owning pointers). This is the
  network counterpart of ``VirtualWorker._objects``.
- :class:`AdminLoadMessage`: ``worker.load(...)`` done remotely by the owner.

Both are refused unless the connection authenticated with an admin token; the
admin role does not bypass the ``.get()`` rules for ordinary requests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch

from veil.exceptions import ObjectNotFoundError, PermissionDeniedError, SerializationError
from veil.messaging import messages as m
from veil.workers.base import BaseWorker, register_handler

if TYPE_CHECKING:
    from veil.workers.websocket_client import WebsocketClientWorker


@dataclass
class AdminObjectsMessage:
    """``ids=None``: list every object id; else return those objects (nothing is deleted)."""

    TYPE: ClassVar[int] = 60
    ids: list | None = None


@dataclass
class AdminLoadMessage:
    """Load an object as the data owner (protected, optionally private)."""

    TYPE: ClassVar[int] = 61
    obj: Any = None
    tags: list = field(default_factory=list)
    description: str = ""
    private: bool = False
    allowed_users: list | None = None


m.register_message(AdminObjectsMessage)
m.register_message(AdminLoadMessage)


def _require_admin(worker: BaseWorker) -> None:
    current = getattr(worker, "current_session", None)
    session = current() if current is not None else None
    if session is None or not session.has_role("admin"):
        raise PermissionDeniedError(f"worker {worker.id!r}: this request needs the data owner's admin token")


@register_handler(AdminObjectsMessage)
def _handle_admin_objects(worker: BaseWorker, msg: AdminObjectsMessage, sender: str) -> Any:
    from veil.tensors.pointer import PointerTensor, PointerWire

    _require_admin(worker)
    objects = worker.monitor.owner_objects()
    if msg.ids is None:
        return m.ObjectsReply(list(objects))
    if not isinstance(msg.ids, list):
        raise SerializationError("AdminObjectsMessage.ids must be a list or None")
    out = []
    for oid in msg.ids:
        if oid not in objects:
            raise ObjectNotFoundError(f"object {oid!r} not found on worker {worker.id!r}")
        obj = objects[oid]
        out.append(PointerWire.of(obj, garbage_collect_data=False) if isinstance(obj, PointerTensor) else obj)
    return m.ObjectsReply(out)


@register_handler(AdminLoadMessage)
def _handle_admin_load(worker: BaseWorker, msg: AdminLoadMessage, sender: str) -> Any:
    _require_admin(worker)
    # the fields as ``StoredObject`` takes them (serde._decode_stored): text tags and description, a bool, user
    # names; a tag that was a map failed every scientist's search on the worker, a string of allowed users
    # named each of its characters
    if (not isinstance(msg.obj, torch.Tensor) or not isinstance(msg.tags, list)
            or not all(type(t) is str for t in msg.tags) or type(msg.description) is not str
            or type(msg.private) is not bool
            or (msg.allowed_users is not None and not (type(msg.allowed_users) is list
                                                       and all(type(u) is str for u in msg.allowed_users)))):
        raise SerializationError("AdminLoadMessage needs a tensor, a list of string tags, a string description, "
                                 "a bool private and a list of user names (or None) as allowed_users")
    allowed = None if msg.allowed_users is None else tuple(msg.allowed_users)
    oid = worker.load(msg.obj, tags=tuple(msg.tags), description=msg.description, private=msg.private,
                      allowed_users=allowed)
    return m.ObjectsReply([oid])


class RemoteObjectsView(Mapping):
    """``client._objects``: a read-only mapping over the server's store (admin token needed).

    Membership and length cost one small round trip; reading a value fetches it.
    """

    def __init__(self, client: "WebsocketClientWorker") -> None:
        self._client = client

    def _send(self, msg: Any) -> list:
        return self._client.hook.local_worker.send_msg(msg, self._client).objects

    def _ids(self) -> list[int]:
        return self._send(AdminObjectsMessage(None))

    def __getitem__(self, oid: int) -> Any:
        try:
            return self._send(AdminObjectsMessage([oid]))[0]
        except ObjectNotFoundError:
            raise KeyError(oid) from None

    def __contains__(self, oid: object) -> bool:
        return oid in set(self._ids())

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids())

    def __len__(self) -> int:
        return len(self._ids())
