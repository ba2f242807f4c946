"""The main demo: two hospitals' worth of Boston Housing, trained on through pointers.

Each data owner (a VirtualWorker) loads its half of the data as private, tagged
objects. The data scientist finds them with ``search``, trains an MLP by sending
the model to each owner in turn, and can never ``.get()`` the raw data.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import veil as sy
from veil.datasets import load_boston, train_test_split
from veil.exceptions import PermissionDeniedError


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1))


def run_demo(epochs: int = 10, out_dir: str = "demo-out", batch_size: int = 8, lr: float = 0.001) -> int:
    torch.manual_seed(0)
    hook = sy.TorchHook(torch)
    owners = [sy.VirtualWorker(hook, id="hospital_a"), sy.VirtualWorker(hook, id="hospital_b")]

    x, y, _ = load_boston()
    x_train, y_train, x_test, y_test = train_test_split(x, y, test_fraction=0.2, seed=0)
    half = len(x_train) // 2
    for owner, sl in zip(owners, (slice(0, half), slice(half, None))):
        owner.load(x_train[sl], tags=("#boston", "#data"), description="Boston features", private=True)
        owner.load(y_train[sl], tags=("#boston", "#target"), description="MEDV (k$)", private=True)
    print("data owners:", ", ".join(f"{o.id} ({len(o._objects)} private objects)" for o in owners))

    remote = [(o, o.search(["#boston", "#data"])[0], o.search(["#boston", "#target"])[0]) for o in owners]
    try:
        remote[0][1].get()
    except PermissionDeniedError as e:
        print(f"as expected, raw data stays with its owner: {e}")

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    history = []
    start = time.perf_counter()
    for epoch in tqdm(range(epochs), desc="epochs", unit="epoch"):
        total, count = 0.0, 0
        for owner, data, target in remote:
            model.send(owner)
            n = data.shape[0]
            losses = []
            for i in range(0, n, batch_size):
                opt.zero_grad()
                loss = F.mse_loss(model(data[i : i + batch_size]), target[i : i + batch_size])
                loss.backward()
                opt.step()
                losses.append(loss)
            model.get()
            # results computed by the data scientist's own commands are theirs to fetch
            total += float(torch.stack([l.get() for l in losses]).detach().sum())
            count += len(losses)
        with torch.no_grad():
            test_mse = F.mse_loss(model(x_test), y_test).item()
        history.append((total / count, test_mse))
    elapsed = time.perf_counter() - start
    print(f"trained {epochs} epochs in {elapsed:.1f} s through pointers")
    print(f"{'epoch':>5} {'train MSE':>10} {'test MSE':>10}")
    for i, (tr, te) in enumerate(history, 1):
        print(f"{i:>5} {tr:>10.2f} {te:>10.2f}")
    _plot(history, out_dir)

    # The same owners, now with training plans (one message per owner and round)
    # and secure aggregation (we only ever see the sum of the owners' weights).
    fed = sy.FederatedDataset(sy.BaseDataset(data, target) for _, data, target in remote)
    model = _mlp()
    start = time.perf_counter()
    fed_history = sy.federated.train(model, fed, rounds=epochs, lr=lr, batch_size=batch_size,
                                     secure_aggregation=True, eval_data=(x_test, y_test))
    print(f"FedAvg with training plans and secure aggregation: {time.perf_counter() - start:.1f} s")
    print(fed_history.table())
    path = fed_history.plot(os.path.join(out_dir, "demo_fedavg_secure.png"), "FedAvg + secure aggregation")
    print(f"federated training curve written to {path}")
    return 0


def _plot(history: list[tuple[float, float]], out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "demo_training_curve.png")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = range(1, len(history) + 1)
    ax.plot(epochs, [h[0] for h in history], label="train (remote batches)")
    ax.plot(epochs, [h[1] for h in history], label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (k$^2), log scale")
    ax.set_yscale("log")
    ax.set_title("Boston Housing, trained through pointers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"training curve written to {path}")
