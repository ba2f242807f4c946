"""Part 8: plans. A traced computation travels to a worker as data (an op list), not code."""

import torch
import torch.nn.functional as F
from torch import nn

import veil as sy

hook = sy.TorchHook(torch)
alice = sy.VirtualWorker(hook, id="alice")


class Net(sy.Plan):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=0)


torch.manual_seed(0)
net = Net()
net.build(torch.tensor([1.0, 2.0]))  # trace once on an example
print(net, "locally:", net(torch.tensor([1.0, 0.0])))

plan_ptr = net.send(alice)  # the op list and the weights go to alice
x = torch.tensor([1.0, 0.0]).send(alice)
print("on alice:", plan_ptr(x).get())

net_back = plan_ptr.get()  # the plan (and its weights) come back
print("back:", net_back(torch.tensor([1.0, 0.0])))


@sy.func2plan(args_shape=[(1,)], state=(torch.tensor([1.0]),))
def add_bias_and_double(x, state):
    (bias,) = state.read()  # state tensors travel with the plan
    return (x + bias) * 2


print("func2plan with state:", add_bias_and_double(torch.tensor([3.0])))
remote = add_bias_and_double.send(alice)
print("remote:", remote(torch.tensor([3.0]).send(alice)).get())
