"""The allowlisted worker functions through which data scientists use owner-side DP.

- ``veil.dp.sanitized_gradient(plan, dataset, params, trainable, loss, sample_rate, noise_multiplier)``:
  one DP-SGD release: Poisson-sample the owner's records, per-record
  gradients of the plan's loss, clip each to the owner's C, sum, add
  N(0, (sigma C)^2) with the owner's sigma (or more), divide by q n, return
  the result as one flat tensor.
- ``veil.dp.query(x, name, epsilon, delta, mechanism, lower, upper, bins)``: a noisy count,
  sum, mean or histogram of a tensor on the worker; returns (value, [epsilon, delta, noise scale]).
- ``veil.dp.budget()``: the requester's [epsilon left, delta left, epsilon spent, delta spent].

Every release is charged to ``worker.requesting_user()`` in the owner's
ledger *before* it is returned; a refused charge discards the result and
raises :class:`~veil.exceptions.BudgetExceededError`. Only the sanitized
gradient or the noisy answer leaves the worker: the lot, the per-record
gradients and the exact aggregates stay local variables of these functions.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from veil.dp.errors import NoiseTooLowError, PrivacyParameterError
from veil.dp.optimizer import clip_factors, per_sample_norms
from veil.dp.plan_grads import check_forward_plan, loss_by_name, per_sample_gradients
from veil.dp.queries import QUERIES
from veil.dp.worker_owner import dp_settings
from veil.exceptions import PermissionDeniedError
from veil.messaging.allowlist import register_worker_function
from veil.workers import owner_guard


def _user(worker: Any) -> str:
    user = worker.requesting_user()
    if not isinstance(user, str) or not user:
        raise PermissionDeniedError(f"worker {worker.id!r} cannot tell who is asking; private releases refused")
    return user


def _number(value: Any, name: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise PrivacyParameterError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _sanitized_gradient(worker: Any, plan: Any, dataset: str, params: list, trainable: list, loss: str,
                        sample_rate: float, noise_multiplier: Optional[float] = None) -> torch.Tensor:
    settings = dp_settings(worker)
    if not settings.training_enabled:
        raise PermissionDeniedError(f"worker {worker.id!r} does not offer DP training (no --dp-clip/--dp-noise)")
    ds = settings.dataset(dataset)
    q = _number(sample_rate, "sample_rate")
    if not 0 < q <= settings.max_sample_rate:
        raise PrivacyParameterError(f"sample_rate must be in (0, {settings.max_sample_rate}], got {sample_rate}")
    sigma = settings.noise_multiplier if noise_multiplier is None else _number(noise_multiplier, "noise_multiplier")
    if sigma < settings.noise_multiplier:
        raise NoiseTooLowError(
            f"requested noise_multiplier {sigma} is below the minimum {settings.noise_multiplier} set by the "
            f"owner of worker {worker.id!r}; ask for at least that (or leave it unset)")
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, torch.Tensor) for p in params):
        raise PrivacyParameterError("params must be a list of tensors (the plan's state, in order)")
    if not isinstance(trainable, (list, tuple)) or len(trainable) != len(params) or \
            not all(type(t) is bool for t in trainable):
        raise PrivacyParameterError("trainable must be one bool per parameter")
    compiled = check_forward_plan(plan, len(params))
    loss_fn = loss_by_name(loss)
    user = _user(worker)
    c = settings.max_grad_norm
    with settings.lock:
        mask = torch.rand(len(ds.data), generator=settings.generator) < q
        x, y = ds.data[mask], ds.target[mask]
        samples = per_sample_gradients(compiled, [p.detach() for p in params], trainable, x, y, loss_fn)
        flat = torch.cat([g.reshape(len(x), g.shape[1:].numel()) for g in samples], dim=1)
        # Each record's whole gradient (all parameters together) is clipped to C.
        # An empty lot still gets the noise: skipping it would reveal the empty lot.
        clipped_sum = torch.einsum("b,bd->d", clip_factors(per_sample_norms([flat]), c), flat) if len(x) \
            else flat.sum(0)
        noise = torch.normal(0.0, sigma * c, clipped_sum.shape, generator=settings.generator)
        released = (clipped_sum + noise) / (q * len(ds.data))
        # Charge before release: if the budget refuses, the result is dropped here.
        settings.ledger.charge_training_step(user, sigma, q, settings.delta, settings.accountant,
                                             reason=f"DP-SGD on {worker.id}/{dataset}")
    return released.detach()


def _query(worker: Any, x: Any, name: str, epsilon: float, delta: float = 0.0, mechanism: str = "laplace",
           lower: Optional[float] = None, upper: Optional[float] = None, bins: Optional[int] = None) -> tuple:
    settings = dp_settings(worker)
    query = QUERIES.get(name) if isinstance(name, str) else None
    if query is None:
        raise PrivacyParameterError(f"unknown DP query {name!r}; choose one of {sorted(QUERIES)}")
    if not isinstance(x, torch.Tensor):
        raise PrivacyParameterError("a DP query runs on a tensor held by the worker (pass its pointer)")
    eps, dlt = _number(epsilon, "epsilon"), _number(delta, "delta")
    kwargs: dict[str, Any] = {"epsilon": eps, "delta": dlt, "mechanism": mechanism,
                              "generator": settings.generator}
    if name != "count":
        if lower is None or upper is None:
            raise PrivacyParameterError(f"a DP {name} needs bounds=(lower, upper): they fix its sensitivity")
        kwargs.update(lower=_number(lower, "lower"), upper=_number(upper, "upper"))
    if name == "histogram":
        if type(bins) is not int:
            raise PrivacyParameterError(f"a DP histogram needs an integer number of bins, got {bins!r}")
        kwargs["bins"] = bins
    with settings.lock:
        result = query(x.detach(), **kwargs)
        settings.ledger.charge(_user(worker), result.epsilon, result.delta,
                               f"DP {name} ({result.mechanism}) on {worker.id}")
    cost = torch.tensor([result.epsilon, result.delta, result.noise_scale], dtype=torch.float64)
    return result.value.detach(), cost


def _budget(worker: Any) -> torch.Tensor:
    settings = dp_settings(worker)
    user = _user(worker)
    left = settings.ledger.remaining(user)
    spent = settings.ledger.spent(user)
    return torch.tensor([*left, *spent], dtype=torch.float64)


register_worker_function("veil.dp.sanitized_gradient", _sanitized_gradient)
register_worker_function("veil.dp.query", _query)
register_worker_function("veil.dp.budget", _budget)
owner_guard.DP_RELEASES.update({"veil.dp.sanitized_gradient", "veil.dp.query", "veil.dp.budget"})
