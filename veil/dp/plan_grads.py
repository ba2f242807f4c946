"""Per-sample gradients of a *plan* (a traced forward pass), for owner-side DP-SGD.

A data owner's worker receives the model as data: a :class:`veil.plans.ops.PlanSpec`
(``sy.Plan(model)``, validated against the allowlist when it arrives), the
parameter values, and the name of a loss from :data:`LOSSES`. It never runs
code sent by the data scientist. Per-sample gradients come from
``torch.func``: ``vmap(grad(loss of one record))`` over the plan interpreter
so each record is run through the plan *alone* (a batch of one). Whatever ops
the plan contains, one record's gradient cannot depend on another record,
which is what the clipping bound (and so the privacy proof) needs.

The gradients come from the one per-sample engine, :mod:`veil.dp.per_sample`
(small lots and plans vmap cannot batch go record by record; the choice
never depends on the data).
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from veil.dp import per_sample, plan_constants
from veil.dp.core import OWNER_LOG
from veil.dp.errors import PrivacyParameterError
from veil.plans import interpreter
from veil.plans.ops import PlanSpec, SlotRef
from veil.tensors.tree import leaves
from veil.workers import output_bounds
from veil.workers.quiet_warnings import DROPPED

# A per-record loss: (output [1, ...], target [1, ...]) -> scalar.
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y.to(out.dtype)).pow(2).sum()


def _absolute_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y.to(out.dtype)).abs().sum()


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # A label outside the output's width (public) would raise, under vmap for the whole lot: every record
    # computes the loss of a label clamped into range, and one whose label was not in range contributes 0
    # (the same ops for every record, no branch on the value).
    logits = out.reshape(1, -1)
    label = y.reshape(1).long()
    valid = (label >= 0) & (label < logits.shape[1])
    loss = F.cross_entropy(logits, label.clamp(0, logits.shape[1] - 1))
    return torch.where(valid[0], loss, torch.zeros_like(loss))


def _bce_with_logits(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out.reshape(-1), y.reshape(-1).to(out.dtype), reduction="sum")


#: The losses a worker computes, by wire name (an explicit registry: losses are data, never code).
LOSSES: dict[str, Loss] = {
    "mse": _squared_error,  # squared error summed over the record's outputs
    "l1": _absolute_error,
    "cross_entropy": _cross_entropy,
    "bce_with_logits": _bce_with_logits,
}

# Ops that would make a "forward pass" do something else (train, touch .grad).
_FORBIDDEN = frozenset({"Tensor.backward", "Tensor.grad.__get__", "Tensor.grad.__set__"})


def loss_by_name(name: object) -> Loss:
    """The registered loss ``name``, or a clear error naming the choices."""
    loss = LOSSES.get(name) if isinstance(name, str) else None
    if loss is None:
        raise PrivacyParameterError(f"unknown loss {name!r}; the worker computes one of {sorted(LOSSES)}")
    return loss


def check_forward_plan(spec: PlanSpec, n_state: int) -> interpreter.CompiledPlan:
    """Validates that ``spec`` is a forward pass ``x -> output`` over ``n_state`` parameters."""
    if not isinstance(spec, PlanSpec):
        raise PrivacyParameterError(f"expected a plan (sy.Plan(model)) as the architecture, got {type(spec).__name__}")
    if spec.n_inputs != 1 or spec.n_state != n_state:
        raise PrivacyParameterError(
            f"plan {spec.name!r} takes {spec.n_inputs} inputs and {spec.n_state} state tensors; a DP gradient "
            f"request needs a forward plan of one input (the data) and {n_state} parameters")
    bad = sorted({op.op for op in spec.ops} & _FORBIDDEN)
    if bad:
        raise PrivacyParameterError(f"plan {spec.name!r} is not a forward pass: it uses {', '.join(bad)}")
    plan_constants.check_plan(spec)
    compiled = spec.__dict__.get("_compiled")  # set by the worker's store validator
    return compiled if compiled is not None else interpreter.compile_plan(spec)


def per_sample_gradients(plan: interpreter.CompiledPlan, state: Sequence[torch.Tensor], trainable: Sequence[bool],
                         x: torch.Tensor, y: torch.Tensor, loss: Loss, strict: bool = False,
                         strategy: Optional[str] = None, size_check: Optional[Callable] = None) -> list[torch.Tensor]:
    """Gradients of ``loss(plan(x_i), y_i)`` w.r.t. the trainable state, one per record.

    Computed by the one per-sample engine (:func:`veil.dp.per_sample.record_gradients`).
    A record the plan fails on contributes zeros after the same work as any
    other (recomputed on a zero record of the public shape), unless ``strict``
    (the dry run on a dummy record, whose error may be shown to the requester; it also refuses an op
    whose result size would follow the values, :func:`_refusing_value_sized`).

    Args:
        strategy: ``"vmap"`` or ``"loop"``; by default chosen from the lot size
            and a dry run on a dummy record (:func:`veil.dp.per_sample.choose_strategy`).
        size_check: sizes each plan op before it runs (``veil.plans.interpreter.run``: a session quota's
            ``Budget``); given for the dry run, whose one record then says what a record holds.

    Returns:
        One tensor ``[B, *param.shape]`` per trainable state tensor, in order.
    """
    train_idx = [i for i, t in enumerate(trainable) if t]
    frozen = [s.detach() for s in state]
    if strict:  # the dry run: every op is seen with the dtypes and shapes every record will give it
        size_check = _refusing_value_sized(plan.spec.name, size_check, _fixed_tensors(plan.spec, frozen))

    def one(params: tuple, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        full = list(frozen)
        for i, p in zip(train_idx, params):
            full[i] = p
        out = interpreter.run(plan, [xi.unsqueeze(0)], full, size_check)
        if not isinstance(out, torch.Tensor):
            raise PrivacyParameterError(f"plan {plan.spec.name!r} must return one tensor (the model output)")
        return loss(out, yi.unsqueeze(0))

    params = tuple(frozen[i] for i in train_idx)
    dummy = (torch.zeros(x.shape[1:], dtype=x.dtype), torch.zeros(y.shape[1:], dtype=y.dtype))
    versions = [t._version for t in frozen]
    # the requester's plan, its warnings dropped (under an owner's "error" filter one failed a record, or the lot)
    with DROPPED:
        if strategy is None:
            # A plan that indexes or divides by values may raise on one record; under vmap that
            # fails the whole lot (and a redo would time it), so such plans go record by record.
            strategy = "loop" if values_may_raise(plan.spec) else \
                per_sample.choose_strategy(one, params, dummy, lot_size=len(x))
        grads = per_sample.record_gradients(one, params, (x, y), strategy=strategy, strict=strict, dummy=dummy,
                                            on_failure=_log_failure)
    if strict and [t._version for t in frozen] != versions:
        # The records share the state tensors: a plan writing into them would let one record's gradient
        # depend on the records run before it (the clipping bound, so the privacy proof, would not hold).
        raise PrivacyParameterError(f"plan {plan.spec.name!r} writes into its parameters or buffers in place; "
                                    f"a DP forward pass must leave them as they are (a BatchNorm in training "
                                    f"mode updates its running statistics: trace the model after model.eval())")
    return grads


def _fixed_tensors(spec: PlanSpec, frozen: Sequence[torch.Tensor]) -> frozenset:
    """Ids of the tensors every record's run sees alike: the plan's constants and its frozen state (a mask
    among them selects the same count for every record: ``x[:, torch.tensor([True, False, True])]``)."""
    found = [id(t) for t in frozen]
    for op in spec.ops:
        for value in (*op.args, *op.kwargs.values()):
            found += [id(t) for t in leaves(value, torch.Tensor)]
    return frozenset(found)


def _refusing_value_sized(name: str, size_check: Optional[Callable], fixed: frozenset = frozenset()) -> Callable:
    """The dry run's check before each op: refuses (PrivacyParameterError, before any charge) an op whose
    result's size, so the work of every later op and the release's time, would follow a record's values
    (``nonzero``, ``masked_select``, ``unique``, ``x[mask]``, ``repeat_interleave`` by a tensor, ``one_hot``
    without ``num_classes``: :func:`veil.workers.output_bounds.value_sized`); then ``size_check``, if any."""

    def check(op: str, func: Callable, args: tuple, kwargs: dict) -> None:
        # (a creation op's tensor size or fill value is the model's own, check_forward_plan saw to that)
        args, kwargs = plan_constants.public_scalars(op, args, kwargs)
        why = _VALUE_TIMED_WHY if _VALUE_TIMED.search(op) else output_bounds.value_sized(op, func, args, kwargs, fixed)
        if why is not None:
            raise PrivacyParameterError(
                f"plan {name!r} uses {op} ({why}): its result's size, so the release's time, would follow "
                f"the data's values; a DP plan keeps fixed shapes (torch.where(mask, x, 0) for x[mask], "
                f"one_hot(..., num_classes=), repeat_interleave(..., output_size=))")
        if size_check is not None:
            size_check(op, func, args, kwargs)

    return check


# Ops that can raise on the *values* of a computed tensor argument (an index out of
# range, an integer division by zero, an integer to a negative power, a label outside the logits).
# _ANY_ARGUMENT raise on the values of any of theirs (a probability outside [0, 1]), _INDEX_FIRST take
# the indices as their first argument.
_VALUE_RAISING = re.compile(r"getitem|setitem|index|gather|take|scatter|floordiv|floor_divide|__mod__|__rmod__|"
                            r"remainder|fmod|repeat_interleave|pow|nll_loss|(?<!binary_)cross_entropy|"
                            r"multilabel|margin")
_INDEX_FIRST = re.compile(r"embedding|one_hot|bincount|multinomial")
# Ops whose amount of work follows the values at fixed shapes (a comparison sort of equal keys is ~6x faster
# than of distinct ones): refused in DP plans like the value-sized ones.
_VALUE_TIMED = re.compile(r"(?:^|\.)(?:arg|m)?sort(?:\.|$)|median|topk|kthvalue|quantile|(?:^|\.)mode(?:\.|$)")
_VALUE_TIMED_WHY = "a sort or selection: its work follows the order of the values"
_ANY_ARGUMENT = re.compile(r"bernoulli|binary_cross_entropy(?!_with_logits)|__rpow__|poisson|multinomial")


def _has_slot(value: object) -> bool:
    if isinstance(value, SlotRef):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_slot(v) for v in value)
    if isinstance(value, dict):
        return any(_has_slot(v) for v in value.values())
    return False


def _may_raise(op: object) -> bool:
    name = op.op
    if _INDEX_FIRST.search(name) or _ANY_ARGUMENT.search(name):
        return _has_slot(op.args) or _has_slot(op.kwargs)
    if _VALUE_RAISING.search(name) or ("div" in name and "rounding_mode" in op.kwargs):
        reflected = name.rsplit(".", 1)[-1].startswith("__r")  # 7 // d: the divisor is the first argument
        return _has_slot(op.args if reflected else op.args[1:]) or _has_slot(op.kwargs)
    return False


def values_may_raise(spec: PlanSpec) -> bool:
    """Whether some op of the plan may raise depending on data values (decided from the plan alone)."""
    return any(_may_raise(op) for op in spec.ops)


def _log_failure(e: BaseException) -> None:
    # Like a NaN gradient (see veil.dp.core), a failure is a property of that record
    # alone, so replacing it by zero is a per-record map and the release stays DP.
    OWNER_LOG.info("a DP gradient plan failed on one protected record (%s); it contributes zero",
                   type(e).__name__)
