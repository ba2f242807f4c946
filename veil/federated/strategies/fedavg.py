"""FedAvg (McMahan et al., 2017) and FedProx (Li et al., 2020)."""

from __future__ import annotations

import math

import torch

from veil.federated.strategies.base import (
    Aggregator,
    ClientUpdate,
    RunningWeightedSum,
    Strategy,
    clip_update,
    server_step,
    weighted_average,
)


class FedAvg(Strategy):
    """Average client weights, weighted by their number of samples.

    Args:
        server_lr: step size on the averaged update (Reddi et al., 2021,
            "Adaptive Federated Optimization"). 1.0 is McMahan et al.'s FedAvg.
            With K clients and small client learning rates, averaging divides
            each round's progress by about K; ``server_lr="clients"`` uses K,
            which makes one round roughly one sequential pass over all data.
        max_update_norm: if set, each client's update (its state minus the global state) is scaled down
            to at most this L2 norm before averaging: one client, whatever it returns or claims to weigh,
            moves the model at most this far (times server_lr) per round, against model replacement
            (Bagdasaryan et al. 2020; norm bounding as in Sun et al. 2019). The coordinator must
            see each update, so it is refused with secure or encrypted aggregation.
    """

    name = "fedavg"

    def __init__(self, server_lr: float | str = 1.0, max_update_norm: float | None = None):
        if server_lr != "clients" and not (isinstance(server_lr, (int, float)) and server_lr > 0):
            raise ValueError("server_lr must be a positive number or 'clients'")
        if max_update_norm is not None and not (isinstance(max_update_norm, (int, float)) and
                                                math.isfinite(max_update_norm) and max_update_norm > 0):
            raise ValueError("max_update_norm must be a positive finite number (or None)")
        self.server_lr, self.max_update_norm = server_lr, max_update_norm

    def _bounded(self, state: list[torch.Tensor], global_state: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.max_update_norm is None:
            return state
        return clip_update(state, global_state, float(self.max_update_norm))

    def _lr(self, n_clients: int) -> float:
        return float(n_clients) if self.server_lr == "clients" else float(self.server_lr)

    def aggregate(self, updates: list[ClientUpdate], global_state: list[torch.Tensor]) -> list[torch.Tensor]:
        average = weighted_average([self._bounded(u.state, global_state) for u in updates],
                                   [u.num_samples for u in updates])
        return server_step(average, global_state, self._lr(len(updates)))

    def apply_secure(self, average: list[torch.Tensor], global_state: list[torch.Tensor], n_clients: int) -> list:
        return server_step(average, global_state, self._lr(n_clients))

    def aggregator(self, global_state: list[torch.Tensor]) -> Aggregator:
        if type(self).aggregate is not FedAvg.aggregate:  # a subclass's own aggregate sees every update
            return super().aggregator(global_state)
        return _StreamingFedAvg(self, global_state)


class _StreamingFedAvg(Aggregator):
    """FedAvg as a running weighted sum: constant memory however many clients report."""

    def __init__(self, strategy: FedAvg, global_state: list[torch.Tensor]) -> None:
        super().__init__(strategy, global_state)
        self.sum = RunningWeightedSum()

    def add(self, update: ClientUpdate) -> None:
        self.sum.add(self.strategy._bounded(update.state, self.global_state), update.num_samples)

    def result(self) -> list[torch.Tensor]:
        return server_step(self.sum.average(), self.global_state, self.strategy._lr(self.sum.count))


class FedProx(FedAvg):
    """FedAvg whose clients add mu/2 * ||w - w_global||^2 to their loss (robust to non-IID data)."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01, server_lr: float | str = 1.0, max_update_norm: float | None = None):
        if mu <= 0:
            raise ValueError("FedProx needs mu > 0 (mu = 0 is FedAvg)")
        super().__init__(server_lr, max_update_norm)
        self.mu = mu

    def client_config(self, round_index: int) -> dict:
        return {"prox_mu": self.mu}
