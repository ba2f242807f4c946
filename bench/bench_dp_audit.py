"""Empirical DP audit of veil's releases: epsilon lower bounds vs the charged epsilon.

Neighbouring datasets (D, and D plus one record at the bound), RUNS releases
each, the Clopper-Pearson threshold audit of veil.dp.audit (95% confidence).
A sound mechanism prints ratio <= 1 (lower bound / charged).

    PYTHONPATH=. python bench/bench_dp_audit.py [RUNS]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from veil.dp import core
from veil.dp.accountant import epsilon_for
from veil.dp.audit import epsilon_lower_bound
from veil.dp.queries import dp_histogram, dp_sum


def main(runs: int) -> None:
    d, d2 = torch.zeros(20, 1), torch.cat([torch.zeros(20, 1), torch.ones(1, 1)])
    others, canary = torch.randn(10, 4) * 0.01, torch.tensor([[100.0, 0.0, 0.0, 0.0]])
    h, h2 = torch.zeros(5, 13), torch.cat([torch.zeros(5, 13), torch.full((1, 13), 9.0)])
    cases = {
        "laplace sum eps=1": (1.0, 0.0, lambda x: float(dp_sum(x, 0.0, 1.0, 1.0).value), d, d2),
        "gaussian sum eps=4 d=1e-5": (4.0, 1e-5, lambda x: float(dp_sum(x, 0.0, 1.0, 4.0, 1e-5, "gaussian").value),
                                      d, d2),
        "histogram 13 cols eps=0.5": (0.5, 0.0, lambda x: float(dp_histogram(x, 2, 0.0, 10.0, 0.5).value[1]), h, h2),
        "DP-SGD step sigma=1 C=1": (epsilon_for(1.0, 1.0, 1, 1e-5, "rdp"), 1e-5,
                                    lambda g: float(core.privatize([g], [torch.zeros(4)], 1.0, 1.0, 1.0)[0][0]),
                                    others, torch.cat([others, canary])),
    }
    print(f"{'release':28} {'charged eps':>11} {'audit lower bound':>17} {'ratio':>6} {'s':>5}")
    for name, (eps, delta, fn, a_in, b_in) in cases.items():
        t = time.time()
        a = np.array([fn(a_in) for _ in range(runs)])
        b = np.array([fn(b_in) for _ in range(runs)])
        lb = epsilon_lower_bound(a, b, delta)
        print(f"{name:28} {eps:11.3f} {lb:17.3f} {lb / eps:6.2f} {time.time() - t:5.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
