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

from veil.dp.errors import PrivacyParameterError


def _as_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def q_noisy_max(counts: np.ndarray, gamma: float) -> float:
    """Upper bound on Pr[the Laplace noisy max differs from the plurality label]."""
    winner = int(np.argmax(counts))
    gaps = np.delete(counts[winner] - counts, winner).astype(np.float64)
    q = float(np.sum((2.0 + gamma * gaps) / (4.0 * np.exp(gamma * gaps))))
    return min(q, 1.0 - 1.0 / len(counts))


def log_moment(q: float, eps: float, l: float) -> float:
    """Bound on the l-th log moment of one eps-DP answer whose error probability is at most q."""
    bound = min(0.5 * eps * eps * l * (l + 1), eps * l)
    if q >= 0.5 or 1.0 - math.exp(eps) * q <= 0:
        return bound
    t = (1 - q) * ((1 - q) / (1 - math.exp(eps) * q)) ** l + q * math.exp(eps * l)
    return min(bound, math.log(t)) if t > 0 else bound


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
        (data-dependent epsilon, data-independent epsilon), as PySyft returned them.
    """
    preds = _as_numpy(teacher_preds).astype(np.int64)
    idx = _as_numpy(indices).astype(np.int64).reshape(-1)
    if preds.ndim != 2 or preds.size == 0:
        raise PrivacyParameterError("teacher_preds must be a non-empty (num_teachers, num_examples) array")
    # (written so that NaN fails: "noise_eps <= 0" let NaN through, and the analysis returned (nan, nan))
    if not (math.isfinite(noise_eps) and noise_eps > 0 and 0 < delta < 1) or type(moments) is not int or moments < 1:
        raise PrivacyParameterError("need a finite noise_eps > 0, 0 < delta < 1 and an integer moments >= 1")
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
        q = q_noisy_max(counts[i], noise_eps)
        dependent += np.array([log_moment(q, eps_answer, l) for l in orders])
    independent = num_examples * np.array([log_moment(1.0, eps_answer, l) for l in orders])
    eps_dep = (dependent - math.log(delta)) / orders
    eps_ind = (independent - math.log(delta)) / orders
    if eps_dep.min() == eps_dep[-1] and moments > 1:
        warnings.warn("PATE analysis: the best moment is the last one tried; increase moments", stacklevel=2)
    return float(eps_dep.min()), float(eps_ind.min())


perform_analysis_torch = perform_analysis
