"""The user's verbs on tensors, usable with or without the hook (``sy.send(x, w)``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from veil.ids import new_id
from veil.messaging.messages import ListObjectsMessage, ObjectMessage, SearchMessage, StoredObject
from veil.messaging.serde import DTYPES
from veil.tensors.pointer import PointerTensor
from veil.workers.listing import every_page

if TYPE_CHECKING:
    from veil.workers.base import BaseWorker


def _owner_for(obj: Any, worker: "BaseWorker") -> "BaseWorker":
    if isinstance(obj, PointerTensor):
        return obj.owner
    return worker.hook.local_worker


def send(obj: Any, *workers: "BaseWorker", garbage_collect_data: bool = True) -> Any:
    """Sends a tensor (or pointer, or nn.Module) to a worker and returns a pointer to it.

    Args:
        obj: a tensor, a PointerTensor (gives a pointer to a pointer) or an nn.Module.
        workers: exactly one destination worker.
        garbage_collect_data: free the remote copy when the pointer is garbage collected.
    """
    if len(workers) > 1 and isinstance(obj, torch.Tensor) and not isinstance(obj, PointerTensor):
        from veil.compat.multi_pointer import MultiPointer  # PySyft's x.send(bob, alice)

        return MultiPointer.send(obj, workers, garbage_collect_data=garbage_collect_data)
    if len(workers) != 1:
        raise ValueError(f"send() takes exactly one worker (or several for a plain tensor), got {len(workers)}")
    worker = workers[0]
    if isinstance(obj, torch.nn.Module):
        from veil.module_api import send_module

        return send_module(obj, worker)
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"cannot send an object of type {type(obj).__name__}")
    from veil.tensors.fixed_precision import FixedPrecisionTensor

    if isinstance(obj, FixedPrecisionTensor):  # PySyft's x.fix_precision().send(w)
        from veil.compat.remote_fixed_precision import send_fixed_precision

        return send_fixed_precision(obj, worker, garbage_collect_data=garbage_collect_data)
    owner = _owner_for(obj, worker)
    oid = new_id()
    tags = tuple(getattr(obj, "tags", ()) or ())
    description = getattr(obj, "description", "") or ""
    allowed = getattr(obj, "allowed_users", None)
    owner.send_msg(ObjectMessage([StoredObject(oid, obj, tags, description, allowed)]), worker)
    if isinstance(obj, PointerTensor):
        obj.garbage_collect_data = False  # the worker we sent it to owns the remote object now
    return PointerTensor(
        location=worker, id_at_location=oid, owner=owner, shape=obj.shape, dtype=obj.dtype,
        requires_grad=obj.requires_grad, garbage_collect_data=garbage_collect_data, tags=tags,
        description=description, mine=not isinstance(obj, PointerTensor),  # pipelinable: see remote_ops
    )


def get(obj: Any, **kwargs: Any) -> Any:
    """``.get()`` for pointers and sent modules."""
    if isinstance(obj, torch.nn.Module):
        from veil.module_api import get_module

        return get_module(obj)
    return obj.get(**kwargs)


def tag(obj: torch.Tensor, *tags: str) -> torch.Tensor:
    """Adds search tags (``"#boston"``) that travel with the tensor when it is sent."""
    current = tuple(getattr(obj, "tags", ()) or ())
    obj.tags = tuple(dict.fromkeys(current + tuple(tags)))
    return obj


def describe(obj: torch.Tensor, description: str) -> torch.Tensor:
    obj.description = description
    return obj


def private_tensor(obj: torch.Tensor, allowed_users: tuple | list = ()) -> torch.Tensor:
    """Marks a tensor so that, once sent, only ``allowed_users`` may ``.get()`` it."""
    if isinstance(allowed_users, str):
        allowed_users = (allowed_users,)
    obj.allowed_users = tuple(allowed_users)
    return obj


def search(worker: "BaseWorker", query: list[str] | str) -> list[PointerTensor]:
    """Pointers to the worker's objects whose tags include every query term.

    The pointers never free the data they point to: it belongs to the data owner.
    """
    if isinstance(query, str):
        query = [query]
    owner = worker.hook.local_worker
    found = every_page(lambda after: owner.send_msg(SearchMessage(list(query), after), worker))
    return [
        PointerTensor(
            location=worker, id_at_location=d.id, owner=owner, shape=d.shape, dtype=DTYPES[d.dtype],
            requires_grad=d.requires_grad, garbage_collect_data=False, tags=d.tags, description=d.description,
        )
        for d in found
    ]


def list_objects(worker: "BaseWorker") -> list:
    """Descriptors of the objects the local worker created on ``worker`` (network-safe ``_objects``)."""
    local = worker.hook.local_worker
    return every_page(lambda after: local.send_msg(ListObjectsMessage(after), worker))  # (bounded pages)
