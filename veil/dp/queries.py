"""Differentially private aggregate queries: count, sum, mean, histogram.

Each query clips its inputs to declared bounds (which fixes the sensitivity),
adds Laplace or Gaussian noise and returns the noisy answer together with its
privacy cost, so a :class:`veil.dp.BudgetLedger` can be charged *before* the
answer is released. Neighbouring datasets differ by adding or removing one
record (the relation used by the accountants as well).

Mechanisms (Dwork & Roth 2014, "The Algorithmic Foundations of Differential
Privacy", Thm. 3.6 and App. A): Laplace with scale ``sensitivity / epsilon``
is (epsilon, 0)-DP for L1 sensitivity. The Gaussian mechanism's noise is
calibrated exactly for the L2 sensitivity with ``dp_accounting`` (the
analytic Gaussian mechanism of Balle & Wang 2018), which is valid for every
epsilon and less noisy than the classic ``sqrt(2 ln(1.25/delta)) / epsilon``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import dp_accounting
import torch

from veil.dp.errors import PrivacyParameterError
from veil.dp.optimizer import make_generator


@dataclass(frozen=True)
class DPResult:
    """A noisy answer and what it cost."""

    value: torch.Tensor
    epsilon: float
    delta: float
    mechanism: str
    noise_scale: float  # Laplace scale b, or Gaussian standard deviation


def gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """Noise std of an (epsilon, delta)-DP Gaussian mechanism for an L2 sensitivity."""
    # The analytic calibration (dp_accounting) is exact for every epsilon and
    # never noisier than the classic sqrt(2 ln(1.25/delta)) bound.
    return sensitivity * dp_accounting.get_sigma_gaussian(epsilon, delta)


def _laplace(shape, scale: float, gen: torch.Generator) -> torch.Tensor:
    # Inverse-CDF sampling from a uniform in (-1/2, 1/2).
    u = torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5
    u = u.clamp(-0.5 + 1e-16, 0.5 - 1e-16)
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())


def _noisy(value: torch.Tensor, l1: float, l2: float, epsilon: float, delta: float, mechanism: str,
           generator: Optional[torch.Generator]) -> DPResult:
    if not epsilon > 0:
        raise PrivacyParameterError(f"epsilon must be > 0, got {epsilon}")
    gen = generator if generator is not None else make_generator()
    value = value.to(torch.float64)
    if mechanism == "laplace":
        scale = l1 / epsilon
        return DPResult(value + _laplace(value.shape, scale, gen), epsilon, 0.0, mechanism, scale)
    if mechanism == "gaussian":
        if not 0 < delta < 1:
            raise PrivacyParameterError(f"the Gaussian mechanism needs delta in (0, 1), got {delta}")
        sigma = gaussian_sigma(l2, epsilon, delta)
        noise = torch.randn(value.shape, generator=gen, dtype=torch.float64) * sigma
        return DPResult(value + noise, epsilon, delta, mechanism, sigma)
    raise ValueError(f"unknown mechanism {mechanism!r}; choose 'laplace' or 'gaussian'")


def _bounds(lower: float, upper: float) -> None:
    if not lower < upper:
        raise PrivacyParameterError(f"need lower < upper, got [{lower}, {upper}]")


def dp_count(x: torch.Tensor, epsilon: float, delta: float = 0.0, mechanism: str = "laplace",
             generator: Optional[torch.Generator] = None) -> DPResult:
    """Noisy number of records (rows of ``x``); sensitivity 1."""
    return _noisy(torch.tensor(float(len(x))), 1.0, 1.0, epsilon, delta, mechanism, generator)


def dp_sum(x: torch.Tensor, lower: float, upper: float, epsilon: float, delta: float = 0.0,
           mechanism: str = "laplace", generator: Optional[torch.Generator] = None) -> DPResult:
    """Noisy sum of values clipped to ``[lower, upper]``.

    Adding or removing one record changes the sum by at most
    ``max(|lower|, |upper|)`` per coordinate; for vector records the L1 and L2
    sensitivities scale with the dimension accordingly.
    """
    _bounds(lower, upper)
    x = x.to(torch.float64).clamp(lower, upper)
    per = max(abs(lower), abs(upper))
    d = x.shape[1:].numel()  # coordinates per record (1 for scalars)
    return _noisy(x.sum(0), per * d, per * math.sqrt(d), epsilon, delta, mechanism, generator)


def dp_mean(x: torch.Tensor, lower: float, upper: float, epsilon: float, delta: float = 0.0,
            mechanism: str = "laplace", generator: Optional[torch.Generator] = None) -> DPResult:
    """Noisy mean of values clipped to ``[lower, upper]``.

    Computed as noisy sum / noisy count with the budget split in half between
    them (basic composition), so the record count is not assumed public.
    The result is clamped back into the bounds (post-processing).
    """
    half_e, half_d = epsilon / 2, delta / 2
    s = dp_sum(x, lower, upper, half_e, half_d, mechanism, generator)
    c = dp_count(x, half_e, half_d, mechanism, generator)
    mean = (s.value / c.value.clamp(min=1.0)).clamp(lower, upper)
    return DPResult(mean, epsilon, delta, mechanism, s.noise_scale)


def dp_histogram(x: torch.Tensor, bins: int, lower: float, upper: float, epsilon: float, delta: float = 0.0,
                 mechanism: str = "laplace", generator: Optional[torch.Generator] = None) -> DPResult:
    """Noisy counts of ``bins`` equal-width bins over ``[lower, upper]``.

    One record falls in exactly one bin (values outside are clipped into the
    edge bins), so adding or removing it changes one count by 1: L1 and L2
    sensitivity 1. Negative noisy counts are left as they are (unbiased).
    """
    _bounds(lower, upper)
    if bins < 1:
        raise PrivacyParameterError(f"bins must be >= 1, got {bins}")
    counts = torch.histc(x.to(torch.float64).clamp(lower, upper).flatten(), bins=bins, min=lower, max=upper)
    return _noisy(counts, 1.0, 1.0, epsilon, delta, mechanism, generator)


# name -> query, for workers that expose queries by name (an explicit registry).
QUERIES: dict[str, Callable[..., DPResult]] = {
    "count": dp_count,
    "sum": dp_sum,
    "mean": dp_mean,
    "histogram": dp_histogram,
}
