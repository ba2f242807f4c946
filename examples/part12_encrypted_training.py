"""Part 12: train an encrypted neural network on encrypted data.

Model, data and gradients stay secret-shared between bob and alice; PyTorch's
autograd differentiates through the shared values.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

import veil as sy

SHORT = os.environ.get("VEIL_EXAMPLE_SHORT") == "1"

hook = sy.TorchHook(torch)
alice = sy.VirtualWorker(hook, id="alice")
bob = sy.VirtualWorker(hook, id="bob")
james = sy.VirtualWorker(hook, id="james")

# A toy dataset: the target is the first bit XOR the second.
data = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
target = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
data = data.fix_precision().share(bob, alice, crypto_provider=james, requires_grad=True)
target = target.fix_precision().share(bob, alice, crypto_provider=james, requires_grad=True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


torch.manual_seed(1)
model = Net().fix_precision().share(bob, alice, crypto_provider=james, requires_grad=True)
opt = torch.optim.SGD(model.parameters(), lr=0.1).fix_precision()
for epoch in range(3 if SHORT else 20):
    opt.zero_grad()
    loss = ((model(data) - target) ** 2).sum()
    loss.backward()
    opt.step()
    print(f"epoch {epoch}: loss {loss.get().float_precision().item():.4f}")
