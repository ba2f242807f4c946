"""PATE: noisy aggregation of teacher votes, and its privacy analysis.

Aggregators (Papernot et al. 2017, "Semi-supervised Knowledge Transfer for
Deep Learning from Private Training Data"; Papernot et al. 2018, "Scalable
Private Learning with PATE", Sec. 4):

* LNMax: ``argmax_j (n_j + Lap(1/gamma))``.
* GNMax: ``argmax_j (n_j + N(0, sigma^2))``.
* Confident-GNMax (2018, Alg. 1): answer with GNMax(sigma2) only if
  ``max_j n_j + N(0, sigma1^2) >= threshold``; otherwise abstain (-1).

Analysis. One teacher changing its vote moves two counts by one, so the
count vector has L1 sensitivity 2 and L2 sensitivity sqrt(2).

* Data-independent: LNMax is (2 gamma, 0)-DP per query; GNMax is
  (lambda, lambda / sigma^2)-RDP (2018, Prop. 8). Both are composed with
  ``dp_accounting`` (a Laplace / Gaussian event of the equivalent noise
  multiplier).
* Data-dependent (2018, Thm. 6 / Prop. 7 with the GNMax bound on
  ``q = Pr[answer != plurality]`` of Prop. 10): when the teachers agree
  strongly, each answer costs far less than the data-independent bound.
  Caution: this epsilon depends on the private votes, so it is not itself
  differentially private (the paper releases it through smooth
  sensitivity, which is not implemented here). Use it to evaluate, not to
  publish.

RDP is converted to (epsilon, delta) with ``dp_accounting``'s conversion.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence

import numpy as np
import torch

from veil.dp.accountant import dp_lib

from veil.dp.errors import PrivacyParameterError
from veil.dp import core

# RDP orders searched for the tightest conversion (the data-dependent bound
# is typically minimised at large orders under strong consensus).
DEFAULT_ORDERS: np.ndarray = np.concatenate([np.linspace(1.1, 10.9, 99), np.arange(11, 201), [256, 512, 1024]])


# ---- parameter checks of the analysis: a NaN or out-of-range parameter gave epsilon 0.0 or NaN, which passes
# every ``epsilon > budget`` check, so each is refused in one line before any accounting

def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_noise(value: object, name: str) -> float:
    """A noise parameter (sigma, gamma): a real number whose square is finite and > 0 (multiplied, not
    ``** 2``: a float's power past the float range raises a bare OverflowError, as the accounting's own would)."""
    if not _is_real(value) or not (math.isfinite(value) and value > 0 and 0 < float(value) * float(value) < math.inf):
        raise PrivacyParameterError(f"{name} must be a finite number > 0 whose square is finite, got {value!r}")
    return float(value)


def _check_delta(delta: object) -> float:
    if not _is_real(delta) or not 0 < delta < 1:
        raise PrivacyParameterError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def _check_queries(num_queries: object) -> int:
    if isinstance(num_queries, bool) or not isinstance(num_queries, (int, np.integer)) or num_queries < 0:
        raise PrivacyParameterError(f"num_queries must be an integer >= 0, got {num_queries!r}")
    return int(num_queries)


def _check_orders(orders: object) -> np.ndarray:
    """The RDP orders of an analysis: a non-empty 1-D list of finite numbers > 1. At order 1 the data-dependent
    bound divided by ``lambda - 1`` came out -inf, and an infinite order made dp_accounting's conversion
    return epsilon 0.0 for any votes (which passes every ``epsilon <= budget`` check)."""
    if orders is None:
        return DEFAULT_ORDERS
    try:
        checked = np.asarray(orders, dtype=np.float64)
    except (TypeError, ValueError):
        checked = np.zeros(0)
    if checked.ndim != 1 or checked.size == 0 or not bool((np.isfinite(checked) & (checked > 1)).all()):
        raise PrivacyParameterError("orders must be a non-empty list of finite RDP orders > 1")
    return checked


def _checked_counts(teacher_preds: torch.Tensor, query_indices: Sequence[int], num_classes: int) -> tuple:
    """Vote counts and the queried example indices, every label and index in range (none quoted: votes are
    private)."""
    if type(num_classes) is not int or num_classes < 2:
        raise PrivacyParameterError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    counts = vote_counts(teacher_preds, num_classes)
    try:  # (int() read an index 1.9 as example 1: the analysis priced another example's votes)
        indices = [operator.index(i) for i in query_indices]
    except TypeError:
        raise PrivacyParameterError("query indices must be integers") from None
    if any(not 0 <= i < counts.shape[0] for i in indices):
        raise PrivacyParameterError(f"query indices must be example indices in [0, {counts.shape[0]})")
    return counts.numpy(), indices


def vote_counts(teacher_preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-example vote histograms.

    Args:
        teacher_preds: ``[num_teachers, num_examples]`` predicted labels.
        num_classes: number of labels.

    Returns:
        ``[num_examples, num_classes]`` counts (float64).

    Raises:
        PrivacyParameterError: not a 2-D tensor of integer labels in ``[0, num_classes)`` (the message names
            the range, never a vote: torch's own error quoted the out-of-range one; float votes are refused,
            ``.long()`` counted 2.7 as a vote for 2).
    """
    if type(num_classes) is not int or num_classes < 1:
        raise PrivacyParameterError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    preds = torch.as_tensor(teacher_preds)
    if preds.dim() != 2 or preds.is_floating_point() or preds.is_complex() or \
            (preds.numel() and not bool(((preds >= 0) & (preds < num_classes)).all())):
        raise PrivacyParameterError(f"teacher_preds must be [teachers, examples] integer labels in "
                                    f"[0, {num_classes})")
    preds = preds.long()
    counts = torch.zeros(preds.shape[1], num_classes, dtype=torch.float64)
    counts.scatter_add_(1, preds.t(), torch.ones(preds.t().shape, dtype=torch.float64))
    return counts


def lnmax(counts: torch.Tensor, gamma: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """LNMax labels: ``argmax(counts + Lap(1/gamma))`` per row.

    The Laplace noise is OpenDP's floating-point-safe sampler over the OS
    CSPRNG (``generator`` is accepted for the old signature and ignored).
    """
    if not gamma > 0:
        raise PrivacyParameterError(f"gamma must be > 0, got {gamma}")
    del generator
    counts = torch.as_tensor(counts, dtype=torch.float64)
    return core.laplace_mechanism(counts, 1.0 / gamma).argmax(-1)


def gnmax(counts: torch.Tensor, sigma: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """GNMax labels: ``argmax(counts + N(0, sigma^2))`` per row.

    The noise is :func:`veil.dp.core.gaussian_noise` over the OS CSPRNG, whatever ``generator`` is (accepted
    for the old signature and ignored, as by :func:`lnmax` and the queries: labels noised from a seeded torch
    generator were the same for the same seed, so whoever knew it removed the noise)."""
    if not sigma > 0:
        raise PrivacyParameterError(f"sigma must be > 0, got {sigma}")
    del generator
    counts = torch.as_tensor(counts, dtype=torch.float64)
    return (counts + core.gaussian_noise(counts.shape, sigma, torch.float64)).argmax(-1)


def confident_gnmax(counts: torch.Tensor, threshold: float, sigma1: float, sigma2: float,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Confident-GNMax labels; -1 where the noisy plurality is below ``threshold`` (noise from the OS CSPRNG;
    ``generator`` is ignored, as by :func:`gnmax`)."""
    if not (sigma1 > 0 and sigma2 > 0):
        raise PrivacyParameterError(f"sigma1 and sigma2 must be > 0, got {sigma1}, {sigma2}")
    del generator
    counts = torch.as_tensor(counts, dtype=torch.float64)
    noisy_max = counts.max(-1).values + core.gaussian_noise(counts.shape[:-1], sigma1, torch.float64)
    labels = gnmax(counts, sigma2)
    return torch.where(noisy_max >= threshold, labels, torch.full_like(labels, -1))


# ---- analysis ----------------------------------------------------------------------------

def _epsilon_from_rdp(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    eps, _ = dp_lib().rdp.rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)
    return float(eps)


def gnmax_log_q(counts: np.ndarray, sigma: float) -> float:
    """log of the 2018 paper's Prop. 10 bound on Pr[GNMax != plurality].

    ``q <= sum_{i != i*} Pr[N(0, 2 sigma^2) > n_{i*} - n_i]``, capped at
    ``1 - 1/num_classes`` (the bound is only useful below that).
    """
    from scipy import special  # here, not at the top: scipy.special adds ~0.3 s to every worker's start-up

    counts = np.asarray(counts, dtype=np.float64)
    if counts.size < 2:  # (one label: log(1 - 1/1) is log 0)
        raise PrivacyParameterError("the GNMax bound needs at least two labels")
    top = int(np.argmax(counts))
    gaps = counts[top] - np.delete(counts, top)
    # Pr[N(0, 2 sigma^2) > g] = Phi(-g / (sqrt(2) sigma)), in logs for tiny q.
    log_terms = special.log_ndtr(-gaps / (math.sqrt(2) * sigma))
    return float(min(special.logsumexp(log_terms), math.log(1 - 1 / len(counts))))


def _log1mexp(x: float) -> float:
    """log(1 - exp(x)) for x < 0, stably."""
    return math.log(-math.expm1(x)) if x > -0.693 else math.log1p(-math.exp(x))


def gnmax_rdp_data_dependent(log_q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """RDP of one GNMax answer given ``q`` (2018, Thm. 6 / Prop. 7), never above lambda / sigma^2.

    Prop. 7 uses two higher orders mu1 = mu2 + 1 and mu2 = sigma sqrt(log 1/q)
    (the choice of the paper's analysis) at which the data-independent RDP
    eps_k = mu_k / sigma^2 holds; it applies to orders lambda <= mu1 when
    ``q e^{eps2} < 1`` and q is below the threshold in its hypothesis.
    """
    sigma, orders = _check_noise(sigma, "sigma"), _check_orders(orders)
    data_independent = orders / sigma**2
    if math.isnan(log_q) or log_q >= 0:
        return data_independent
    if log_q == -math.inf:  # q = 0: the output is fixed (the limit of the bound; the paper's code returns 0 too)
        return np.zeros_like(orders)
    mu2 = sigma * math.sqrt(-log_q)
    mu1 = mu2 + 1
    eps1, eps2 = mu1 / sigma**2, mu2 / sigma**2
    applies = (orders <= mu1) & (mu2 > 1)
    # Hypotheses of Prop. 7: q <= e^{(mu2-1) eps2} / (mu1/(mu1-1) * mu2/(mu2-1))^mu2, and q e^{eps2} < 1.
    log_q_max = (mu2 - 1) * eps2 - mu2 * (math.log(mu1 / (mu1 - 1)) + math.log(mu2 / (mu2 - 1))) if mu2 > 1 else -np.inf
    if not applies.any() or log_q > log_q_max or log_q + eps2 >= 0:
        return data_independent
    log_1mq = _log1mexp(log_q)
    # A = (1-q) / (1 - (q e^{eps2})^{(mu2-1)/mu2});  B = e^{eps1} / q^{1/(mu1-1)}
    log_a = log_1mq - _log1mexp((log_q + eps2) * (1 - 1 / mu2))
    log_b = eps1 - log_q / (mu1 - 1)
    lam = orders[applies]
    log_s = np.logaddexp(log_1mq + (lam - 1) * log_a, log_q + (lam - 1) * log_b)
    out = data_independent.copy()
    # (at least 0: a bound rounded below 0 is read by dp_accounting as "no privacy loss", epsilon 0)
    out[applies] = np.maximum(np.minimum(data_independent[applies], log_s / (lam - 1)), 0.0)
    # an order whose bound overflowed to NaN keeps the data-independent one (one NaN order made a total NaN,
    # and dp_accounting converts a NaN RDP to epsilon 0)
    return np.where(np.isnan(out), data_independent, out)


def gnmax_epsilon_data_independent(num_queries: int, sigma: float, delta: float,
                                   orders: Optional[Sequence[float]] = None) -> float:
    """(epsilon at delta) of ``num_queries`` GNMax answers, whatever the votes.

    GNMax's RDP lambda/sigma^2 is that of a Gaussian event with noise
    multiplier sigma/sqrt(2) (sensitivity sqrt(2)); dp_accounting composes it.
    """
    num_queries, sigma, delta = _check_queries(num_queries), _check_noise(sigma, "sigma"), _check_delta(delta)
    orders = _check_orders(orders)
    if num_queries == 0:
        return 0.0
    lib = dp_lib()
    acc = lib.rdp.RdpAccountant(list(orders))
    acc.compose(lib.GaussianDpEvent(sigma / math.sqrt(2)), num_queries)
    return float(acc.get_epsilon(delta))


def lnmax_epsilon(num_queries: int, gamma: float, delta: float = 0.0) -> float:
    """(epsilon at delta) of ``num_queries`` LNMax answers (data-independent).

    Per query LNMax is (2 gamma, 0)-DP; a Laplace event with noise multiplier
    1/(2 gamma) (scale 1/gamma over sensitivity 2) lets dp_accounting's PLD
    compose them. With ``delta=0`` this is basic composition, ``2 gamma Q``.
    """
    num_queries, gamma = _check_queries(num_queries), _check_noise(gamma, "gamma")
    if delta == 0 or num_queries == 0:
        return 2 * gamma * num_queries
    delta = _check_delta(delta)
    lib = dp_lib()
    acc = lib.pld.PLDAccountant()
    acc.compose(lib.LaplaceDpEvent(1 / (2 * gamma)), num_queries)
    return float(min(acc.get_epsilon(delta), 2 * gamma * num_queries))


def gnmax_epsilon_data_dependent(teacher_preds: torch.Tensor, query_indices: Sequence[int], num_classes: int,
                                 sigma: float, delta: float,
                                 orders: Optional[Sequence[float]] = None) -> float:
    """Data-dependent (epsilon at delta) of GNMax answers to the queried examples.

    Args:
        teacher_preds: ``[num_teachers, num_examples]`` teachers' labels.
        query_indices: indices of the examples the student asked about.
        num_classes: number of labels.
        sigma: GNMax noise std.
        delta: target delta.

    Not DP to release as is (see module docstring).
    """
    sigma, delta = _check_noise(sigma, "sigma"), _check_delta(delta)
    counts, indices = _checked_counts(teacher_preds, query_indices, num_classes)
    orders = _check_orders(orders)
    total = np.zeros_like(orders)
    for i in indices:
        total += gnmax_rdp_data_dependent(gnmax_log_q(counts[i], sigma), sigma, orders)
    return _epsilon_from_rdp(total, orders, delta)


def confident_gnmax_epsilon(teacher_preds: torch.Tensor, query_indices: Sequence[int], answered: Sequence[bool],
                            num_classes: int, sigma1: float, sigma2: float, delta: float,
                            orders: Optional[Sequence[float]] = None) -> float:
    """(epsilon at delta) of Confident-GNMax on the queried examples.

    Every query pays for the threshold check, a Gaussian on the plurality
    count (sensitivity 1: RDP lambda / (2 sigma1^2), data-independent); the
    answered ones also pay GNMax(sigma2)'s data-dependent RDP. ``answered`` holds one bool per query
    (``labels != -1`` of :func:`confident_gnmax`, not the labels themselves).
    """
    sigma1, sigma2 = _check_noise(sigma1, "sigma1"), _check_noise(sigma2, "sigma2")
    delta = _check_delta(delta)
    query_indices, flags = list(query_indices), _flags(answered)
    if len(flags) != len(query_indices):  # zip truncated silently: the unpaired answers went uncharged
        raise PrivacyParameterError(f"answered needs one flag per query: {len(flags)} for {len(query_indices)}")
    counts, indices = _checked_counts(teacher_preds, query_indices, num_classes)
    orders = _check_orders(orders)
    total = len(indices) * orders / (2 * sigma1**2)
    for i, ans in zip(indices, flags):
        if ans:
            total = total + gnmax_rdp_data_dependent(gnmax_log_q(counts[i], sigma2), sigma2, orders)
    return _epsilon_from_rdp(total, orders, delta)


def _flags(answered: Sequence[bool]) -> list:
    """``answered`` as booleans; labels are refused (as flags, label 0 read as "abstained", paid nothing)."""
    flags = answered.tolist() if hasattr(answered, "tolist") else list(answered)
    if any(type(a) is not bool for a in flags):
        raise PrivacyParameterError("answered must be booleans, one per query (labels != -1, not the labels)")
    return flags
