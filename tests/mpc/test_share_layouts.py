"""Shares whose parties hold them in a layout the orchestrator's wrapper does not know.

A weight gradient of an encrypted Linear is autograd's ``t()`` of a product: each party holds its share
transposed, the wrapper claims contiguous strides. ``p.grad.view(-1)`` (what gradient clipping and
flattening utilities do) failed on the parties; ``clone(memory_format=...)`` could not be sent.
"""

import torch

import veil as sy


def _workers(hook, tag):
    return [sy.VirtualWorker(hook, id=f"{tag}-{n}") for n in ("a", "b", "cp")]


def test_a_weight_gradient_flattens_like_torchs(hook):
    alice, bob, cp = _workers(hook, "layout-grad")
    torch.manual_seed(3)
    plain = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    plain(x).sum().backward()
    model = torch.nn.Linear(4, 3)
    model.load_state_dict(plain.state_dict())
    model.fix_precision().share(alice, bob, crypto_provider=cp, requires_grad=True)
    xs = x.fix_precision().share(alice, bob, crypto_provider=cp, requires_grad=True)
    model(xs).sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        flat = p.grad.view(-1).get().float_precision()
        assert flat.shape == (q.numel(),)
        assert torch.allclose(flat, q.grad.view(-1), atol=1e-3)


def test_clone_with_a_memory_format_on_a_pointer(hook):
    alice = sy.VirtualWorker(hook, id="layout-clone")
    x = torch.arange(24.0).view(2, 3, 4)
    ptr = x.send(alice)
    out = ptr.transpose(0, 2).clone(memory_format=torch.contiguous_format).get()
    assert torch.equal(out, x.transpose(0, 2)) and out.is_contiguous()
