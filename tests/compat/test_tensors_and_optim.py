"""PySyft 0.2 spellings on tensors and optimizers, compared with plain PyTorch (issue #15: 1, 2, 3, 6, 13)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import veil as sy
from veil.compat import crypto_provider as cp
from veil.mpc.errors import PrecisionMismatchError


def test_share_without_crypto_provider_uses_a_dedicated_worker_and_warns_once(hook, ws):
    bob, alice, _ = ws
    cp._warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.tensor([1, 2, 3]).share(bob, alice)
        y = torch.tensor([3.5, -1.25]).fix_precision().share(bob, alice)
        prod = (y * y).get().float_precision()
    msgs = [str(w.message) for w in caught if issubclass(w.category, cp.DefaultCryptoProviderWarning)]
    assert len(msgs) == 1 and "neither a party nor the data owner" in msgs[0]
    assert torch.equal(x.get(), torch.tensor([1, 2, 3]))
    assert torch.allclose(prod, torch.tensor([3.5, -1.25]) ** 2, atol=1e-3)
    provider = cp.default_crypto_provider([bob, alice])
    assert provider.id == cp.DEFAULT_PROVIDER_ID and provider not in (bob, alice, hook.local_worker)


def test_local_worker_names():
    hook = sy.TorchHook(torch)  # the most recent hook is the current one
    assert sy.local_worker is hook.local_worker
    assert sy.hook.local_worker is hook.local_worker
    assert sy.local_worker.id == "me"


OPTIMIZERS = [
    (torch.optim.Adam, {"lr": 0.05}),
    (torch.optim.Adam, {"lr": 0.05, "amsgrad": True, "weight_decay": 0.01}),
    (torch.optim.AdamW, {"lr": 0.05}),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}),
    (torch.optim.Adagrad, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
]


@pytest.mark.parametrize("opt_cls,kwargs", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_optimizer_on_remote_parameters_matches_a_local_run(ws, opt_cls, kwargs):
    bob = ws[0]
    torch.manual_seed(0)
    local = torch.nn.Linear(3, 1)
    remote = copy.deepcopy(local)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt_local = opt_cls(local.parameters(), **kwargs)
    remote.send(bob)
    opt_remote = opt_cls(remote.parameters(), **kwargs)
    xp, yp = x.send(bob), y.send(bob)
    for _ in range(3):
        opt_local.zero_grad()
        torch.nn.functional.mse_loss(local(x), y).backward()
        opt_local.step()
        opt_remote.zero_grad()
        torch.nn.functional.mse_loss(remote(xp), yp).backward()
        opt_remote.step()
    remote.get()
    for a, b in zip(local.parameters(), remote.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_get_keeps_grad_after_remote_backward(ws):
    bob = ws[0]
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    ref = x.detach().clone().requires_grad_(True)
    (ref * ref).sum().backward()
    xp = x.send(bob)
    (xp * xp).sum().backward()
    back = xp.get()
    assert back.grad is not None and torch.equal(back.grad, ref.grad)


def test_get_of_a_private_value_releases_neither_value_nor_grad(ws):
    bob = ws[0]
    oid = bob.load(torch.tensor([1.0, 2.0], requires_grad=True), tags=("#secret",), private=True)
    (ptr,) = sy.search(bob, "#secret")
    with pytest.raises(sy.exceptions.PermissionDeniedError):
        ptr.get()
    assert torch.equal(bob._objects[oid].detach(), torch.tensor([1.0, 2.0]))
    assert torch.equal((ptr + 1).get(), torch.tensor([2.0, 3.0]))  # still serving


def test_search_matches_tags_ids_and_descriptions_and_repr_shows_them(ws):
    bob = ws[0]
    ptr = torch.tensor([1, 2, 3, 4, 5]).tag("#fun", "#boston").describe("The input datapoints to the boston housing").send(bob)
    torch.tensor([9]).tag("#fun", "#mnist").describe("MNIST images").send(bob)
    assert [p.id_at_location for p in bob.search(["#fun", "#boston"])] == [ptr.id_at_location]
    assert [p.id_at_location for p in bob.search("housing")] == [ptr.id_at_location]
    assert [p.id_at_location for p in bob.search(str(ptr.id_at_location))] == [ptr.id_at_location]
    assert bob.search(["#fun", "#nothing"]) == []
    text = repr(ptr)
    assert "Tags: #fun #boston" in text and "Description: The input datapoints" in text and "Shape: torch.Size([5])" in text


def test_multi_send_child_and_max_shape(ws):
    bob, alice, _ = ws
    x = torch.tensor([[1.0, 5.0], [3.0, 2.0]])
    multi = x.send(bob, alice)
    assert set(multi.child) == {bob.id, alice.id}
    doubled = (multi * 2).get()
    assert all(torch.equal(v, x * 2) for v in doubled)
    assert torch.equal(multi.get(sum_results=True), x * 2)
    ptr = x.send(bob)
    assert ptr.child is ptr
    assert ptr.max().shape == x.max().shape and torch.equal(ptr.max().get(), x.max())
    values, idx = ptr.max(dim=1)
    assert values.shape == x.max(dim=1).values.shape and torch.equal(idx.get(), x.max(dim=1).indices)
    shared = x.fix_precision().share(bob, alice, crypto_provider=ws[2])
    assert shared.max().shape == x.max().shape
    assert torch.allclose(shared.max().get().float_precision(), x.max())


def test_fixed_precision_pysyft_encoding_and_mismatch_explains(ws):
    x = torch.tensor([1.25, -0.5, 2.0004], dtype=torch.float64)
    enc = x.fix_precision(base=10, precision_fractional=3)
    # PySyft's encoding: x * 10^3 as an integer (veil rounds where PySyft truncated; equal here)
    assert torch.equal(enc.child, torch.tensor([1250, -500, 2000]))
    assert torch.allclose(enc.float_precision(), torch.tensor([1.25, -0.5, 2.0], dtype=torch.float64))
    with pytest.raises(PrecisionMismatchError, match="encode both alike"):
        enc + torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64).fix_precision()


def test_pysyft_encoding_on_a_shared_model_matches_torch(ws):
    bob, alice, james = ws
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    ref = model(x).detach()
    model.fix_precision(base=10, precision_fractional=3).share(bob, alice, crypto_provider=james)
    data = x.fix_precision(base=10, precision_fractional=3).share(bob, alice, crypto_provider=james)
    out = model(data).get()
    assert out.encoding.base == 10 and out.encoding.precision_fractional == 3
    assert torch.allclose(out.float_precision(), ref, atol=1e-2)  # 3 decimal digits per operand
