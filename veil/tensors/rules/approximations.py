"""Rules for the non-linear functions fixed-precision tensors compute by approximation.

``x.sigmoid()``, ``torch.tanh(x)`` (and ``F.sigmoid``/``F.tanh``, which recurrent cells and PySyft 0.2's or
CrypTen's users call on encrypted tensors) run :mod:`veil.mpc.functions`' approximations: additions,
products and divisions by public values only, so the same rule serves plain and secret-shared children.
Their ranges and errors are that module's table (sigmoid: absolute 2e-3 on [-5, 5]; tanh: 4e-3 on
[-2.5, 2.5]); outside them the result degrades without a warning, as in CrypTen. The backward passes
(``sigmoid_backward``, ``tanh_backward``) are torch's decompositions into products of the output.
"""

from __future__ import annotations

import torch

from veil.mpc import functions
from veil.tensors.rules.fixed_precision import FIXED_PRECISION_RULES

aten = torch.ops.aten


@FIXED_PRECISION_RULES.handler(aten.sigmoid.default)
def _sigmoid(cls, func, args, kwargs):
    return functions.sigmoid(args[0])


@FIXED_PRECISION_RULES.handler(aten.tanh.default)
def _tanh(cls, func, args, kwargs):
    return functions.tanh(args[0])
