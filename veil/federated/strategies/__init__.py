"""Federated strategies, by name."""

from veil.federated.strategies.base import (
    Aggregator,
    ClientUpdate,
    RunningWeightedSum,
    Strategy,
    clip_update,
    server_step,
    weighted_average,
)
from veil.federated.strategies.fedavg import FedAvg, FedProx

STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg, "fedprox": FedProx}

__all__ = ["STRATEGIES", "Aggregator", "ClientUpdate", "RunningWeightedSum", "FedAvg", "FedProx", "Strategy", "clip_update", "server_step", "weighted_average"]
