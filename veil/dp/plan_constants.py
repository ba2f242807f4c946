"""Constant-creating ops (``torch.full``, ``zeros``, ``ones``, ``arange``, ``eye``, ``*_like``) in DP plans.

Such an op reads any tensor among its sizes or fill value into a Python number when it runs, so its
meta-device sizing cannot see that number and the DP dry run used to refuse it as value-sized. What
matters for privacy is where the number comes from:

- from the plan's constants or its parameters and buffers (the data scientist's values, the same for
  every record): the result is the same for every record, so the op is accepted, and sized with the
  number itself (:func:`public_scalars`);
- from the record (any slot computed from the plan's input): a size would follow the data's values, a fill
  value would be read out of a record, so the plan is refused before any charge (:func:`check_plan`).

Which slots hold record values is decided from the plan alone (:func:`record_slots`). An in-place write
reaches every tensor that may share the written one's storage (:mod:`veil.plans.aliasing`). A plan that
writes in place into anything aliasing its parameters, buffers or constants is refused (:func:`check_plan`): the records share them, so one record's result would follow the
records run before it, and the plan object would keep owner values after the release.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.dp.errors import PrivacyParameterError
from veil.plans import aliasing
from veil.plans.ops import PlanSpec, SlotRef
from veil.tensors.tree import leaves

#: creation op -> how many leading positional arguments only give a shape and dtype (``*_like``'s input:
#: a record's shape is public); every other argument is a size or a fill value
CREATION_OPS: dict[str, int] = {
    "torch.full": 0, "torch.zeros": 0, "torch.ones": 0, "torch.arange": 0, "torch.eye": 0,
    "torch.full_like": 1, "torch.zeros_like": 1, "torch.ones_like": 1, "torch.empty_like": 1,
}


def _value_args(op: Any) -> tuple:
    """The arguments of a creation op that are sizes or fill values."""
    return (op.args[CREATION_OPS[op.op]:], op.kwargs)


def _slots(value: Any) -> list[int]:
    return [ref.slot for ref in leaves(value, SlotRef)]


def record_slots(spec: PlanSpec) -> tuple[set[int], bool]:
    """The slots that may hold values computed from the record (the plan's inputs, every result of an op that
    reads one, every slot that may alias one written with such values), and whether some op writes such values
    in place while also reading a slot not among them."""
    groups = aliasing.alias_groups(spec)
    slots: set[int] = set(range(spec.n_inputs))  # computed from the record
    written_groups: set = set()  # storage a record's values were written into

    def tainted(s: int) -> bool:
        return s in slots or groups.find(s) in written_groups

    leaked = False
    for op in spec.ops:
        read = _slots((op.args, op.kwargs))
        if not any(tainted(s) for s in read):
            continue
        written = aliasing.written_args(op)
        if written and not all(tainted(s) for s in read):
            leaked = True
        written_groups.update(groups.find(aliasing.key(v)) for v in written)
        slots.update(s for s in op.out_slots if s >= 0)
    return {s for s in range(spec.n_slots) if tainted(s)}, leaked


def check_plan(spec: PlanSpec) -> None:
    """Refuses (PrivacyParameterError) a plan writing into its parameters, buffers or constants, and a creation
    op whose size or fill value comes from the record."""
    op = aliasing.shared_write(spec, aliasing.alias_groups(spec))
    if op is not None:
        raise PrivacyParameterError(
            f"plan {spec.name!r} writes into its parameters or buffers in place ({op}, or a constant or a view "
            f"of one); a DP forward pass must leave them as they are: every record shares them (a BatchNorm in "
            f"training mode updates its running statistics: trace the model after model.eval())")
    tainted, leaked = record_slots(spec)
    for op in spec.ops:
        if op.op not in CREATION_OPS:
            continue
        read = _slots(_value_args(op))
        if any(s in tainted for s in read) or (leaked and read):
            raise PrivacyParameterError(
                f"plan {spec.name!r} uses {op.op} with a size or fill value computed from the record: a size "
                f"would follow the data's values (and a fill value be read out of a record); give it plain "
                f"numbers or the model's own tensors, or use torch.zeros_like(x) + value for a computed fill")


def public_scalars(name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments of a creation op (already accepted by :func:`check_plan`) with each one-element tensor
    size or fill value replaced by its number, so that the op can be sized on meta; other ops unchanged."""
    skip = CREATION_OPS.get(name)
    if skip is None:
        return args, kwargs

    def number(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return v.detach().reshape(()).item()
        if isinstance(v, (list, tuple)):
            return type(v)(number(x) for x in v)
        return v

    return (*args[:skip], *(number(a) for a in args[skip:])), {k: number(v) for k, v in kwargs.items()}
