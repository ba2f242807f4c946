"""SMPC over VirtualWorkers: every op decoded and compared with plain torch.

Error bounds (16 fractional bits, ulp = 2^-16 ~ 1.5e-5): encoding 0.5 ulp per
input; a shared product adds <= 1 ulp of truncation plus the inputs' encoding
errors times the other factor; comparisons, ReLU, max and max-pooling are
exact on the encoded values.
"""

import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.mpc.opening import count_openings

ULP = 2.0**-16


@pytest.fixture(params=[2, 3], ids=["2party", "3party"])
def parties(request, hook):
    names = ("alice", "bob", "charlie")[: request.param]
    return [sy.VirtualWorker(hook, id=n) for n in names]


@pytest.fixture
def cp(hook):
    return sy.VirtualWorker(hook, id="crypto_provider")


def shared(t, parties, cp):
    if t.dtype.is_floating_point:
        return t.fix_precision().share(*parties, crypto_provider=cp)
    return t.share(*parties, crypto_provider=cp)


def plain(x):
    out = x.get()
    return out.float_precision() if isinstance(out, sy.FixedPrecisionTensor) else out


def test_issue_example(parties, cp):
    x, y = shared(torch.tensor([25]), parties, cp), shared(torch.tensor([5]), parties, cp)
    assert torch.equal((x * y).get(), torch.tensor([125]))
    assert torch.equal((x > y).get(), torch.tensor([1]))
    assert torch.equal((x + 3).get(), torch.tensor([28]))


def test_shares_live_on_the_parties(parties, cp, hook):
    x = shared(torch.tensor([1, 2, 3]), parties, cp)
    assert [s.location for s in x.child.values()] == parties
    assert all(type(s) is sy.PointerTensor for s in x.child.values())
    assert len(hook.local_worker._objects) == 0


def test_integer_ops(parties, cp):
    a, b = torch.tensor([25, -3, 7, 0, 9]), torch.tensor([5, -3, 9, 1, -9])
    x, y = shared(a, parties, cp), shared(b, parties, cp)
    assert torch.equal((x * y).get(), a * b)
    assert torch.equal((x - y + 2).get(), a - b + 2)
    assert torch.equal((x * 3).get(), a * 3)
    for op in ("gt", "lt", "ge", "le", "eq", "ne"):
        got = getattr(x, f"__{op}__")(y).get()
        assert torch.equal(got, getattr(torch, op)(a, b).long()), op
    assert torch.equal(torch.relu(x).get(), torch.relu(a))


def test_fixed_precision_arithmetic(parties, cp):
    a, b = torch.randn(64, 32), torch.randn(32, 10)
    x, y = shared(a, parties, cp), shared(b, parties, cp)
    assert torch.allclose(plain(x @ y), a @ b, atol=32 * 4 * ULP * 8)
    c = torch.randn(64, 32)
    z = shared(c, parties, cp)
    assert torch.allclose(plain(x * z), a * c, atol=10 * ULP)
    assert torch.allclose(plain(x + z * 2 - 1.5), a + c * 2 - 1.5, atol=4 * ULP)


def test_conv_and_pooling(parties, cp):
    img, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3) * 0.3
    x, k = shared(img, parties, cp), shared(w, parties, cp)
    assert torch.allclose(plain(F.conv2d(x, k, padding=1)), F.conv2d(img, w, padding=1), atol=27 * 8 * ULP)
    assert torch.allclose(plain(F.max_pool2d(x, 2)), F.max_pool2d(img, 2), atol=ULP)
    assert torch.allclose(plain(F.avg_pool2d(x, 2)), F.avg_pool2d(img, 2), atol=2 * ULP)


def test_comparisons_relu_max(parties, cp):
    a, b = torch.randn(4, 6) * 10, torch.randn(4, 6) * 10
    b[0, :3] = a[0, :3]  # ties
    x, y = shared(a, parties, cp), shared(b, parties, cp)
    ea, eb = a.fix_precision().child, b.fix_precision().child  # compare the encoded values (exact)
    for op in ("gt", "lt", "ge", "le", "eq"):
        got = plain(getattr(x, f"__{op}__")(y))
        assert torch.equal(got, getattr(torch, op)(ea, eb).float()), op
    assert torch.allclose(plain(F.relu(x)), F.relu(a), atol=ULP)
    values, index = torch.max(x, dim=1)
    assert torch.allclose(plain(values), a.max(dim=1).values, atol=ULP)
    assert torch.equal(plain(index), ea.argmax(dim=1).float())  # fixed-precision indices
    assert torch.equal(plain(torch.argmax(x)), ea.argmax().float())
    assert torch.allclose(plain(torch.max(x)), a.max(), atol=ULP)


def test_rounds(cp, hook):
    alice, bob = sy.VirtualWorker(hook, id="alice"), sy.VirtualWorker(hook, id="bob")
    x = shared(torch.randn(100), [alice, bob], cp)
    y = shared(torch.randn(100), [alice, bob], cp)
    with count_openings() as mul_stats:
        (x * y).settle()  # its truncation paid now, not by the next reader
    with count_openings() as relu_stats:
        F.relu(x)
    # a fixed-point product: the Beaver round, then the exact truncation's round
    from veil.mpc.comparison import COMPARISON_ROUNDS, DEFAULT_COMPARISON

    assert mul_stats.rounds == 2 and relu_stats.rounds == COMPARISON_ROUNDS[DEFAULT_COMPARISON]
    # one opening message per party (the Beaver mask step returns e_i and f_i together)
    me = hook.local_worker
    (x * y).settle()  # warm the triple cache for this shape
    before = me.stats.messages
    (x * y).settle()
    # (triple and pair requests) + per party: Beaver open, combine, truncation open, finish
    assert me.stats.messages - before <= 2 + 4 * 2
