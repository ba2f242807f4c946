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
multiplied by ``lr`` and truncated together, then subtracted from the
parameters (local; one command per party for each). Per entry this is
torch's ``p.add_(grad, alpha=-lr)``; stepping parameter by parameter took
one round each (6 for an MLP with three layers). A weight gradient that
still owes its product's truncation (lazy truncation) pays it in the same
division (:func:`_folded_divisor`). Anything else runs torch's own step.

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

from torch.autograd.graph import increment_version

from veil.mpc.encoding import encode_scalar
from veil.mpc.errors import NotEncodedError
from veil.mpc.party import party_function, run_party
from veil.mpc.truncation import TRUNCATION_BOUND
from veil.tensors.additive import AdditiveSharingTensor
from veil.tensors.fixed_precision import FixedPrecisionTensor, consumed_owing
from veil.tensors.rules import fixed_precision as fp_rules

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
    child, own = grad.raw_child, p.child  # (a truncation the gradient owes is paid with the update's)
    if type(child) is not AdditiveSharingTensor or type(own) is not AdditiveSharingTensor or grad.dtype != p.dtype:
        return None
    if child.mac is not None or own.mac is not None or own.parties != child.parties:
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
                _batched_update(params, lr)
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


def _batched_update(params: list, lr: float) -> None:
    """``p -= lr * grad`` for every parameter of a bucket with one truncation round and two commands per
    party: the gradients' shares flattened, each times a public integer, and concatenated
    (``sgd_flatten``), truncated together, and split back off the parameters' shares (``sgd_apply``).
    Folded (:func:`_folded_divisor`): the owed gradients as they are (at scale ``s^2``), the others times
    ``s`` (exact: a bias's gradient at a product's scale, in its range), divided by ``D``. Otherwise the
    gradients pay what they owe, are multiplied by the encoded ``lr`` and truncated by ``s``, per entry as
    torch's ``p.add_(grad, alpha=-lr)``."""
    first = params[0].grad
    scale = first.encoding.scale
    divisor = _folded_divisor(params, lr)
    if divisor is not None:
        owed = [p.grad.pending_divisor == scale for p in params]
        children = [p.grad.raw_child if o else p.grad.child for p, o in zip(params, owed)]
        for p, o in zip(params, owed):
            if o:
                consumed_owing(p.grad)
        factors = [1 if o else scale for o in owed]
    else:
        children = [p.grad.child for p in params]
        factors, divisor = [encode_scalar(lr, first.encoding)] * len(params), scale
    provider = children[0].crypto_provider
    parties = list(children[0].child)
    flat = {k: run_party("sgd_flatten", [c.child[k] for c in children], factors) for k in parties}
    update = AdditiveSharingTensor(flat, provider).truncate(divisor)
    new = {k: run_party("sgd_apply", [p.child.child[k] for p in params], update.child[k]) for k in parties}
    for i, p in enumerate(params):
        p._veil_assign(FixedPrecisionTensor(AdditiveSharingTensor({k: new[k][i] for k in parties}, provider),
                                            p.encoding, p.dtype))
        increment_version(p)  # as an in-place op would: autograd refuses graphs that saved the old value


@party_function("sgd_flatten")
def _sgd_flatten(grads: list, factors: list) -> torch.Tensor:
    """One party's gradient shares flattened, each times its public integer factor, concatenated."""
    if type(grads) is not list or type(factors) is not list or len(grads) != len(factors) or not grads:
        raise ValueError("sgd_flatten needs a list of shares and an integer factor for each")
    if not all(type(f) is int for f in factors):
        raise ValueError("sgd_flatten's factors must be integers")
    return torch.cat([g.reshape(-1) if f == 1 else g.reshape(-1) * f for g, f in zip(grads, factors)])


@party_function("sgd_apply")
def _sgd_apply(params: list, update: torch.Tensor) -> tuple:
    """Each of one party's parameter shares minus its chunk of the flat ``update`` (in order)."""
    sizes = [p.numel() for p in params] if type(params) is list else None
    if not sizes or update.dim() != 1 or update.numel() != sum(sizes):
        raise ValueError("sgd_apply needs a list of shares and a flat update of their total size")
    return tuple(p - u.reshape(p.shape) for p, u in zip(params, update.split(sizes)))
