"""A plan step is all or nothing for the requester's tensors: cut part-way (by the worker's deadline, a quota, an
op's error), the tensors it writes in place are put back as they were before the step.

A training step updates its parameters one after the other (``p -= lr * p.grad``); the interpreter checks the
deadline every few ops, so a cut between two updates left a model that no number of whole SGD steps gives
(some parameters one step ahead of the others, gradients left set). The values and gradients of what a step of
the plan may write (its state, and its inputs: ``fit``'s ``extra`` momentum buffers) are copied before each step
and restored if the step does not finish. The copy is taken once per tensor, however many slots it is passed
as, and sized against the session quota beside the step's ops.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from veil.plans import aliasing
from veil.plans.ops import PlanSpec

#: ops that write gradients (``backward`` accumulates into ``.grad``; ``.grad`` set or cleared)
_GRAD_WRITES = re.compile(r"backward|\.grad\.|autograd")


def undo_plan(spec: PlanSpec) -> tuple[frozenset, bool] | None:
    """What a step of the plan may write among its inputs and state: (the slots whose values it may write in
    place or through a view, whether it may write their gradients); None if nothing (decided once per plan)."""
    if "_undo" not in spec.__dict__:
        groups = spec.__dict__.get("_alias_groups") or aliasing.alias_groups(spec)
        written = {groups.find(aliasing.key(v)) for op in spec.ops for v in aliasing.written_args(op)}
        values = frozenset(i for i in range(spec.n_inputs + spec.n_state) if groups.find(i) in written)
        grads = any(_GRAD_WRITES.search(op.op) for op in spec.ops)
        spec.__dict__["_undo"] = (values, grads) if values or grads else None
    return spec.__dict__["_undo"]


def snapshot(slots: list, undo: tuple[frozenset, bool], budget: Any = None) -> list:
    """Copies of what ``undo`` (:func:`undo_plan`) says a step may write among ``slots`` (the run's inputs, then
    its state): the bytes of each storage once, however many slots or views hold it, with where each tensor
    lies in it, and the gradients (dense tensors: a plan cannot resize a sparse one). ``budget`` (the run's
    session quota, if any) holds their bytes first, or refuses the step."""
    values, grads = undo
    chosen: dict = {}
    for i, t in enumerate(slots):
        if isinstance(t, torch.Tensor) and t.layout is torch.strided and (grads or i in values):
            known = chosen.get(id(t))
            chosen[id(t)] = (t, i in values or (known is not None and known[1]))
    storages: dict = {}
    taken = []
    for t, copy_value in chosen.values():
        where = None
        if copy_value:
            storage = t.untyped_storage()
            storage = storages.setdefault(storage._cdata, storage)
            where = (storage, storage.nbytes(), t.storage_offset(), t.shape, t.stride())
        taken.append((t, where, t.grad if grads and t.is_leaf else None))
    if budget is not None:
        budget.reserve(sum(s.nbytes() for s in storages.values())
                       + sum(grad.numel() * grad.element_size() for _, _, grad in taken if grad is not None))
    copies = {}
    for key, storage in storages.items():
        copies[key] = torch.empty(storage.nbytes(), dtype=torch.uint8)
        copies[key].untyped_storage().copy_(storage)
    return [(t, None if where is None else copies[where[0]._cdata], grad,
             None if grad is None else grad.detach().clone(), grads and t.is_leaf, where)
            for t, where, grad in taken]


def restore(taken: list) -> None:
    """Puts every tensor of :func:`snapshot` back: the same objects (pointers to them stay valid) over the same
    storages (so views of them, other stored objects among them, read the same), their bytes copied back (a
    storage the step resized first sized back) and each tensor where it lay in it, their gradients as they were."""
    with torch.no_grad():
        done: set = set()
        for t, copy, grad, grad_value, grad_taken, where in taken:
            if copy is not None:
                storage, nbytes, offset, size, stride = where
                if storage._cdata not in done:
                    done.add(storage._cdata)
                    if storage.nbytes() != nbytes:
                        storage.resize_(nbytes)
                    storage.copy_(copy.untyped_storage())
                if (t.untyped_storage()._cdata != storage._cdata or t.storage_offset() != offset or t.shape != size
                        or t.stride() != stride):
                    t.set_(storage, offset, size, stride)
            if not grad_taken:
                continue
            if grad is not None:
                if grad.shape == grad_value.shape:
                    grad.copy_(grad_value)
                else:
                    grad.set_(grad_value)
            t.grad = grad


def run_step(run: Any, slots: list, undo: tuple[frozenset, bool] | None, budget: Any = None) -> Any:
    """``run()`` with what it may write among ``slots`` (inputs, then state) restored if it raises."""
    if undo is None:
        return run()
    taken = snapshot(slots, undo, budget)
    try:
        return run()
    except BaseException:
        restore(taken)
        raise
