"""Plans that follow the batch size of their input instead of baking in the one they were traced on.

Tracing records Python numbers as they were: ``x.view(x.shape[0], -1)`` traced on 32 rows replays as
``view(32, -1)``, which fails on the last, shorter batch of a ``fit``, and ``x.sum() / x.shape[0]`` silently
divides a 20-row batch by 32. A plan is therefore traced a second time on one more row (:func:`second_examples`)
and the two op lists are merged (:func:`merge`): a number that is ``k`` times the rows in both becomes
:class:`~veil.plans.ops.BatchSize` (filled in from the first input when the plan runs); any other difference
(a float such as ``1 / x.shape[0]``, a constant tensor, another op list) is refused at build time, in one line,
since no worker could replay it on another batch.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.exceptions import VeilError
from veil.messaging.allowlist import ALLOWLIST
from veil.plans.ops import BatchSize, PlanOp, PlanSpec, SlotRef

_FULL = ALLOWLIST.by_func(torch.full).name


class BatchDependentPlanError(VeilError, ValueError):
    """A plan depends on the batch size of its example in a way a worker cannot replay on another batch."""


def rows_of(example_args: tuple) -> int | None:
    """The batch size of the examples (rows of the first), or None when the first is not a batched tensor."""
    first = example_args[0] if example_args else None
    if not isinstance(first, torch.Tensor) or first.dim() == 0 or first.shape[0] == 0:
        return None
    return first.shape[0]


def second_examples(example_args: tuple, rows: int, batched: tuple | None) -> tuple:
    """The examples with one more row (the first row again) in each batched input: those at the indices
    ``batched``, or (None) every tensor with ``rows`` rows."""
    out = []
    for i, a in enumerate(example_args):
        grow = isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == rows
        if batched is not None:
            grow = grow and i in batched
        if grow:
            a = torch.cat([a, a[:1]]).detach().requires_grad_(a.requires_grad)
        out.append(a)
    return tuple(out)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def _uniform(t: torch.Tensor) -> Any:
    """The one value every element of ``t`` holds (0 when it has none), or None."""
    if t.numel() == 0:
        return False if t.dtype == torch.bool else 0
    flat = t.reshape(-1)
    first = flat[0]
    same = (flat == first) | (torch.isnan(flat) & bool(torch.isnan(first))) if t.dtype.is_floating_point \
        else flat == first
    return first.item() if bool(same.all()) else None


class _Merge:
    def __init__(self, name: str, rows: tuple[int, int], n_slots: int) -> None:
        self.name, (self.n1, self.n2) = name, rows
        self.where = "?"
        self.n_slots = n_slots
        self.pending: list[PlanOp] = []  # creation ops to run before the op being merged

    def filled(self, a: torch.Tensor, b: torch.Tensor) -> SlotRef | None:
        """A constant made outside the traced tensors (``torch.zeros(x.shape[0], 8)``: only Python numbers, so
        not recorded) whose rows follow the batch and whose elements all hold one value: made in the plan
        instead, by ``torch.full`` of the batch's size, into a new slot; None if ``a``/``b`` are not such."""
        if a.dtype != b.dtype or a.dim() != b.dim() or a.dtype.is_complex or a.requires_grad:
            return None
        size = tuple(self.value(x, y) for x, y in zip(a.shape, b.shape))
        value, other = _uniform(a), _uniform(b)
        if value is None or other is None or not (value == other or (value != value and other != other)):
            return None
        slot, self.n_slots = self.n_slots, self.n_slots + 1
        self.pending.append(PlanOp(_FULL, (size, value), {"dtype": a.dtype}, [slot], False))
        return SlotRef(slot)

    def refuse(self, a: Any, b: Any) -> BatchDependentPlanError:
        text = lambda v: f"a tensor of shape {list(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)[:40]
        return BatchDependentPlanError(
            f"plan {self.name!r} depends on its example's batch size in a way a worker cannot replay on another "
            f"batch ({self.where}: {text(a)} on {self.n1} rows, {text(b)} on {self.n2}); take sizes from -1 "
            f"(x.view(-1, 4), x.flatten(1)) or x.shape[0] as a whole, and x.mean() rather than 1 / x.shape[0]; or "
            f"build(..., fixed_batch=True) for a plan only ever run on this batch size")

    def value(self, a: Any, b: Any) -> Any:
        if type(a) is not type(b) and not (isinstance(a, tuple) and isinstance(b, tuple)):
            raise self.refuse(a, b)
        if isinstance(a, torch.Tensor):
            if _same_tensor(a, b):
                return a
            made = self.filled(a, b)
            if made is None:
                raise self.refuse(a, b)
            return made
        if isinstance(a, (list, tuple)):
            if len(a) != len(b):
                raise self.refuse(a, b)
            merged = [self.value(x, y) for x, y in zip(a, b)]
            if type(a) is list:
                return merged
            return tuple(merged) if type(a) is torch.Size or type(a) is tuple else type(a)(merged)
        if isinstance(a, dict):
            if list(a) != list(b):
                raise self.refuse(a, b)
            return {k: self.value(a[k], b[k]) for k in a}
        if type(a) is int:
            if a == b:
                return a
            scale = a // self.n1
            if scale >= 1 and a == scale * self.n1 and b == scale * self.n2:
                return BatchSize(scale)
            raise self.refuse(a, b)
        if type(a) is float and a != a and b != b:  # (NaN)
            return a
        if a != b:
            raise self.refuse(a, b)
        return a


def merge(first: PlanSpec, second: PlanSpec, rows: tuple[int, int]) -> PlanSpec:
    """``first`` (traced on ``rows[0]`` rows) with every number that follows the rows replaced by BatchSize;
    raises BatchDependentPlanError where ``second`` (on ``rows[1]``) differs otherwise."""
    m = _Merge(first.name, rows, first.n_slots)
    if (len(first.ops) != len(second.ops) or first.n_slots != second.n_slots
            or [o.op for o in first.ops] != [o.op for o in second.ops]):
        m.where = "its ops"
        raise m.refuse(f"{len(first.ops)} ops", f"{len(second.ops)} ops")
    ops = []
    for a, b in zip(first.ops, second.ops):
        m.where = a.op
        if a.out_slots != b.out_slots or a.grad_enabled != b.grad_enabled:
            raise m.refuse(a.out_slots, b.out_slots)
        args, kwargs = m.value(tuple(a.args), tuple(b.args)), m.value(a.kwargs, b.kwargs)
        ops += m.pending
        m.pending = []
        ops.append(PlanOp(a.op, tuple(args), kwargs, a.out_slots, a.grad_enabled))
    m.where = "its outputs"
    outputs = m.value(first.outputs, second.outputs)
    if any(not isinstance(v, SlotRef) for v in _flat(outputs) if v is not None):
        raise m.refuse(first.outputs, second.outputs)
    return PlanSpec(first.name, first.n_inputs, first.n_state, m.n_slots, ops, outputs)


def _flat(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    return [value]

