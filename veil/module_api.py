"""nn.Module send/get/copy/move.

Parameters keep their Python identity across ``send``/``get`` (an optimizer
built before ``model.send(w)`` keeps working): each parameter object is swapped
in place with its pointer through ``torch.utils.swap_tensors``.
"""

from __future__ import annotations

import copy as _copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from veil.ids import new_id
from veil.messaging.messages import GetObjectsMessage, MoveMessage, ObjectMessage, StoredObject
from veil.tensors.pointer import PointerTensor

if TYPE_CHECKING:
    from veil.workers.base import BaseWorker


def _slots(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """(owning dict, name, tensor) for every parameter and buffer, shared ones once."""
    seen: set[int] = set()
    out = []
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append((table, name, t))
    return out


def _is_remote(module: nn.Module) -> bool:
    return any(isinstance(t, PointerTensor) for _, _, t in _slots(module))


def send_module(module: nn.Module, worker: "BaseWorker") -> nn.Module:
    """Sends every parameter and buffer in one message; the module now computes remotely."""
    if _is_remote(module):
        raise ValueError("module is already remote: use .move(worker) or .get() first")
    slots = _slots(module)
    owner = worker.hook.local_worker
    ids = [new_id() for _ in slots]
    owner.send_msg(ObjectMessage([StoredObject(i, t.detach().requires_grad_(t.requires_grad)) for i, (_, _, t) in zip(ids, slots)]), worker)
    for oid, (table, name, t) in zip(ids, slots):
        ptr = PointerTensor(worker, oid, owner, t.shape, t.dtype, t.requires_grad, mine=True)
        _swap_in(table, name, t, ptr)
    module.location = worker
    return module


def _swap_in(table: dict, name: str, old: torch.Tensor, new: torch.Tensor) -> None:
    """Makes the object ``old`` become ``new`` (keeps identity for optimizers)."""
    try:
        torch.utils.swap_tensors(old, new)
    except RuntimeError:
        # Still referenced from an autograd graph: fall back to replacing the slot.
        table[name] = new


def get_module(module: nn.Module) -> nn.Module:
    """Brings parameters and buffers back in one message and frees them remotely."""
    slots = [(table, name, t) for table, name, t in _slots(module) if isinstance(t, PointerTensor)]
    if not slots:
        return module
    by_location: dict[str, list] = {}
    for slot in slots:
        by_location.setdefault(slot[2].location.id, []).append(slot)
    for group in by_location.values():
        first = group[0][2]
        reply = first.owner.send_msg(GetObjectsMessage([t.id_at_location for _, _, t in group]), first.location)
        for (table, name, ptr), value in zip(group, reply.objects):
            ptr.mark_freed()
            is_param = table is not None and any(table is sub._parameters for sub in module.modules())
            local = nn.Parameter(value.detach(), requires_grad=ptr.requires_grad) if is_param else value.detach()
            _swap_in(table, name, ptr, local)
    if "location" in module.__dict__:
        del module.__dict__["location"]
    return module


def copy_module(module: nn.Module) -> nn.Module:
    """A copy: local modules are deep-copied; remote ones are copied on their worker."""
    location = module.__dict__.get("location")
    # Workers are shared references, never copied (PointerTensor.__deepcopy__ copies remotely).
    memo = {id(location): location} if location is not None else {}
    return _copy.deepcopy(module, memo)


def move_module(module: nn.Module, destination: "BaseWorker") -> nn.Module:
    """Moves remote parameters worker-to-worker (a local module is simply sent)."""
    slots = [(table, name, t) for table, name, t in _slots(module) if isinstance(t, PointerTensor)]
    if not slots:
        return send_module(module, destination)
    by_location: dict[str, list] = {}
    for slot in slots:
        by_location.setdefault(slot[2].location.id, []).append(slot)
    for group in by_location.values():
        first = group[0][2]
        new_ids = [new_id() for _ in group]
        first.owner.send_msg(
            MoveMessage([t.id_at_location for _, _, t in group], destination.id, new_ids), first.location
        )
        for (_, _, ptr), oid in zip(group, new_ids):
            # same Python object, new place: optimizers keep their references
            ptr.__dict__["location"] = destination
            ptr.__dict__["id_at_location"] = oid
    module.location = destination
    return module
