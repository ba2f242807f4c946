"""The Boston pointer training loop of bench_network.py row 3, one step per call (the callgrind drivers').

MLP 13-32-24-1, SGD lr 0.001, the training rows sent once, batches taken as bench_network's loop takes
them: rows 0..b, b..2b, ... to the end of the data (the last batch short), then again (epoch after
epoch), so a step's commands and skeleton definitions are those of the benchmark's loop.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import _mlp  # noqa: E402  (the model of bench_network's row 3)

#: bench_network.py's default batch
BATCH = 8


def boston_data() -> tuple:
    """The training split of Boston Housing (x, y), as bench_network.py row 3 uses it."""
    from veil.datasets import load_boston, train_test_split

    x, y, _ = load_boston()
    x_train, y_train, _, _ = train_test_split(x, y, seed=0)
    return x_train, y_train


def batch_starts(rows: int, batch: int) -> Iterator[int]:
    """Where each step's batch starts: ``range(0, rows, batch)``, epoch after epoch."""
    while True:
        yield from range(0, rows, batch)


def boston_step(net: Any, batch: int = BATCH) -> Callable[[], None]:
    """One training step per call of the loop on worker ``net`` (data and model sent to it first)."""
    x, y = boston_data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    px, py = x.send(net), y.send(net)
    model.send(net)
    starts = batch_starts(px.shape[0], batch)

    def step() -> None:
        i = next(starts)
        opt.zero_grad()
        F.mse_loss(model(px[i:i + batch]), py[i:i + batch]).backward()
        opt.step()
    return step
