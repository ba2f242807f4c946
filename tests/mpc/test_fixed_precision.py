"""FixedPrecisionTensor ops, plaintext and shared (2 and 3 parties), vs torch.

Tolerances: each product adds at most ``mul_error_bound`` (inputs below ~4
in magnitude here, so a few ulps); sums of k products multiply that by k.
"""

import pytest
import torch
import torch.nn.functional as F

from veil.mpc.errors import EncodingOverflowError, NotEncodedError, PrecisionMismatchError, UnsupportedOperationError
from veil.mpc.providers import LocalDealer
from veil.tensors.fixed_precision import FixedPrecisionTensor, fix_precision, float_precision

ULP = 2.0**-16
MODES = ["plain", "2party", "3party"]
PARTIES = {"2party": ("alice", "bob"), "3party": ("alice", "bob", "charlie")}


class Chain:
    """Builds fixed-precision tensors in one mode and decodes results."""

    def __init__(self, mode, **enc):
        self.mode, self.enc = mode, enc
        self.dealer = LocalDealer(seed=7)

    def __call__(self, t, requires_grad=False):
        f = fix_precision(t, requires_grad=requires_grad, **self.enc)
        if self.mode != "plain":
            f = f.share(*PARTIES[self.mode], crypto_provider=self.dealer)
        return f

    @staticmethod
    def value(f):
        assert isinstance(f, FixedPrecisionTensor)
        return f.get().float_precision() if f.is_shared else f.float_precision()


@pytest.fixture(params=MODES)
def chain(request):
    torch.manual_seed(0)
    return Chain(request.param)


def close(got, expected, ulps):
    assert got.shape == expected.shape
    err = (got.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= ulps * ULP, f"error {err / ULP:.1f} ulps > {ulps}"


def test_linear_ops(chain):
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    a, b = chain(x), chain(y)
    v = chain.value
    close(v(a + b), x + y, 1)
    close(v(a - b), x - y, 1)
    close(v(-a), -x, 0.5)
    close(v(a + 1.5), x + 1.5, 1)
    close(v(2 - a), 2 - x, 1)
    close(v(a - y), x - y, 1)
    close(v(a.sum()), x.sum(), 12)
    close(v(a.sum(0)), x.sum(0), 2)
    close(v(a.mean()), x.mean(), 2)
    close(v(a.mean(1)), x.mean(1), 2)


def test_products_and_division(chain):
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    a, b = chain(x), chain(y)
    v = chain.value
    close(v(a * b), x * y, 4)
    close(v(a * 3), x * 3, 2)
    close(v(a * 0.25), x * 0.25, 2)
    close(v(a * y), x * y, 4)
    close(v(a / 4), x / 4, 1)
    close(v(a / -3), x / -3, 1)
    close(v(a / 0.5), x / 0.5, 3)
    close(v(a**2), x**2, 4)
    close(v(a**3), x**3, 30)


def test_matmul_linear_conv(chain):
    x, w, bias = torch.randn(5, 4), torch.randn(3, 4), torch.randn(3)
    v = chain.value
    close(v(chain(x) @ chain(w).t()), x @ w.t(), 8)
    close(v(chain(x) @ w.t()), x @ w.t(), 8)
    close(v(F.linear(chain(x), chain(w), chain(bias))), F.linear(x, w, bias), 8)
    close(v(torch.bmm(chain(x[None]), chain(w.t()[None]))), (x @ w.t())[None], 8)
    close(v(chain(x[0]) @ chain(w[0])), x[0] @ w[0], 8)
    img, ker, kb = torch.randn(2, 2, 6, 6), torch.randn(3, 2, 3, 3), torch.randn(3)
    close(v(F.conv2d(chain(img), chain(ker), chain(kb), padding=1)), F.conv2d(img, ker, kb, padding=1), 40)
    close(v(F.conv2d(chain(img), chain(ker), stride=2)), F.conv2d(img, ker, stride=2), 40)
    close(v(F.avg_pool2d(chain(img), 2)), F.avg_pool2d(img, 2), 2)
    close(v(F.avg_pool2d(chain(img), 3, stride=1, padding=1)), F.avg_pool2d(img, 3, stride=1, padding=1), 2)


def test_structural(chain):
    x = torch.randn(2, 3, 4)
    a = chain(x)
    v = chain.value
    for got, expected in [
        (a.view(6, 4), x.view(6, 4)),
        (a.reshape(4, 6), x.reshape(4, 6)),
        (a.transpose(1, 2), x.transpose(1, 2)),
        (a.permute(2, 0, 1), x.permute(2, 0, 1)),
        (a.flatten(), x.flatten()),
        (a[1, 1:, ::2], x[1, 1:, ::2]),
        (torch.cat([a, a], 2), torch.cat([x, x], 2)),
        (torch.stack([a, a]), torch.stack([x, x])),
        (a.unsqueeze(1).squeeze(1), x),
    ]:
        close(v(got), expected, 0.5)


def test_constants_and_inplace(chain):
    x = torch.randn(4)
    a = chain(x)
    close(chain.value(torch.ones_like(a)), torch.ones(4), 0)
    close(chain.value(torch.full_like(a, 2.5)), torch.full((4,), 2.5), 0)
    a.add_(1.0)
    a.mul_(2)
    close(chain.value(a), (x + 1) * 2, 2)


def test_autograd_linear_model(chain):
    torch.manual_seed(1)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    w = torch.randn(2, 4, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    ((F.linear(x, w, b) - y) ** 2).mean().backward()
    W, B = chain(w.detach(), requires_grad=True), chain(b.detach(), requires_grad=True)
    loss = ((F.linear(chain(x), W, B) - chain(y)) ** 2).mean()
    loss.backward()
    assert isinstance(W.grad, FixedPrecisionTensor)
    close(chain.value(W.grad), w.grad, 20)
    close(chain.value(B.grad), b.grad, 20)
    # one SGD step in fixed precision
    with torch.no_grad():
        W -= 0.1 * W.grad
    close(chain.value(W), w.detach() - 0.1 * w.grad, 20)


@pytest.mark.parametrize("mode", MODES)
def test_base10_pysyft_encoding(mode):
    chain = Chain(mode, base=10)
    x, y = torch.tensor([1.5, -16.9999, 3.25]), torch.tensor([2.0, 1.5, -0.5])
    got = chain.value(chain(x) * chain(y))
    assert (got - x * y).abs().max() <= 0.05


def test_plain_errors():
    a = fix_precision(torch.tensor([1.0, 2.0]))
    with pytest.raises(EncodingOverflowError):
        fix_precision(torch.tensor([1e15]))
    with pytest.raises(EncodingOverflowError, match="overflows"):
        fix_precision(torch.tensor([3e5])) * fix_precision(torch.tensor([3e5]))
    with pytest.raises(PrecisionMismatchError):
        a + fix_precision(torch.tensor([1.0, 2.0]), precision_fractional=8)
    with pytest.raises(NotEncodedError):
        torch.cat([a, torch.ones(2)])
    with pytest.raises(UnsupportedOperationError):
        a / a
    with pytest.raises(TypeError, match="get"):
        float_precision(a.share("a", "b", crypto_provider=LocalDealer()))
    assert torch.equal(a > 1.5, torch.tensor([False, True]))
    assert "value=" in repr(a) and "tensor(" not in repr(a.share("a", "b", crypto_provider=LocalDealer()))
