"""Strategy interface: what clients are told each round, and how their results combine.

Aggregation functions are pure (lists of tensors in, list of tensors out) so
that they can be tested alone and reused by secure aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ClientUpdate:
    worker_id: str
    state: list  # the client's state tensors after local training
    num_samples: int
    mean_loss: float


def weighted_average(states: list[list[torch.Tensor]], weights: list[float]) -> list[torch.Tensor]:
    """sum_k w_k * state_k / sum_k w_k, tensor by tensor (FedAvg's aggregation)."""
    if not states:
        raise ValueError("nothing to aggregate")
    if len(states) != len(weights) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be non-negative, one per state, with a positive sum")
    total = float(sum(weights))
    out = []
    for tensors in zip(*states):
        if any(t.shape != tensors[0].shape for t in tensors):
            raise ValueError("clients returned states of different shapes")
        acc = torch.zeros_like(tensors[0], dtype=torch.float64)
        for t, w in zip(tensors, weights):
            acc += t.to(torch.float64) * (w / total)
        out.append(acc.to(tensors[0].dtype))
    return out


class Strategy:
    """Base strategy: override ``client_config`` and/or ``aggregate``."""

    name = "base"

    def client_config(self, round_index: int) -> dict:
        return {}

    def aggregate(self, updates: list[ClientUpdate], global_state: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def apply_secure(self, average: list[torch.Tensor], global_state: list[torch.Tensor], n_clients: int) -> list:
        """New global state from the clients' weighted average (all secure aggregation reveals)."""
        return average


def server_step(average: list[torch.Tensor], global_state: list[torch.Tensor], server_lr: float) -> list[torch.Tensor]:
    """global + server_lr * (average - global); server_lr = 1 is plain averaging."""
    if server_lr == 1.0:
        return average
    return [g + (a - g) * server_lr if a.is_floating_point() else a for a, g in zip(average, global_state)]
