"""A backward pass's independent shared products open together (veil/tensors/pending_products.py).

Every gradient is checked against torch's; the rounds of the backward pass are counted with the
products pending (the default) and opened one by one (``LAZY_PRODUCTS = False``): a matmul's, a
product's two gradients cost one round instead of two. Outside a backward pass
products open at once; a failed batched opening raises in ``backward()`` and the next step works.
"""

import threading

import pytest
import torch

import veil.tensors.pending_products as pending
from veil.mpc.errors import MPCError
from veil.mpc.opening import count_openings

from tests.mpc.peer_fixtures import cp, parties  # noqa: F401  (network parties with peer openings)
from tests.mpc.test_lazy_truncation import close, sh, value  # noqa: F401  (sh: the 2- and 3-party fixture)


CASES = {
    "matmul": ((5, 4), (4, 3), lambda x, w: x @ w),
    "mul": ((3, 4), (3, 4), lambda x, w: x * w),
    # a strided, padded convolution: its backward (veil/tensors/rules/conv_backward.py) is two convolutions
    "conv": ((2, 2, 6, 5), (3, 2, 3, 2), lambda x, w: torch.nn.functional.conv2d(x, w, stride=2, padding=1)),
}


def _backward(share, name):
    """Gradients of both operands of one product, and the rounds of the backward pass alone."""
    xs, ws, fn = CASES[name]
    gen = torch.Generator().manual_seed(5)
    x, w, g = torch.randn(xs, generator=gen), torch.randn(ws, generator=gen), None
    sx, sw = share(x, requires_grad=True), share(w, requires_grad=True)
    out = fn(sx, sw)
    g = torch.randn(out.shape, generator=gen)
    out.child  # noqa: B018  (the forward product's truncation paid before the count)
    with count_openings() as stats:
        out.backward(share(g))
        grads = (sx.grad.settle(), sw.grad.settle())
    x.requires_grad_(), w.requires_grad_()
    fn(x, w).backward(g)
    return grads, (x.grad, w.grad), stats.rounds


@pytest.mark.parametrize("name", list(CASES))
def test_both_gradients_of_a_product_open_in_one_round(sh, name):
    got, want, lazy_rounds = _backward(sh, name)
    for gv, wv in zip(got, want):
        close(value(gv), wv, 16)
    pending.LAZY_PRODUCTS = False
    try:
        _, _, eager_rounds = _backward(sh, name)
    finally:
        pending.LAZY_PRODUCTS = True
    assert lazy_rounds == eager_rounds - 1, (lazy_rounds, eager_rounds)


@pytest.mark.parametrize("name", ["matmul", "mul", "conv"])
def test_over_network_parties_with_peer_openings(parties, cp, name):  # noqa: F811
    def share(t, requires_grad=False):
        return t.fix_precision(requires_grad=requires_grad).share(*parties, crypto_provider=cp)

    got, want, _ = _backward(share, name)
    for gv, wv in zip(got, want):
        assert torch.allclose(gv.get().float_precision(), wv, atol=1e-2)


def test_products_outside_a_backward_pass_open_at_once(sh):
    x, w = sh(torch.randn(3, 3)), sh(torch.randn(3, 3))
    with count_openings() as stats:
        z = x @ w
    assert stats.rounds == 1 and z.raw_child._veil_pending is None


def test_a_failed_batched_opening_raises_in_backward_and_the_next_step_works(sh, monkeypatch):
    import veil.mpc.beaver as beaver

    real = beaver.finish_products
    calls = {"n": 0}

    def failing(products):
        calls["n"] += 1
        if len(products) > 1 and calls["n"] == 1:
            raise MPCError("party lost during opening (test)")
        return real(products)

    monkeypatch.setattr(pending, "finish_products", failing)
    x, w = torch.randn(4, 3), torch.randn(3, 2)
    sx, sw = sh(x, requires_grad=True), sh(w, requires_grad=True)
    with pytest.raises(MPCError, match="party lost"):
        (sx @ sw).sum().backward()
    sx.grad = sw.grad = None
    (sx @ sw).sum().backward()
    x.requires_grad_(), w.requires_grad_()
    (x @ w).sum().backward()
    close(value(sx.grad), x.grad, 16)
    close(value(sw.grad), w.grad, 16)


def test_a_pending_product_read_by_another_thread_finishes_alone(sh):
    """``defer_product`` outside a backward pass (as inside one): a thread that did not make the product
    reads it; the maker's later read finds it finished."""
    a, b, c = torch.randn(3, 2), torch.randn(2, 2), torch.randn(3, 2)
    sa, sb, sc = (sh(t).child for t in (a, b, c))
    cls = type(sa)
    first = pending.defer_product(cls, sa, sb, "mm")
    second = pending.defer_product(cls, sa, sc, "mul")
    box = {}
    reader = threading.Thread(target=lambda: box.setdefault("first", first.get()))
    reader.start()
    reader.join(60)
    assert first._veil_pending is None and second._veil_pending is not None
    got_second = second.get()
    scale = 2 ** 16
    assert torch.allclose(box["first"].double() / scale ** 2, (a @ b).double(), atol=1e-3)
    assert torch.allclose(got_second.double() / scale ** 2, (a * c).double(), atol=1e-3)
