"""RemoteHandle: the one client-side type for "an object that lives on another worker".

Every handle kind (tensor pointers, HE ciphertext pointers, plan pointers, the
DP owner's plan handle) is a :class:`RemoteHandle`. The base holds what they
share, so the wire behaviour is the same for all of them:

- ``location`` (the worker holding the object), ``id_at_location`` (its
  unguessable id there), ``owner`` (the worker that sends this handle's
  messages: the local worker, or another worker in a pointer chain);
- garbage collection: a dying handle *queues* its id with
  ``owner.schedule_delete`` (finalizers never send); the id rides as a
  ``DeleteMessage`` prelude on the next message to that worker, where the
  reference monitor frees it only for the session that stored it
  (``monitor.discard``: owner data and other sessions' ids are left alone);
- ``fetch`` (``GetObjectsMessage``: the worker's monitor applies the reveal
  rules: allowed_users, reveal_to, dealer material, DP-only, review policy)
  and ``mark_freed`` once the remote copy is gone or owned elsewhere;
- ``tag`` / ``describe`` (local labels, PySyft's API) and ``handle_head`` (one
  display format).

Attributes live in the instance ``__dict__`` (a ``torch.Tensor`` wrapper
subclass cannot have per-instance slots, and reading them through properties
would re-enter ``__torch_function__``). :data:`HANDLE_KINDS` is the table of
kinds and how each is revealed and released; tests check every class is in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from veil.exceptions import escaped

if TYPE_CHECKING:
    from veil.workers.base import BaseWorker


@dataclass(frozen=True)
class HandleKind:
    """One handle kind: where it is defined, what it names, and its get / release paths."""

    cls: str  # dotted path of the class
    names: str  # what the remote object is
    get: str  # how its value comes back (and which rules the worker's monitor applies)
    release: str  # how the remote object is freed


#: every remote-handle kind (a new kind adds its row here; tests/core/test_handle.py checks the table)
HANDLE_KINDS: dict[str, HandleKind] = {
    "tensor": HandleKind(
        "veil.tensors.pointer.PointerTensor", "a tensor (or, in a chain, a stored pointer)",
        "GetObjectsMessage([id], delete, user) -> the tensor (then its .grad, same rules); monitor Purpose.REVEAL",
        "finalizer -> schedule_delete -> DeleteMessage prelude; .get()/.move() mark it freed"),
    "he": HandleKind(
        "veil.he.remote.HEPointer", "a Paillier / CKKS ciphertext (decryptable only by its owner)",
        "GetObjectsMessage([id]) -> the ciphertext, decrypted locally; monitor Purpose.REVEAL",
        "finalizer -> schedule_delete -> DeleteMessage prelude; .get() marks it freed"),
    "plan": HandleKind(
        "veil.plans.remote.PlanPointer", "a PlanSpec plus its state tensors (PointerTensors)",
        "GetObjectsMessage([plan, *state], delete) -> Plan; monitor Purpose.REVEAL on each",
        "its stand-in PointerTensor (_handle, a command argument) frees the plan id, the state pointers "
        "themselves; .get() marks all freed"),
    "dp": HandleKind(
        "veil.dp.remote.RemoteDPOwner", "a forward plan stored for owner-side DP training",
        "never fetched: values leave only through DP releases (veil.dp.sanitized_gradient); Purpose.DP_RELEASE",
        "its stand-in PointerTensor (_plan, a command argument) frees the plan id"),
}


class RemoteHandle:
    """Base of every handle kind (see the module docstring and :data:`HANDLE_KINDS`)."""

    __slots__ = ()
    #: key of this class in HANDLE_KINDS
    HANDLE_KIND = ""

    # ------------------------------------------------------------- state

    def _init_handle(self, location: "BaseWorker", id_at_location: int, owner: "BaseWorker",
                     garbage_collect_data: bool = True, tags: tuple = (), description: str = "") -> None:
        d = self.__dict__
        d["location"] = location
        d["id_at_location"] = id_at_location
        d["owner"] = owner
        d["garbage_collect_data"] = garbage_collect_data
        d["tags"] = tuple(tags)
        d["description"] = description
        d["_freed"] = False

    # ------------------------------------------------- garbage collection

    def __del__(self) -> None:
        d = self.__dict__
        if d.get("garbage_collect_data") and not d.get("_freed", True):
            try:
                d["owner"].schedule_delete(d["location"], d["id_at_location"])
            except Exception:  # interpreter shutdown: nothing left to free
                pass

    def mark_freed(self) -> None:
        """The remote object is gone (or owned elsewhere): never delete it from here."""
        self.__dict__["_freed"] = True

    # ------------------------------------------------------------ fetching

    def fetch(self, delete: bool = True, user: str | None = None, also: Sequence["RemoteHandle"] = ()) -> list:
        """Values of this handle (and ``also``, same worker) in one ``GetObjectsMessage``.

        The worker's reference monitor decides; with ``delete`` the remote copies are freed
        (the owner's protected data is never taken), so the handles are marked freed.
        """
        return fetch_all([self, *also], delete, user)

    # ------------------------------------------------------------- labels

    def tag(self, *tags: str) -> Any:
        self.__dict__["tags"] = tuple(dict.fromkeys(self.__dict__["tags"] + tags))
        return self

    def describe(self, description: str) -> Any:
        self.__dict__["description"] = description
        return self

    def handle_head(self, label: str, extra: str = "") -> str:
        """``[label extra | owner -> location:id]``: one display format for every kind."""
        d = self.__dict__
        extra = f" {extra}" if extra else ""
        return escaped(f"[{label}{extra} | {d['owner'].id} -> {d['location'].id}:{d['id_at_location']}]")


def fetch_all(handles: Sequence[RemoteHandle], delete: bool = True, user: str | None = None) -> list:
    """Values of several handles on one worker in one round trip (freed there with ``delete``)."""
    from veil.messaging.messages import GetObjectsMessage

    first = handles[0].__dict__
    location = first["location"]
    if any(h.__dict__["location"] is not location for h in handles):
        raise ValueError("fetch_all: every handle must point to the same worker")
    reply = first["owner"].send_msg(
        GetObjectsMessage([h.__dict__["id_at_location"] for h in handles], delete, user), location)
    if delete:
        for h in handles:
            h.__dict__["_freed"] = True
    return list(reply.objects)
