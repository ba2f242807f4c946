"""Part 10: federated learning with secure aggregation.

Bob and Alice train copies of a model on their own data. Each then encodes and
secret-shares its *own* parameters between bob and alice; the coordinator
(this script) holds pointers only, and decrypts nothing but the sum.
"""

import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

import veil as sy
from veil.datasets import load_boston

SHORT = os.environ.get("VEIL_EXAMPLE_SHORT") == "1"

hook = sy.TorchHook(torch)
bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")
james = sy.VirtualWorker(hook, id="james")
compute_nodes = [bob, alice]

x, y, _ = load_boston()
y = y.view(-1) / 10
half = len(x) // 2
remote_dataset = [(x[:half].send(bob), y[:half].send(bob)), (x[half:].send(alice), y[half:].send(alice))]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(13, 16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


torch.manual_seed(0)
model = Net()
for round_ in range(1 if SHORT else 10):
    models = [copy.deepcopy(model) for _ in compute_nodes]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    for (data, target), m, opt in zip(remote_dataset, models, optimizers):
        m.send(data.location)
        for _ in range(2 if SHORT else 5):
            opt.zero_grad()
            loss = F.mse_loss(m(data).view(-1), target)
            loss.backward()
            opt.step()
    params = [list(m.parameters()) for m in models]  # pointers: the models stay on their workers
    new_params = []
    for param_i in range(len(params[0])):
        spdz_params = []
        for remote_index in range(len(compute_nodes)):
            copy_of_parameter = params[remote_index][param_i].copy()  # a copy, on its worker
            fixed_precision_param = copy_of_parameter.fix_precision()  # encoded on its worker
            encrypted_param = fixed_precision_param.share(bob, alice, crypto_provider=james)  # shared by its worker
            spdz_params.append(encrypted_param.get())  # pointers to the shares, never the values
        new_params.append((spdz_params[0] + spdz_params[1]).get().float_precision() / 2)
    with torch.no_grad():
        for p, new in zip(model.parameters(), new_params):
            p.set_(new)
    print(f"round {round_}: full-data MSE {F.mse_loss(model(x).view(-1), y).item():.3f}")
