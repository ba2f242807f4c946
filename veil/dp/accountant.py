"""Privacy accounting through Google's ``dp_accounting`` library.

veil does none of the privacy mathematics itself: an accountant records the
history of noisy steps (noise multiplier, sample rate, count) and, when asked
for epsilon, describes that history as a ``dp_accounting`` event
(``PoissonSampledDpEvent`` of a ``GaussianDpEvent``, self-composed per run of
identical steps, all composed) and hands it to a fresh RDP or PLD accountant.
Rebuilding from the history keeps the reported epsilon identical to calling
``dp_accounting`` directly on the same mechanism and lets PLD use its fast
self-composition instead of composing step by step.
"""

from __future__ import annotations

import logging
import math
import operator
from types import ModuleType
from typing import TYPE_CHECKING, Callable

import numpy as np

from veil.dp.errors import PrivacyParameterError
from veil.dp.pld_cache import composed_epsilon
from veil.dp.replace_one import replace_one_epsilon
from veil.workers.user_caches import per_user_cache

if TYPE_CHECKING:
    import dp_accounting


def dp_lib() -> ModuleType:
    """``dp_accounting``, imported on first use: it pulls in scipy.signal and scipy.stats (~0.8 s, a third of
    ``import veil``), which every worker process and CLI run paid although most never account."""
    import dp_accounting

    return dp_accounting


def _pld_accountant() -> dp_accounting.PrivacyAccountant:
    return dp_lib().pld.PLDAccountant()


#: PLDAccountant's default discretization (composed from kept one-step PLDs while "pld" is _pld_accountant)
_PLD_INTERVAL = 1e-4

# name -> factory of an empty dp_accounting accountant (the extension point).
ACCOUNTANT_FACTORIES: dict[str, Callable[[], dp_accounting.PrivacyAccountant]] = {
    "pld": _pld_accountant,
    "rdp": lambda: dp_lib().rdp.RdpAccountant(),
}


def sgm_event(noise_multiplier: float, sample_rate: float, steps: int = 1) -> dp_accounting.DpEvent:
    """The DP event of ``steps`` Poisson-subsampled Gaussian mechanism steps."""
    lib = dp_lib()
    event = lib.PoissonSampledDpEvent(sample_rate, lib.GaussianDpEvent(noise_multiplier))
    return lib.SelfComposedDpEvent(event, steps) if steps != 1 else event


@per_user_cache(per_user=64, total=4096)  # (per user: a shared one's 0.1 s miss said who trained with what)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> tuple[tuple[float, ...], np.ndarray]:
    """RDP orders and the RDP of one subsampled Gaussian step at each order.

    Computing a step's RDP costs ~0.1 s (fractional orders); RDP composes
    additively, so a worker that charges budgets step by step computes it once
    per (sigma, q) and scales it by the step count. ``RdpAccountant`` keeps the
    vector in ``_rdp`` (no public getter); epsilon then comes from the library's
    own ``compute_epsilon``, so the result equals ``RdpAccountant.get_epsilon``.
    """
    acc = dp_lib().rdp.RdpAccountant()
    acc.compose(sgm_event(noise_multiplier, sample_rate))
    return tuple(acc._orders), np.array(acc._rdp, dtype=float)


def _check_step(noise_multiplier: float, sample_rate: float) -> None:
    if not 0 < noise_multiplier < math.inf:  # (inf: no number the PLD or RDP library composes)
        raise PrivacyParameterError(
            f"noise_multiplier must be finite and > 0 for a private step, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise PrivacyParameterError(f"sample_rate must be in (0, 1], got {sample_rate}")


#: A larger noise multiplier is accounted at this one (more noise never costs more, so this over-charges a
#: step whose cost is already ~0): the libraries square sigma, and a scientist's sigma of 1e300 raised an
#: OverflowError from the ledger's charge
MAX_ACCOUNTED_NOISE = 1e6


def accounted_noise(noise_multiplier: float) -> float:
    """The noise multiplier a step is accounted at (at most :data:`MAX_ACCOUNTED_NOISE`)."""
    return min(noise_multiplier, MAX_ACCOUNTED_NOISE)


def _whole_count(count: object) -> int:
    """A number of steps: a whole number >= 1 (a NaN count was accepted, ``nan < 1`` being False, and composed
    to an RDP epsilon of 0.0 for the whole history; 1.5 was composed as one and a half steps)."""
    try:
        steps = operator.index(count)
    except TypeError:
        raise PrivacyParameterError(f"count must be a whole number of steps, got {count!r}") from None
    if steps < 1:
        raise PrivacyParameterError(f"count must be >= 1, got {count!r}")
    return steps


class Accountant:
    """Tracks the privacy spent by a sequence of subsampled Gaussian steps.

    Args:
        mechanism: ``"pld"`` (privacy loss distributions, tighter; default) or
            ``"rdp"`` (Renyi DP), a key of :data:`ACCOUNTANT_FACTORIES`.

    Example:
        >>> acc = Accountant("pld")
        >>> acc.step(noise_multiplier=1.1, sample_rate=0.01, count=1000)
        >>> eps = acc.get_epsilon(1e-5)
    """

    def __init__(self, mechanism: str = "pld") -> None:
        if mechanism not in ACCOUNTANT_FACTORIES:
            raise ValueError(f"unknown accountant {mechanism!r}; choose one of {sorted(ACCOUNTANT_FACTORIES)}")
        self.mechanism = mechanism
        # Runs of identical steps: [noise_multiplier, sample_rate, count].
        self.history: list[list] = []
        # Runs of steps whose neighbouring datasets differ by a replaced record (a hidden count's bounded
        # slots: veil.dp.replace_one), composed with the history under the replace-one relation
        self.replaced: list[list] = []
        # delta -> (generation, epsilon): an entry counts only while its generation is current (a reader that
        # composed the history before a step must not leave its lower epsilon behind for later reads)
        self._cache: dict[float, tuple[int, float]] = {}
        self._generation = 0

    def step(self, noise_multiplier: float, sample_rate: float, count: int = 1, replace_one: bool = False) -> None:
        """Records ``count`` steps of the Poisson-subsampled Gaussian mechanism (``replace_one``: steps whose
        neighbouring datasets differ by one replaced record, e.g. over a hidden count's slots)."""
        _check_step(noise_multiplier, sample_rate)
        noise_multiplier = accounted_noise(noise_multiplier)
        count = _whole_count(count)
        if type(replace_one) is not bool:
            raise PrivacyParameterError(f"replace_one must be a bool, got {replace_one!r}")
        runs = self.replaced if replace_one else self.history
        if runs and runs[-1][:2] == [noise_multiplier, sample_rate]:
            runs[-1][2] += count
        else:
            runs.append([noise_multiplier, sample_rate, count])
        self._changed()

    def _changed(self) -> None:
        """After the history changed (the generation after the change: see get_epsilon)."""
        self._generation += 1
        self._cache.clear()

    def merge_runs(self) -> None:
        """Puts the steps of each (sigma, q) pair in one run (composition does not depend on the order): the
        history, and the time to compute its epsilon, grow with the distinct pairs, not with alternations."""
        for name in ("history", "replaced"):
            old = getattr(self, name)
            runs: dict[tuple, int] = {}
            for s, q, c in old:
                runs[(s, q)] = runs.get((s, q), 0) + c
            if len(runs) != len(old):
                setattr(self, name, [[s, q, c] for (s, q), c in runs.items()])
                self._changed()

    @property
    def steps(self) -> int:
        """Total number of recorded steps."""
        return sum(c for _, _, c in self.history) + sum(c for _, _, c in self.replaced)

    def pairs(self) -> set[tuple[float, float, bool]]:
        """The distinct (noise multiplier, sample rate, replace-one) runs: what an epsilon's time grows with."""
        return {(s, q, False) for s, q, _c in self.history} | {(s, q, True) for s, q, _c in self.replaced}

    def event(self) -> dp_accounting.DpEvent:
        """The add/remove history as one composed ``dp_accounting`` event (replace-one runs are not in it:
        they are composed under another neighbouring relation, :mod:`veil.dp.replace_one`)."""
        return dp_lib().ComposedDpEvent([sgm_event(s, q, c) for s, q, c in self.history])

    def get_epsilon(self, delta: float) -> float:
        """Epsilon of everything recorded so far at the given delta."""
        if not 0 < delta < 1:
            raise PrivacyParameterError(f"delta must be in (0, 1), got {delta}")
        # a copy of the history read after its generation: another thread's step meanwhile makes the result
        # one of an older generation, answered to this caller but never cached for the next
        generation = self._generation
        history = [list(h) for h in self.history]
        replaced = [list(h) for h in self.replaced]
        if not history and not replaced:
            return 0.0
        cached = self._cache.get(delta)
        if cached is not None and cached[0] == generation:
            return cached[1]
        if replaced:
            epsilon = replace_one_epsilon(dp_lib(), history, replaced, delta,
                                          lambda: _rdp_epsilon([*history, *[[s / 2, q, c] for s, q, c in replaced]],
                                                               delta))
        elif self.mechanism == "rdp":
            epsilon = _rdp_epsilon(history, delta)
        elif self.mechanism == "pld" and ACCOUNTANT_FACTORIES["pld"] is _pld_accountant:
            # (PLDAccountant()'s value, its one-step PLDs kept: each charge rebuilt them, 1-4 s a step)
            epsilon = composed_epsilon(history, delta, False, _PLD_INTERVAL)
        else:
            acc = ACCOUNTANT_FACTORIES[self.mechanism]()
            acc.compose(dp_lib().ComposedDpEvent([sgm_event(s, q, c) for s, q, c in history]))
            epsilon = float(acc.get_epsilon(delta))
        self._cache[delta] = (generation, epsilon)
        return epsilon

    def state_dict(self) -> dict:
        """A plain-data snapshot (for checkpoints or a worker's disk)."""
        state = {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}
        if self.replaced:  # (absent otherwise: a snapshot of add/remove steps reads as before)
            state["replace_one"] = [list(h) for h in self.replaced]
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "Accountant":
        """Rebuilds an accountant from :meth:`state_dict`."""
        acc = cls(state["mechanism"])
        for s, q, c in state["history"]:
            acc.step(s, q, c)
        for s, q, c in state.get("replace_one", ()):
            acc.step(s, q, c, replace_one=True)
        return acc


def _rdp_epsilon(runs: list, delta: float) -> float:
    """The library's RDP epsilon of add/remove ``runs`` (sigma, q, count), one step's RDP cached per pair."""
    orders = _rdp_one_step(*runs[0][:2])[0]
    total = sum(c * _rdp_one_step(s, q)[1] for s, q, c in runs)
    return float(dp_lib().rdp.rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float, mechanism: str = "pld") -> float:
    """Epsilon of ``steps`` subsampled Gaussian steps (a one-shot helper)."""
    acc = Accountant(mechanism)
    acc.step(noise_multiplier, sample_rate, steps)
    return acc.get_epsilon(delta)


def find_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    mechanism: str = "pld",
    tol: float = 1e-3,
) -> float:
    """Smallest noise multiplier whose ``steps`` steps stay within the target.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (Brent search over the
    accountant's epsilon), so the result is exactly as private as claimed by
    the same accountant that later tracks training.
    """
    if not target_epsilon > 0:
        raise PrivacyParameterError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < target_delta < 1:
        raise PrivacyParameterError(f"target_delta must be in (0, 1), got {target_delta}")
    _check_step(1.0, sample_rate)
    def search(mech: str, bracket) -> float:
        return dp_lib().calibrate_dp_mechanism(
            ACCOUNTANT_FACTORIES[mech],
            lambda s: sgm_event(s, sample_rate, steps),
            target_epsilon,
            target_delta,
            bracket_interval=bracket,
            tol=tol,
        )

    # RDP is cheap at any sigma; PLD at very small sigma needs huge FFTs (tens
    # of GiB). RDP's epsilon upper-bounds PLD's in practice, so the RDP answer
    # is a safe upper end of the PLD bracket and half of it a safe lower end.
    # dp_accounting warns (via absl) for every fractional RDP order it drops
    # at small sigma; the bound stays valid, so keep the search quiet.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        sigma = search("rdp", dp_lib().LowerEndpointAndGuess(0.1, 1.0))
    finally:
        absl_logger.setLevel(level)
    if mechanism != "rdp":
        lower = max(0.5 * sigma, 0.3)
        if epsilon_for(lower, sample_rate, steps, target_delta, mechanism) > target_epsilon:
            sigma = search(mechanism, dp_lib().ExplicitBracketInterval(lower, sigma))
    # Brent returns a point within tol of the optimum, possibly on the wrong
    # side of it; step up until the target is met so the guarantee holds.
    while epsilon_for(sigma, sample_rate, steps, target_delta, mechanism) > target_epsilon:
        sigma += tol
    return float(sigma)
