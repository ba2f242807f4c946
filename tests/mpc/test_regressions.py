"""Regression tests for issue 14's four bugs, each checked against plain torch."""

import pytest
import torch

import veil as sy
from veil.tensors.additive import share

ULP = 2.0**-16


@pytest.fixture(params=[2, 3], ids=["2party", "3party"])
def workers(request, hook):
    names = ("alice", "bob", "charlie")[: request.param]
    return [sy.VirtualWorker(hook, id=n) for n in names]


@pytest.fixture
def cp(hook):
    return sy.VirtualWorker(hook, id="crypto_provider")


def plain(x):
    out = x.get()
    return out.float_precision() if isinstance(out, sy.FixedPrecisionTensor) else out


# ---- (x + 3).get() must not free x's shares (a public add reused share objects)


@pytest.mark.parametrize("op", [lambda x: x + 3, lambda x: x - 3, lambda x: 3 - x, lambda x: x // 1])
def test_public_add_leaves_operand_usable(workers, cp, op):
    t = torch.tensor([5, -7, 11])
    x = t.share(*workers, crypto_provider=cp)
    expected = op(t)
    assert torch.equal(op(x).get(), expected)
    # x is intact: every op on it still decodes, twice
    assert torch.equal((x + 3).get(), t + 3)
    assert torch.equal((x - 3).get(), t - 3)
    assert torch.equal(x.get(), t)


def test_public_add_fixed_precision_leaves_operand_usable(workers, cp):
    t = torch.tensor([0.5, -1.25, 3.0])
    x = t.fix_precision().share(*workers, crypto_provider=cp)
    assert torch.allclose(plain(x + 3), t + 3)
    assert torch.allclose(plain(x / 1), t)
    assert torch.allclose(plain(x * 2), t * 2)
    assert torch.allclose(plain(x), t)


def test_public_add_local_shares_are_fresh_objects(dealer):
    x = share(torch.tensor([1, 2]), ("a", "b", "c"), dealer)
    y = x + 3
    assert all(y.child[p] is not x.child[p] for p in x.parties)


# ---- max over any dim of a 2-D shared tensor (used aten.movedim, unsupported)


@pytest.mark.parametrize("dim", [0, 1, -2, -1])
def test_max_any_dim(workers, cp, dim):
    a = torch.randn(5, 7) * 10
    x = a.fix_precision().share(*workers, crypto_provider=cp)
    values, index = x.max(dim=dim)
    assert torch.allclose(plain(values), a.max(dim=dim).values, atol=ULP)
    ea = a.fix_precision().child
    assert torch.equal(plain(index), ea.argmax(dim=dim).float())


def test_max_dim0_3d_keepdim(workers, cp):
    a = torch.randint(-50, 50, (3, 4, 5))
    x = a.share(*workers, crypto_provider=cp)
    values, index = torch.max(x, dim=1, keepdim=True)
    assert torch.equal(values.get(), a.max(dim=1, keepdim=True).values)
    assert torch.equal(index.get(), a.argmax(dim=1, keepdim=True))


@pytest.mark.parametrize("n", [4, 5, 6, 7])
def test_argmax_keeps_the_first_of_tied_maxima_like_torch(workers, cp, n):
    # every 0/1 row of length n: ties everywhere (a tournament pairing entries i and i + n/2 returned
    # index 2 for [0, 1, 1, 0]: the winners of {0, 2} and {1, 3} met in the wrong order)
    rows = torch.tensor([[(k >> j) & 1 for j in range(n)] for k in range(1 << n)])
    index = rows.share(*workers, crypto_provider=cp).argmax(dim=1)
    assert torch.equal(index.get(), rows.argmax(dim=1))


# ---- argmax of a fixed-precision tensor is fixed-precision (compares with fp targets)


def test_argmax_fixed_precision_compares_with_fixed_precision_targets(workers, cp):
    logits = torch.randn(6, 10)
    target = torch.tensor([0, 3, 9, 2, 2, 5])
    target[1] = int(logits[1].argmax())  # at least one hit
    x = logits.fix_precision().share(*workers, crypto_provider=cp)
    y = target.float().fix_precision().share(*workers, crypto_provider=cp)
    pred = x.argmax(dim=1)
    assert isinstance(pred, sy.FixedPrecisionTensor)
    correct = pred.eq(y.view_as(pred)).sum()
    assert plain(correct).item() == (logits.argmax(1) == target).sum().item()


def test_argmax_plain_fixed_precision(hook):
    a = torch.randn(4, 5)
    x = a.fix_precision()
    assert torch.equal(x.argmax(dim=1).float_precision(), a.argmax(dim=1).float())


# ---- copy() and refresh()


def test_copy_is_independent(workers, cp):
    t = torch.tensor([1.5, -2.0, 4.25])
    x = t.fix_precision().share(*workers, crypto_provider=cp)
    y = x.copy()
    assert torch.allclose(plain(y), t)
    assert torch.allclose(plain(x), t)  # the original survives the copy's .get()


def test_refresh_rerandomizes_same_value(workers, cp):
    t = torch.randint(-1000, 1000, (50,))
    x = t.share(*workers, crypto_provider=cp)
    before = {p: x.child[p].clone().get() for p in x.parties}
    y = x.refresh()
    after = {p: y.child[p].clone().get() for p in y.parties}
    assert all(not torch.equal(before[p], after[p]) for p in x.parties)
    assert torch.equal(y.get(), t)
    assert torch.equal(x.get(), t)


def test_refresh_local_and_fixed_precision(dealer):
    t = torch.tensor([0.5, -3.25])
    x = t.fix_precision().share("a", "b", "c", crypto_provider=dealer)
    y = x.refresh()
    assert all(not torch.equal(x.child.child[p], y.child.child[p]) for p in ("a", "b", "c"))
    assert torch.allclose(y.get().float_precision(), t) and torch.allclose(x.get().float_precision(), t)


# ---- hostile calls of the changed truncation steps: clear errors, worker keeps serving


def test_truncation_steps_refuse_malformed_arguments(hook):
    from veil.exceptions import VeilError
    from veil.mpc.party import OpenMessage

    alice = sy.VirtualWorker(hook, id="alice")
    bob = sy.VirtualWorker(hook, id="bob")
    me = hook.local_worker
    x = torch.tensor([5, 6]).share(alice, bob, crypto_provider=sy.VirtualWorker(hook, id="crypto_provider"))
    share = x.child["alice"]
    for bad_shift in ("2", 1.5, [1]):
        with pytest.raises((VeilError, ValueError, TypeError)):
            me.send_msg(OpenMessage("trunc_mask", (share, share, bad_shift), {}), alice)
    with pytest.raises((VeilError, ValueError, TypeError)):
        me.send_msg(OpenMessage("trunc_finish", (share, share, share), {"divisor": 1, "first": True}), alice)
    # trunc_finish is not openable: its output (a share) never comes back in an opening
    with pytest.raises(VeilError, match="not an openable"):
        me.send_msg(OpenMessage("trunc_finish", (share, share, share), {"divisor": 4, "first": True}), alice)
    assert torch.equal(x.get(), torch.tensor([5, 6]))  # nothing changed, the workers still serve


# ---- a truncation of a transposed local share: trunc_finish flat-viewed a result with the share's strides


def test_truncating_a_transposed_local_share(hook):
    from veil.mpc.providers import LocalDealer
    from veil.tensors.fixed_precision import fix_precision

    dealer = LocalDealer(seed=4)
    a = torch.randn(3, 5)
    for parties in (("alice", "bob"), ("alice", "bob", "charlie")):
        x = fix_precision(a).share(*parties, crypto_provider=dealer)
        got = (x.t() * 0.5).get().float_precision()
        assert (got - a.t() * 0.5).abs().max().item() <= 2 * ULP
