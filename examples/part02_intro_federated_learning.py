"""Part 2: a first federated learning loop.

Two hospitals (bob, alice) keep their part of a dataset; the model travels
to each of them, trains on their data, and comes back. The data never moves.
"""

import os

import torch
from torch import nn, optim

import veil as sy
from veil.datasets import load_boston

SHORT = os.environ.get("VEIL_EXAMPLE_SHORT") == "1"

hook = sy.TorchHook(torch)
bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")

x, y, _ = load_boston()
y = y.view(-1, 1) / 10  # house values in $10k keep the loss small
half = len(x) // 2
datasets = [(x[:half].send(bob), y[:half].send(bob)), (x[half:].send(alice), y[half:].send(alice))]

torch.manual_seed(0)
model = nn.Linear(13, 1)
opt = optim.SGD(model.parameters(), lr=0.05)


def train(rounds):
    for r in range(rounds):
        for data, target in datasets:
            model.send(data.location)  # the model goes to the data
            opt.zero_grad()
            loss = ((model(data) - target) ** 2).mean()
            loss.backward()
            opt.step()
            model.get()  # ... and comes back
            print(f"round {r} on {data.location.id}: loss {loss.get().item():.3f}")


train(3 if SHORT else 20)
print("full-data MSE:", ((model(x) - y) ** 2).mean().item())
