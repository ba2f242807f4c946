"""The federated-scale benchmark's data split, with torch and the standard library only (the Flower
side runs it in its own venv, without veil): Boston Housing, features standardized as
``veil.datasets.load_boston`` does, client ``i`` gets ``rows`` records drawn with replacement by a
generator seeded with ``i``. Same split on every backend, wherever the client runs."""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import torch

BOSTON_CSV = Path(__file__).resolve().parent.parent / "veil" / "datasets" / "data" / "boston_housing.csv"


@lru_cache(maxsize=1)
def boston() -> tuple[torch.Tensor, torch.Tensor]:
    with open(BOSTON_CSV, newline="") as f:
        rows = list(csv.reader(f))[1:]
    data = torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float32)
    x, y = data[:, :-1], data[:, -1:]
    return (x - x.mean(0)) / x.std(0), y


def client_data(i: int, rows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = boston()
    idx = torch.randint(0, len(x), (rows,), generator=torch.Generator().manual_seed(i))
    return x[idx], y[idx]
