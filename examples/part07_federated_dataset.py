"""Part 7: federated datasets, one batch per worker per step, and federated averaging.

Each worker trains its own copy of the model; ``federated_avg`` (PySyft's
``sy.frameworks.torch.fl.utils.federated_avg``) averages the copies after every round.
"""

import copy
import os

import torch
from torch import nn

import veil as sy
from veil.datasets import load_boston

SHORT = os.environ.get("VEIL_EXAMPLE_SHORT") == "1"

hook = sy.TorchHook(torch)
bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")

x, y, _ = load_boston()
y = y.view(-1, 1) / 10
half = len(x) // 2
bob_ds = sy.BaseDataset(x[:half], y[:half]).send(bob)
alice_ds = sy.BaseDataset(x[half:], y[half:]).send(alice)
federated_dataset = sy.FederatedDataset([bob_ds, alice_ds])
loader = sy.FederatedDataLoader(federated_dataset, batch_size=32, shuffle=True, iter_per_worker=True)

torch.manual_seed(0)
model = nn.Linear(13, 1)
for round_ in range(2 if SHORT else 10):
    models = {w: copy.deepcopy(model) for w in (bob, alice)}  # one copy per worker
    local_opts = {w: torch.optim.SGD(m.parameters(), lr=0.05) for w, m in models.items()}
    for step, batches in enumerate(loader):
        for worker, (data, target) in batches.items():
            m = models[worker].send(worker)
            local_opts[worker].zero_grad()
            loss = ((m(data) - target) ** 2).mean()
            loss.backward()
            local_opts[worker].step()
            m.get()
        if SHORT and step == 1:
            break
    model = sy.frameworks.torch.fl.utils.federated_avg(models)
    print(f"round {round_}: full-data MSE {((model(x) - y) ** 2).mean().item():.3f}")
