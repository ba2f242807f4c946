"""Lazy truncation: a shared product owes its division by the scale until an op pays it.

Every result is decoded and checked against torch; the round counts are checked
against the same computation with ``LAZY_TRUNCATION`` off.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import veil.tensors.rules.fixed_precision as fp_rules
from veil.mpc.opening import count_openings
from veil.mpc.providers import LocalDealer
from veil.tensors.fixed_precision import fix_precision

ULP = 2.0**-16
SCALE = 2**16


@pytest.fixture(params=[("alice", "bob"), ("alice", "bob", "charlie")], ids=["2party", "3party"])
def sh(request):
    dealer = LocalDealer(seed=3)

    def share(t, requires_grad=False):
        return fix_precision(t, requires_grad=requires_grad).share(*request.param, crypto_provider=dealer)

    share.parties, share.dealer = request.param, dealer
    return share


@pytest.fixture
def eager():
    fp_rules.LAZY_TRUNCATION = False
    yield
    fp_rules.LAZY_TRUNCATION = True


def value(f) -> torch.Tensor:
    return f.get().float_precision()


def close(got, expected, ulps) -> None:
    assert got.shape == expected.shape
    err = (got.double() - expected.double()).abs().max().item()
    assert err <= ulps * ULP, f"error {err / ULP:.1f} ulps > {ulps}"


def _block():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4), nn.ReLU(),
                         nn.Linear(4, 2))


def _rounds(fn) -> tuple:
    with count_openings() as stats:
        out = fn()
        out.child  # the last product's truncation, still owed, is part of the work
    return out, stats.rounds


def test_conv_pool_relu_linear_relu_match_torch_in_three_rounds_fewer(hook, sh):
    torch.manual_seed(0)
    plain = _block().eval()
    x = torch.randn(2, 2, 10, 10)
    shared = _block().eval()
    shared.load_state_dict(plain.state_dict())
    shared.fix_precision().share(*sh.parties, crypto_provider=sh.dealer)
    with torch.no_grad():
        lazy, lazy_rounds = _rounds(lambda: shared(sh(x)))
        fp_rules.LAZY_TRUNCATION = False
        try:
            eager_out, eager_rounds = _rounds(lambda: shared(sh(x)))
        finally:
            fp_rules.LAZY_TRUNCATION = True
        expected = plain(x)
    close(value(lazy), expected, 64)
    close(value(eager_out), expected, 64)
    # the pool's division and both ReLUs' truncations ride on other rounds: (conv 1 + pool 1 + relu 1) +
    # (linear 1 + relu 1) + linear's 1 eager, conv/pool/relu + linear/relu + linear's truncation lazy
    assert eager_rounds - lazy_rounds == 3


def test_linear_relu_training_gradients_match_torch(sh):
    torch.manual_seed(1)
    w1, b1, w2 = torch.randn(4, 5) * 0.5, torch.randn(4) * 0.5, torch.randn(1, 4) * 0.5
    x, y = torch.randn(6, 5), torch.randn(6, 1)
    params = [t.clone().requires_grad_() for t in (w1, b1, w2)]
    F.mse_loss(F.linear(F.relu(F.linear(x, params[0], params[1])), params[2]), y).backward()
    shared = [sh(t, requires_grad=True) for t in (w1, b1, w2)]
    with count_openings() as stats:
        hidden = F.relu(F.linear(sh(x), shared[0], shared[1]))
    fp_rules.LAZY_TRUNCATION = False
    try:
        with count_openings() as eager_stats:
            F.relu(F.linear(sh(x), shared[0], shared[1]))
    finally:
        fp_rules.LAZY_TRUNCATION = True
    assert stats.rounds == eager_stats.rounds - 1  # the bias rode at scale s^2, the truncation on the comparison
    F.mse_loss(F.linear(hidden, shared[2]), sh(y)).backward()
    for got, want in zip(shared, params):
        close(value(got.grad), want.grad, 64)


def test_every_reader_pays_what_is_owed(sh):
    torch.manual_seed(2)
    a, b, c = torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 5)
    plain = a @ b
    cases = [
        (lambda z, cc: z, plain),
        (lambda z, cc: z + 1.5, plain + 1.5),
        (lambda z, cc: 2.25 - z, 2.25 - plain),
        (lambda z, cc: z * 3, plain * 3),
        (lambda z, cc: z * 0.5, plain * 0.5),
        (lambda z, cc: z - cc, plain - c),
        (lambda z, cc: cc + z, c + plain),
        (lambda z, cc: z + torch.full((3, 5), 0.75), plain + 0.75),
        (lambda z, cc: z.t(), plain.t()),
        (lambda z, cc: z.reshape(-1), plain.reshape(-1)),
        (lambda z, cc: z.sum(), plain.sum()),
        (lambda z, cc: z * cc, plain * c),
        (lambda z, cc: F.relu(z - 0.25), F.relu(plain - 0.25)),
        (lambda z, cc: z.max(), plain.max()),
    ]
    for fn, expected in cases:
        z = sh(a) @ sh(b)
        assert z.pending_divisor == SCALE
        close(value(fn(z, sh(c))), expected, 40)


def test_two_owed_divisors_each_pay_their_own(sh):
    torch.manual_seed(3)
    img, ker = torch.randn(1, 1, 6, 6), torch.randn(2, 1, 3, 3)
    m1, m2 = torch.randn(2, 2), torch.randn(2, 2)
    pooled = F.avg_pool2d(F.conv2d(sh(img), sh(ker)), 2)  # owes s * 4
    prod = (sh(m1) @ sh(m2)).view(1, 2, 1, 2).expand(1, 2, 2, 2)  # a view: paid on the way
    assert pooled.pending_divisor == 4 * SCALE
    close(value(pooled + prod), F.avg_pool2d(F.conv2d(img, ker), 2) + (m1 @ m2).view(1, 2, 1, 2), 40)


def test_public_operands_beyond_the_scaled_range_make_the_product_pay_first(sh):
    a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5], [0.25]])
    big = 2.0**40  # encoded 2^56: times the owed 2^16 it would leave int64
    z = sh(a) @ sh(b)
    close(value(z + big), a @ b + big, 1)
    z = sh(a) @ sh(b)
    close(value(z - torch.full((1, 1), big)), a @ b - big, 1)


def test_printing_pays_nothing(sh):
    z = sh(torch.randn(2, 3)) @ sh(torch.randn(3, 2))
    with count_openings() as stats:
        text = repr(z)
    assert stats.rounds == 0 and z.pending_divisor == SCALE and f"pending_divisor={SCALE}" in text


def test_a_value_read_twice_is_right_both_times(sh):
    a, b = torch.randn(4, 3), torch.randn(3, 4)
    z = sh(a) @ sh(b)
    r = F.relu(z)  # folds the truncation into its comparison, z itself still owes it
    assert z.pending_divisor == SCALE
    close(value(r), F.relu(a @ b), 40)
    close(value(z), a @ b, 40)
    assert z.pending_divisor == 1


def test_plaintext_products_and_the_eager_switch_truncate_at_once(sh, eager):
    a, b = torch.randn(2, 3), torch.randn(3, 2)
    assert (fix_precision(a) @ fix_precision(b)).pending_divisor == 1
    assert (sh(a) @ sh(b)).pending_divisor == 1


def test_maxima_of_a_product_owe_what_it_did(hook, sh):
    torch.manual_seed(4)
    img, ker, bias = torch.randn(2, 1, 8, 8), torch.randn(3, 1, 3, 3), torch.randn(3)
    a, b = torch.randn(4, 6), torch.randn(6, 5)

    def block():
        return F.relu(F.max_pool2d(F.conv2d(sh(img), sh(ker), sh(bias)), 2))

    with count_openings() as lazy:
        out = block()
    fp_rules.LAZY_TRUNCATION = False
    try:
        with count_openings() as eager:
            block()
    finally:
        fp_rules.LAZY_TRUNCATION = True
    assert eager.rounds - lazy.rounds == 1  # no truncation round of its own: the ReLU paid it
    close(value(out), F.relu(F.max_pool2d(F.conv2d(img, ker, bias), 2)), 40)
    z = sh(a) @ sh(b)
    values, index = z.max(dim=1)
    assert values.pending_divisor == SCALE
    close(value(values), (a @ b).max(dim=1).values, 40)
    assert torch.equal(value(index).long(), (a @ b).argmax(dim=1))
    close(value((sh(a) @ sh(b)).max()), (a @ b).max(), 40)


_CHAIN_OPS = ["mm", "add_public", "add_shared", "mul_int", "mul_shared", "relu", "t", "neg", "max_dim", "settle"]


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.sampled_from(_CHAIN_OPS), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_property_any_chain_of_ops_matches_torch(ops, seed):
    """Whatever carries or pays the debt, in whatever order, the decoded result is torch's."""
    gen = torch.Generator().manual_seed(seed)
    dealer = LocalDealer(seed=seed)

    def share(t):
        return fix_precision(t).share("alice", "bob", crypto_provider=dealer)

    x = torch.randn(4, 4, generator=gen)
    w, y = torch.randn(4, 4, generator=gen) * 0.5, torch.randn(4, 4, generator=gen)
    sx = share(x) @ share(torch.eye(4))  # start owing, as a layer's output does
    for op in ops:
        if op == "mm":
            x, sx = x @ w, sx @ share(w)
        elif op == "add_public":
            x, sx = x + 0.75, sx + 0.75
        elif op == "add_shared":
            x, sx = x + y, sx + share(y)
        elif op == "mul_int":
            x, sx = x * 3, sx * 3
        elif op == "mul_shared":
            x, sx = x * y, sx * share(y)
        elif op == "relu":
            x, sx = F.relu(x), F.relu(sx)
        elif op == "t":
            x, sx = x.t(), sx.t()
        elif op == "neg":
            x, sx = -x, -sx
        elif op == "max_dim":
            x, sx = x.max(dim=1, keepdim=True).values.expand(4, 4), sx.max(dim=1, keepdim=True)[0].expand(4, 4)
        else:
            sx = sx.settle()
    got = value(sx)
    tolerance = 1e-3 * (1 + x.abs().max().item())
    assert (got - x).abs().max().item() <= tolerance, (ops, (got - x).abs().max().item())


def test_operands_that_would_stretch_the_range_make_the_product_pay_first(sh):
    """A plain fixed-precision addend is checked like a public one; an integer factor above 1 in size
    makes the product pay (the factor times the product would be what is truncated: past its range)."""
    a, b = torch.tensor([[2.0, 1.0]], dtype=torch.float64), torch.tensor([[3.0], [1.0]], dtype=torch.float64)
    for big in (2.0**35, 2.0**40):
        z = sh(a) @ sh(b)
        addend = fix_precision(torch.tensor([[big]], dtype=torch.float64))  # times 2^16 it would wrap
        assert value(z + addend).item() == 7 + big
    for k in (10**6, 10**9, -(10**9)):
        z = sh(a) @ sh(b)
        assert value(z * k).item() == 7 * k
    z = sh(a) @ sh(b)
    assert (z * -1).pending_divisor == SCALE  # a sign flip keeps the debt


def test_an_integer_division_and_the_mse_gradient_fold_into_the_debt(sh):
    a, b = torch.randn(4, 3), torch.randn(3, 2)
    z = sh(a) @ sh(b)
    q = z / 4
    assert q.pending_divisor == 4 * SCALE
    close(value(q), (a @ b) / 4, 2)
    close(value((sh(a) @ sh(b)) / -3), (a @ b) / -3, 2)
    x, y = torch.randn(6, 2, requires_grad=True), torch.randn(6, 2)
    F.mse_loss(x, y).backward()
    rounds = {}
    for lazy in (True, False):
        fp_rules.LAZY_TRUNCATION = lazy
        try:
            sx = sh(x.detach(), requires_grad=True)
            loss = F.mse_loss(sx, sh(y))
            with count_openings() as stats:
                loss.backward()  # 2 / 12 (x - y) grad: grad is the public seed 1 (no Beaver round)
                sx.grad.settle()  # (the leaf's gradient carries what it owes through autograd's detach)
        finally:
            fp_rules.LAZY_TRUNCATION = True
        rounds[lazy] = stats.rounds
        close(value(sx.grad), x.grad, 4)
    assert rounds[True] == rounds[False] == 1  # one truncation


def test_a_failed_record_block_leaves_no_watcher(hook):
    import veil as sy
    import veil.tensors.fixed_precision as fp_tensor
    from veil.mpc.providers.worker_dealer import dealer_for

    al, bo, cp = (sy.VirtualWorker(hook, id=n) for n in ("lz_alice", "lz_bob", "lz_cp"))
    dealer = dealer_for(cp, hook.local_worker)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom"):
            with dealer.record():
                kept = fix_precision(torch.ones(2)).share(al, bo, crypto_provider=cp) * 2.5
                raise RuntimeError("boom")
    assert fp_tensor._WATCHED == [] and kept.pending_divisor == SCALE  # nothing paid for a failed block
    with dealer.record() as plan:
        kept = fix_precision(torch.ones(2)).share(al, bo, crypto_provider=cp) * 2.5
    assert kept.pending_divisor == 1 and any(key[0] == "truncation" for key in plan.needs.values())


def test_results_derived_from_one_product_pay_once_and_keep_their_values(sh):
    a, b = torch.randn(3, 4), torch.randn(4, 3)
    p = a @ b

    def rounds(fn, lazy):
        fp_rules.LAZY_TRUNCATION = lazy
        try:
            with count_openings() as stats:
                out = fn().settle()
        finally:
            fp_rules.LAZY_TRUNCATION = True
        return out, stats.rounds

    for fn, expected in ((lambda z: (z + 1) * (z + 2), (p + 1) * (p + 2)),
                         (lambda z: torch.cat([z + 1, -z, z * 3]), torch.cat([p + 1, -p, p * 3]))):
        sa, sb = sh(a), sh(b)
        lazy_out, lazy_rounds = rounds(lambda: fn(sa @ sb), True)
        _, eager_rounds = rounds(lambda: fn(sa @ sb), False)
        assert lazy_rounds <= eager_rounds  # the product pays once for every result derived from it
        close(value(lazy_out), expected, 64)
    # a source assigned in place after a result derived from it: the result keeps the old value
    z = sh(a) @ sh(b)
    w = sh(torch.ones(3, 3))
    derived, flipped = z + w, -z
    z.add_(5.0)
    w.add_(7.0)
    close(value(derived), p + 1, 40)
    close(value(flipped), -p, 40)
    close(value(z), p + 5, 40)
