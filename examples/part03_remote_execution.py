"""Part 3: advanced remote execution: pointers to pointers and moving data between workers."""

import torch

import veil as sy

hook = sy.TorchHook(torch)
bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")

x = torch.tensor([1, 2, 3, 4])
# Send to bob, then send bob's pointer to alice: we point at alice, who points at bob.
x_ptr = x.send(bob).send(alice)
print("pointer to a pointer:", x_ptr)
print("alice holds a pointer, bob the data:", alice.objects_count(), bob.objects_count())

# Ops travel along the chain.
y_ptr = x_ptr + x_ptr
back = y_ptr.get()  # one level: now a pointer to bob
print("one level up:", back)
print("value:", back.get())

# .move() sends data straight from one worker to another (never through here).
z = torch.tensor([10.0, 20.0]).send(bob)
z = z.move(alice)
print("moved to", z.location.id, "value", z.get())

# remote_get: the middle worker fetches the value, so we point directly at data on alice.
p = torch.tensor([7, 8]).send(bob).send(alice)
p.remote_get()
print("after remote_get:", p.get())
