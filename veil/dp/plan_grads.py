"""Per-sample gradients of a *plan* (a traced forward pass), for owner-side DP-SGD.

A data owner's worker receives the model as data: a :class:`veil.plans.ops.PlanSpec`
(``sy.Plan(model)``, validated against the allowlist when it arrives), the
parameter values, and the name of a loss from :data:`LOSSES`. It never runs
code sent by the data scientist. Per-sample gradients come from
``torch.func``: ``vmap(grad(loss of one record))`` over the plan interpreter,
so each record is run through the plan *alone* (a batch of one). Whatever ops
the plan contains, one record's gradient cannot depend on another record,
which is what the clipping bound (and so the privacy proof) needs.

Small lots (up to 32 records) skip vmap and differentiate record by record
with plain autograd, which is much faster for small models on CPU; plans
whose ops have no vmap batching rule fall back to one ``torch.func.grad``
call per record. All three give the same per-record gradients.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from veil.dp.core import OWNER_LOG
from veil.dp.errors import PrivacyParameterError
from veil.plans import interpreter
from veil.plans.ops import PlanSpec

# A per-record loss: (output [1, ...], target [1, ...]) -> scalar.
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y.to(out.dtype)).pow(2).sum()


def _absolute_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y.to(out.dtype)).abs().sum()


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(1, -1), y.reshape(1).long())


def _bce_with_logits(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out.reshape(-1), y.reshape(-1).to(out.dtype), reduction="sum")


#: The losses a worker computes, by wire name (an explicit registry: losses are data, never code).
LOSSES: dict[str, Loss] = {
    "mse": _squared_error,  # squared error summed over the record's outputs
    "l1": _absolute_error,
    "cross_entropy": _cross_entropy,
    "bce_with_logits": _bce_with_logits,
}

# Lots up to this size are differentiated record by record (see per_sample_gradients).
_LOOP_MAX = 32

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
    compiled = spec.__dict__.get("_compiled")  # set by the worker's store validator
    return compiled if compiled is not None else interpreter.compile_plan(spec)


def per_sample_gradients(plan: interpreter.CompiledPlan, state: Sequence[torch.Tensor], trainable: Sequence[bool],
                         x: torch.Tensor, y: torch.Tensor, loss: Loss, strict: bool = False) -> list[torch.Tensor]:
    """Gradients of ``loss(plan(x_i), y_i)`` w.r.t. the trainable state, one per record.

    A record the plan fails on contributes zeros, unless ``strict`` (the dry
    run on a dummy record, whose error may be shown to the requester).

    Returns:
        One tensor ``[B, *param.shape]`` per trainable state tensor, in order.
    """
    train_idx = [i for i, t in enumerate(trainable) if t]
    frozen = [s.detach() for s in state]

    def one(params: tuple, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        full = list(frozen)
        for i, p in zip(train_idx, params):
            full[i] = p
        out = interpreter.run(plan, [xi.unsqueeze(0)], full)
        if not isinstance(out, torch.Tensor):
            raise PrivacyParameterError(f"plan {plan.spec.name!r} must return one tensor (the model output)")
        return loss(out, yi.unsqueeze(0))

    params = tuple(frozen[i] for i in train_idx)
    # The worker runs commands under the caller's grad mode; gradients need it on.
    with torch.enable_grad():
        return _gradients(one, params, x, y, strict)


def _one_record(one: Callable, leaves_: list, xi: torch.Tensor, yi: torch.Tensor, strict: bool) -> list:
    """One record's gradient; a record the plan fails on contributes zeros.

    Like a NaN gradient (see :mod:`veil.dp.core`), a failure is a property of
    that record alone, so replacing it by zero is a per-record map and the
    release stays DP: neither the error text nor the fact of an error leaves
    the worker. The owner's log notes that it happened, never the value.
    """
    try:
        row = torch.autograd.grad(one(tuple(leaves_), xi, yi), leaves_, allow_unused=True)
    except PrivacyParameterError:
        raise  # about the plan's structure (checked on the dummy input too), not the data
    except Exception as e:
        if strict:
            raise  # noqa: BLE001 - any failure on a record is sanitized the same way
        OWNER_LOG.info("a DP gradient plan failed on one protected record (%s); it contributes zero",
                       type(e).__name__)
        return [torch.zeros_like(p) for p in leaves_]
    return [torch.zeros_like(p) if r is None else r for r, p in zip(row, leaves_)]


def _gradients(one: Callable, params: tuple, x: torch.Tensor, y: torch.Tensor, strict: bool) -> list[torch.Tensor]:
    if len(x) == 0:
        return [p.new_zeros((0, *p.shape)) for p in params]
    leaves_ = [p.detach().requires_grad_(True) for p in params]
    if len(x) > _LOOP_MAX:
        try:
            return list(vmap(grad(one), in_dims=(None, 0, 0))(params, x, y))
        except PrivacyParameterError:
            raise
        except Exception:  # noqa: BLE001
            pass  # no batching rule for some op, or a record fails: record by record below
    # Small lots (the common DP-SGD case): plain autograd per record is ~10x
    # faster than vmap's batched backward on CPU for small models.
    rows = [_one_record(one, leaves_, x[i], y[i], strict) for i in range(len(x))]
    return [torch.stack([r[k] for r in rows]) for k in range(len(params))]
