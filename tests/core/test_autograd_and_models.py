"""Remote autograd, models and optimizers, checked against the same steps in torch."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import veil as sy


def test_remote_backward_and_grad_pointer(alice):
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    w = torch.tensor([0.5, 0.25, -1.0], requires_grad=True)
    px, pw = x.send(alice), w.send(alice)
    assert px.requires_grad
    loss = ((px * pw).sum() - 1.0) ** 2
    assert loss.requires_grad and loss.shape == ()
    me = alice.hook.local_worker
    alice.pipelining = False  # count the messages of a synchronous backward
    before = me.stats.messages
    loss.backward()
    assert me.stats.messages - before == 1  # backward is one command (the queued forward rides on it)
    alice.pipelining = True
    g = pw.grad
    assert isinstance(g, sy.PointerTensor)
    ref = ((x * w).sum() - 1.0) ** 2
    ref.backward()
    assert torch.allclose(g.get(), w.grad)
    assert torch.allclose(px.grad.get(), x.grad)


def test_grad_is_none_until_backward(alice):
    p = torch.randn(2, requires_grad=True).send(alice)
    assert p.grad is None


def test_del_grad_clears_the_remote_grad_as_in_torch(alice):
    x = torch.randn(3, requires_grad=True)
    px = x.send(alice)
    (px * 2).sum().backward()
    assert torch.equal(px.grad.get(), torch.full((3,), 2.0))
    del px.grad  # torch: the same as ``t.grad = None``
    assert px.grad is None
    (px * 3).sum().backward()  # a fresh gradient, not added to the deleted one
    assert torch.equal(px.grad.get(), torch.full((3,), 3.0))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1))


def test_remote_training_matches_local(alice):
    local_model, remote_model = _mlp(), _mlp()
    data, target = torch.randn(16, 13), torch.randn(16, 1)
    lopt = torch.optim.SGD(local_model.parameters(), lr=0.05)
    ropt = torch.optim.SGD(remote_model.parameters(), lr=0.05)
    remote_model.send(alice)
    pd, pt = data.send(alice), target.send(alice)
    for _ in range(3):
        lopt.zero_grad()
        F.mse_loss(local_model(data), target).backward()
        lopt.step()
        ropt.zero_grad()
        loss = F.mse_loss(remote_model(pd), pt)
        loss.backward()
        ropt.step()
    remote_model.get()
    assert all(type(p) is nn.Parameter for p in remote_model.parameters())
    for a, b in zip(local_model.parameters(), remote_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_optimizer_survives_send_get_cycles(alice, bob):
    """The PySyft 0.2 tutorial loop: one optimizer, the model hops between workers."""
    model, ref = _mlp(), _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.01)
    batches = [(torch.randn(8, 13), torch.randn(8, 1)) for _ in range(4)]
    for i, (d, t) in enumerate(batches):
        w = alice if i % 2 == 0 else bob
        model.send(w)
        opt.zero_grad()
        loss = F.mse_loss(model(d.send(w)), t.send(w))
        loss.backward()
        opt.step()
        model.get()
        ropt.zero_grad()
        rl = F.mse_loss(ref(d), t)
        rl.backward()
        ropt.step()
        assert torch.allclose(loss.get(), rl.detach(), atol=1e-6)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_module_copy_and_move(alice, bob):
    model = _mlp()
    x = torch.randn(4, 13)
    expected = model(x)
    model.send(alice)
    twin = model.copy()
    assert twin[0].weight.location is alice and twin[0].weight.id_at_location != model[0].weight.id_at_location
    model.move(bob)
    assert model[0].weight.location is bob
    out = model(x.send(bob))
    assert torch.allclose(out.get(), expected, atol=1e-6)
    twin.get()
    assert torch.allclose(twin(x), expected, atol=1e-6)


def test_local_module_copy_is_deep():
    model = _mlp()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.add_(1)
    assert not torch.allclose(model[0].weight, twin[0].weight)


def test_batchnorm_buffers_are_remote(alice):
    torch.manual_seed(1)
    bn_local = nn.BatchNorm1d(3)
    bn_remote = copy.deepcopy(bn_local)
    x = torch.randn(8, 3)
    bn_remote.send(alice)
    out = bn_remote(x.send(alice))
    expected = bn_local(x)
    assert torch.allclose(out.get(), expected, atol=1e-6)
    bn_remote.get()
    assert torch.allclose(bn_remote.running_mean, bn_local.running_mean)
    assert int(bn_remote.num_batches_tracked) == 1
