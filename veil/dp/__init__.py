"""Differential privacy for veil: DP-SGD, accounting, federated DP, budgets, queries, PATE."""

from veil.dp.accountant import Accountant, epsilon_for, find_noise_multiplier
from veil.dp.engine import PrivacyEngine
from veil.dp.errors import (
    BatchNormNotPrivateError,
    BudgetExceededError,
    DPError,
    NoiseTooLowError,
    PrivacyParameterError,
    UnknownUserError,
    UnsupportedModuleError,
)
from veil.dp.optimizer import DPOptimizer, make_generator
from veil.dp.per_sample import GradSampleModule, fix_module, validate
from veil.dp.sampling import DPDataLoader, PoissonBatchSampler

__all__ = [
    "Accountant",
    "BatchNormNotPrivateError",
    "BudgetExceededError",
    "DPDataLoader",
    "DPError",
    "DPOptimizer",
    "GradSampleModule",
    "NoiseTooLowError",
    "PoissonBatchSampler",
    "PrivacyEngine",
    "PrivacyParameterError",
    "UnknownUserError",
    "UnsupportedModuleError",
    "epsilon_for",
    "find_noise_multiplier",
    "fix_module",
    "make_generator",
    "validate",
]
