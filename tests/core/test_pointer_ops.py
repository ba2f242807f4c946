"""Every remote result is fetched and compared with the same computation in torch."""

import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.exceptions import RevealError, WorkerMismatchError


def test_quickstart(alice):
    data = torch.tensor([1, 2, 3, 4.0]).send(alice)
    result = data * 2
    assert torch.equal(result.get(), torch.tensor([2.0, 4.0, 6.0, 8.0]))


def test_pointer_metadata_is_local(alice):
    x = torch.randn(3, 4, dtype=torch.float64)
    p = x.send(alice)
    before = alice.hook.local_worker.stats.messages
    assert p.shape == (3, 4) and p.dtype == torch.float64 and p.dim() == 2 and p.numel() == 12
    assert p.location is alice and p.owner is alice.hook.local_worker
    assert isinstance(p.id_at_location, int) and p.id_at_location.bit_length() > 32
    assert alice.hook.local_worker.stats.messages == before  # no round trip for metadata
    assert repr(p) == f"[PointerTensor | me:{p.id} -> alice:{p.id_at_location}]"
    assert torch.equal(alice._objects[p.id_at_location], x)


A = torch.tensor([[1.5, -2.0, 3.0], [0.25, 4.0, -1.0]])
B = torch.tensor([[2.0, 1.0, -0.5], [3.0, -2.0, 1.0]])

BINARY = [
    ("add", lambda a, b: a + b),
    ("sub", lambda a, b: a - b),
    ("mul", lambda a, b: a * b),
    ("div", lambda a, b: a / b),
    ("pow", lambda a, b: a.abs() ** b),
    ("lt", lambda a, b: a < b),
    ("eq", lambda a, b: a == b),
    ("matmul", lambda a, b: a @ b.t()),
    ("torch.add", lambda a, b: torch.add(a, b, alpha=2)),
    ("torch.matmul", lambda a, b: torch.matmul(a.t(), b)),
    ("torch.where", lambda a, b: torch.where(a > b, a, b)),
    ("mse", lambda a, b: F.mse_loss(a, b)),
    ("linear", lambda a, b: F.linear(a, b)),
    ("cat", lambda a, b: torch.cat([a, b], dim=1)),
    ("stack", lambda a, b: torch.stack((a, b))),
]


@pytest.mark.parametrize("name,fn", BINARY, ids=[n for n, _ in BINARY])
def test_binary_ops_match_torch(alice, name, fn):
    expected = fn(A, B)
    got = fn(A.send(alice), B.send(alice)).get()
    assert torch.allclose(got, expected) and got.dtype == expected.dtype


UNARY = [
    ("neg", lambda a: -a),
    ("sum_dim", lambda a: a.sum(dim=0)),
    ("mean", lambda a: a.mean()),
    ("view", lambda a: a.view(3, 2)),
    ("t", lambda a: a.t()),
    ("slice", lambda a: a[0:1]),
    ("index_tuple", lambda a: a[1, 1:]),
    ("index_list", lambda a: a[[1, 0]]),
    ("ellipsis", lambda a: a[..., 0]),
    ("relu", lambda a: F.relu(a)),
    ("softmax", lambda a: F.softmax(a, dim=1)),
    ("scalar_radd", lambda a: 3 + a),
    ("scalar_rsub", lambda a: 3 - a),
    ("scalar_rdiv", lambda a: 2 / a),
    ("exp", lambda a: torch.exp(a)),
    ("reshape_size", lambda a: a.reshape(torch.Size([6]))),
    ("to_dtype", lambda a: a.to(torch.float64)),
    ("T", lambda a: a.T),
    ("unsqueeze", lambda a: a.unsqueeze(0)),
]


@pytest.mark.parametrize("name,fn", UNARY, ids=[n for n, _ in UNARY])
def test_unary_ops_match_torch(alice, name, fn):
    expected = fn(A)
    p = fn(A.send(alice))
    assert p.shape == expected.shape  # inferred locally
    got = p.get()
    assert torch.allclose(got, expected) and got.dtype == expected.dtype


def test_mixing_pointer_with_local_tensor_sends_it_along(alice):
    p = A.send(alice)
    assert torch.allclose((p + B).get(), A + B)
    assert torch.allclose(torch.mul(B, p).get(), A * B)


def test_in_place_ops_keep_the_pointer(alice):
    p = A.clone().send(alice)
    q = B.send(alice)
    r = p.add_(q)
    assert r is p
    p.mul_(2)
    p[0, 0] = 100.0
    expected = (A + B) * 2
    expected[0, 0] = 100.0
    assert torch.allclose(p.get(), expected)


def test_multiple_results(alice):
    p = A.send(alice)
    values, indices = p.max(dim=0)
    ev, ei = A.max(dim=0)
    assert torch.equal(values.get(), ev) and torch.equal(indices.get(), ei)
    assert p.max(dim=1).values.shape == (2,)
    parts = torch.split(p, 1, dim=1)
    assert len(parts) == 3
    for got, exp in zip(parts, torch.split(A, 1, dim=1)):
        assert torch.equal(got.get(), exp)
    chunks = list(p)  # __iter__ unbinds remotely
    assert torch.equal(chunks[1].get(), A[1])


def test_data_dependent_shape_falls_back_to_worker(alice):
    p = torch.tensor([1.0, -2.0, 3.0, -4.0]).send(alice)
    nz = torch.nonzero(p > 0)
    assert nz.shape == (2, 1)
    assert torch.equal(nz.get(), torch.tensor([[0], [2]]))
    u = torch.unique(torch.tensor([3, 1, 3, 2]).send(alice))
    assert torch.equal(u.get(), torch.tensor([1, 2, 3]))


def test_revealing_ops_raise(alice):
    p = A.send(alice)
    with pytest.raises(RevealError):
        bool(p.sum() > 0)
    with pytest.raises(RevealError):
        p.sum().item()
    with pytest.raises(RevealError):
        p.tolist()


def test_mixing_workers_names_both(alice, bob):
    pa, pb = A.send(alice), B.send(bob)
    with pytest.raises(WorkerMismatchError, match="alice.*bob"):
        pa + pb


def test_without_the_hook_functions(alice):
    p = sy.send(torch.tensor([1.0, 2.0]), alice)
    assert torch.equal(sy.get(p + p), torch.tensor([2.0, 4.0]))


def test_integer_and_bool_dtypes_roundtrip(alice):
    for t in (torch.arange(6).view(2, 3), torch.tensor([True, False]), torch.tensor([1, 2], dtype=torch.int8),
              torch.randn(2, dtype=torch.bfloat16), torch.tensor(3.5)):
        assert torch.equal(t.send(alice).get(), t)
