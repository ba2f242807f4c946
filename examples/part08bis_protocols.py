"""Part 8 bis: protocols. Plans chained across workers; the intermediate results move worker to worker."""

import torch

import veil as sy

hook = sy.TorchHook(torch)


@sy.func2plan(args_shape=[(1,)])
def inc(x):
    return x + 1


@sy.func2plan(args_shape=[(1,)])
def double(x):
    return x * 2


protocol = sy.Protocol([("worker1", inc), ("worker2", double), ("worker3", inc)])
bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")
charlie = sy.VirtualWorker(hook, id="charlie")
protocol.deploy(alice, bob, charlie)  # roles are filled in order

ptr = protocol.run(torch.tensor([1.0]))
print("result lives on", ptr.location.id, ":", ptr.get())  # ((1 + 1) * 2) + 1 = 5

# Search a worker on behalf of the local worker.
answer = torch.tensor([42.0]).tag("#answer").send(charlie)  # keep the pointer: dropping it frees the data
found = sy.local_worker.request_search(["#answer"], location=charlie)
print("found:", found, "value:", found[0].get())
