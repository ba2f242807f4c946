"""Runs a PlanSpec: the same code path locally and on a worker.

``compile_plan`` validates every op against the allowlist once (when the plan
arrives) and resolves names to callables, so running a plan costs one Python
call per op plus argument substitution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from veil.exceptions import (CommandTimeoutError, OperationNotAllowedError, RemoteExecutionError, SerializationError,
                             VeilError)
from veil.messaging.allowlist import ALLOWLIST
from veil.plans.ops import BatchSize, PlanSpec, SlotRef
from veil.tensors.tree import leaves
from veil.workers import cancellation, output_pieces
from veil.workers.value_shapes import ShapeRefused


def _has_slots(value: Any) -> bool:
    return bool(leaves(value, SlotRef))


def _rows(slots: list) -> int:
    first = slots[0]
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise RemoteExecutionError("the plan's sizes follow the rows of its first input, which has none")
    return first.shape[0]


def _fill(value: Any, slots: list) -> Any:
    tp = type(value)
    if tp is SlotRef:
        return slots[value.slot]
    if tp is BatchSize:
        return value.scale * _rows(slots)
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
    # flat arguments (slots and constants, no nesting): a template filled at (position, slot) pairs
    flat: tuple | None = None  # (args template, [(position, slot)], kwargs template, [(name, slot)])


@dataclass
class CompiledPlan:
    spec: PlanSpec
    ops: list
    # per op, what run() reads (a tuple: no attribute lookups in the loop):
    # (kind, func, direct slots | flat template | None, out_slots, grad_enabled)
    steps: list = None  # type: ignore[assignment]


_D1, _D2, _D3, _DIRECT, _FLAT, _NESTED = 0, 1, 2, 3, 4, 5
_NOT_FLAT = (tuple, list, dict, BatchSize)  # (filled by _fill)


def _flat_template(args: tuple, kwargs: dict) -> tuple | None:
    """The fill-in form of arguments that are slots or constants, none nested in a container."""
    if any(type(a) in _NOT_FLAT for a in args) or any(type(v) in _NOT_FLAT for v in kwargs.values()):
        return None
    arg_slots = [(i, a.slot) for i, a in enumerate(args) if type(a) is SlotRef]
    kw_slots = [(k, v.slot) for k, v in kwargs.items() if type(v) is SlotRef]
    return tuple(args), arg_slots, dict(kwargs), kw_slots


def compile_plan(spec: PlanSpec) -> CompiledPlan:
    """Checks every op against the allowlist and every slot reference against the plan's size."""
    compiled, steps = [], []
    for op in spec.ops:
        entry = ALLOWLIST.by_name(op.op)
        if entry.worker_function:
            raise OperationNotAllowedError(f"plan {spec.name!r}: {op.op} cannot be part of a plan")
        for ref in leaves((op.args, op.kwargs), SlotRef):
            if ref.slot >= spec.n_slots:
                raise SerializationError(f"plan {spec.name!r}: {op.op} reads slot {ref.slot} of {spec.n_slots}")
        if spec.n_inputs == 0 and leaves((op.args, op.kwargs), BatchSize):
            raise SerializationError(f"plan {spec.name!r}: {op.op} takes a batch size, but the plan has no input")
        direct = None
        if not op.kwargs and op.args and all(type(a) is SlotRef for a in op.args):
            direct = tuple(a.slot for a in op.args)
        flat = None if direct is not None else _flat_template(op.args, op.kwargs)
        c = CompiledOp(op.op, entry.func, op.args, op.kwargs, op.out_slots, op.grad_enabled, direct, flat)
        compiled.append(c)
        func = c.func if op.op not in output_pieces.PIECE_OPS else _pieces_bounded(c.func, op.op, op.out_slots)
        if direct is not None:
            # one, two or three slot arguments (nearly every op of a model) read without building a list
            kind = (_D1, _D2, _D3)[len(direct) - 1] if len(direct) <= 3 else _DIRECT
            steps.append((kind, func, direct, list(op.out_slots), bool(op.grad_enabled), c))
        elif flat is not None:
            steps.append((_FLAT, func, flat, list(op.out_slots), bool(op.grad_enabled), c))
        else:
            steps.append((_NESTED, func, None, list(op.out_slots), bool(op.grad_enabled), c))
    return CompiledPlan(spec, compiled, steps)


class PlanArgumentError(RemoteExecutionError):
    """A plan command's own arguments are wrong (how many inputs, a batch size, row counts: what the requester
    sent and sees, never a value): value-free, so the requester reads what is wrong on owner data too, where
    any other failure is a ProtectedDataError. Travels as RemoteExecutionError."""

    value_free = True


class Refusal(VeilError):
    """Raised by a size check to refuse an op with a value-free error (a quota's) that the caller of run() gets
    as it is, not wrapped as the plan's failure (which a worker shows as ProtectedDataError on owner data).
    Control flow inside run(): it never leaves it (run raises ``.error``)."""

    def __init__(self, error: VeilError) -> None:
        super().__init__(str(error))
        self.error = error


def _pieces_bounded(func: Callable, name: str, out_slots: Any) -> Callable:
    """``func`` (a split, chunk or unbind: a tensor per piece) refused before it runs when it would return more
    tensors than the op has result slots (veil/workers/output_pieces.py ``check_pieces``: the count follows a
    dimension's length or an argument, not the input's bytes; one small plan made 10^9 empty tensors)."""
    slots = list(out_slots) if type(out_slots) in (list, tuple) else []

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            output_pieces.check_pieces(name, args, kwargs, slots)
        except RemoteExecutionError as e:
            raise Refusal(PlanArgumentError(f"in a plan: {e}")) from None
        return func(*args, **kwargs)
    return call


def _sized(func: Callable, name: str, size_check: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        size_check(name, func, args, kwargs)
        return func(*args, **kwargs)
    return call


#: ops between two checks of the running command's deadline (a check costs a clock read)
CHECK_EVERY = 16
#: how many of a plan's first ops ran since a failed command's walk last checked its constants
#: (veil/workers/storage_overrun.py: only a run reaches them, and only the ops it ran); absent: never walked
OPS_REACHED = "_ops_reached"


def _note_reached(plan: CompiledPlan, last: CompiledOp) -> None:
    """Notes that the plan's ops ran up to ``last`` (the one that failed, or the last one)."""
    ops = plan.ops
    n = len(ops) if last is ops[-1] else next(i for i, c in enumerate(ops) if c is last) + 1
    spec = plan.spec
    spec.__dict__[OPS_REACHED] = max(spec.__dict__.get(OPS_REACHED, 0), n)


def run(plan: CompiledPlan, inputs: list, state: list, size_check: Callable | None = None) -> Any:
    """Runs the plan; ``size_check(name, func, args, kwargs)``, if given, before every op (a worker with a
    session quota refuses an op whose result would not fit before it allocates: veil/workers/output_bounds.py)."""
    spec = plan.spec
    if len(inputs) != spec.n_inputs or len(state) != spec.n_state:
        raise PlanArgumentError(
            f"plan {spec.name!r} takes {spec.n_inputs} inputs and {spec.n_state} state tensors, "
            f"got {len(inputs)} and {len(state)}"
        )
    cancellation.check()  # a worker's per-command deadline / disconnect (once per execution: per batch in fit)
    # ... and every CHECK_EVERY ops within it: one step of thousands of ops must not run far past the deadline
    token, countdown = cancellation.current_token(), CHECK_EVERY
    slots: list = [None] * spec.n_slots
    slots[: spec.n_inputs] = inputs
    slots[spec.n_inputs : spec.n_inputs + spec.n_state] = state
    outer_mode = grad_mode = torch.is_grad_enabled()
    op = None
    try:
        steps = plan.steps if size_check is None else [
            (kind, _sized(func, op.name, size_check), how, outs, grad, op)
            for kind, func, how, outs, grad, op in plan.steps]
        for kind, func, how, outs, grad_enabled, op in steps:
            if token is not None:
                countdown -= 1
                if not countdown:
                    countdown = CHECK_EVERY
                    token.check()
            if grad_enabled is not grad_mode:
                torch.set_grad_enabled(grad_enabled)
                grad_mode = grad_enabled
            if kind == _D1:
                result = func(slots[how[0]])
            elif kind == _D2:
                result = func(slots[how[0]], slots[how[1]])
            elif kind == _D3:
                result = func(slots[how[0]], slots[how[1]], slots[how[2]])
            elif kind == _DIRECT:
                result = func(*[slots[i] for i in how])
            elif kind == _FLAT:
                args, arg_slots, kwargs, kw_slots = how
                if arg_slots:
                    args = list(args)
                    for pos, i in arg_slots:
                        args[pos] = slots[i]
                if kw_slots:
                    kwargs = dict(kwargs)
                    for name, i in kw_slots:
                        kwargs[name] = slots[i]
                result = func(*args, **kwargs)
            else:
                result = func(*_fill(op.args, slots), **_fill(op.kwargs, slots))
            if len(outs) == 1 and isinstance(result, torch.Tensor):
                slots[outs[0]] = result
            elif outs:
                for slot, t in zip(outs, leaves(result)):
                    if slot >= 0:
                        slots[slot] = t
    except Refusal as r:
        raise r.error from None
    except (CommandTimeoutError, ShapeRefused):  # (CommandCancelledError too)
        raise  # the worker's limit, as between batches, or a value-free refusal (not the plan's failure)
    except Exception as e:
        raise RemoteExecutionError(f"plan {spec.name!r} failed at {op.name if op else '?'}: "
                                   f"{type(e).__name__}: {e}") from e
    finally:
        torch.set_grad_enabled(outer_mode)
        if op is not None and OPS_REACHED in spec.__dict__:  # (absent: the next walk checks every constant)
            _note_reached(plan, op)
    return _fill(spec.outputs, slots)
