"""Core benchmark: remote-op latency and the Boston Housing pointer training loop.

Run: .venv/bin/python bench/bench_core.py [--epochs 10]

Baselines run in the same process: the same op / the same training in plain
PyTorch. Prints veil / PyTorch ratios plus messages and bytes per step.
Reference (PySyft 0.2 paper table): virtual workers took 46x pure PyTorch.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import veil as sy
from veil.datasets import load_boston, train_test_split


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1))


def _best_of(fn, repeat: int = 5, number: int = 2000) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t) / number)
    return best


def bench_latency(worker: sy.VirtualWorker) -> None:
    a = torch.randn(8, 13)
    pa = a.send(worker)
    plain = _best_of(lambda: a + a)
    remote = _best_of(lambda: pa + pa)
    print(f"remote op latency (8x13 add): veil {remote * 1e6:.1f} us, torch {plain * 1e6:.2f} us, "
          f"ratio {remote / plain:.0f}x (absolute overhead {(remote - plain) * 1e6:.1f} us/op)")


def train_pure(x, y, epochs, batch):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    t = time.perf_counter()
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            opt.zero_grad()
            F.mse_loss(model(x[i:i + batch]), y[i:i + batch]).backward()
            opt.step()
    return time.perf_counter() - t, model


def train_pointers(workers, x, y, epochs, batch, pipelining=False):
    for w in workers:
        w.pipelining = pipelining
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    half = len(x) // 2
    shards = [(w, x[s].send(w), y[s].send(w)) for w, s in zip(workers, (slice(0, half), slice(half, None)))]
    me = workers[0].hook.local_worker
    me.stats.reset()
    steps = 0
    t = time.perf_counter()
    for _ in range(epochs):
        for w, px, py in shards:
            model.send(w)
            for i in range(0, px.shape[0], batch):
                opt.zero_grad()
                loss = F.mse_loss(model(px[i:i + batch]), py[i:i + batch])
                loss.backward()
                opt.step()
                steps += 1
            model.get()
    elapsed = time.perf_counter() - t
    for w in workers:
        w.pipelining = False
    return elapsed, model, me.stats.snapshot(), steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    hook = sy.TorchHook(torch)
    workers = [sy.VirtualWorker(hook, id="bench_alice"), sy.VirtualWorker(hook, id="bench_bob")]
    bench_latency(workers[0])

    x, y, _ = load_boston()
    x_train, y_train, x_test, y_test = train_test_split(x, y, seed=0)
    train_pure(x_train, y_train, 1, args.batch)  # warm-up
    t_pure, m_pure = train_pure(x_train, y_train, args.epochs, args.batch)
    t_ptr, m_ptr, stats, steps = train_pointers(workers, x_train, y_train, args.epochs, args.batch)
    with torch.no_grad():
        mse_pure = F.mse_loss(m_pure(x_test), y_test).item()
        mse_ptr = F.mse_loss(m_ptr(x_test), y_test).item()
    print(f"Boston Housing, MLP 13-32-24-1, batch {args.batch}, SGD lr 0.001, {args.epochs} epochs, "
          f"{len(x_train)} training rows on 2 VirtualWorkers")
    print(f"  pure PyTorch          {t_pure:7.2f} s   test MSE {mse_pure:6.2f}")
    print(f"  veil pointer loop     {t_ptr:7.2f} s   test MSE {mse_ptr:6.2f}   ratio {t_ptr / t_pure:5.1f}x "
          f"(reference framework: 46x)")
    print(f"  per step: {stats['messages'] / steps:.1f} messages, "
          f"{stats['bytes_sent'] / steps:.0f} B sent, {stats['bytes_received'] / steps:.0f} B received")
    t_pipe, m_pipe, pstats, _ = train_pointers(workers, x_train, y_train, args.epochs, args.batch, pipelining=True)
    with torch.no_grad():
        mse_pipe = F.mse_loss(m_pipe(x_test), y_test).item()
    print(f"  veil pointer loop, pipelined {t_pipe:7.2f} s   test MSE {mse_pipe:6.2f}   ratio {t_pipe / t_pure:5.1f}x, "
          f"{pstats['messages'] / steps:.1f} messages per step")


if __name__ == "__main__":
    main()
