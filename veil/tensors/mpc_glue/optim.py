"""Optimizers over fixed-precision (and secret-shared) parameters.

``torch.optim.SGD(model.parameters(), lr=0.1).fix_precision()`` prepares a
stock torch optimizer for a model after ``model.fix_precision().share(...,
requires_grad=True)``: its update ``p -= lr * grad`` then runs through the
parameters' ``__torch_dispatch__`` rules, i.e. on the shares. The
hyper-parameters (``lr``, ``momentum``, ``weight_decay``, ...) are *public*:
every step encodes them at the parameters' precision.

Plain SGD (no momentum, weight decay, nesterov, maximize) on secret-shared
parameters updates them all with **one** truncation round
(:func:`_batched_sgd_step`): the gradients' shares are concatenated (local),
multiplied by ``-lr`` and truncated together, then added back parameter by
parameter (local). Per entry this is exactly torch's ``p.add_(grad,
alpha=-lr)``; stepping parameter by parameter took one round each (6 for an
MLP with three layers). Anything else runs torch's own step.

The optimizer object is returned unchanged apart from disabling the
multi-tensor (``foreach``) and fused kernels, which bypass per-tensor
dispatch; torch already falls back for tensor subclasses, this makes it
explicit.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from torch.optim import optimizer as torch_optimizer

from veil.mpc.errors import NotEncodedError
from veil.mpc.truncation import TRUNCATION_BOUND
from veil.tensors.fixed_precision import FixedPrecisionTensor
from veil.tensors.rules import fixed_precision as fp_rules
from veil.tensors.remote_ops import deferring

#: Optimizers whose step only adds, scales and multiplies (exact on shares).
SUPPORTED_OPTIMIZERS: tuple[type, ...] = (torch.optim.SGD,)


def fix_precision_optimizer(
    optimizer: torch.optim.Optimizer, precision_fractional: Optional[int] = None, base: Optional[int] = None
) -> torch.optim.Optimizer:
    """Checks and configures ``optimizer`` for fixed-precision parameters.

    Args:
        optimizer: A torch optimizer built on a fixed-precision model's
            parameters.
        precision_fractional: Accepted for PySyft compatibility; must match
            the parameters' encoding if given (the hyper-parameters are
            encoded with the parameters' own encoding).
        base: As ``precision_fractional``.

    Returns:
        The same optimizer.

    Raises:
        NotImplementedError: For optimizers needing square roots or
            divisions by secrets (Adam, RMSprop, ...).
        NotEncodedError: If a parameter is not fixed-precision, or the
            requested encoding differs from a parameter's.
    """
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        names = ", ".join(c.__name__ for c in SUPPORTED_OPTIMIZERS)
        raise NotImplementedError(
            f"{type(optimizer).__name__} is not supported on fixed-precision parameters (supported: {names}); "
            "adaptive optimizers need a square root and a division of secret values"
        )
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, FixedPrecisionTensor):
                raise NotEncodedError(
                    "optimizer.fix_precision(): every parameter must be fixed-precision; "
                    "call model.fix_precision() (and .share(...)) before building the optimizer"
                )
            enc = p.encoding
            if precision_fractional is not None and precision_fractional != enc.precision_fractional:
                raise NotEncodedError(f"precision_fractional={precision_fractional} differs from the parameters' {enc}")
            if base is not None and base != enc.base:
                raise NotEncodedError(f"base={base} differs from the parameters' {enc}")
        group["foreach"] = False
        if "fused" in group:
            group["fused"] = False
    if type(optimizer) is torch.optim.SGD:
        optimizer.step = types.MethodType(_batched_sgd_step, optimizer)
    return optimizer


def _plain_group(group: dict) -> bool:
    """An SGD group whose update is ``p += -lr * grad`` and nothing else."""
    return (not group.get("momentum") and not group.get("weight_decay") and not group.get("maximize")
            and not group.get("nesterov") and not group.get("differentiable")
            and isinstance(group.get("lr"), (int, float)))


def _batch_key(p: torch.Tensor) -> Optional[tuple]:
    """Parameters whose gradients can be truncated together: same encoding, parties and provider, no MACs."""
    grad = p.grad
    if not isinstance(p, FixedPrecisionTensor) or not isinstance(grad, FixedPrecisionTensor):
        return None
    child = grad.raw_child  # (a truncation it owes is paid with the update's)
    if getattr(child, "mac", None) is not None or not hasattr(child, "parties") or grad.dtype != p.dtype:
        return None
    return (grad.encoding, child.parties, id(child.crypto_provider), grad.dtype)


def _has_step_hooks(opt: torch.optim.Optimizer) -> bool:
    return bool(opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
                or torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks)


def _batched_sgd_step(self: torch.optim.SGD, closure=None):
    """SGD's step with every shared parameter's ``lr * grad`` truncated in one round (see the module doc)."""
    if _has_step_hooks(self) or not all(_plain_group(g) for g in self.param_groups):
        return torch.optim.SGD.step(self, closure)
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    with torch.no_grad():
        for group in self.param_groups:
            lr = group["lr"]
            buckets: dict = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                key = _batch_key(p)
                if key is None:
                    p.add_(p.grad, alpha=-lr)  # torch's own update
                else:
                    buckets.setdefault(key, []).append(p)
            for params in buckets.values():
                divisor = _folded_divisor(params, lr)
                if divisor is not None:
                    _folded_update(params, divisor)
                    continue
                if len(params) == 1:
                    params[0].add_(params[0].grad, alpha=-lr)
                    continue
                flat = _on_shares(torch.cat, [_on_shares(torch.reshape, p.grad, (-1,)) for p in params])
                update = torch.mul(flat, -lr)  # one truncation for all of them; per entry as add_(alpha=-lr)
                chunks = _on_shares(torch.split, update, [p.numel() for p in params])
                for p, chunk in zip(params, chunks):
                    p.add_(_on_shares(torch.reshape, chunk, tuple(p.shape)))
    return loss


def _folded_divisor(params: list, lr: float) -> Optional[int]:
    """``D = round(s / lr)`` when some gradient still owes its product's truncation by the scale ``s``
    (lazy truncation: a weight's ``x^T g``): ``lr * grad`` at scale ``s`` is then that product divided by
    ``D``, the owed truncation and the learning rate's in one, with the product's own range
    (``|v| <= 2^62 - D``, :mod:`veil.mpc.truncation`); else None (the gradients pay, then ``lr`` is encoded
    and truncated). Only where ``D`` is no coarser than encoding ``lr`` (relative error of ``D`` at most
    that of ``round(lr * s)``): ``lr <= 1`` in practice, and every power of two."""
    scale = params[0].grad.encoding.scale
    if not fp_rules.LAZY_TRUNCATION or lr <= 0 or not any(p.grad.pending_divisor == scale for p in params):
        return None
    exact = scale / lr
    divisor = round(exact)
    if not 1 < divisor <= TRUNCATION_BOUND // 2:
        return None
    encoded = lr * scale
    if abs(divisor - exact) / exact > abs(round(encoded) - encoded) / encoded:
        return None
    return divisor


def _folded_update(params: list, divisor: int) -> None:
    """``p -= grad / D`` for every parameter with one truncation: the owed gradients as they are (at scale
    ``s^2``), the others times ``s`` (exact: a bias's gradient at a product's scale, in its range), flattened
    and concatenated, divided by ``D`` (:func:`_folded_divisor`) together, split back."""
    scale = params[0].grad.encoding.scale
    flat = [_on_shares(torch.reshape, p.grad, (-1,), raw=p.grad.pending_divisor == scale) for p in params]
    flat = [f if p.grad.pending_divisor == scale else _on_shares(torch.mul, f, scale) for f, p in zip(flat, params)]
    flat = flat[0] if len(flat) == 1 else _on_shares(torch.cat, flat)
    first = params[0].grad
    update = FixedPrecisionTensor(flat.child, first.encoding, first.dtype, pending_divisor=divisor)
    chunks = [update] if len(params) == 1 else _on_shares(torch.split, update, [p.numel() for p in params])
    for p, chunk in zip(params, chunks):  # reading the first chunk's shares paid the truncation
        p.sub_(_on_shares(torch.reshape, chunk, tuple(p.shape)))


def _on_shares(fn, x, *args, raw: bool = False):
    """``fn`` on every party's share of shared fixed-precision ``x`` (or each of a list of them), local.

    Reshaping goes to the shares themselves, not through the wrappers: a weight's gradient share is a
    transposed view on its worker while the wrapper's strides say contiguous, so a wrapper-level
    reshape would become a ``view`` the worker cannot take. ``raw``: on the shares as they are, a
    truncation still owed unpaid (the caller pays it); the result owes nothing.
    """
    first = x[0] if isinstance(x, list) else x
    cls, enc, dtype = type(first.raw_child), first.encoding, first.dtype
    read = (lambda t: t.raw_child) if raw else (lambda t: t.child)
    children = [read(t) for t in x] if isinstance(x, list) else read(x)
    with deferring():
        out = cls._veil_apply_local(fn, (children, *args), {})
    if isinstance(out, (tuple, list)):
        return [FixedPrecisionTensor(o, enc, dtype) for o in out]
    return FixedPrecisionTensor(out, enc, dtype)
