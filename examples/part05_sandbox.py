"""Part 5: the sandbox. Six workers with real data, found by searching tags and descriptions."""

import os

import torch
from torch import nn

import veil as sy

SHORT = os.environ.get("VEIL_EXAMPLE_SHORT") == "1"

sy.create_sandbox(globals(), verbose=False)  # defines hook, workers, bob ... jon, grid
print("workers:", [w.id for w in workers])  # noqa: F821 (created by create_sandbox)

x = torch.tensor([1, 2, 3, 4, 5]).tag("#fun", "#boston", "#housing").describe("my own Boston-like numbers")
x_ptr = x.send(bob)  # noqa: F821
print(bob.search(["#fun", "#boston"]))  # noqa: F821
print(bob.search("Boston-like")[0].description)  # noqa: F821  (descriptions match too)

grid = sy.PrivateGridNetwork(*workers)  # noqa: F821
data = grid.search("#boston", "#data")
target = grid.search("#boston", "#target")
print("workers with Boston data:", sorted(data))

# Train one model across the grid: each worker's rows stay where they are.
torch.manual_seed(0)
model = nn.Linear(13, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for epoch in range(2 if SHORT else 10):
    for wid in data:
        d, t = data[wid][0], target[wid][0]
        model.send(d.location)
        opt.zero_grad()
        loss = ((model(d).view(-1) - t.view(-1) / 10) ** 2).mean()
        loss.backward()
        opt.step()
        model.get()
    print(f"epoch {epoch}: last loss {loss.get().item():.3f}")
