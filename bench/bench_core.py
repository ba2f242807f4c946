"""Core benchmark: remote-op latency and the Boston Housing pointer training loop.

Run: .venv/bin/python bench/bench_core.py [--epochs 10] [--repeat 3] [--network]

Baselines run in the same process: the same op / the same training in plain
PyTorch. Prints veil / PyTorch ratios plus messages and bytes per step.
Reference (PySyft 0.2 paper table): virtual workers took 46x pure PyTorch.

Each measurement is repeated ``--repeat`` times, interleaved with its baseline,
and the best of each is compared: on a shared 2-core machine single runs swing
by 2x. Torch runs on one thread (``--threads``) in both: with two OpenMP threads
on busy cores an 8x13 ``linear`` took 580 us instead of 12 us, which measured the
neighbours, not veil. ``--network`` runs the loop over one ``veil worker`` process
on loopback instead of two VirtualWorkers (issue 19's "Boston pointer loop over one
network worker").

Modes: ``sync`` is ``worker.pipelining = False`` (one request/reply per command),
``default`` is a worker as constructed (now: pipelining on), ``piped`` sets
``worker.pipelining = True`` (commands whose result ids the client names ride,
batched in order, on the next message that needs a reply).
"""

from __future__ import annotations

import argparse
import os
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
    remote = _best_of(lambda: (pa + pa).shape)
    print(f"remote op latency (8x13 add, pipelining={worker.pipelining}): veil {remote * 1e6:.1f} us, "
          f"torch {plain * 1e6:.2f} us, ratio {remote / plain:.0f}x (absolute overhead {(remote - plain) * 1e6:.1f} us/op)")


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
    """The pointer loop over 1 or 2 workers; ``pipelining`` None keeps each worker's own setting."""
    saved = [w.pipelining for w in workers]
    if pipelining is not None:
        for w in workers:
            w.pipelining = pipelining
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    cut = [round(k * len(x) / len(workers)) for k in range(len(workers) + 1)]
    shards = [(w, x[a:b].send(w), y[a:b].send(w)) for w, a, b in zip(workers, cut, cut[1:])]
    me = workers[0].hook.local_worker
    me.flush_deletes()
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
    for w, s in zip(workers, saved):
        w.pipelining = s
    return elapsed, model, me.stats.snapshot(), steps


def _network_worker(hook):
    from veil.workers.websocket_launcher import start_worker

    token = "bench-core-token"
    wp = start_worker("bench_net", ["--token", token], env={"OMP_NUM_THREADS": "1"})
    return wp, sy.WebsocketClientWorker(hook, id="bench_net", host="127.0.0.1", port=wp.port, token=token)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs; the best of each is compared")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both baseline and veil)")
    parser.add_argument("--network", action="store_true", help="one network worker instead of 2 VirtualWorkers")
    parser.add_argument("--modes", default="sync,default", help="comma list of: sync, default, piped")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hook = sy.TorchHook(torch)
    process = None
    if args.network:
        process, net = _network_worker(hook)
        workers = [net]
        where = "one network worker (loopback, separate process)"
    else:
        workers = [sy.VirtualWorker(hook, id="bench_alice"), sy.VirtualWorker(hook, id="bench_bob")]
        where = "2 VirtualWorkers"
        bench_latency(workers[0])
    try:
        x, y, _ = load_boston()
        x_train, y_train, x_test, y_test = train_test_split(x, y, seed=0)
        modes = [m for m in args.modes.split(",") if m]
        settings = {"sync": False, "default": None, "piped": True}
        train_pure(x_train, y_train, 1, args.batch)  # warm-up
        train_pointers(workers, x_train, y_train, 1, args.batch)
        best: dict[str, float] = {}
        info: dict[str, tuple] = {}
        for _ in range(args.repeat):
            t_pure, m_pure = train_pure(x_train, y_train, args.epochs, args.batch)
            best["pure"] = min(best.get("pure", float("inf")), t_pure)
            for mode in modes:
                t, model, stats, steps = train_pointers(workers, x_train, y_train, args.epochs, args.batch,
                                                        settings[mode])
                best[mode] = min(best.get(mode, float("inf")), t)
                info[mode] = (model, stats, steps)
        with torch.no_grad():
            mse_pure = F.mse_loss(m_pure(x_test), y_test).item()
        print(f"Boston Housing, MLP 13-32-24-1, batch {args.batch}, SGD lr 0.001, {args.epochs} epochs, "
              f"{len(x_train)} training rows on {where}; best of {args.repeat}, torch threads {args.threads}, "
              f"loadavg {open('/proc/loadavg').read().split()[:3] if os.path.exists('/proc/loadavg') else '?'}")
        print(f"  pure PyTorch               {best['pure']:7.3f} s   test MSE {mse_pure:6.2f}")
        for mode in modes:
            model, stats, steps = info[mode]
            with torch.no_grad():
                mse = F.mse_loss(model(x_test), y_test).item()
            label = {"sync": "pipelining off", "default": "as constructed", "piped": "pipelining on"}[mode]
            print(f"  veil {label:21s} {best[mode]:7.3f} s   test MSE {mse:6.2f}   ratio "
                  f"{best[mode] / best['pure']:5.1f}x   {stats['messages'] / steps:.1f} messages/step, "
                  f"{stats['bytes_sent'] / steps:.0f} B sent, {stats['bytes_received'] / steps:.0f} B received")
    finally:
        if process is not None:
            workers[0].close()
            process.stop()


if __name__ == "__main__":
    main()
