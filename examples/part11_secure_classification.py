"""Part 11: secure classification. An encrypted model evaluates encrypted images.

The model owner shares the weights, the data owner shares the images; the
parties compute the predictions without seeing either (bundled MNIST 5k).
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

import veil as sy
from veil.datasets import load_mnist_5k

SHORT = os.environ.get("VEIL_EXAMPLE_SHORT") == "1"

hook = sy.TorchHook(torch)
alice = sy.VirtualWorker(hook, id="alice")
bob = sy.VirtualWorker(hook, id="bob")
crypto_provider = sy.VirtualWorker(hook, id="crypto_provider")

mnist = load_mnist_5k()
x_train, y_train = mnist["x_train"].view(-1, 784), mnist["y_train"]
if SHORT:
    x_train, y_train = x_train[::4], y_train[::4]  # 1,000 images, every digit
x_test, y_test = mnist["x_test"].view(-1, 784), mnist["y_test"]

# 1. Public training (plain PyTorch).
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
gen = torch.Generator().manual_seed(0)
for epoch in range(1 if SHORT else 3):
    for idx in torch.randperm(len(y_train), generator=gen).split(64):
        opt.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        opt.step()

# 2. Encrypt the model and the test images.
n_test = 50 if SHORT else 500
with torch.no_grad():
    plain_pred = model(x_test[:n_test]).argmax(1)
model.fix_precision().share(alice, bob, crypto_provider=crypto_provider)
correct = agree = 0
for start in range(0, n_test, 50):
    data = x_test[start:start + 50].fix_precision().share(alice, bob, crypto_provider=crypto_provider)
    with torch.no_grad():
        pred = model(data).get().float_precision().argmax(1)
    correct += (pred == y_test[start:start + 50]).sum().item()
    agree += (pred == plain_pred[start:start + 50]).sum().item()
print(f"encrypted accuracy {correct / n_test:.3f}; agrees with plaintext on {agree}/{n_test} images")
