"""Optimizers over fixed-precision (and secret-shared) parameters.

``torch.optim.SGD(model.parameters(), lr=0.1).fix_precision()`` prepares a
stock torch optimizer for a model after ``model.fix_precision().share(...,
requires_grad=True)``: its update ``p -= lr * grad`` then runs through the
parameters' ``__torch_dispatch__`` rules, i.e. on the shares. The
hyper-parameters (``lr``, ``momentum``, ``weight_decay``, ...) are *public*:
every step encodes them at the parameters' precision (one truncation per
product by ``lr``, one round with three or more parties, none with two).

The optimizer object is returned unchanged apart from disabling the
multi-tensor (``foreach``) and fused kernels, which bypass per-tensor
dispatch; torch already falls back for tensor subclasses, this makes it
explicit.
"""

from __future__ import annotations

from typing import Optional

import torch

from veil.mpc.errors import NotEncodedError
from veil.tensors.fixed_precision import FixedPrecisionTensor

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
    return optimizer
