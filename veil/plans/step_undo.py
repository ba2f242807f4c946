"""A plan step is all or nothing for the requester's state: cut part-way (by the worker's deadline, a quota, an
op's error), the tensors it writes in place are put back as they were before the step.

A training step updates its parameters one after the other (``p -= lr * p.grad``); the interpreter checks the
deadline every few ops, so a cut between two updates left a model that no number of whole SGD steps gives
(some parameters one step ahead of the others, gradients left set). The values and gradients of the state are
copied before each step of a plan that may write them, and restored if the step does not finish.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from veil.plans import aliasing
from veil.plans.ops import PlanSpec

#: ops that write gradients (``backward`` accumulates into ``.grad``; ``.grad`` set or cleared)
_GRAD_WRITES = re.compile(r"backward|\.grad\.|autograd")


def writes_state(spec: PlanSpec) -> bool:
    """Whether a step of the plan may change its state tensors or their gradients (decided once per plan)."""
    known = spec.__dict__.get("_writes_state")
    if known is None:
        groups = spec.__dict__.get("_alias_groups") or aliasing.alias_groups(spec)
        known = spec.n_state > 0 and (aliasing.shared_write(spec, groups, state=True) is not None
                                      or any(_GRAD_WRITES.search(op.op) for op in spec.ops))
        spec.__dict__["_writes_state"] = known
    return known


def snapshot(tensors: list) -> list:
    """Copies of the values and gradients of ``tensors`` (dense ones: a plan cannot resize a sparse one)."""
    taken = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.layout is torch.strided:
            grad = t.grad
            taken.append((t, t.detach().clone(), grad, None if grad is None else grad.detach().clone()))
    return taken


def restore(taken: list) -> None:
    """Puts every tensor of :func:`snapshot` back: the same objects (pointers to them stay valid), their values
    copied back (or the copy taken whole where the step resized it), their gradients as they were."""
    with torch.no_grad():
        for t, value, grad, grad_value in taken:
            if t.shape == value.shape and t.dtype == value.dtype:
                t.copy_(value)
            else:
                t.set_(value)
            if grad is not None:
                if grad.shape == grad_value.shape:
                    grad.copy_(grad_value)
                else:
                    grad.set_(grad_value)
            t.grad = grad


def run_step(run: Any, tensors: list, undo: bool) -> Any:
    """``run()`` with ``tensors`` restored if it raises (``undo``: the plan may write them)."""
    if not undo:
        return run()
    taken = snapshot(tensors)
    try:
        return run()
    except BaseException:
        restore(taken)
        raise
