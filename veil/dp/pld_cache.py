"""Privacy loss distributions kept between a ledger's charges.

Every DP-SGD step a ledger charges recomposes the user's whole history (veil.dp.budget): with
``dp_accounting``'s ``PLDAccountant`` that rebuilt each run's one-step PLD at every step (0.1-1 s at the
replace-one 1e-3 interval, 1-4 s at the add/remove accountant's 1e-4), where self-composing a kept one takes
milliseconds. So the one-step PLDs are kept per (sigma, q, relation, interval) (their bytes bounded), and the composed epsilon per
history: the ledger composes a step's history before its write transaction, and the transaction's
composition of the same history is then a lookup. The value is the library's, bit for bit: the same calls in
the order ``PLDAccountant`` makes them for a ``ComposedDpEvent`` of ``SelfComposedDpEvent`` runs of
``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` (PLDs are immutable: composing makes new ones).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict

#: Bytes of one-step PLDs kept, least recently used dropped first: one is ~80 KiB (sigma 1, q 0.01, replace-one
#: at 1e-3) to ~6 MiB (sigma 0.3, q 1, add/remove at 1e-4; more below), so a count alone did not bound them
ONE_STEP_BYTES = 64 << 20

#: Composed epsilons kept (floats; per history, relation, interval and delta)
COMPOSED_EPSILONS = 256

_kept: OrderedDict = OrderedDict()  # (sigma, q, replace_one, interval) -> (PLD, bytes)
_kept_lock = threading.Lock()


def _pld_bytes(pld) -> int:
    pmfs = [pld._pmf_remove] if pld._symmetric else [pld._pmf_remove, pld._pmf_add]
    # (a dense PMF's array; a sparse one's dict, ~100 bytes an entry)
    return sum(p._probs.nbytes if hasattr(p, "_probs") else 100 * len(p._loss_probs) for p in pmfs)


def one_step_pld(noise_multiplier: float, sample_rate: float, replace_one: bool, interval: float):
    """The library's pessimistic PLD of one Poisson-subsampled Gaussian step (kept: ONE_STEP_BYTES)."""
    key = (float(noise_multiplier), float(sample_rate), bool(replace_one), float(interval))
    with _kept_lock:
        if key in _kept:
            _kept.move_to_end(key)
            return _kept[key][0]
    pld = _build(*key)  # (outside the lock: two threads may both build one, the same)
    size = _pld_bytes(pld)
    with _kept_lock:
        if size <= ONE_STEP_BYTES and key not in _kept:
            _kept[key] = (pld, size)
            while sum(b for _p, b in _kept.values()) > ONE_STEP_BYTES:
                _kept.popitem(last=False)
    return pld


def _build(noise_multiplier: float, sample_rate: float, replace_one: bool, interval: float):
    import dp_accounting  # (imported on first use: veil.dp.accountant.dp_lib)
    from dp_accounting.pld import privacy_loss_distribution as pld

    relation = dp_accounting.NeighboringRelation
    return pld.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, value_discretization_interval=interval, sampling_prob=sample_rate,
        neighboring_relation=relation.REPLACE_ONE if replace_one else relation.ADD_OR_REMOVE_ONE)


@functools.lru_cache(maxsize=COMPOSED_EPSILONS)
def _composed(runs: tuple, delta: float, replace_one: bool, interval: float) -> float:
    from dp_accounting.pld import privacy_loss_distribution as pld

    total = pld.identity(value_discretization_interval=interval)
    for s, q, c in runs:
        total = total.compose(one_step_pld(s, q, replace_one, interval).self_compose(c))
    return float(total.get_epsilon_for_delta(delta))


def composed_epsilon(runs: list, delta: float, replace_one: bool, interval: float) -> float:
    """The PLD epsilon at ``delta`` of ``runs`` ([sigma, q, count], each sigma > 0 and 0 < q <= 1), all under
    one neighbouring relation, as ``PLDAccountant(relation, interval)`` answers it."""
    key = tuple((float(s), float(q), int(c)) for s, q, c in runs)
    return _composed(key, float(delta), bool(replace_one), float(interval))
