"""Active security: SPDZ MACs on shares; tampering aborts with MacCheckError."""

import pytest
import torch

import veil as sy
from veil.mpc.errors import MacCheckError, ShareMismatchError, UnsupportedOperationError
from veil.mpc.opening import count_openings
from veil.mpc.providers import LocalDealer


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
    worker.store.get(share.id_at_location).add_(delta)


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
    with pytest.raises(MacCheckError, match="SPDZ MAC check"):
        w.get()  # an unrelated output: the pending opening of e is checked first


def test_refuses_ops_that_would_lose_authentication(net):
    parties, cp = net[0][:2], net[1]
    x = _share(X, parties, cp)
    with pytest.raises(UnsupportedOperationError, match="authenticated"):
        x > 0
    with pytest.raises(ShareMismatchError, match="unauthenticated"):
        x + Y.share(*parties, crypto_provider=cp)
    f = torch.tensor([1.5, -2.25]).fix_precision().share(*parties, crypto_provider=cp, active_security=True)
    assert torch.equal((f + f - 0.5).get().float_precision(), torch.tensor([2.5, -5.0]))
    with pytest.raises(UnsupportedOperationError, match="truncation"):
        f * f


def test_indexing_keeps_authentication(net):
    parties, cp = net[0][:2], net[1]
    x = _share(X, parties, cp)
    idx = torch.tensor([1, 0, 1])
    assert torch.equal(x[idx].get(), X[idx])
