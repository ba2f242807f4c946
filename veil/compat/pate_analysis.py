"""PySyft's ``perform_analysis``: the 2017 PATE moments accountant for LNMax.

Papernot et al. 2017 ("Semi-supervised Knowledge Transfer for Deep Learning
from Private Training Data", Sec. 3 and App. A): answering a query with the
Laplace noisy max of teacher votes (noise scale 1/gamma) is (2 gamma)-DP, and
its l-th log moment is bounded by
  - data-independent: min(2 gamma^2 l (l+1), 2 gamma l) (Thm. 2 with eps = 2 gamma);
  - data-dependent: log((1-q) ((1-q)/(1-e^{2 gamma} q))^l + q e^{2 gamma l}) (Thm. 3),
    where q bounds Pr[answer != plurality] from the vote gaps:
    q <= sum_{j != j*} (2 + gamma d_j) / (4 exp(gamma d_j)).
Moments add up over queries, and epsilon = min_l (alpha(l) + log(1/delta)) / l.

The data-dependent value depends on the private votes: use it to evaluate a
run, not to publish (veil.dp.pate's GNMax analysis says the same).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from veil.dp.core import MAX_EPSILON
from veil.dp.errors import PrivacyParameterError


def _real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _as_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _whole(a: Any, what: str) -> np.ndarray:
    """``a`` as int64, refused unless every entry is a whole number (none quoted: votes are private). astype
    truncated a vote 2.7 to 2 and an index 1.9 to example 1, and made a NaN -2^63."""
    raw = _as_numpy(a)
    if raw.dtype.kind not in "biuf" or \
            (raw.dtype.kind == "f" and not bool(np.all(np.isfinite(raw) & (raw == np.round(raw))))):
        raise PrivacyParameterError(f"{what} must be whole numbers")
    return raw.astype(np.int64)


def log_q_noisy_max(counts: np.ndarray, gamma: float) -> float:
    """log of an upper bound on Pr[the Laplace noisy max differs from the plurality label], in logs: with a
    large gamma ``exp(gamma * gap)`` overflowed (math range error) and q underflowed to 0 while
    ``q e^{2 gamma l}`` of the moment is not small."""
    winner = int(np.argmax(counts))
    x = gamma * np.delete(counts[winner] - counts, winner).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # (an infinite gamma * gap: a term of 0)
        logs = np.where(np.isinf(x), -np.inf, np.log(2.0 + x) - math.log(4.0) - x)
    top = float(logs.max()) if logs.size else -math.inf
    log_q = top if top == -math.inf else top + math.log(float(np.sum(np.exp(logs - top))))
    return min(log_q, math.log(1.0 - 1.0 / len(counts)) if len(counts) > 1 else -math.inf)


def q_noisy_max(counts: np.ndarray, gamma: float) -> float:
    """Upper bound on Pr[the Laplace noisy max differs from the plurality label]."""
    return math.exp(log_q_noisy_max(counts, gamma))


def log_moment(q: float, eps: float, l: float) -> float:
    """Bound on the l-th log moment of one eps-DP answer whose error probability is at most q."""
    return log_moment_of_log_q(math.log(q) if q > 0 else -math.inf, eps, l)


def log_moment_of_log_q(log_q: float, eps: float, l: float) -> float:
    """:func:`log_moment` from ``log q``, in logs (``e^eps`` overflowed for eps > 709)."""
    bound = min(0.5 * eps * eps * l * (l + 1), eps * l)
    if log_q >= math.log(0.5) or log_q + eps >= 0:  # (q >= 1/2, or 1 - e^eps q <= 0)
        return bound
    if log_q == -math.inf:  # q = 0: t = 1
        return min(bound, 0.0)
    log_1mq = math.log1p(-math.exp(log_q))
    # t = (1-q) ((1-q) / (1 - e^eps q))^l + q e^{eps l}
    log_t = np.logaddexp(log_1mq + l * (log_1mq - math.log1p(-math.exp(log_q + eps))), log_q + eps * l)
    return min(bound, float(log_t))


def perform_analysis(teacher_preds: Any, indices: Any, noise_eps: float, delta: float = 1e-5,
                     moments: int = 8, beta: float = 0.09, num_classes: int = 10) -> tuple[float, float]:
    """PATE analysis of LNMax answers, with PySyft 0.2's signature and return order.

    Args:
        teacher_preds: (num_teachers, num_examples) integer labels voted by each teacher.
        indices: the examples (column indices) that were answered with noisy max.
        noise_eps: gamma, the inverse Laplace scale used by the aggregation.
        delta: target delta.
        moments: how many log moments (l = 1..moments) to try.
        beta: accepted for PySyft compatibility (its smooth-sensitivity value was never returned).
        num_classes: the number of labels (public; 10 by default). Never inferred from the votes: with
            ``max(vote) + 1`` labels, a vote on an example nobody queried changed the queried answers' epsilon.

    Returns:
        (data-dependent epsilon, data-independent epsilon), as PySyft returned them; both count every answer
        in ``indices`` (an example asked twice is two answers).
    """
    preds = _whole(teacher_preds, "teacher_preds (labels)")
    idx = _whole(indices, "indices").reshape(-1)
    if preds.ndim != 2 or preds.size == 0:
        raise PrivacyParameterError("teacher_preds must be a non-empty (num_teachers, num_examples) array")
    # (written so that NaN fails: "noise_eps <= 0" let NaN through, and the analysis returned (nan, nan); at most
    # MAX_EPSILON / 2, the most a query may spend: past ~1e308 gamma * gap overflowed to inf and the moments to 0)
    if not (_real(noise_eps) and 0 < noise_eps <= MAX_EPSILON / 2 and _real(delta) and 0 < delta < 1) \
            or type(moments) is not int or moments < 1:
        raise PrivacyParameterError(f"need a noise_eps in (0, {MAX_EPSILON / 2:g}], 0 < delta < 1 and an integer "
                                    "moments >= 1")
    if type(num_classes) is not int or num_classes < 1:
        raise PrivacyParameterError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if preds.min() < 0 or preds.max() >= num_classes:
        raise PrivacyParameterError(f"teacher labels must be integers in [0, num_classes={num_classes})")
    num_teachers, num_examples = preds.shape
    if idx.size and (idx.min() < 0 or idx.max() >= num_examples):
        raise PrivacyParameterError(f"indices must be example indices in [0, {num_examples})")
    counts = np.zeros((num_examples, num_classes), dtype=np.int64)
    for label in range(num_classes):
        counts[:, label] = (preds == label).sum(axis=0)
    orders = np.arange(1, moments + 1, dtype=np.float64)
    eps_answer = 2.0 * noise_eps
    dependent = np.zeros(moments)
    for i in idx:
        log_q = log_q_noisy_max(counts[i], noise_eps)
        dependent += np.array([log_moment_of_log_q(log_q, eps_answer, l) for l in orders])
    # every answer in ``indices`` pays, repeated examples included (counting the columns charged fifty answers
    # about one example as one, and one answer among fifty columns as fifty)
    independent = idx.size * np.array([log_moment(1.0, eps_answer, l) for l in orders])
    eps_dep = (dependent - math.log(delta)) / orders
    eps_ind = (independent - math.log(delta)) / orders
    if eps_dep.min() == eps_dep[-1] and moments > 1:
        warnings.warn("PATE analysis: the best moment is the last one tried; increase moments", stacklevel=2)
    return float(eps_dep.min()), float(eps_ind.min())


perform_analysis_torch = perform_analysis
