"""Empirical privacy auditing: a statistical lower bound on epsilon from samples of a mechanism.

Run the mechanism many times on two neighbouring datasets D and D'. For any
output set S, (epsilon, delta)-DP needs ``P[M(D') in S] <= e^eps P[M(D) in S] + delta``
(and the same with D, D' swapped). With Clopper-Pearson intervals on both
probabilities, every threshold set ``S = {out > tau}`` (and its complement)
gives, at confidence ``1 - alpha``, a lower bound

    eps >= log((p_hi_lower - delta) / p_lo_upper).

The maximum over thresholds is reported (Jagielski et al. 2020, "Auditing
Differentially Private Machine Learning: How Private is Private SGD?";
Nasr et al. 2021). A correct mechanism gives a bound below its epsilon; a
broken one (wrong sensitivity, NaN channel, float artefacts) shows up above.
The thresholds are taken on a fixed grid of quantiles, so the bound holds
up to the multiple testing of that grid (alpha is split across it).
"""

from __future__ import annotations

import math

import numpy as np


def _clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    from scipy import stats  # here, not at import: scipy.stats costs every veil process ~0.5-3 s at start

    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def epsilon_lower_bound(outputs_d: np.ndarray, outputs_d_prime: np.ndarray, delta: float = 0.0,
                        alpha: float = 0.05, thresholds: int = 50) -> float:
    """Largest epsilon lower bound over threshold tests, at confidence 1 - alpha (0 if none)."""
    a = np.asarray(outputs_d, dtype=np.float64).ravel()
    b = np.asarray(outputs_d_prime, dtype=np.float64).ravel()
    grid = np.quantile(np.concatenate([a, b]), np.linspace(0.01, 0.99, thresholds))
    per_test = alpha / (4 * len(grid))  # two sets x two directions per threshold (Bonferroni)
    best = 0.0
    for tau in grid:
        for x, y in ((a, b), (b, a)):  # which dataset plays D'
            for above in (True, False):
                kx = int(((x > tau) if above else (x <= tau)).sum())
                ky = int(((y > tau) if above else (y <= tau)).sum())
                _, px_hi = _clopper_pearson(kx, len(x), per_test)
                py_lo, _ = _clopper_pearson(ky, len(y), per_test)
                if py_lo - delta > 0 and px_hi > 0:
                    best = max(best, math.log((py_lo - delta) / px_hi))
    return best
