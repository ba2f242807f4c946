"""Gradients ``backward`` makes, charged to the session as they are made.

A gradient lives with its leaf, stored or only held by a stored result's graph, and a command naming the leaf
was the only thing that charged it (``ObjectStore.charge_growth``): a session ran ``backward`` over cheap
leaves (an expanded scalar of n elements costs 256 bytes) and held their n-element gradients uncharged, a room's
worth per round. When ``backward`` is sized (``output_bounds.check``, under a quota: commands and plan steps
alike) every leaf its graph reaches gets one hook, for its lifetime: each gradient torch puts there that no one
charged yet is charged to the session whose ``backward`` first reached the leaf, for as long as the gradient
lives (``ObjectStore.linger``, released when it is freed). Its storage is charged, not its shape: a stolen
gradient may be a view of a larger buffer, all of it held. Accumulating into a gradient already charged adds
nothing (no new memory); a command naming the leaf does not charge it again (its walk skips the gradients so
charged, ``store._grad_bytes``). A sparse gradient (``embedding(..., sparse=True)``: one row per index looked
up) is charged its values and indices, not its dense size (under a quota its ``backward`` is refused anyway:
``output_bounds._backward_bound``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

#: on a gradient: charged already, to its session's gradients or to its tensor's entry (not charged again)
CHARGED = "_veil_grad_charged"


def watch(monitor: Any, principal: Any, leaf: torch.Tensor) -> None:
    """Charges each new gradient of ``leaf`` to ``principal``'s session when torch puts it there (one hook per
    leaf, however many ``backward`` reach it; looked up among its hooks, which a copy of it does not get, though
    it gets a flag set on it)."""
    hooks = getattr(leaf, "_post_accumulate_grad_hooks", None)
    if hooks and any(type(h) is _Charge for h in hooks.values()):
        return
    try:
        leaf.register_post_accumulate_grad_hook(_Charge(monitor, principal))
    except RuntimeError:  # (not a leaf that requires grad: torch puts no gradient there)
        pass


class _Charge:
    """The hook: a gradient no one charged yet is charged, once."""

    __slots__ = ("monitor", "principal")

    def __init__(self, monitor: Any, principal: Any) -> None:
        self.monitor, self.principal = monitor, principal

    def __call__(self, leaf: torch.Tensor) -> None:
        grad = leaf.grad
        if grad is None or getattr(grad, CHARGED, False):
            return
        from veil.workers.quota import MIN_TENSOR_BYTES  # (quota -> store -> this module)

        try:
            setattr(grad, CHARGED, True)
            self.monitor.charge_growth(self.principal, {}, (grad, max(held_bytes(grad), MIN_TENSOR_BYTES)))
        except Exception:  # noqa: BLE001 - a failed charge must not break the requester's backward midway
            log.exception("could not charge a gradient to its session")


def held_bytes(grad: torch.Tensor) -> int:
    """The memory ``grad`` holds: its storage (a view's whole buffer); a sparse one's values and indices (one row
    per index looked up, beyond its dense size when indices repeat), or its dense size, whichever is larger."""
    if grad.layout is torch.strided:
        return grad.untyped_storage().nbytes()
    dense = grad.numel() * grad.element_size()
    if grad.layout is torch.sparse_coo:
        return max(dense, grad._values().untyped_storage().nbytes() + grad._indices().untyped_storage().nbytes())
    return dense
