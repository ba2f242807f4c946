"""Part 6: federated learning on MNIST with a CNN (bundled 5,000-image subset)."""

import os

import torch
import torch.nn.functional as F
from torch import nn

import veil as sy
from veil.datasets import load_mnist_5k

SHORT = os.environ.get("VEIL_EXAMPLE_SHORT") == "1"

hook = sy.TorchHook(torch)
bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")

mnist = load_mnist_5k()
perm = torch.randperm(len(mnist["y_train"]), generator=torch.Generator().manual_seed(0))  # rows are sorted by digit
n = 256 if SHORT else len(perm)
train = torch.utils.data.TensorDataset(mnist["x_train"][perm[:n]], mnist["y_train"][perm[:n]])
federated_train_loader = sy.FederatedDataLoader(train.federate((bob, alice)), batch_size=64, shuffle=True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.fc1 = nn.Linear(4 * 4 * 16, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.view(-1, 4 * 4 * 16)))
        return F.log_softmax(self.fc2(x), dim=1)


torch.manual_seed(0)
model = Net()
# Plain SGD: a momentum buffer would live on the worker that made it (see Optims in websocket_fedavg.py).
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
for epoch in range(1 if SHORT else 3):
    for batch_idx, (data, target) in enumerate(federated_train_loader):
        model.send(data.location)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        model.get()
        if batch_idx % 10 == 0:
            print(f"epoch {epoch} batch {batch_idx} on {data.location.id}: loss {loss.get().item():.3f}")

with torch.no_grad():
    acc = (model(mnist["x_test"]).argmax(1) == mnist["y_test"]).float().mean().item()
print(f"test accuracy: {acc:.3f}")
