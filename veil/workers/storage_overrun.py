"""A failed op must not leave a stored tensor that reads past its memory.

``torch.add(big, 1, out=t)`` on a tensor whose storage cannot grow (one decoded from a frame shares the
frame's buffer) fails, but torch sets ``t``'s new shape before it tries to grow the storage: ``t`` then
spans more bytes than it owns, and a get of it serialized the worker's heap beyond (other sessions' and
the owner's memory). On a failed command the handler checks the objects it resolved; such a tensor is
emptied (every other reference to it included) and its id freed: its shape before the op is gone.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.messaging.tensor_payload import spans_past_storage


def drop_overruns(monitor: Any, principal: Any, found: dict) -> list:
    """Empties and frees the resolved objects (``found``: id -> entry) a failed op left past their storage;
    returns their ids."""
    dropped = []
    for oid, entry in found.items():
        obj = entry.obj
        if isinstance(obj, torch.Tensor) and spans_past_storage(obj):
            try:
                with torch.no_grad():
                    obj.set_(obj.untyped_storage(), 0, (0,))
            except RuntimeError:  # (a tensor torch will not re-point: its id is freed all the same)
                pass
            monitor.discard(principal, oid, only=entry)
            dropped.append(oid)
    return dropped
