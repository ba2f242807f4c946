"""Federated learning: federated datasets and loaders, strategies, secure aggregation, training rounds."""

from veil.federated import floptimizer, he_agg, secure_agg  # floptimizer: PySyft's sy.federated.floptimizer
from veil.federated.dataloader import FederatedDataLoader
from veil.federated.dataset import BaseDataset, FederatedDataset, federate
from veil.federated.strategies import STRATEGIES, ClientUpdate, FedAvg, FedProx, Strategy, weighted_average
from veil.federated.trainer import TrainingHistory, train

__all__ = [
    "STRATEGIES", "BaseDataset", "he_agg", "secure_agg", "ClientUpdate", "FedAvg", "FedProx", "FederatedDataLoader", "FederatedDataset",
    "Strategy", "TrainingHistory", "federate", "train", "weighted_average",
]
