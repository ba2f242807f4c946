"""Exceptions raised by :mod:`veil.dp`.

Every error names what is wrong and, where there is one, the fix. They all
derive from :class:`veil.exceptions.VeilError` and are registered with
:func:`veil.exceptions.register_remote_error`, so a data owner's worker can
refuse a request and the data scientist sees the same class locally.

:class:`BudgetExceededError` is *the* class of :mod:`veil.exceptions` (one
class for the whole code base): it is a ``PermissionDeniedError``, because a
spent budget is the owner's rule refusing a request.
"""

from __future__ import annotations

from veil.exceptions import BudgetExceededError, PermissionDeniedError, VeilError, register_remote_error

__all__ = [
    "BatchNormNotPrivateError",
    "BudgetExceededError",
    "DPError",
    "DPReleaseError",
    "NoiseTooLowError",
    "PrivacyParameterError",
    "ReplayedRequestError",
    "UnknownUserError",
    "UnsupportedModuleError",
]


class DPError(VeilError):
    """Base class of the differential-privacy errors defined here.

    Value-free: the DP core words these itself (parameters, budgets, a generic
    DPReleaseError for failures on data), so they pass the owner guard unchanged.
    """

    value_free = True


class UnsupportedModuleError(DPError):
    """A module has trainable parameters but no per-sample-gradient rule."""


class BatchNormNotPrivateError(UnsupportedModuleError):
    """BatchNorm mixes samples of a batch, so per-sample gradients do not exist.

    The fix is to replace it with GroupNorm (``veil.dp.fix_module(model)``).
    """


class NoiseTooLowError(DPError, PermissionDeniedError):
    """A caller asked for less noise than the data owner's setting allows."""


class UnknownUserError(DPError, BudgetExceededError):
    """The budget ledger has no budget for the user (a budget of zero: every charge is refused)."""


class PrivacyParameterError(DPError, ValueError):
    """An epsilon, delta, noise multiplier, sample rate or bound is out of range."""


class DPReleaseError(DPError):
    """A release failed on protected data. Deliberately value-free: the
    request was charged as if it had succeeded and the detail is only in the
    data owner's log (``veil.dp.owner``), so neither the error text nor
    error-vs-success depends on a record for free."""


class ReplayedRequestError(DPError, PermissionDeniedError):
    """A DP release with this request id was already charged (and released once)."""


for _cls in (DPError, DPReleaseError, ReplayedRequestError, UnsupportedModuleError, BatchNormNotPrivateError, NoiseTooLowError, UnknownUserError,
             PrivacyParameterError):
    register_remote_error(_cls)
