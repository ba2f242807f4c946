"""Exceptions raised by :mod:`veil.dp`.

Every error names what is wrong and, where there is one, the fix.
"""

from __future__ import annotations


class DPError(Exception):
    """Base class of all differential-privacy errors in veil."""


class UnsupportedModuleError(DPError):
    """A module has trainable parameters but no per-sample-gradient rule."""


class BatchNormNotPrivateError(UnsupportedModuleError):
    """BatchNorm mixes samples of a batch, so per-sample gradients do not exist.

    The fix is to replace it with GroupNorm (``veil.dp.fix_module(model)``).
    """


class NoiseTooLowError(DPError):
    """A caller asked for less noise than the data owner's setting allows."""


class BudgetExceededError(DPError):
    """A privacy charge would take a user past their (epsilon, delta) budget."""


class UnknownUserError(DPError):
    """The budget ledger has no budget for the user (call ``set_budget`` first)."""


class PrivacyParameterError(DPError, ValueError):
    """An epsilon, delta, noise multiplier, sample rate or bound is out of range."""
