"""FedAvg with many simulated clients on one machine: time per round and memory.

Run: .venv/bin/python bench/bench_fl_scale.py [--clients 1000] [--rounds 3]

Each client is a VirtualWorker holding a slice of Boston Housing (resampled
with replacement so that every client has --rows rows) and a training plan for
a linear model. Memory is the process's resident set size (psutil), before the
clients exist and at the end. Baseline: the same number of client updates as
plain PyTorch loops in the same process.
"""

from __future__ import annotations

import argparse
import gc
import time

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import veil as sy
from veil import federated as fl
from veil.datasets import load_boston


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    proc = psutil.Process()
    hook = sy.TorchHook(torch)
    x, y, _ = load_boston()
    g = torch.Generator().manual_seed(0)
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    workers = [sy.VirtualWorker(hook, id=f"client{i}") for i in range(args.clients)]
    datasets = []
    for w in tqdm(workers, desc="sending client data", unit="client"):
        idx = torch.randint(0, len(x), (args.rows,), generator=g)
        datasets.append(fl.BaseDataset(x[idx], y[idx]).send(w))
    fed = fl.FederatedDataset(datasets)
    setup = time.perf_counter() - t
    model = nn.Linear(13, 1)
    t = time.perf_counter()
    hist = fl.train(model, fed, rounds=args.rounds, lr=0.001, batch_size=8)
    veil_time = time.perf_counter() - t
    gc.collect()
    rss1 = proc.memory_info().rss

    # Baseline: the same client updates in plain PyTorch (no workers, no averaging cost).
    ref = nn.Linear(13, 1)
    t = time.perf_counter()
    for _ in range(args.rounds):
        for ds in datasets:
            opt = torch.optim.SGD(ref.parameters(), lr=0.001)
            for i in range(0, args.rows, 8):
                opt.zero_grad()
                F.mse_loss(ref(x[i:i + 8]), y[i:i + 8]).backward()
                opt.step()
    plain_time = time.perf_counter() - t
    print(f"\n{args.clients} clients x {args.rows} rows, linear model, {args.rounds} FedAvg rounds")
    print(f"  set-up (workers + data): {setup:.1f} s")
    print(f"  veil: {veil_time:.2f} s ({veil_time / args.rounds:.2f} s/round); plain PyTorch loops: "
          f"{plain_time:.2f} s; ratio {veil_time / plain_time:.1f}x")
    print(f"  memory: {rss0 / 2**20:.0f} MiB before clients, {rss1 / 2**20:.0f} MiB after "
          f"({(rss1 - rss0) / 2**10 / args.clients:.1f} KiB per client)")
    print(f"  last round: train loss {hist.rounds[-1].train_loss:.2f} over {len(hist.rounds[-1].clients)} clients")


if __name__ == "__main__":
    main()
