"""Epsilon of DP-SGD steps whose neighbouring datasets differ by a *replaced* record.

Past a hidden count's bound (:mod:`veil.dp.padding`) a lot is drawn over ``max_records`` slots: removing one
of the first records moves the next one in, and below the bound a record becomes a zero padding row. Either
way one slot's clipped gradient changes from x to x' (both of norm <= C): the replace-one relation, whose
dominating pair for the Poisson-subsampled Gaussian is ``(1-q) N(0) + q N(-C)`` against ``(1-q) N(0) + q N(C)``.

``dp_accounting`` composes that pair exactly in its PLD accountant (``NeighboringRelation.REPLACE_ONE`` with a
``PoissonSampledDpEvent``); its RDP accountant takes replace-one only for sampling without replacement, which
is not how veil draws a lot. So the tight charge is the library's pessimistic PLD. The old charge, add/remove
RDP at ``sigma / 2`` (sensitivity 2C), stays as the bound where the PLD is not used (both are sound upper
bounds, the lower is charged): where its time would not be bounded (a small sigma, a huge privacy loss, many
distinct runs: the constants below) or it fails.
"""

from __future__ import annotations

import logging
from typing import Callable

from veil.dp.pld_cache import composed_epsilon

#: PLD discretization for replace-one runs: pessimistic (an upper bound) at any interval; 1e-3 is within 0.1%
#: of 1e-4 at the epsilons training spends (sigma 1, q 0.01, 1,000 steps: 2.8440 against 2.8434) and 5-10x
#: faster, which matters as every step recomposes the user's whole history (before the ledger's lock:
#: veil.dp.budget; its one-step PLDs kept below)
PLD_DISCRETIZATION = 1e-3

#: Below this noise multiplier in any run (replace-one or add/remove: all are composed by the PLD) the history is
#: charged by the sigma / 2 RDP bound only: the PLD's support grows as 1 / sigma (sigma 0.3, q 1, one step:
#: 2.3 s per charge; 0.1: 6.6 s and 200 MiB)
PLD_MIN_NOISE = 0.5

#: The PLD is composed only while the sigma / 2 bound is at most this: its time grows with the privacy loss
#: (sigma 1, q 1, 10,000 steps, epsilon 2e4: 5 s per charge, under the ledger's write lock), and a charge
#: that high has long spent any budget meant as one
PLD_MAX_BOUND = 100.0

#: ... and while the user's history holds at most this many distinct runs (each its own PLD, composed again at
#: every charge; the ledger allows MAX_TRAINING_EVENTS of them): about a second each at most, bounded
PLD_MAX_RUNS = 4


def _pld_epsilon(lib, runs: list, delta: float) -> float:
    """The library's PLD epsilon of all ``runs`` (sigma, q, count) under the replace-one relation (an
    add/remove run among them is charged as replace-one too: a valid, looser, pair for it)."""
    return composed_epsilon(runs, delta, True, PLD_DISCRETIZATION)  # (its one-step PLDs kept: veil.dp.pld_cache)


def replace_one_epsilon(lib, history: list, replaced: list, delta: float,
                        half_noise_bound: Callable[[], float]) -> float:
    """Epsilon of add/remove ``history`` runs composed with ``replaced`` (replace-one) runs, each run
    ``[sigma, q, count]``. ``half_noise_bound()``: the RDP epsilon of the history with every replaced run at
    sigma / 2 (sound: a replaced record is an add/remove of sensitivity 2C); the lower of two sound bounds is
    charged, so never more than before replace-one was accounted."""
    bound = half_noise_bound()
    runs = [*history, *replaced]
    if bound > PLD_MAX_BOUND or len(runs) > PLD_MAX_RUNS or any(s < PLD_MIN_NOISE for s, _q, _c in runs):
        return bound
    try:
        tight = _pld_epsilon(lib, runs, delta)
    except (ArithmeticError, ValueError, MemoryError) as e:  # (never seen with sigma <= MAX_ACCOUNTED_NOISE)
        logging.getLogger(__name__).info("replace-one PLD failed (%s): charging the sigma / 2 bound", type(e).__name__)
        return bound
    if not 0 <= tight <= bound:  # (NaN included: never a NaN, negative or higher charge)
        return bound
    return tight
