"""Part 9: encrypted programs. Secret sharing, fixed precision, and computing on shared values.

``x.share(bob, alice, crypto_provider=james)`` splits x into random shares:
each worker alone sees only uniform noise; together they compute on x.
"""

import torch

import veil as sy

hook = sy.TorchHook(torch)
bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")
james = sy.VirtualWorker(hook, id="james")  # deals the Beaver triples; not a party

x = torch.tensor([25, 5]).share(bob, alice, crypto_provider=james)
y = torch.tensor([5, 10]).share(bob, alice, crypto_provider=james)
print("shares of x:", x.child)
print("x + y =", (x + y).get())
print("x * y =", (x * y).get())
print("x - y =", (x - y).get())

# Reals need an integer encoding first.
a = torch.tensor([0.1, 0.2, 0.3]).fix_precision()
print(a)
b = torch.tensor([1.5, -2.0, 0.5]).fix_precision().share(bob, alice, crypto_provider=james)
a_shared = a.share(bob, alice, crypto_provider=james)
print("a * b =", (a_shared * b).get().float_precision())
print("a > b:", (a_shared > b).get().float_precision())
print("max(b) =", b.max().get().float_precision())

# Without crypto_provider= veil uses a dedicated in-process dealer and warns once why a separate one matters.
c = torch.tensor([3, 4]).share(bob, alice)
print("default provider:", (c * c).get())
