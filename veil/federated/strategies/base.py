"""Strategy interface: what clients are told each round, and how their results combine.

Aggregation functions are pure (lists of tensors in, list of tensors out) so
that they can be tested alone and reused by secure aggregation.
"""

from __future__ import annotations

import math
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


def clip_update(state: list[torch.Tensor], global_state: list[torch.Tensor], bound: float) -> list[torch.Tensor]:
    """``state`` moved toward ``global_state`` until its update (state - global, L2 norm over every floating
    tensor) is at most ``bound``: how far one client can pull the model in a round, whatever it returns or
    weighs (norm bounding against model replacement, Sun et al. 2019). Other tensors (counters) are kept."""
    # Half the update, scaled by its largest entry: finite for every finite state (a float64 client's 1e200
    # entries squared to inf, and the ValueError stopped the whole round instead of clipping that client).
    halves = [s.to(torch.float64) / 2 - g.to(torch.float64) / 2 if s.is_floating_point() else None
              for s, g in zip(state, global_state, strict=True)]
    live = [h for h in halves if h is not None and h.numel()]
    if any(not bool(torch.isfinite(h).all()) for h in live):
        raise ValueError("a client's update has non-finite entries")
    largest = max((float(h.abs().max()) for h in live), default=0.0)
    if largest == 0.0:
        return state
    squares = math.fsum(float(((h / largest) ** 2).sum()) for h in live)  # (each term at most 1)
    if 2 * largest * math.sqrt(squares) <= bound:  # (the norm; inf past float64's range: clipped)
        return state
    factor = (bound / largest) / math.sqrt(squares)  # 2 * bound / norm: applied to the halves, never overflows
    return [s if h is None else (g.to(torch.float64) + h * factor).to(s.dtype)
            for s, g, h in zip(state, global_state, halves)]


class RunningWeightedSum:
    """sum_k w_k * state_k in float64, one state at a time: FedAvg over any number of clients in the
    memory of one model (``weighted_average`` needs every state at once)."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] | None = None
        self.dtypes: list[torch.dtype] = []
        self.total = 0.0
        self.count = 0

    def add(self, state: list[torch.Tensor], weight: float) -> None:
        if weight < 0:
            raise ValueError("weights must be non-negative")
        if self.sums is None:
            self.sums = [torch.zeros_like(t, dtype=torch.float64) for t in state]
            self.dtypes = [t.dtype for t in state]
        elif len(state) != len(self.sums) or any(t.shape != s.shape for t, s in zip(state, self.sums)):
            raise ValueError("clients returned states of different shapes")
        for s, t in zip(self.sums, state):
            s.add_(t.to(torch.float64), alpha=float(weight))
        self.total += float(weight)
        self.count += 1

    def average(self) -> list[torch.Tensor]:
        if self.sums is None or self.total <= 0:
            raise ValueError("nothing to aggregate (no state with a positive weight)")
        return [(s / self.total).to(dt) for s, dt in zip(self.sums, self.dtypes)]


class Aggregator:
    """Takes a round's client updates one at a time; ``result()`` is the new global state.

    This default collects the updates and calls ``strategy.aggregate`` (any strategy works);
    strategies whose aggregation is a running sum override ``Strategy.aggregator`` so that
    the coordinator's memory does not grow with the number of clients.
    """

    def __init__(self, strategy: "Strategy", global_state: list[torch.Tensor]) -> None:
        self.strategy, self.global_state = strategy, global_state
        self.updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        self.updates.append(update)

    def result(self) -> list[torch.Tensor]:
        return self.strategy.aggregate(self.updates, self.global_state)


class Strategy:
    """Base strategy: override ``client_config`` and/or ``aggregate`` (and ``aggregator`` to stream)."""

    name = "base"

    def client_config(self, round_index: int) -> dict:
        return {}

    def aggregate(self, updates: list[ClientUpdate], global_state: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def aggregator(self, global_state: list[torch.Tensor]) -> Aggregator:
        """What collects a round's updates when clients are dispatched in batches (``fl.train`` over a
        client pool): by default all updates, then :meth:`aggregate`."""
        return Aggregator(self, global_state)

    def apply_secure(self, average: list[torch.Tensor], global_state: list[torch.Tensor], n_clients: int) -> list:
        """New global state from the clients' weighted average (all secure aggregation reveals)."""
        return average


def server_step(average: list[torch.Tensor], global_state: list[torch.Tensor], server_lr: float) -> list[torch.Tensor]:
    """global + server_lr * (average - global); server_lr = 1 is plain averaging."""
    if server_lr == 1.0:
        return average
    return [g + (a - g) * server_lr if a.is_floating_point() else a for a, g in zip(average, global_state)]
