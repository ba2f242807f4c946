"""Differential privacy for veil: DP-SGD, accounting, federated DP, budgets, queries, PATE."""

from veil.dp import audit, core, pate, queries, worker_functions  # worker_functions: registers the DP worker functions
from veil.dp.accountant import Accountant, epsilon_for, find_noise_multiplier
from veil.dp.budget import BudgetLedger
from veil.dp.engine import PrivacyEngine
from veil.dp.federated import DPDataOwner, FederatedDPResult, train_federated_dp
from veil.dp.errors import (
    BatchNormNotPrivateError,
    BudgetExceededError,
    DPError,
    DPReleaseError,
    NoiseTooLowError,
    PrivacyParameterError,
    ReplayedRequestError,
    UnknownUserError,
    UnsupportedModuleError,
)
from veil.dp.optimizer import DPOptimizer, make_generator
from veil.dp.per_sample import GradSampleModule, fix_module, validate
from veil.dp.queries import DPResult, dp_count, dp_histogram, dp_mean, dp_sum
from veil.dp.remote import RemoteDPOwner, remaining_budget, remote_query, train_remote_dp
from veil.dp.sampling import DPDataLoader, PoissonBatchSampler
from veil.dp.worker_owner import WorkerDP, dp_settings, enable_dp

__all__ = [
    "Accountant",
    "BudgetLedger",
    "DPDataOwner",
    "DPResult",
    "FederatedDPResult",
    "RemoteDPOwner",
    "WorkerDP",
    "dp_settings",
    "enable_dp",
    "remaining_budget",
    "remote_query",
    "train_remote_dp",
    "dp_count",
    "dp_histogram",
    "dp_mean",
    "dp_sum",
    "pate",
    "queries",
    "train_federated_dp",
    "BatchNormNotPrivateError",
    "BudgetExceededError",
    "DPDataLoader",
    "DPError",
    "DPReleaseError",
    "ReplayedRequestError",
    "audit",
    "core",
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
