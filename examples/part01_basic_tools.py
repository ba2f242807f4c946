"""Part 1: the basic tools of private deep learning.

Send tensors to a worker, compute on them through pointers, run autograd
remotely and bring values (and their gradients) back.
Run: python examples/part01_basic_tools.py   (VEIL_EXAMPLE_SHORT=1 for a quick run)
"""

import torch

import veil as sy

hook = sy.TorchHook(torch)
bob = sy.VirtualWorker(hook, id="bob")

# A pointer is a local handle on data that lives on bob.
x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).send(bob)
y = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]).send(bob)
print("pointer:", x)
print("bob holds", bob.objects_count(), "tensors")

z = x + y  # runs on bob; z is a new pointer
print("x + y =", z.get())

# torch functions work on pointers too
print("torch.add:", torch.add(x, y).get())

# Autograd happens where the data is: backward() is one command to bob.
w = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5], requires_grad=True).send(bob)
loss = (x * w).sum()
loss.backward()
w_back = w.get()
print("w after get:", w_back, "grad:", w_back.grad)  # the gradient comes back with it
assert torch.equal(w_back.grad, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))

# sy.local_worker is "me": the worker that owns your pointers.
print("local worker:", sy.local_worker)
