"""Federated DP-SGD: data owners release only sanitized gradients.

Setting of "Private federated learning" (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models"; and the DP-SGD of Abadi
et al. 2016 run across data owners): at each step the data scientist picks
one owner at random; that owner Poisson-samples a lot of its own records,
clips every per-sample gradient, sums them, adds Gaussian noise with *its
own* noise multiplier and returns the result. Raw data and unclipped
gradients never leave the owner.

:class:`DPDataOwner` is the owner's side. It holds no network code: a worker
exposes :meth:`DPDataOwner.sanitized_gradient` through an allowlisted worker
function. :func:`train_federated_dp` is the data scientist's side.

Privacy accounting is per owner (the owners' data are disjoint, so the
overall guarantee is the worst owner's): each release by an owner is one
Poisson-subsampled Gaussian step on that owner's data at the owner's sample
rate. The random choice of owner would amplify privacy further; it is not
credited, so the reported epsilon is conservative.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from veil.dp.accountant import Accountant, epsilon_for
from veil.dp.budget import MAX_TRAINING_EVENTS
from veil.dp.errors import BudgetExceededError, PrivacyParameterError
from veil.dp import core, per_sample
from veil.dp.core import make_generator
from veil.workers.user_caches import per_user_cache

# A loss that maps (model output, target) to one loss per sample (reduction="none").
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


#: max_releases searches no further: an answer of MAX_COUNTED means "at least that many"
MAX_COUNTED = 1 << 24


@per_user_cache(per_user=64, total=4096)  # (per user, as veil.dp.queries.gaussian_sigma)
def max_releases(noise_multiplier: float, sample_rate: float, epsilon: float, delta: float, mechanism: str) -> int:
    """Largest number of identical steps whose epsilon stays within ``epsilon`` (at most ``MAX_COUNTED``).

    Cached per requesting user: owners repeat the same (sigma, q, budget), and each accountant
    call costs up to a second with PLD.
    """
    if epsilon_for(noise_multiplier, sample_rate, 1, delta, mechanism) > epsilon:
        return 0
    lo, hi = 1, 2
    while epsilon_for(noise_multiplier, sample_rate, hi, delta, mechanism) <= epsilon:
        lo, hi = hi, hi * 2
        if lo >= MAX_COUNTED:  # (hi is unchecked: return the verified lo; past it _check_budget is exact)
            return lo
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        if epsilon_for(noise_multiplier, sample_rate, mid, delta, mechanism) <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo


class DPDataOwner:
    """A data owner that answers gradient requests with DP-sanitized gradients.

    Args:
        data: the owner's inputs (first dim = records).
        target: the owner's labels / targets.
        max_grad_norm: per-record clipping bound C (the owner's choice).
        noise_multiplier: the smallest sigma this owner accepts; requests may
            ask for more noise, never less.
        budget: optional ``(epsilon, delta)``; a release that would take the
            owner past it is refused with :class:`BudgetExceededError`.
        accountant: ``"pld"`` or ``"rdp"``, for the owner's own ledger.
        generator: randomness for sampling and noise (OS-seeded by default).
    """

    def __init__(self, data: torch.Tensor, target: torch.Tensor, max_grad_norm: float, noise_multiplier: float,
                 budget: Optional[tuple[float, float]] = None, accountant: str = "pld",
                 generator: Optional[torch.Generator] = None) -> None:
        if len(data) != len(target):
            raise ValueError(f"data has {len(data)} records but target has {len(target)}")
        # (finite: an infinite C clips nothing; a NaN budget epsilon let one release through, then refused all)
        if not 0 < max_grad_norm < math.inf:
            raise PrivacyParameterError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
        if not 0 < noise_multiplier < math.inf:
            raise PrivacyParameterError(f"a data owner needs a finite noise_multiplier > 0, got {noise_multiplier}")
        if budget is not None and not (0 <= budget[0] <= math.inf and 0 < budget[1] < 1):
            raise PrivacyParameterError(f"budget must be (epsilon >= 0, delta in (0, 1)), got {budget}")
        self._data, self._target = data, target
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.budget = budget
        self.accountant = Accountant(accountant)
        self._generator = generator  # None: cryptographic sampling and noise (veil.dp.core)
        self._lock = threading.Lock()  # a release's budget check and charge, one thread at a time

    def __len__(self) -> int:
        # The record count is treated as public, as in DP-SGD's normalisation.
        return len(self._data)

    def epsilon(self, delta: float) -> float:
        """Privacy this owner has spent so far (its own ledger)."""
        return self.accountant.get_epsilon(delta)

    def _check_budget(self, sigma: float, q: float) -> None:
        if self.budget is None:
            return
        eps, delta = self.budget
        hist = self.accountant.history
        if not hist or (len(hist) == 1 and hist[0][:2] == [sigma, q]):
            allowed = max_releases(sigma, q, eps, delta, self.accountant.mechanism)
            done = hist[0][2] if hist else 0
            if done + 1 <= allowed:
                return
            if allowed < MAX_COUNTED:
                raise self._refusal(sigma, q)
        # a mixed history, or past what max_releases counts: the exact check of this one release
        trial = Accountant.from_state_dict(self.accountant.state_dict())
        trial.step(sigma, q)
        if trial.get_epsilon(delta) <= eps:
            return
        raise self._refusal(sigma, q)

    def _check_pair(self, sigma: float, q: float) -> None:
        """Every budget check composes the accountant's runs, one per distinct (sigma, q): at most
        MAX_TRAINING_EVENTS of them (as the worker ledger), a new pair past that is refused before the charge."""
        pairs = {(s, r) for s, r, _c in self.accountant.history}
        if (sigma, q) not in pairs and len(pairs) >= MAX_TRAINING_EVENTS:
            raise PrivacyParameterError(
                f"this data owner already released with {len(pairs)} distinct (noise_multiplier, sample_rate) "
                f"pairs (at most {MAX_TRAINING_EVENTS}): continue with one of them")

    def _refusal(self, sigma: float, q: float) -> BudgetExceededError:
        eps, delta = self.budget
        return BudgetExceededError(
            f"data owner refuses: one more release (sigma={sigma}, q={q}) would exceed its budget "
            f"epsilon={eps}, delta={delta}")

    def sanitized_gradient(self, model: nn.Module, params: Mapping[str, torch.Tensor], loss_fn: LossFn,
                           sample_rate: float, noise_multiplier: Optional[float] = None) -> dict[str, torch.Tensor]:
        """Computes one DP-SGD gradient on a Poisson sample of this owner's data.

        Args:
            model: the architecture (its own weights are ignored; a copy is used).
            params: parameter values by name (``model.state_dict()`` style).
            loss_fn: per-sample loss, ``loss_fn(output, target) -> [B]``.
            sample_rate: q, the probability of each record joining the lot.
            noise_multiplier: requested sigma; defaults to (and may not be
                below) the owner's.

        Returns:
            ``{name: (sum of clipped per-sample gradients + N(0, (sigma C)^2)) / (q n)}``.

        Raises:
            NoiseTooLowError: the request asks for less noise than the owner allows.
            BudgetExceededError: the owner's budget would be exceeded (nothing released).
        """
        sigma = core.check_noise(noise_multiplier, self.noise_multiplier, "this data owner")
        if type(sample_rate) not in (int, float) or not 0 < sample_rate <= 1:
            raise PrivacyParameterError(f"sample_rate must be in (0, 1], got {sample_rate}")
        local = copy.deepcopy(model)
        local.load_state_dict(dict(params), strict=False)
        per_sample.validate(local)
        trainable = [(n, p) for n, p in local.named_parameters() if p.requires_grad]
        core.check_release_dtypes([p for _, p in trainable])  # (refused before the charge)
        # Charge before computing anything that could be released; check and charge as one step (two threads
        # both passed the check of the last release the budget allowed, and both were answered).
        with self._lock:
            self._check_pair(sigma, sample_rate)
            self._check_budget(sigma, sample_rate)
            self.accountant.step(sigma, sample_rate)
            self.accountant.merge_runs()  # (alternating pairs: one run each, not one run per release)
        forward = per_sample.module_record_fn(local, [n for n, _ in trainable])

        def one(ps: tuple, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return loss_fn(forward(ps, xi).unsqueeze(0), yi.unsqueeze(0)).sum()

        like = [p for _, p in trainable]
        try:
            lot = core.poisson_mask(len(self._data), sample_rate, self._generator) if self._generator is not None \
                else core.poisson_indices(len(self._data), sample_rate)  # (time proportional to the lot)
            x, y = self._data[lot], self._target[lot]
            dummy = (torch.zeros_like(self._data[0]), torch.zeros_like(self._target[0]))
            strategy = per_sample.choose_strategy(one, like, dummy, lot_size=len(x))
            samples = per_sample.record_gradients(one, like, (x, y), strategy=strategy)
            released = core.privatize(samples, like, self.max_grad_norm, sigma,
                                      sample_rate * len(self._data), generator=self._generator)
        except Exception as e:  # the model or loss failed on the data: charged, value-free error
            raise core.generic_failure("sanitized_gradient", e) from None
        return {n: g for (n, _), g in zip(trainable, released)}


@dataclass
class FederatedDPResult:
    """What :func:`train_federated_dp` returns besides the trained model."""

    steps: int = 0
    releases: list[int] = field(default_factory=list)  # per owner
    epsilons: list[float] = field(default_factory=list)  # per owner, at ``delta``
    exhausted: list[bool] = field(default_factory=list)

    @property
    def epsilon(self) -> float:
        """The guarantee for every record: the worst owner's epsilon."""
        return max(self.epsilons) if self.epsilons else 0.0


def train_federated_dp(model: nn.Module, owners: Sequence[DPDataOwner], loss_fn: LossFn, *, steps: int,
                       sample_rate: float, optimizer: torch.optim.Optimizer, delta: float,
                       noise_multiplier: Optional[float] = None, generator: Optional[torch.Generator] = None,
                       progress: Optional[Callable[[int], None]] = None) -> FederatedDPResult:
    """The data scientist's loop: each step, one random owner, one sanitized gradient.

    Owners whose budget is spent refuse (:class:`BudgetExceededError`) and are
    not asked again; training ends early when every owner is exhausted.

    Args:
        model: trained in place.
        owners: the data owners (or proxies with the same method).
        loss_fn: per-sample loss ``(output, target) -> [B]``.
        steps: number of updates to attempt.
        sample_rate: q requested from the chosen owner.
        optimizer: applies the returned gradients to ``model``.
        delta: delta at which epsilons are reported.
        noise_multiplier: requested sigma (None: each owner's own).
        generator: owner choice randomness (OS-seeded by default).
        progress: called with the step index after each step (e.g. tqdm.update).
    """
    gen = generator if generator is not None else make_generator()
    active = list(range(len(owners)))
    result = FederatedDPResult(releases=[0] * len(owners), exhausted=[False] * len(owners))
    for step in range(steps):
        if not active:
            break
        k = active[int(torch.randint(len(active), (1,), generator=gen))]
        params = {n: p.detach() for n, p in model.named_parameters()}
        try:
            grads = owners[k].sanitized_gradient(model, params, loss_fn, sample_rate, noise_multiplier)
        except BudgetExceededError:
            active.remove(k)
            result.exhausted[k] = True
            continue
        optimizer.zero_grad()
        for n, p in model.named_parameters():
            if n in grads:
                p.grad = grads[n]
        optimizer.step()
        result.steps += 1
        result.releases[k] += 1
        if progress is not None:
            progress(step)
    result.epsilons = [o.epsilon(delta) for o in owners]
    return result


