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

The noise itself comes from OpenDP (:mod:`veil.dp.core`): floating-point-safe
samplers over the OS CSPRNG, the discrete Laplace (geometric) for counts.
NaN/inf inputs are mapped into the bounds before clipping, so one record
cannot turn a release into NaN. ``generator`` arguments are accepted for the
old signature and ignored (query noise is never seeded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from veil.dp import core
from veil.dp.accountant import dp_lib
from veil.dp.errors import PrivacyParameterError
from veil.workers.user_caches import per_user_cache


@dataclass(frozen=True)
class DPResult:
    """A noisy answer and what it cost."""

    value: torch.Tensor
    epsilon: float
    delta: float
    mechanism: str
    noise_scale: float  # Laplace scale b, or Gaussian standard deviation


@per_user_cache(per_user=256, total=16384)  # (a shared cache's ~2 us hit vs ~3 ms miss told who asked what)
def gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """Noise std of an (epsilon, delta)-DP Gaussian mechanism for an L2 sensitivity (cached per user: a search)."""
    # The analytic calibration (dp_accounting) is exact for every epsilon and
    # never noisier than the classic sqrt(2 ln(1.25/delta)) bound.
    return sensitivity * dp_lib().get_sigma_gaussian(epsilon, delta)


def _check(epsilon: float, delta: float, mechanism: str) -> None:
    core.check_epsilon(epsilon)
    if mechanism == "laplace":
        if delta != 0:
            raise PrivacyParameterError(f"the Laplace mechanism is (epsilon, 0)-DP; pass delta=0, got {delta}")
    elif mechanism == "gaussian":
        if type(delta) not in (int, float) or not 0 < delta < 1:
            raise PrivacyParameterError(f"the Gaussian mechanism needs delta in (0, 1), got {delta}")
    else:
        raise PrivacyParameterError(f"unknown mechanism {mechanism!r}; choose 'laplace' or 'gaussian'")


def _noisy(value: torch.Tensor, l1: float, l2: float, epsilon: float, delta: float, mechanism: str,
           integer: bool = False) -> DPResult:
    _check(epsilon, delta, mechanism)
    if mechanism == "laplace":
        scale = l1 / epsilon  # (integer: an int64 value goes to the discrete Laplace as it is, never rounded)
        return DPResult(core.laplace_mechanism(value, scale, integer), epsilon, 0.0, mechanism, scale)
    sigma = gaussian_sigma(l2, epsilon, delta)
    return DPResult(core.gaussian_mechanism(value.to(torch.float64), sigma), epsilon, delta, mechanism, sigma)


def _bounds(lower: float, upper: float) -> None:
    if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
        raise PrivacyParameterError(f"need finite lower < upper, got [{lower}, {upper}]")


def _clamped(x: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    # NaN / inf entries are mapped into the bounds data-independently (NaN to
    # lower), so a release is never NaN because of one record.
    x = torch.nan_to_num(x.to(torch.float64), nan=lower, posinf=upper, neginf=lower)
    return x.clamp(lower, upper)


def _warn_generator(generator: Optional[torch.Generator]) -> None:
    # Kept for the old signature: query noise is OpenDP's (OS CSPRNG), never seeded.
    del generator


def dp_count(x: torch.Tensor, epsilon: float, delta: float = 0.0, mechanism: str = "laplace",
             generator: Optional[torch.Generator] = None, present: Optional[torch.Tensor] = None) -> DPResult:
    """Noisy number of records (rows of ``x``, or its rows marked in ``present``); sensitivity 1 (geometric
    noise for Laplace)."""
    _warn_generator(generator)
    # int64, exact: a float32 count was rounded to float32's grid above 2^24 rows (sensitivity 8 at 6.7e7)
    count = torch.tensor(len(x), dtype=torch.int64) if present is None else present.sum(dtype=torch.int64)
    return _noisy(count, 1.0, 1.0, epsilon, delta, mechanism, integer=True)


def _records_only(values: torch.Tensor, present: Optional[torch.Tensor]) -> torch.Tensor:
    """``values`` with the rows that are no record (padding, ``present`` False) set to 0: the same work
    over every row, whichever are records (:mod:`veil.dp.padding`)."""
    if present is None:
        return values
    keep = present.reshape(-1, *([1] * (values.dim() - 1)))
    return torch.where(keep, values, torch.zeros((), dtype=values.dtype))


def dp_sum(x: torch.Tensor, lower: float, upper: float, epsilon: float, delta: float = 0.0,
           mechanism: str = "laplace", generator: Optional[torch.Generator] = None,
           present: Optional[torch.Tensor] = None) -> DPResult:
    """Noisy sum of values clipped to ``[lower, upper]``.

    Adding or removing one record changes the sum by at most
    ``max(|lower|, |upper|)`` per coordinate; for vector records the L1 and L2
    sensitivities scale with the dimension accordingly. With ``present`` (a hidden count's release over the
    first ``max_records`` records, :mod:`veil.dp.padding`) removing one of them may move the next one in, a
    replaced record: up to ``upper - lower`` per coordinate, so the noise is for the larger of the two.
    """
    _warn_generator(generator)
    _bounds(lower, upper)
    x = _records_only(_clamped(x, lower, upper), present)  # (padding rows add 0, after the clamp)
    per = max(abs(lower), abs(upper))
    d = x.shape[1:].numel()  # coordinates per record (1 for scalars)
    # Summed in units of m = 2^(e-1) <= per (exact: a power of two), where a record adds less than 2 per
    # coordinate: in the bounds' own units bounds near 1e308 overflow the float64 sum, an error iff enough
    # records sit at the bound. The noisy sum times m, saturated at the largest float64, is post-processing.
    m = math.ldexp(1.0, math.frexp(per)[1] - 1)
    unit = per / m
    if present is not None:  # a replaced record moves a coordinate by up to upper - lower (< 4 units: finite)
        unit = max(unit, upper / m - lower / m)
    res = _noisy(x.div(m).sum(0), unit * d, unit * math.sqrt(d), epsilon, delta, mechanism)
    value = (res.value * m).clamp(-_FLOAT64_MAX, _FLOAT64_MAX)
    return DPResult(value, res.epsilon, res.delta, res.mechanism, res.noise_scale * m)


_FLOAT64_MAX = torch.finfo(torch.float64).max


def dp_mean(x: torch.Tensor, lower: float, upper: float, epsilon: float, delta: float = 0.0,
            mechanism: str = "laplace", generator: Optional[torch.Generator] = None,
            present: Optional[torch.Tensor] = None) -> DPResult:
    """Noisy mean of values clipped to ``[lower, upper]``.

    Computed as noisy sum / noisy count with the budget split in half between
    them (basic composition), so the record count is not assumed public.
    The result is clamped back into the bounds (post-processing).
    """
    _check(epsilon, delta, mechanism)
    half_e, half_d = epsilon / 2, delta / 2
    s = dp_sum(x, lower, upper, half_e, half_d, mechanism, present=present)
    c = dp_count(x, half_e, half_d, mechanism, present=present)
    mean = (s.value / c.value.clamp(min=1.0)).clamp(lower, upper)
    return DPResult(mean, epsilon, delta, mechanism, s.noise_scale)


def dp_histogram(x: torch.Tensor, bins: int, lower: float, upper: float, epsilon: float, delta: float = 0.0,
                 mechanism: str = "laplace", generator: Optional[torch.Generator] = None,
                 present: Optional[torch.Tensor] = None) -> DPResult:
    """Noisy counts of ``bins`` equal-width bins over ``[lower, upper]`` of all values of all records.

    A record of d values (``x[i]`` has ``d`` entries) adds d to the counts,
    possibly all to one bin: L1 and L2 sensitivity d (1 for scalar records). With ``present`` (a hidden
    count's release over the first ``max_records`` records) a record may be replaced instead, moving d
    counts from one bin to another: L1 2d, L2 sqrt(2) d.
    Values outside are clipped into the edge bins; NaN goes to the first bin.
    Negative noisy counts are left as they are (unbiased).
    """
    _warn_generator(generator)
    _bounds(lower, upper)
    if type(bins) is not int or bins < 1:
        raise PrivacyParameterError(f"bins must be an integer >= 1, got {bins!r}")
    _check(epsilon, delta, mechanism)
    d = float(x.shape[1:].numel())
    # bin = floor((v - lower) / width * bins), the top edge in the last bin, on halves (finite for any finite
    # bounds: torch.histc dropped every record when upper - lower overflowed, and misbinned near it)
    v = _clamped(x, lower, upper).flatten()
    half = upper * 0.5 - lower * 0.5
    frac = (v * 0.5 - lower * 0.5) / half if half > 0 else (v - lower) / (upper - lower)  # (subnormal bounds)
    at = (frac * bins).floor_().clamp_(0, bins - 1).to(torch.int64)
    if present is not None:  # a padding row's values go to one more bin, dropped (made whether or not any
        # row is padding: at exactly max_records records bincount's output was one bin shorter)
        at = torch.where(present.reshape(-1, 1).expand(len(x), x.shape[1:].numel()).reshape(-1), at, bins)
    counts = torch.bincount(at, minlength=bins if present is None else bins + 1)[:bins]  # int64: exact
    l1, l2 = (d, d) if present is None else (2 * d, math.sqrt(2) * d)  # (a replaced record: see above)
    return _noisy(counts, l1, l2, epsilon, delta, mechanism, integer=(mechanism == "laplace"))


def query_cost(name: str, shape: torch.Size, epsilon: float, delta: float = 0.0, mechanism: str = "laplace",
               lower: Optional[float] = None, upper: Optional[float] = None, bins: Optional[int] = None
               ) -> tuple[float, float]:
    """(epsilon, delta) a query will be charged, checked from its parameters alone (no data).

    Lets a worker validate and charge *before* touching the data.
    """
    _check(epsilon, delta, mechanism)
    if name != "count":
        _bounds(lower, upper)
    if name == "histogram" and (type(bins) is not int or bins < 1):
        raise PrivacyParameterError(f"bins must be an integer >= 1, got {bins!r}")
    if name == "mean":  # its sum and count get half each: both halves checked before the charge, not after
        try:
            _check(epsilon / 2, delta / 2, mechanism)
        except PrivacyParameterError:
            raise PrivacyParameterError(
                f"a DP mean spends half its epsilon (and delta) on the sum and half on the count: need "
                f"epsilon >= {2 * core.MIN_EPSILON} (and delta / 2 > 0), got epsilon={epsilon!r}") from None
    if len(shape) == 0:
        raise PrivacyParameterError("a DP query needs records: a tensor with a first (record) dimension")
    return float(epsilon), float(delta) if mechanism == "gaussian" else 0.0


# name -> query, for workers that expose queries by name (an explicit registry).
QUERIES: dict[str, Callable[..., DPResult]] = {
    "count": dp_count,
    "sum": dp_sum,
    "mean": dp_mean,
    "histogram": dp_histogram,
}
