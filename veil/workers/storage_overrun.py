"""A failed op must not leave a stored tensor that reads past its memory.

``torch.add(big, 1, out=t)`` on a tensor whose storage cannot grow (one decoded from a frame shares the
frame's buffer) fails, but torch sets ``t``'s new shape before it tries to grow the storage: ``t`` then
spans more bytes than it owns, and a get of it serialized the worker's heap beyond (other sessions' and
the owner's memory). A storage that can grow is left the same way when its new size overflows or cannot
be allocated. On a failed command the handler checks the objects it resolved and every tensor they hold that
an op could have reached: a tensor's gradient (and the gradient's own), a plan's constants and theirs (a plan
once made one the gradient of its own tensor, then the ``out=`` of a failing op: the stored plan kept a
constant past its storage, and its next run read the heap into a fresh tensor that left as an honest one).
Such a tensor is emptied (every other reference to it included) and the id of the object holding it freed:
its shape before the op is gone. Only a run of a plan reaches its constants, and only those of the ops it ran:
they are gathered once per plan, and a walk checks those of the ops run since the last walk (the interpreter
notes how far runs got; every constant the first time). Walked in full after every failed command, a stored plan
of 10^5 constants named in a cheap failing torch op cost the worker over a second of its turn per message.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterator

import torch

from veil.messaging.tensor_payload import spans_past_storage
from veil.plans.interpreter import OPS_REACHED
from veil.plans.ops import PlanSpec
from veil.tensors.tree import leaves


#: tensors whose ``.grad`` is read here (a stored pointer's would send a command to the worker it points to)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plan_constants(spec: PlanSpec) -> tuple[tuple, list]:
    """The distinct tensors in a plan's op arguments, in the order the ops first use them, and the index of the
    op first using each; gathered once per plan (kept with it)."""
    known = spec.__dict__.get("_held_constants")
    if known is None:
        first: dict = {}
        for i, op in enumerate(spec.ops):
            for t in leaves((op.args, op.kwargs), torch.Tensor):
                first.setdefault(id(t), (t, i))
        known = spec.__dict__["_held_constants"] = (tuple(t for t, _ in first.values()),
                                                    [i for _, i in first.values()])
    return known


def _reached_constants(spec: PlanSpec) -> tuple:
    """The constants of the ops run since the last walk (all of them if never walked); the walk starts over."""
    tensors, first = plan_constants(spec)
    reached = spec.__dict__.get(OPS_REACHED)
    spec.__dict__[OPS_REACHED] = 0
    return tensors if reached is None else tensors[:bisect_left(first, reached)]


def held_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors a stored object holds that an op it was given could have resized: a tensor, a plan's
    constants (of the ops run since they were last walked), and down each one's chain of gradients (each tensor
    once)."""
    if isinstance(obj, torch.Tensor):
        roots: Any = (obj,)
    elif isinstance(obj, PlanSpec):
        roots = _reached_constants(obj)
    else:
        return
    seen: set = set()
    for t in roots:
        while isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            yield t
            # (a non-leaf's .grad: no op reads it back)
            t = t.grad if type(t) in _PLAIN and (t.is_leaf or t.retains_grad) else None


def _empty(t: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            t.set_(t.untyped_storage(), 0, (0,))
    except RuntimeError:  # (a tensor torch will not re-point: its holder's id is freed all the same)
        pass


def drop_overruns(monitor: Any, principal: Any, found: dict) -> list:
    """Empties what the resolved objects (``found``: id -> entry) hold past its storage after a failed op, and
    frees the ids of the objects holding it; returns those ids."""
    dropped = []
    for oid, entry in found.items():
        overrun = [t for t in held_tensors(entry.obj) if spans_past_storage(t)]
        if overrun:
            for t in overrun:
                _empty(t)
            monitor.discard(principal, oid, only=entry)
            dropped.append(oid)
    return dropped
