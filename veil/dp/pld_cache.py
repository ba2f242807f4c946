"""Privacy loss distributions kept between a ledger's charges.

Every DP-SGD step a ledger charges recomposes the user's whole history (veil.dp.budget): with
``dp_accounting``'s ``PLDAccountant`` that rebuilt each run's one-step PLD at every step (0.1-1 s at the
replace-one 1e-3 interval, 1-4 s at the add/remove accountant's 1e-4), where self-composing a kept one takes
milliseconds. So the one-step PLDs are kept per (sigma, q, relation, interval) (their bytes bounded), and
the composed epsilon per history, each per requesting user (veil/workers/user_caches.py: kept for all users
at once, another user's charge at the same parameters took a lookup instead of seconds, and one user's fresh
pairs evicted everyone's PLDs, rebuilt then inside the ledger's write lock): the ledger composes a step's
history before its write transaction, and the transaction's composition of the same history is then a
lookup. The value is the library's, bit for bit: the same calls in
the order ``PLDAccountant`` makes them for a ``ComposedDpEvent`` of ``SelfComposedDpEvent`` runs of
``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` (PLDs are immutable: composing makes new ones).
"""

from __future__ import annotations

from veil.workers.user_caches import ScopedCache, current_scope, per_user_cache

#: Bytes of one-step PLDs kept for all users: one is ~80 KiB (sigma 1, q 0.01, replace-one at 1e-3) to ~6 MiB
#: (sigma 0.3, q 1, add/remove at 1e-4; more below), so a count alone did not bound them
ONE_STEP_BYTES = 128 << 20
#: ... of which one user keeps at most this (its own least recently used dropped first), in one of the
#: ONE_STEP_BYTES // USER_BYTES slots (no other user can drop it: user_caches.py). At half the total, two user
#: names filled it and dropped every other user's PLDs at will
USER_BYTES = 8 << 20

#: Composed epsilons kept per user (floats; per history, relation, interval and delta), and for all users
COMPOSED_EPSILONS, ALL_COMPOSED_EPSILONS = 64, 4096

_kept = ScopedCache(USER_BYTES, ONE_STEP_BYTES)  # user -> (sigma, q, replace_one, interval) -> PLD (bytes)


def _pld_bytes(pld) -> int:
    pmfs = [pld._pmf_remove] if pld._symmetric else [pld._pmf_remove, pld._pmf_add]
    # (a dense PMF's array; a sparse one's dict, ~100 bytes an entry)
    return sum(p._probs.nbytes if hasattr(p, "_probs") else 100 * len(p._loss_probs) for p in pmfs)


def one_step_pld(noise_multiplier: float, sample_rate: float, replace_one: bool, interval: float):
    """The library's pessimistic PLD of one Poisson-subsampled Gaussian step (kept: ONE_STEP_BYTES)."""
    key = (float(noise_multiplier), float(sample_rate), bool(replace_one), float(interval))
    scope = current_scope()
    pld = _kept.get(scope, key)
    if pld is None:
        pld = _build(*key)  # (outside the cache's lock: two threads may both build one, the same)
        _kept.put(scope, key, pld, _pld_bytes(pld))
    return pld


def _build(noise_multiplier: float, sample_rate: float, replace_one: bool, interval: float):
    import dp_accounting  # (imported on first use: veil.dp.accountant.dp_lib)
    from dp_accounting.pld import privacy_loss_distribution as pld

    relation = dp_accounting.NeighboringRelation
    return pld.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, value_discretization_interval=interval, sampling_prob=sample_rate,
        neighboring_relation=relation.REPLACE_ONE if replace_one else relation.ADD_OR_REMOVE_ONE)


@per_user_cache(per_user=COMPOSED_EPSILONS, total=ALL_COMPOSED_EPSILONS)
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
