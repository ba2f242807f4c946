"""Runs a PlanSpec: the same code path locally and on a worker.

``compile_plan`` validates every op against the allowlist once (when the plan
arrives) and resolves names to callables, so running a plan costs one Python
call per op plus argument substitution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from veil.exceptions import OperationNotAllowedError, RemoteExecutionError, SerializationError
from veil.messaging.allowlist import ALLOWLIST
from veil.plans.ops import PlanSpec, SlotRef
from veil.tensors.tree import leaves
from veil.workers import cancellation


def _has_slots(value: Any) -> bool:
    return bool(leaves(value, SlotRef))


def _fill(value: Any, slots: list) -> Any:
    tp = type(value)
    if tp is SlotRef:
        return slots[value.slot]
    if tp is tuple or tp is list:
        return tp(_fill(v, slots) for v in value)
    if tp is dict:
        return {k: _fill(v, slots) for k, v in value.items()}
    return value


@dataclass
class CompiledOp:
    name: str
    func: Callable[..., Any]
    args: tuple
    kwargs: dict
    out_slots: list
    grad_enabled: bool
    direct: tuple | None  # slot indices when every argument is a plain slot (fast path)


@dataclass
class CompiledPlan:
    spec: PlanSpec
    ops: list


def compile_plan(spec: PlanSpec) -> CompiledPlan:
    """Checks every op against the allowlist and every slot reference against the plan's size."""
    compiled = []
    for op in spec.ops:
        entry = ALLOWLIST.by_name(op.op)
        if entry.worker_function:
            raise OperationNotAllowedError(f"plan {spec.name!r}: {op.op} cannot be part of a plan")
        for ref in leaves((op.args, op.kwargs), SlotRef):
            if ref.slot >= spec.n_slots:
                raise SerializationError(f"plan {spec.name!r}: {op.op} reads slot {ref.slot} of {spec.n_slots}")
        direct = None
        if not op.kwargs and op.args and all(type(a) is SlotRef for a in op.args):
            direct = tuple(a.slot for a in op.args)
        compiled.append(CompiledOp(op.op, entry.func, op.args, op.kwargs, op.out_slots, op.grad_enabled, direct))
    return CompiledPlan(spec, compiled)


def run(plan: CompiledPlan, inputs: list, state: list) -> Any:
    spec = plan.spec
    if len(inputs) != spec.n_inputs or len(state) != spec.n_state:
        raise RemoteExecutionError(
            f"plan {spec.name!r} takes {spec.n_inputs} inputs and {spec.n_state} state tensors, "
            f"got {len(inputs)} and {len(state)}"
        )
    cancellation.check()  # a worker's per-command deadline / disconnect (once per execution: per batch in fit)
    slots: list = [None] * spec.n_slots
    slots[: spec.n_inputs] = inputs
    slots[spec.n_inputs : spec.n_inputs + spec.n_state] = state
    outer_mode = grad_mode = torch.is_grad_enabled()
    try:
        for op in plan.ops:
            if op.grad_enabled != grad_mode:
                torch.set_grad_enabled(op.grad_enabled)
                grad_mode = op.grad_enabled
            if op.direct is not None:
                result = op.func(*[slots[i] for i in op.direct])
            else:
                result = op.func(*_fill(op.args, slots), **_fill(op.kwargs, slots))
            outs = op.out_slots
            if len(outs) == 1 and isinstance(result, torch.Tensor):
                slots[outs[0]] = result
            elif outs:
                for slot, t in zip(outs, leaves(result)):
                    if slot >= 0:
                        slots[slot] = t
    except Exception as e:
        raise RemoteExecutionError(f"plan {spec.name!r} failed at {op.name}: {type(e).__name__}: {e}") from e
    finally:
        torch.set_grad_enabled(outer_mode)
    return _fill(spec.outputs, slots)
