"""Approximations of non-linear functions on fixed-precision tensors.

Every function uses only additions, products and division by public values,
so it runs unchanged on plaintext and secret-shared fixed-precision tensors
(each shared product is one Beaver round, plus one truncation round for 3+
parties). The methods follow CrypTen (Knott et al., NeurIPS 2021):
limit approximation for exp, Newton-Raphson for reciprocal and inverse
square root, Householder iterations for log.

Errors below are measured on the stated ranges at the default encoding
(16 fractional bits) and checked by ``tests/mpc/test_functions.py``; outside
these ranges the approximations degrade or diverge, and secret values give
no warning.

=============  ==================  ===========================================
function       input range         max error
=============  ==================  ===========================================
exp            [-4, 4]             relative 3.5% (limit approx., 8 squarings)
reciprocal     [0.1, 100]          relative 0.2% + 4e-4 absolute
sigmoid        [-5, 5]             absolute 2e-3
tanh           [-2.5, 2.5]         absolute 4e-3
softmax        [-2, 2], dim <= 10  absolute 3e-3
inv_sqrt/sqrt  [0.1, 100]          relative 1%
log            [0.5, 50]           absolute 5e-2
=============  ==================  ===========================================
"""

from __future__ import annotations

import torch

# Type alias: any FixedPrecisionTensor (plain or shared child).
FPT = torch.Tensor

EXP_ITERATIONS = 8
RECIPROCAL_ITERATIONS = 10
INV_SQRT_ITERATIONS = 3
LOG_ITERATIONS = 2
LOG_ORDER = 8


def exp(x: FPT, iterations: int = EXP_ITERATIONS) -> FPT:
    """``exp(x) ~ (1 + x / 2^n)^(2^n)``: n squarings, n rounds.

    Relative error about ``x^2 / 2^(n+1)`` from the limit, plus the
    encoding error amplified 2^n times.
    """
    y = 1.0 + x / (2**iterations)  # division by a power of two: truncation
    for _ in range(iterations):
        y = y * y
    return y


def reciprocal(x: FPT, iterations: int = RECIPROCAL_ITERATIONS) -> FPT:
    """``1/x`` for positive ``x`` by Newton's iteration ``y <- y (2 - x y)``.

    The start ``3 exp(1/2 - x) + 0.003`` lies in ``(0, 2/x)`` on the range,
    so the relative error squares every step.
    """
    y = 3.0 * exp(0.5 - x) + 0.003
    for _ in range(iterations):
        y = y * (2.0 - x * y)
    return y


def sigmoid(x: FPT) -> FPT:
    """``1 / (1 + exp(-x))``."""
    return reciprocal(1.0 + exp(-x))


def tanh(x: FPT) -> FPT:
    """``2 sigmoid(2x) - 1``."""
    return 2 * sigmoid(2 * x) - 1.0


def softmax(x: FPT, dim: int = -1) -> FPT:
    """``exp(x) / sum(exp(x))`` without max subtraction (needs no comparison)."""
    e = exp(x)
    return e * reciprocal(e.sum(dim, keepdim=True))


def inv_sqrt(x: FPT, iterations: int = INV_SQRT_ITERATIONS) -> FPT:
    """``1/sqrt(x)`` by Newton ``y <- y (3 - x y^2) / 2`` from CrypTen's start."""
    y = 2.2 * exp(-(x / 2 + 0.2)) + 0.2 - x / 1024
    for _ in range(iterations):
        y = y * (3.0 - x * y * y) / 2
    return y


def sqrt(x: FPT) -> FPT:
    """``x * inv_sqrt(x)``."""
    return x * inv_sqrt(x)


def log(x: FPT, iterations: int = LOG_ITERATIONS, order: int = LOG_ORDER) -> FPT:
    """Natural log by Householder iterations on ``h = 1 - x exp(-y)``."""
    y = x / 120 - 20 * exp(-2 * x - 1.0) + 3.0
    for _ in range(iterations):
        h = 1.0 - x * exp(-y)
        correction, power = h, h
        for k in range(2, order + 1):
            power = power * h
            correction = correction + power / k
        y = y - correction
    return y


def div(x: FPT, y: FPT) -> FPT:
    """``x / y`` for positive ``y`` in reciprocal's range."""
    return x * reciprocal(y)


# Registry of approximations by name (used by tests and benchmarks).
FUNCTIONS = {
    "exp": exp,
    "reciprocal": reciprocal,
    "sigmoid": sigmoid,
    "tanh": tanh,
    "softmax": softmax,
    "inv_sqrt": inv_sqrt,
    "sqrt": sqrt,
    "log": log,
}
