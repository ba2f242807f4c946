"""A two-party matrix product's ``beaver_local`` item (veil.mpc.material) and its combine (veil.mpc.beaver's
``beaver_combine_local``): each party computes ``(e + a_i) @ (f + b_i) + d_i`` less its share of ``e @ f``, with
``d = a0 @ b1 + a1 @ b0`` dealt. Checked against plain torch over the whole ring, with every dealer (in process,
a provider worker dealing seeded and unseeded), and with hostile arguments."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import veil as sy
from veil.mpc import beaver
from veil.mpc.beaver import beaver_matmul, beaver_mul
from veil.mpc.errors import ProviderError
from veil.mpc.material import recipe
from veil.mpc.opening import reconstruct
from veil.mpc.party import PARTY_FUNCTIONS
from veil.mpc.providers import LocalDealer
from veil.mpc.providers.worker_dealer import WorkerDealer
from veil.mpc.ring import INT64_MAX, INT64_MIN, random_ring
from veil.mpc.sharing import split

combine_local = PARTY_FUNCTIONS["beaver_combine_local"]


@pytest.fixture(autouse=True)
def _local_items_at_any_size(monkeypatch):
    """Small products here take local items too (by default only from ``LOCAL_MIN_WORK`` multiply-adds on)."""
    monkeypatch.setattr(beaver, "LOCAL_MIN_WORK", 0)
EDGES = [0, 1, -1, INT64_MAX, INT64_MIN, 1 << 62, -(1 << 62), 1 << 32]
RING = st.one_of(st.sampled_from(EDGES), st.integers(INT64_MIN, INT64_MAX))


def _ring(rows: int, cols: int, values: list) -> torch.Tensor:
    return torch.tensor(values[: rows * cols], dtype=torch.int64).view(rows, cols)


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 5)),
       values=st.lists(RING, min_size=6 * 20, max_size=6 * 20))
def test_the_two_combines_sum_to_the_product_over_the_ring(shape, values):
    """x = e + a, y = f + b with a, b split between two parties, d = a0 b1 + a1 b0: z0 + z1 = x @ y mod 2^64 for
    any ring values (the row split of e @ f over one row, odd rows, one column)."""
    m, k, n = shape
    chunks = [values[i * 20:(i + 1) * 20] for i in range(6)]
    a0, a1, e = (_ring(m, k, c) for c in chunks[:3])
    b0, b1, f = (_ring(k, n, c) for c in chunks[3:])
    d = a0 @ b1 + a1 @ b0
    d0 = random_ring((m, n))
    z0 = combine_local(a0, b0, d0, e, f, part=0, parts=2)
    z1 = combine_local(a1, b1, d - d0, e, f, part=1, parts=2)
    assert torch.equal(z0 + z1, (e + a0 + a1) @ (f + b0 + b1))
    for t in (a0, b0, d0, e, f):  # (the dealt and opened operands are left as they were)
        assert t.dtype == torch.int64


@pytest.mark.parametrize("make", ["local", "worker seeded", "worker unseeded"])
def test_every_dealer_deals_the_cross_terms(make, hook):
    """Each dealer's item: a, b uniform shares and d's shares summing to a0 b1 + a1 b0 (not a b)."""
    if make == "local":
        dealer, parties = LocalDealer(seed=5), ["p0", "p1"]
        items = dealer.local_triples("mm", (6, 4), (4, 3), parties)
        got = {p: items[p] for p in parties}
    else:
        owner = sy.VirtualWorker(hook, id=f"lp-owner-{make}")
        cp = sy.VirtualWorker(hook, id=f"lp-cp-{make}")
        workers = [sy.VirtualWorker(hook, id=f"lp-{i}-{make}") for i in range(2)]
        dealer = WorkerDealer(cp, owner, seeded=(make == "worker seeded"))
        items = dealer.local_triples("mm", (6, 4), (4, 3), [w.id for w in workers])
        got = {p: tuple(t.location._objects[t.id_at_location].clone() for t in items[p]) for p in items}  # (owner)
    (a0, b0, d0), (a1, b1, d1) = got.values()
    assert torch.equal(d0 + d1, a0 @ b1 + a1 @ b0)
    assert not torch.equal(d0 + d1, (a0 + a1) @ (b0 + b1))


def test_matmul_between_two_parties_takes_local_items_and_matches_torch(hook, monkeypatch):
    """beaver_matmul on a provider worker: the product takes a local item (one product per party online) and
    reconstructs to torch's; an elementwise product keeps the Beaver triple."""
    owner = sy.VirtualWorker(hook, id="lp-mm-owner")
    cp = sy.VirtualWorker(hook, id="lp-mm-cp")
    workers = [sy.VirtualWorker(hook, id=f"lp-mm-{i}") for i in range(2)]
    dealer = WorkerDealer(cp, owner)
    kinds = []  # (spied at the dealer: a patched party function would be cached as the step's signature)
    real_take = dealer._take
    monkeypatch.setattr(dealer, "_take", lambda kind, *a: kinds.append(kind) or real_take(kind, *a))
    x, y = random_ring((9, 7)), random_ring((7, 5))
    xs = {w.id: s.send(w) for w, s in zip(workers, split(x, 2))}
    ys = {w.id: s.send(w) for w, s in zip(workers, split(y, 2))}
    z = beaver_matmul(xs, ys, dealer)
    assert torch.equal(reconstruct({p: t.get() for p, t in z.items()}), x @ y)
    assert kinds == ["beaver_local"]
    kinds.clear()
    v = random_ring((9, 7))
    zm = beaver_mul(xs, {w.id: s.send(w) for w, s in zip(workers, split(v, 2))}, dealer)
    assert torch.equal(reconstruct({p: t.get() for p, t in zm.items()}), x * v)
    assert kinds == ["beaver"]


def test_three_parties_keep_beaver_triples():
    """The local item is dealt to two parties only: three parties' matmul takes triples and still matches torch."""
    dealer, parties = LocalDealer(seed=9), ["p0", "p1", "p2"]
    x, y = random_ring((5, 4)), random_ring((4, 3))
    z = beaver_matmul(dict(zip(parties, split(x, 3))), dict(zip(parties, split(y, 3))), dealer)
    assert torch.equal(reconstruct(z), x @ y)
    with pytest.raises(ProviderError, match="two parties"):
        dealer.local_triples("mm", (5, 4), (4, 3), parties)


@pytest.mark.parametrize("spec", [("mul", (4, 4), (4, 4), {}), ("conv2d", (1, 1, 4, 4), (1, 1, 3, 3), {}),
                                  ("matmul", (2, 4, 4), (4, 4), {}), ("bmm", (2, 4, 4), (2, 4, 4), {})])
def test_a_provider_refuses_local_items_of_other_products(spec):
    with pytest.raises(ProviderError, match="two matrices"):
        recipe("beaver_local", spec)


@pytest.mark.parametrize("kwargs", [dict(part=2, parts=2), dict(part=-1, parts=2), dict(part=0, parts=3),
                                    dict(part=0.0, parts=2), dict(part=True, parts=2), dict(part=0, parts=1 << 40)])
def test_hostile_parts_are_refused_in_one_line(kwargs):
    t = random_ring((3, 3))
    with pytest.raises(ValueError) as info:
        combine_local(t, t, t, t, t, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("e_shape, f_shape", [((3, 4), (3, 3)), ((3, 3), (4, 3)), ((1 << 10, 3), (3, 3)),
                                              ((3,), (3, 3))])
def test_opened_values_of_another_shape_are_refused_before_any_product(e_shape, f_shape):
    """A requester's e and f must be the dealt item's shapes: nothing larger is multiplied."""
    t = random_ring((3, 3))
    with pytest.raises(ValueError, match="not one matrix product"):
        combine_local(t, t, t, random_ring(e_shape), random_ring(f_shape), part=0, parts=2)


def test_a_provider_refuses_a_local_dealing_for_three_parties_before_any_seed_goes_out():
    """A requester's dealing request names its parties: a local item for three is refused while the request is
    checked (before the provider sends a seed or expands anything), in one line."""
    from veil.mpc.providers.worker_dealer import _checked_request

    with pytest.raises(ProviderError, match="two parties, not 3") as info:
        _checked_request("beaver_local", ("mm", (4, 4), (4, 4), {}), ["p0", "p1", "p2"], [[1, 2, 3]] * 3, 1)
    assert "\n" not in str(info.value)
    assert len(_checked_request("beaver_local", ("mm", (4, 4), (4, 4), {}), ["p0", "p1"], [[1, 2, 3]] * 2, 1)[0]) == 2


def test_a_small_product_keeps_its_beaver_triple_by_default(monkeypatch):
    """Below LOCAL_MIN_WORK multiply-adds (a batch-1 model's layers) the local item saves less than its extra
    passes: the product takes a triple; from it on, a local item. Both match torch."""
    monkeypatch.undo()
    dealer, parties = LocalDealer(seed=3), ["p0", "p1"]
    taken = []
    real = dealer.local_triples
    monkeypatch.setattr(dealer, "local_triples", lambda *a: taken.append(a[1:3]) or real(*a))
    for shape in ((1, 64), (64, 32)), ((64, 128), (128, 128)):
        x, y = random_ring(shape[0]), random_ring(shape[1])
        z = beaver_matmul(dict(zip(parties, split(x, 2))), dict(zip(parties, split(y, 2))), dealer)
        assert torch.equal(reconstruct(z), x @ y)
    assert beaver.LOCAL_MIN_WORK == 1 << 20 and taken == [((64, 128), (128, 128))]
