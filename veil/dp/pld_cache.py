"""Privacy loss distributions kept between a ledger's charges.

Every DP-SGD step a ledger charges recomposes the user's whole history (veil.dp.budget): with
``dp_accounting``'s ``PLDAccountant`` that rebuilt each run's one-step PLD at every step (0.1-1 s at the
replace-one 1e-3 interval, 1-4 s at the add/remove accountant's 1e-4), where self-composing a kept one takes
milliseconds. So the one-step PLDs are kept per (sigma, q, relation, interval), and the composed epsilon per
history: the ledger composes a step's history before its write transaction, and the transaction's
composition of the same history is then a lookup. The value is the library's, bit for bit: the same calls in
the order ``PLDAccountant`` makes them for a ``ComposedDpEvent`` of ``SelfComposedDpEvent`` runs of
``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` (PLDs are immutable: composing makes new ones).
"""

from __future__ import annotations

import functools

#: One-step PLDs kept: up to ~0.7 MiB each at the replace-one floor (sigma 0.5, interval 1e-3), a few MiB at
#: the add/remove accountant's 1e-4; a typical one (sigma 1, q 0.01) ~80 KiB
ONE_STEP_PLDS = 32

#: Composed epsilons kept (floats; per history, relation, interval and delta)
COMPOSED_EPSILONS = 256


@functools.lru_cache(maxsize=ONE_STEP_PLDS)
def one_step_pld(noise_multiplier: float, sample_rate: float, replace_one: bool, interval: float):
    """The library's pessimistic PLD of one Poisson-subsampled Gaussian step."""
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
