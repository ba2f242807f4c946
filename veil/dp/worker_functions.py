"""The allowlisted worker functions through which data scientists use owner-side DP.

- ``veil.dp.sanitized_gradient(plan, dataset, params, trainable, loss, sample_rate, noise_multiplier,
  request_id)``: one DP-SGD release through :func:`veil.dp.core.privatize`:
  Poisson-sample the owner's records, per-record gradients of the plan's loss
  (a record the plan fails on, or whose gradient is NaN/inf, contributes
  zero), clip each to the owner's C, sum, add N(0, (sigma C)^2) with the
  owner's sigma (or more), divide by q n (n: the owner's public nominal count
  while the count is hidden), return one flat tensor. On a hidden count's
  bound the step is charged for a replaced record in the slots
  (:mod:`veil.dp.padding`, :mod:`veil.dp.replace_one`). The owner's data enters
  only as the named dataset; under a session quota the plan is sized on the dry
  run and the lot computed in chunks that fit.
- ``veil.dp.query(x, name, epsilon, delta, mechanism, lower, upper, bins, request_id)``: a noisy
  count, sum, mean or histogram of a tensor on the worker (OpenDP noise; over a
  hidden count's bound, noised for a replaced record too: :mod:`veil.dp.padding`);
  returns (value, [epsilon, delta, noise scale]).
- ``veil.dp.budget()``: the requester's [epsilon left, delta left, epsilon spent, delta spent].

Order of every release: validate the parameters (and dry-run a plan on a zero
record of the public shape), then charge ``worker.requesting_user()`` in the
owner's ledger (refused: :class:`~veil.exceptions.BudgetExceededError`; a
repeated ``request_id``: :class:`~veil.dp.errors.ReplayedRequestError`),
then compute. Errors before the charge speak only of parameters and public
shapes; a failure after it is the value-free
:class:`~veil.dp.errors.DPReleaseError` (detail in the owner's log). Only the
sanitized gradient or the noisy answer leaves the worker.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from veil.dp import core
from veil.dp.errors import PrivacyParameterError
from veil.dp.padding import all_slots, masked_lot_gradients, padded_rows, release_bound
from veil.dp.plan_grads import check_forward_plan, loss_by_name, per_sample_gradients, values_may_raise
from veil.dp.queries import QUERIES, query_cost
from veil.dp.worker_owner import dp_settings
from veil.exceptions import PermissionDeniedError
from veil.messaging.allowlist import register_worker_function
from veil.plans.remote import session_budget
from veil.workers import owner_guard
from veil.workers.cancellation import outside_turn
from veil.workers.quota import QuotaExceededError


def _user(worker: Any) -> str:
    user = worker.requesting_user()
    if not isinstance(user, str) or not user:
        raise PermissionDeniedError(f"worker {worker.id!r} cannot tell who is asking; private releases refused")
    return user


def _number(value: Any, name: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise PrivacyParameterError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _request_id(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not 8 <= len(value) <= 128:
        raise PrivacyParameterError("request_id must be a string of 8 to 128 characters")
    return value


def _dummy(t: torch.Tensor) -> torch.Tensor:
    """One record of the public shape and dtype, all zeros (no owner value in it)."""
    return torch.zeros((1, *t.shape[1:]), dtype=t.dtype)


def _sanitized_gradient(worker: Any, plan: Any, dataset: str, params: list, trainable: list, loss: str,
                        sample_rate: float, noise_multiplier: Optional[float] = None,
                        request_id: Optional[str] = None) -> torch.Tensor:
    settings = dp_settings(worker)
    if not settings.training_enabled:
        raise PermissionDeniedError(f"worker {worker.id!r} does not offer DP training (no --dp-clip/--dp-noise)")
    ds = settings.dataset(dataset)
    count = _public_count(worker, settings, ds)
    q = _number(sample_rate, "sample_rate")
    if not 0 < q <= settings.max_sample_rate:
        raise PrivacyParameterError(f"sample_rate must be in (0, {settings.max_sample_rate}], got {sample_rate}")
    sigma = core.check_noise(noise_multiplier, settings.noise_multiplier, f"the owner of worker {worker.id!r}")
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, torch.Tensor) for p in params):
        raise PrivacyParameterError("params must be a list of tensors (the plan's state, in order)")
    if not isinstance(trainable, (list, tuple)) or len(trainable) != len(params) or \
            not all(type(t) is bool for t in trainable):
        raise PrivacyParameterError("trainable must be one bool per parameter")
    core.check_release_dtypes([p for p, t in zip(params, trainable) if t])
    compiled = check_forward_plan(plan, len(params))
    loss_fn = loss_by_name(loss)
    rid = _request_id(request_id)
    user = _user(worker)
    state = [p.detach() for p in params]
    like = [p for p, t in zip(state, trainable) if t]
    budget = session_budget(worker)  # a session quota: the plan's ops are sized (None without one)
    # Dry run on a dummy record of the public shape: a plan that cannot run at
    # all is refused here, in the clear and free, before any owner value is read.
    try:
        per_sample_gradients(compiled, state, trainable, _dummy(ds.data), _dummy(ds.target), loss_fn, strict=True,
                             size_check=budget)
    except (PrivacyParameterError, QuotaExceededError):
        raise
    except Exception as e:  # noqa: BLE001 - any error on a dummy input is the plan's own fault
        if isinstance(e.__cause__, PrivacyParameterError):  # refused at one of its ops (a value-sized one)
            raise e.__cause__ from None
        raise PrivacyParameterError(f"the plan fails on a dummy input of the dataset's public shape: "
                                    f"{type(e).__name__}: {e}") from None
    chunk = _records_per_chunk(worker, budget, like)
    # a hidden count: the lot is drawn over the owner's public max_records rows, padding masked (refused
    # here, free, without a bound; records past it unread): its size, so the release's time, follows the
    # bound, not the count
    bound = release_bound(worker, settings, ds.data, ds.target, dataset=True)
    if bound is not None and values_may_raise(compiled.spec):
        # a record the plan raises on is run twice (its attempt, then the dummy record), a zero padding row
        # once: a plan raising on every real record made the lot's work max_records + (records in the lot)
        raise PrivacyParameterError(
            f"plan {compiled.spec.name!r} has ops that may raise on a record's values (indexing, embedding, "
            "integer division by a value, ...): on data whose record count is hidden a failing record costs "
            "more work than a padding row, so such plans are refused there")
    c = settings.max_grad_norm
    # a lot drawn over the bound's slots: past the bound, removing one of the first max_records records moves
    # the next one in, below it a record becomes a zero padding row: one slot's clipped gradient changes
    # from x to x' (both of norm <= C), accounted under the replace-one relation (veil.dp.replace_one;
    # whatever the count: charging only data past the bound told n > N)
    note = "" if bound is None else ", hidden count: for a replaced record"
    with settings.user_lock(user):
        # Charge first (before any work on the data): a failure below stays charged.
        with outside_turn():  # (the ledger only: see _query)
            settings.ledger.charge_training_step(user, sigma, q, settings.delta, settings.accountant,
                                                 reason=f"DP-SGD on {worker.id}/{dataset}{note}", request_id=rid,
                                                 replace_one=bound is not None)
        try:
            if bound is None:
                lot = core.poisson_indices(len(ds.data), q)  # (in time proportional to the lot, not the count)
                x, y, present = ds.data[lot], ds.target[lot], None
            else:  # (the lot's slots read from the live tensors: a gather of the lot's size)
                lot = core.poisson_indices(bound, q)
                data, target = padded_rows(ds.data, lot), padded_rows(ds.target, lot)
                # (a slot is a record when both are: the owner's data grown without its targets, or past
                # the bound, is read over the pairs it has, never a record paired with a padding target)
                x, y, present = data.rows, target.rows, data.present & target.present
            sums = [torch.zeros_like(p) for p in like]
            step = chunk or max(len(x), 1)
            for at in range(0, len(x), step):  # clipped per record, summed chunk by chunk
                samples = per_sample_gradients(compiled, state, trainable, x[at:at + step], y[at:at + step], loss_fn)
                if present is not None:
                    samples = masked_lot_gradients(samples, present[at:at + step])
                for total, part in zip(sums, core.clipped_sum(samples, c, like)):
                    total.add_(part)
                del samples
            released = core.noisy_mean(sums, c, sigma, q * count)
            flat = torch.cat([g.reshape(-1) for g in released]) if released else torch.zeros(0)
        except Exception as e:  # noqa: BLE001
            raise core.generic_failure(f"DP-SGD on {worker.id}/{dataset}", e) from None
    return flat.detach()


def _public_count(worker: Any, settings: Any, ds: Any) -> int:
    """The record count a release divides by: its noise scale ``sigma C / (q count)`` shows it, so while the
    owner hides the count it is the owner's public ``nominal_count`` (none: refused, before any charge)."""
    if not settings.hide_count:
        return len(ds.data)
    if settings.nominal_count is None:
        raise PermissionDeniedError(
            f"worker {worker.id!r} keeps its record counts private and declared no public count for DP training "
            "to divide by (the owner's enable_dp(..., nominal_count=N) or --dp-nominal-count N)")
    return settings.nominal_count


#: what one record costs a lot beyond its plan's forward ops, in gradient-sized tensors (its row of the
#: per-record gradients, and the clipping's scratch)
_GRADIENT_COPIES = 3


def _records_per_chunk(worker: Any, budget: Any, like: list) -> int:
    """How many records' gradients are computed together (0: the whole lot at once, without a quota). Under
    a session quota, as many as fit its room, from the dry run's sized ops and the gradients' size (public:
    never the lot's size, nor the data); refused before any charge when one record does not fit."""
    if budget is None:
        return 0
    per_record = budget.held + _GRADIENT_COPIES * sum(p.numel() * p.element_size() for p in like)
    monitor = worker.monitor
    monitor.check_room(budget.principal, per_record, "veil.dp.sanitized_gradient")  # one record must fit
    room = monitor.max_session_bytes - monitor.session_bytes(budget.principal.namespace)
    return max(1, room // max(per_record, 1))


def _query(worker: Any, x: Any, name: str, epsilon: float, delta: float = 0.0, mechanism: str = "laplace",
           lower: Optional[float] = None, upper: Optional[float] = None, bins: Optional[int] = None,
           request_id: Optional[str] = None) -> tuple:
    settings = dp_settings(worker)
    query = QUERIES.get(name) if isinstance(name, str) else None
    if query is None:
        shown = repr(name) if isinstance(name, str) else f"of type {type(name).__name__}"
        raise PrivacyParameterError(f"unknown DP query {shown}; choose one of {sorted(QUERIES)}")
    if not isinstance(x, torch.Tensor):
        raise PrivacyParameterError("a DP query runs on a tensor held by the worker (pass its pointer)")
    eps, dlt = core.check_epsilon(epsilon), _number(delta, "delta")
    kwargs: dict[str, Any] = {"epsilon": eps, "delta": dlt, "mechanism": mechanism}
    if name != "count":
        if lower is None or upper is None:
            raise PrivacyParameterError(f"a DP {name} needs bounds=(lower, upper): they fix its sensitivity")
        kwargs.update(lower=_number(lower, "lower"), upper=_number(upper, "upper"))
    if name == "histogram":
        if type(bins) is not int or not 1 <= bins <= settings.max_bins:
            raise PrivacyParameterError(
                f"a DP histogram needs an integer number of bins in [1, {settings.max_bins}] (the owner's "
                f"limit), got {bins!r}")
        kwargs["bins"] = bins
    rid = _request_id(request_id)
    # Validates the mechanism / bounds / delta on the public shape only: nothing is computed yet.
    cost_eps, cost_delta = query_cost(name, x.shape, **kwargs)
    user = _user(worker)
    # a hidden count: a sum, mean or histogram reads the owner's max_records padded rows, padding masked
    # (refused here, free, without a bound); a count's work never followed the count
    bound = release_bound(worker, settings, x) if name != "count" else None
    with settings.user_lock(user):
        # outside the worker's turn: the charge touches the ledger only, and a COMMIT whose answer was lost is
        # looked up for up to ~10 s, which held every other session's command (the value is already in hand)
        with outside_turn():
            settings.ledger.charge(user, cost_eps, cost_delta, f"DP {name} ({mechanism}) on {worker.id}",
                                   request_id=rid)
        try:
            if bound is None:  # (a count reads len(x) only: not even a view of x sized by it)
                result = query(x if name == "count" else x.detach(), **kwargs)
            else:
                padded = all_slots(x, bound)
                result = query(padded.rows, present=padded.present, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise core.generic_failure(f"DP {name} on {worker.id}", e) from None
    cost = torch.tensor([result.epsilon, result.delta, result.noise_scale], dtype=torch.float64)
    return result.value.detach(), cost


def _budget(worker: Any) -> torch.Tensor:
    settings = dp_settings(worker)
    user = _user(worker)
    with outside_turn():  # the ledger only (as a release's charge): a charge holding it held every session
        left, spent = settings.ledger.remaining_and_spent(user)  # (one read: a charge between two disagreed)
    return torch.tensor([*left, *spent], dtype=torch.float64)


register_worker_function("veil.dp.sanitized_gradient", _sanitized_gradient)
register_worker_function("veil.dp.query", _query)
register_worker_function("veil.dp.budget", _budget)
owner_guard.DP_RELEASES.update({"veil.dp.sanitized_gradient", "veil.dp.query", "veil.dp.budget"})
owner_guard.DP_DATA_ARGS["veil.dp.query"] = (0, "x")  # the gradient's data is the owner's dataset, named
