"""AdditiveSharingTensor ops, for 2 and 3 parties, against plain torch."""

import pytest
import torch
import torch.nn.functional as F

from veil.mpc.errors import NotEncodedError, ShareMismatchError, UnsupportedOperationError
from veil.mpc.providers import LocalDealer
from veil.tensors.additive import AdditiveSharingTensor, share


def ints(*shape, bound=1000):
    return torch.randint(-bound, bound, shape)


def test_share_and_get(parties, dealer):
    x = ints(4, 3)
    s = share(x, parties, dealer)
    assert isinstance(s, AdditiveSharingTensor) and s.shape == x.shape and s.parties == parties
    assert torch.equal(s.get(), x)
    # no share equals the secret (overwhelmingly likely) and repr shows no values
    assert all(not torch.equal(v, x) for v in s.child.values())
    assert "tensor(" not in repr(s)


def test_linear_ops(parties, dealer):
    x, y = ints(3, 4), ints(3, 4)
    a, b = share(x, parties, dealer), share(y, parties, dealer)
    checks = {
        "add": (a + b, x + y),
        "sub": (a - b, x - y),
        "neg": (-a, -x),
        "add_public": (a + 5, x + 5),
        "add_public_broadcast": (a[0] + torch.full((2, 1, 4), 3), x[0] + torch.full((2, 1, 4), 3)),
        "rsub": (7 - a, 7 - x),
        "public_minus": (y - a, y - x),
        "mul_public": (a * 3, x * 3),
        "mul_public_tensor": (a * y, x * y),
        "alpha": (torch.add(a, b, alpha=2), x + 2 * y),
        "sum": (a.sum(), x.sum()),
        "sum_dim": (a.sum(1, keepdim=True), x.sum(1, keepdim=True)),
    }
    for name, (got, expected) in checks.items():
        assert torch.equal(got.get(), expected.expand_as(got)), name


def test_structural_ops(parties, dealer):
    x = ints(2, 3, 4)
    a = share(x, parties, dealer)
    checks = {
        "view": (a.view(6, 4), x.view(6, 4)),
        "reshape": (a.reshape(4, 6), x.reshape(4, 6)),
        "transpose": (a.transpose(0, 2), x.transpose(0, 2)),
        "permute": (a.permute(2, 0, 1), x.permute(2, 0, 1)),
        "flatten": (a.flatten(1), x.flatten(1)),
        "index": (a[1, :, 2:], x[1, :, 2:]),
        "fancy": (a[:, torch.tensor([0, 2])], x[:, torch.tensor([0, 2])]),
        "cat": (torch.cat([a, a], 1), torch.cat([x, x], 1)),
        "cat_public": (torch.cat([a, x]), torch.cat([x, x])),
        "stack": (torch.stack([a, a]), torch.stack([x, x])),
        "unsqueeze": (a.unsqueeze(0), x.unsqueeze(0)),
        "expand": (a[:, :1].expand(2, 3, 4), x[:, :1].expand(2, 3, 4)),
    }
    for name, (got, expected) in checks.items():
        assert torch.equal(got.get(), expected), name


def test_products(parties, dealer):
    x, y, m = ints(3, 4), ints(3, 4), ints(4, 2)
    a, b, c = (share(t, parties, dealer) for t in (x, y, m))
    assert torch.equal((a * b).get(), x * y)
    assert torch.equal((a @ c).get(), x @ m)
    assert torch.equal((a @ m).get(), x @ m)
    assert torch.equal((x @ c).get(), x @ m)
    assert torch.equal(torch.bmm(a[None], c[None]).get(), (x @ m)[None])
    bias = ints(2)
    assert torch.equal(torch.addmm(share(bias, parties, dealer), a, c).get(), bias + x @ m)
    v = ints(4)
    assert torch.equal((a @ share(v, parties, dealer)).get(), x @ v)
    img, ker = ints(1, 2, 6, 6, bound=50), ints(3, 2, 3, 3, bound=50)
    got = F.conv2d(share(img, parties, dealer), share(ker, parties, dealer), padding=1)
    assert torch.equal(got.get(), F.conv2d(img, ker, padding=1))
    got = F.conv2d(share(img, parties, dealer), ker, stride=2)
    assert torch.equal(got.get(), F.conv2d(img, ker, stride=2))


def test_inplace_and_constants(parties, dealer):
    x = ints(5)
    a = share(x, parties, dealer)
    a += 2
    a *= 3
    assert torch.equal(a.get(), (x + 2) * 3)
    assert torch.equal(torch.ones_like(a).get(), torch.ones(5, dtype=torch.int64))
    assert torch.equal(torch.zeros_like(a).get(), torch.zeros(5, dtype=torch.int64))


def test_floor_division_by_public(parties, dealer):
    x = ints(200, bound=10**9)
    got = (share(x, parties, dealer) // 1000).get()
    assert (got - torch.div(x, 1000, rounding_mode="floor")).abs().max() <= 1


def test_errors(dealer):
    x = torch.arange(3)
    a = share(x, ("a", "b"), dealer)
    with pytest.raises(ShareMismatchError, match="shared among"):
        a + share(x, ("a", "c"), dealer)
    with pytest.raises(ShareMismatchError, match="crypto providers"):
        a * share(x, ("a", "b"), LocalDealer(seed=5))
    with pytest.raises(NotEncodedError, match="fix_precision"):
        share(torch.randn(3), ("a", "b"), dealer)
    with pytest.raises(NotEncodedError):
        a + 0.5
    with pytest.raises(NotEncodedError):
        a / 2
    with pytest.raises(UnsupportedOperationError, match="does not support"):
        torch.sin(a)
    with pytest.raises(ValueError, match="distinct"):
        share(x, ("a", "a"), dealer)
