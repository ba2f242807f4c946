"""One DP-SGD epoch vs one ordinary epoch on a small CNN (MNIST 5k, batch 256).

Prints veil's slowdown ratio (DP epoch time / non-private epoch time) and, in
the same run, Opacus's ratio on the same model and data. "veil" fuses the loss
with the per-record gradients (``make_private(..., criterion=...)``);
"veil-unfused" runs the same loop as Opacus (one extra forward pass). If Opacus is not
importable the script tries ``pip install opacus`` into this interpreter
(torch already satisfies its requirements, so nothing large is pulled).

Run: ``python bench/bench_dp_sgd.py [--epochs 3]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from veil.datasets import load_mnist_5k
from veil.dp import PrivacyEngine

BATCH, SIGMA, C, LR = 256, 1.1, 1.0, 0.5


def make_cnn() -> nn.Module:
    """The small convolutional network commonly used for DP MNIST."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 10),
    )


def run_epoch(model, opt, loader, criterion=nn.functional.cross_entropy) -> float:
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()
    return time.perf_counter() - start


def accuracy(model, x, y) -> float:
    with torch.no_grad():  # (a fused veil model returns a pending output only under grad)
        return (model(x).argmax(1) == y).float().mean().item()


def import_opacus():
    try:
        import opacus  # noqa: F401
    except ImportError:
        print("opacus not installed; trying `pip install opacus` ...", flush=True)
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "opacus"], capture_output=True, text=True)
        if res.returncode != 0:
            return None
    try:
        import opacus
        return opacus
    except ImportError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per variant (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist_5k()
    ds = TensorDataset(data["x_train"], data["y_train"])

    def plain():
        torch.manual_seed(0)
        model = make_cnn()
        return model, torch.optim.SGD(model.parameters(), lr=LR), DataLoader(ds, batch_size=BATCH, shuffle=True)

    def veil_dp(fused: bool):
        torch.manual_seed(0)
        model = make_cnn()
        engine = PrivacyEngine(accountant="pld")
        kw = {"criterion": nn.CrossEntropyLoss()} if fused else {}
        out = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                  data_loader=DataLoader(ds, batch_size=BATCH), noise_multiplier=SIGMA,
                                  max_grad_norm=C, poisson_sampling=True, **kw)
        return (out[0], out[1], out[3], out[2]) if fused else out

    opacus = import_opacus()

    def opacus_dp():
        torch.manual_seed(0)
        model = make_cnn()
        engine = opacus.PrivacyEngine(accountant="prv")
        return engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                   data_loader=DataLoader(ds, batch_size=BATCH), noise_multiplier=SIGMA,
                                   max_grad_norm=C, poisson_sampling=True)

    # "veil": the criterion fused with the per-record gradients (make_private(criterion=...));
    # "veil-unfused": the same loop as Opacus's (loss outside), one extra forward pass.
    variants = {"non-private": plain, "veil": lambda: veil_dp(True), "veil-unfused": lambda: veil_dp(False)}
    if opacus is not None:
        variants["opacus"] = opacus_dp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setups = {name: make() for name, make in variants.items()}
        for name, (model, opt, loader, *crit) in setups.items():  # warm-up epoch each
            run_epoch(model, opt, loader, *crit)
        # Interleave the variants round by round so that drift in machine
        # speed (shared VM) affects all of them alike; report medians.
        times: dict[str, list[float]] = {name: [] for name in setups}
        for _ in range(args.epochs):
            for name, (model, opt, loader, *crit) in setups.items():
                times[name].append(run_epoch(model, opt, loader, *crit))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["non-private"]
    print(f"non-private epoch: {base:.3f} s")
    print(f"veil DP-SGD epoch: {med['veil']:.3f} s   ratio {med['veil'] / base:.2f}x")
    print(f"veil unfused epoch: {med['veil-unfused']:.3f} s   ratio {med['veil-unfused'] / base:.2f}x")
    if opacus is None:
        print("opacus unavailable")
        return
    print(f"opacus {opacus.__version__} DP-SGD epoch: {med['opacus']:.3f} s   ratio {med['opacus'] / base:.2f}x")
    print(f"veil ratio / opacus ratio = {med['veil'] / med['opacus']:.2f} (<= 1 means veil is at least as fast)")
    print(f"veil-unfused ratio / opacus ratio = {med['veil-unfused'] / med['opacus']:.2f}")
    x_test, y_test = data["x_test"], data["y_test"]
    print("test accuracy after warm-up + timed epochs: "
          + ", ".join(f"{n} {accuracy(setups[n][0], x_test, y_test):.3f}" for n in setups))

if __name__ == "__main__":
    main()
