"""Part 4: federated learning with a trusted aggregator.

Bob and Alice train their own copy of the model; the copies are moved to a
secure worker that averages them, and only the average comes back.
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
secure_worker = sy.VirtualWorker(hook, id="secure_worker")

x, y, _ = load_boston()
y = y.view(-1, 1) / 10
half = len(x) // 2
bob_data, bob_target = x[:half].send(bob), y[:half].send(bob)
alice_data, alice_target = x[half:].send(alice), y[half:].send(alice)

torch.manual_seed(0)
model = nn.Linear(13, 1)

for round_ in range(2 if SHORT else 10):
    bobs_model = copy.deepcopy(model).send(bob)
    alices_model = copy.deepcopy(model).send(alice)
    bobs_opt = torch.optim.SGD(bobs_model.parameters(), lr=0.05)
    alices_opt = torch.optim.SGD(alices_model.parameters(), lr=0.05)
    for _ in range(3 if SHORT else 10):
        for m, opt, data, target in ((bobs_model, bobs_opt, bob_data, bob_target),
                                     (alices_model, alices_opt, alice_data, alice_target)):
            opt.zero_grad()
            loss = ((m(data) - target) ** 2).mean()
            loss.backward()
            opt.step()
    # The models meet on the secure worker; we only fetch the average.
    bobs_model.move(secure_worker)
    alices_model.move(secure_worker)
    with torch.no_grad():
        new_weight = ((bobs_model.weight + alices_model.weight) / 2).get()
        new_bias = ((bobs_model.bias + alices_model.bias) / 2).get()
        model.weight.set_(new_weight)
        model.bias.set_(new_bias)
    print(f"round {round_}: full-data MSE {((model(x) - y) ** 2).mean().item():.3f}")
