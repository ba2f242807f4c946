"""Active security: SPDZ2k MACs on shares (mod 2^128); tampering aborts with MacCheckError."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import veil as sy
from veil.messaging.messages import DeleteMessage
from veil.mpc.errors import MacCheckError, ShareMismatchError, UnsupportedOperationError
from veil.mpc.opening import count_openings
from veil.mpc.providers import LocalDealer, WorkerDealer
from veil.tensors.mpc_glue.remote_sharing import local_worker_of

# tests that share plain tensors (``.share``, the hook's) without a worker fixture need the hook installed too
# (they passed only while an earlier test in the same process had installed it)
pytestmark = pytest.mark.usefixtures("hook")


@pytest.fixture
def net(hook):
    parties = [sy.VirtualWorker(hook, id=f"as{i}") for i in range(3)]
    return parties, sy.VirtualWorker(hook, id="as_cp")


X = torch.tensor([[3, -4, 0], [5, 6, -7]])
Y = torch.tensor([[7, 2, 1], [-1, 8, 2]])


def _share(t, parties, cp):
    return t.share(*parties, crypto_provider=cp, active_security=True)


@pytest.mark.parametrize("n", [2, 3])
def test_authenticated_arithmetic_matches_torch(net, n):
    parties, cp = net[0][:n], net[1]
    x, y = _share(X, parties, cp), _share(Y, parties, cp)
    out = ((x * y + 3) @ y.t() - x.sum(1) * 2 - (5 - x[:, :2]).sum())
    expected = (X * Y + 3) @ Y.t() - X.sum(1) * 2 - (5 - X[:, :2]).sum()
    with count_openings() as stats:
        got = out.get()
    assert torch.equal(got, expected)
    assert stats.rounds == 2  # the output, then one batched MAC check of everything opened


def test_local_dealer_authenticated_product():
    dealer = LocalDealer(seed=5)
    x = X.share("a", "b", crypto_provider=dealer, active_security=True)
    y = Y.share("a", "b", crypto_provider=dealer, active_security=True)
    assert torch.equal((x * y).get(), X * Y)


def _tamper(worker, share, delta=1):
    """Adds ``delta`` to a share directly in the worker's object store."""
    share.owner.send_msg(DeleteMessage([]), share.location)  # steps queued for the worker (deferred share ops) run first
    worker._objects[share.id_at_location].add_(delta)


def test_tampered_output_share_aborts(net):
    parties, cp = net[0][:2], net[1]
    z = _share(X, parties, cp) * _share(Y, parties, cp)
    _tamper(parties[0], z.child[parties[0].id])
    with pytest.raises(MacCheckError, match="MAC check failed"):
        z.get()


@pytest.mark.parametrize("delta", [1, 1 << 40, -(1 << 20)])
def test_tampered_input_is_caught_at_the_next_check(net, delta):
    parties, cp = net[0][:3], net[1]
    x, y = _share(X, parties, cp), _share(Y, parties, cp)
    _tamper(parties[1], x.child[parties[1].id], delta)
    z = x * y  # the tampered share only enters the masked opening e = x - a
    w = _share(Y, parties, cp) + 1
    with pytest.raises(MacCheckError, match="SPDZ2k MAC check"):
        w.get()  # an unrelated output: the pending opening of e is checked first


def test_refuses_ops_that_would_lose_authentication(net):
    parties, cp = net[0][:2], net[1]
    x = _share(X, parties, cp)
    with pytest.raises(ShareMismatchError, match="unauthenticated"):
        x + Y.share(*parties, crypto_provider=cp)
    f = torch.tensor([1.5, -2.25]).fix_precision().share(*parties, crypto_provider=cp, active_security=True)
    assert torch.equal((f + f - 0.5).get().float_precision(), torch.tensor([2.5, -5.0]))
    assert torch.equal((f > 0).get().float_precision(), torch.tensor([1.0, 0.0]))  # MAC-checked comparison
    with pytest.raises(UnsupportedOperationError, match="reciprocal"):
        f / f  # division by a shared value


def test_indexing_keeps_authentication(net):
    parties, cp = net[0][:2], net[1]
    x = _share(X, parties, cp)
    idx = torch.tensor([1, 0, 1])
    assert torch.equal(x[idx].get(), X[idx])


# ------------------------------------------------------------ fixed point: authenticated truncation

ULP = 2.0**-16  # one unit in the last place at 16 fractional bits


def _bound(x, y, k):
    """Error of a decoded fixed-point product summed over ``k`` terms: the inputs'
    rounding (1/2 ulp each, times the other factor) per term, plus the truncation
    (< 1 ulp) and the output's decoding."""
    return k * (ULP * (x.abs().max() + y.abs().max() + ULP) / 2 + ULP) + ULP


def _fp(t, parties, cp):
    return t.fix_precision().share(*parties, crypto_provider=cp, active_security=True)


def _providers(net, n, kind):
    parties, cp = net[0][:n], net[1]
    if kind == "local":
        return [f"lp{i}" for i in range(n)], LocalDealer(seed=11)
    if kind == "worker":
        return parties, cp
    return parties, WorkerDealer(cp, local_worker_of([cp]), seeded=False)


@pytest.mark.parametrize("kind", ["local", "worker", "worker_unseeded"])
@pytest.mark.parametrize("n", [2, 3])
def test_fixed_point_products_match_torch(net, n, kind):
    parties, cp = _providers(net, n, kind)
    g = torch.Generator().manual_seed(n)
    a, b, w = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(6, 3, generator=g)
    A, B, W = _fp(a, parties, cp), _fp(b, parties, cp), _fp(w, parties, cp)
    with count_openings() as stats:
        prod = (A * B).settle()  # the truncation paid now, not by the next reader
    assert stats.rounds == 2  # Beaver's e/f, then the truncation's masked x + r (also for 2 parties)
    assert (prod.get().float_precision() - a * b).abs().max() <= _bound(a, b, 1)
    assert ((A @ W).get().float_precision() - a @ w).abs().max() <= _bound(a, w, 6)
    assert ((A * 0.75 - B / 4).get().float_precision() - (a * 0.75 - b / 4)).abs().max() <= 4 * ULP
    assert (A.mean().get().float_precision() - a.mean()).abs() <= 2 * ULP
    assert ((A * B).sum(1).get().float_precision() - (a * b).sum(1)).abs().max() <= _bound(a, b, 6)


@pytest.mark.parametrize("n", [2, 3])
def test_linear_model_inference(net, n):
    parties, cp = net[0][:n], net[1]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Linear(5, 2))
    x = torch.randn(3, 8)
    expected = model(x).detach()
    model.fix_precision().share(*parties, crypto_provider=cp, active_security=True)
    assert all(p.child.mac is not None for p in model.parameters())
    got = model(_fp(x, parties, cp)).get().float_precision()
    assert (got - expected).abs().max() < 2e-3
    got = model(x.fix_precision()).get().float_precision()  # a public input, authenticated weights
    assert (got - expected).abs().max() < 2e-3


def test_conv2d_and_avg_pool(net):
    parties, cp = net[0][:2], net[1]
    torch.manual_seed(1)
    x, w, b = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    out = F.avg_pool2d(F.conv2d(_fp(x, parties, cp), _fp(w, parties, cp), _fp(b, parties, cp), padding=1), 2)
    expected = F.avg_pool2d(F.conv2d(x, w, b, padding=1), 2)
    assert (out.get().float_precision() - expected).abs().max() < 2e-3
    out = F.conv2d(_fp(x, parties, cp), w.fix_precision(), stride=2)  # public kernel: local, no triple
    assert (out.get().float_precision() - F.conv2d(x, w, stride=2)).abs().max() < 2e-3


def test_other_ops_keep_authentication(net):
    parties, cp = net[0][:3], net[1]
    x = _share(X, parties, cp)
    diff = (x // 2).get() - X // 2  # floor division by a public integer: authenticated truncation
    assert ((diff == 0) | (diff == 1)).all()
    both = torch.cat([x, torch.ones(2, 3, dtype=torch.int64)], 0) + torch.ones_like(x).repeat(2, 1)
    assert torch.equal(both.get(), torch.cat([X, torch.ones(2, 3, dtype=torch.int64)], 0) + 1)
    assert torch.equal(F.pad(x, (1, 1)).get(), F.pad(X, (1, 1)))
    assert torch.equal((10 - x).get(), 10 - X) and torch.equal((torch.tensor(10) + x).get(), 10 + X)
    from veil.mpc import functions

    f = _fp(torch.tensor([-2.0, 0.0, 1.5]), parties, cp)
    got = functions.sigmoid(f).get().float_precision()  # products and truncations only
    assert (got - torch.sigmoid(torch.tensor([-2.0, 0.0, 1.5]))).abs().max() < 5e-3


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=16),
    divisor=st.sampled_from([2**16, 1000, 7, 2]),
    n=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**32),
)
def test_authenticated_truncation_error_below_one(values, divisor, n, seed):
    x = torch.tensor(values)
    shared = x.share(*[f"t{i}" for i in range(n)], crypto_provider=LocalDealer(seed=seed), active_security=True)
    with count_openings() as stats:
        z = shared.truncate(divisor)
    assert stats.rounds == 1 and z.mac is not None
    diff = z.get() - torch.div(x, divisor, rounding_mode="floor")  # MAC-checked
    assert ((diff == 0) | (diff == 1)).all()


def _share_of(value, party):
    """The share of ``party`` in an authenticated tensor (fixed-point or integer)."""
    child = value.child.child if hasattr(value, "encoding") else value.child
    return child[party.id]


@pytest.mark.parametrize("n", [2, 3])
def test_tampered_input_of_a_truncation_aborts(net, n):
    parties, cp = net[0][:n], net[1]
    x = _fp(torch.tensor([1.5, -2.0, 3.25]), parties, cp)
    _tamper(parties[-1], _share_of(x, parties[-1]), 1 << 16)  # +1.0 in fixed point, without its MAC
    z = x * 0.5  # a public factor: the error only enters the opened c = x + r
    with pytest.raises(MacCheckError, match=r"1 of 2 opened value\(s\) \(truncation mask c = x \+ r\)"):
        z.get()


def test_tampered_product_before_truncation_aborts(net):
    parties, cp = net[0][:3], net[1]
    x, y = _share(X, parties, cp), _share(Y, parties, cp)
    z = x * y
    _tamper(parties[0], z.child[parties[0].id], 5)
    t = z.truncate(4)
    with pytest.raises(MacCheckError, match=r"\(truncation mask c = x \+ r\)"):
        t.get()


def test_tampered_input_of_a_fixed_point_product_aborts(net):
    parties, cp = net[0][:2], net[1]
    a, b = _fp(torch.tensor([[1.0, 2.0]]), parties, cp), _fp(torch.tensor([[0.5], [-1.0]]), parties, cp)
    _tamper(parties[0], _share_of(b, parties[0]), -3)
    with pytest.raises(MacCheckError, match=r"Beaver mask f = y - b \(mm\)"):
        (a @ b).get()


@pytest.mark.parametrize("n", [2, 3])
def test_tampered_fixed_point_result_aborts(net, n):
    parties, cp = net[0][:n], net[1]
    a, b = _fp(torch.tensor([1.0, -2.0]), parties, cp), _fp(torch.tensor([0.5, 4.0]), parties, cp)
    z = a * b
    _tamper(parties[1], _share_of(z, parties[1]), 1 << 16)
    with pytest.raises(MacCheckError, match=r"1 of 4 opened value\(s\) \(output\)"):
        z.get()
    assert torch.equal((a * b).get().float_precision(), torch.tensor([0.5, -8.0]))  # honest again: passes


def test_tampered_truncation_material_aborts():
    """A party that changes its share of the dealt r (or of alpha*q) is caught too."""
    dealer = LocalDealer(seed=2)
    x = _fp(torch.tensor([1.0, 2.0]), ["a", "b"], dealer)
    real = dealer.authenticated_truncation_pairs

    def bad(*args):
        pairs = real(*args)
        fields = list(pairs["b"])  # (lo, hi) of r, q, g, alpha*r, alpha*q, alpha*g
        fields[8] = fields[8] + 1  # party b's share of alpha*q
        pairs["b"] = tuple(fields)
        return pairs

    dealer.authenticated_truncation_pairs = bad
    with pytest.raises(MacCheckError, match=r"\(output\)"):
        (x * 0.5).get()


def test_copy_and_refresh_keep_macs(net):
    parties, cp = net[0][:2], net[1]
    x = _share(X, parties, cp)
    y = x.copy()
    assert y.mac is not None and torch.equal(y.get(), X)
    assert torch.equal((x + 3).get(), X + 3) and torch.equal(x.get(), X)  # x survives both openings
    z = x.refresh()  # tests/mpc/test_mac_comparison.py checks the fresh shares and tampering
    assert z.mac is not None and torch.equal(z.get(), X)
