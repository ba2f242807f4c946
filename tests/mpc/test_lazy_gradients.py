"""Lazy truncation through views and into the SGD update.

A view or reordering (``t``, ``transpose``, ``permute``, ``view``, ``detach``) of a shared product
owes what the product owes; plain SGD pays a weight gradient's owed truncation together with the
learning rate's division (one divisor ``D = round(s / lr)``). Every value is checked against torch.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil as sy
import veil.tensors.rules.fixed_precision as fp_rules
from veil.mpc.communicator import communicate
from veil.mpc.opening import count_openings
from veil.tensors.mpc_glue.optim import _folded_divisor

from tests.mpc.test_lazy_truncation import SCALE, close, sh, value  # noqa: F401  (sh: the 2- and 3-party fixture)


VIEWS = [
    (lambda z: z.t(), "t"),
    (lambda z: z.transpose(0, 1), "transpose"),
    (lambda z: z.permute(1, 0), "permute"),
    (lambda z: z.view(-1), "view"),
    (lambda z: z.reshape(2, 6), "reshape"),
    (lambda z: z.detach(), "detach"),
    (lambda z: z.t().detach().permute(1, 0).view(-1), "chain"),
]


@pytest.mark.parametrize("fn,name", VIEWS, ids=[n for _, n in VIEWS])
def test_views_owe_what_the_product_owes_and_pay_once(sh, fn, name):
    torch.manual_seed(0)
    a, b = torch.randn(3, 4), torch.randn(4, 4)
    z = sh(a) @ sh(b)
    derived = fn(z)
    assert derived.pending_divisor == SCALE  # nothing paid yet
    with count_openings() as stats:
        got_derived, got_z = derived.settle(), z.settle()
    assert stats.rounds == 1  # the view paid through the product: one truncation for both
    close(value(got_derived), fn(a @ b), 8)
    close(value(got_z), a @ b, 8)


def test_a_view_of_a_product_assigned_in_place_keeps_the_old_value(sh):
    torch.manual_seed(1)
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    z = sh(a) @ sh(b)
    flipped = z.t()
    z.add_(2.0)  # a new value for z: the view must not redo its transpose on it
    close(value(flipped), (a @ b).t(), 8)
    close(value(z), a @ b + 2, 8)


def test_folded_divisor_is_never_coarser_than_the_encoded_rate(hook, sh):
    w = sh(torch.randn(2, 3), requires_grad=True)
    w.grad = sh(torch.randn(2, 4)) @ sh(torch.randn(4, 3))  # owes the scale
    assert w.grad.pending_divisor == SCALE
    assert _folded_divisor([w], 0.1) == 10 * SCALE
    assert _folded_divisor([w], 0.5) == 2 * SCALE
    assert _folded_divisor([w], 0.03) == round(SCALE / 0.03)  # 1.5e-7 off instead of 4e-5
    assert _folded_divisor([w], 2.0) == SCALE // 2
    assert _folded_divisor([w], 3.0) is None  # 3 s is exact, s / 3 is not
    assert _folded_divisor([w], 0.0) is None and _folded_divisor([w], -0.1) is None
    fp_rules.LAZY_TRUNCATION = False
    try:
        assert _folded_divisor([w], 0.1) is None
    finally:
        fp_rules.LAZY_TRUNCATION = True
    w.grad.settle()
    assert _folded_divisor([w], 0.1) is None  # nothing owed: lr is encoded and truncated as before


def _workers(hook, n):
    parties = [sy.VirtualWorker(hook, id=f"lg{i}") for i in range(n)]
    return parties, sy.VirtualWorker(hook, id="lgcp")


def _train_step(model, opt, x, y):
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("n_parties", [2, 3])
@pytest.mark.parametrize("lr", [0.1, 0.03, 3.0])
def test_sgd_steps_match_torch_with_the_weight_gradients_folded(hook, n_parties, lr):
    torch.manual_seed(7)
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 2))
    models = {lazy: copy.deepcopy(plain) for lazy in (True, False)}
    parties, cp = _workers(hook, n_parties)
    opts = {}
    for lazy, model in models.items():
        model.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True)
        opts[lazy] = torch.optim.SGD(model.parameters(), lr=lr).fix_precision()
    popt = torch.optim.SGD(plain.parameters(), lr=lr)
    rounds = {}
    for step in range(3):
        x, y = torch.randn(10, 6), torch.randn(10, 2)
        _train_step(plain, popt, x, y)
        for lazy in (True, False):
            fp_rules.LAZY_TRUNCATION = lazy
            try:
                xs, ys = (t.fix_precision().share(*parties, crypto_provider=cp) for t in (x, y))
                with communicate() as comm:
                    _train_step(models[lazy], opts[lazy], xs, ys)
            finally:
                fp_rules.LAZY_TRUNCATION = True
            rounds[lazy] = comm.rounds
    # three weight gradients' truncations ride on the update's (with lr = 3 the rate is encoded: one fewer,
    # the last layer's loss gradient still folds)
    assert rounds[True] <= rounds[False] - (4 if lr != 3.0 else 1)
    for lazy, model in models.items():
        model.get().float_precision()
        for p, q in zip(model.parameters(), plain.parameters()):
            assert torch.allclose(p, q, atol=2e-3 * max(1.0, lr)), (lazy, (p - q).abs().max())


def test_gradients_read_after_the_folded_step_keep_their_values(hook):
    torch.manual_seed(8)
    parties, cp = _workers(hook, 2)
    w, b = torch.randn(3, 4), torch.randn(3)
    x = torch.randn(5, 4)
    pw, pb = w.clone().requires_grad_(), b.clone().requires_grad_()
    F.linear(x, pw, pb).sum().backward()
    sw, sb = (t.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True) for t in (w, b))
    opt = torch.optim.SGD([sw, sb], lr=0.25).fix_precision()
    F.linear(x.fix_precision().share(*parties, crypto_provider=cp), sw, sb).sum().backward()
    assert sw.grad.pending_divisor == SCALE  # x^T g through t() and detach: still owed
    with communicate() as comm:
        opt.step()
    assert comm.rounds == 1
    close(value(sw.grad), pw.grad, 4)  # the gradient itself still pays its own truncation when read
    close(value(sb.grad), pb.grad, 4)
    close(value(sw), w - 0.25 * pw.grad, 8)
    close(value(sb), b - 0.25 * pb.grad, 8)


@pytest.mark.parametrize("lr", [0.1, 1e-4])
def test_gradients_at_the_top_of_the_product_range_fold_exactly(hook, sh, lr):
    """Edge: an owed weight gradient and a bias gradient near ``2^30`` (a product's range: ``|v| s^2`` just
    under ``2^62 - D``); the bias is scaled by ``s`` to the product's scale, the largest value truncated."""
    big = 2.0**29.9
    a = torch.tensor([[big / 4], [-big / 8]], dtype=torch.float64)  # entries of a @ b: |.| <= big
    bvec = torch.tensor([[4.0, -3.0, 0.5]], dtype=torch.float64)
    w = sh(torch.zeros(2, 3), requires_grad=True)
    bias = sh(torch.zeros(3), requires_grad=True)
    w.grad = sh(a.float()) @ sh(bvec.float())  # owed, |entries| up to 2^29.9
    bias.grad = sh(torch.tensor([big, -big, 1.0]))
    opt = torch.optim.SGD([w, bias], lr=lr).fix_precision()
    with count_openings() as stats:
        opt.step()
    assert stats.rounds == 1
    expected_w = -lr * (a.float().double() @ bvec)
    expected_b = -lr * torch.tensor([big, -big, 1.0], dtype=torch.float64)
    for got, want in ((value(w), expected_w), (value(bias), expected_b)):
        rel = ((got.double() - want).abs() / want.abs().clamp_min(1.0)).max().item()
        assert rel < 1e-5, rel


def test_a_product_with_a_shared_constant_is_a_public_one(sh):
    """``ones_like`` of a shared tensor (autograd's seed gradient) is public: products with it open nothing."""
    torch.manual_seed(9)
    a = torch.randn(3, 4)
    x = sh(a)
    with count_openings() as stats:
        exact = x * torch.ones_like(x)  # an integer: exact
        scaled = x * torch.full_like(x, 2.5)  # a public product (its truncation owed)
        broadcast = torch.ones_like(x[0]) * x  # the constant broadcast to x's shape
    assert stats.rounds == 0
    close(value(exact), a, 1)
    close(value(scaled), a * 2.5, 2)
    close(value(broadcast), a, 1)
    # a constant that broadcasts the other operand beyond its shape: a shared product of the constant's shape
    small = sh(torch.tensor([1.5]))
    close(value(small * torch.full_like(x, 2.0)), torch.full((3, 4), 3.0), 4)
    # a constant assigned a new value (in place) is no longer public
    c = torch.ones_like(x)
    c.add_(x)
    close(value(x * c), a * (1 + a), 8)
