"""Approximations vs torch, plaintext and shared, on their documented ranges."""

import pytest
import torch

from veil.mpc import functions as fn
from veil.mpc.providers import LocalDealer
from veil.tensors.fixed_precision import fix_precision

# name: (range, torch reference, absolute tolerance, relative tolerance)
CASES = {
    "exp": ((-4, 4), torch.exp, 0.0, 0.035),
    "reciprocal": ((0.1, 100), torch.reciprocal, 4e-4, 0.002),
    "sigmoid": ((-5, 5), torch.sigmoid, 2e-3, 0.0),
    "tanh": ((-2.5, 2.5), torch.tanh, 4e-3, 0.0),
    "inv_sqrt": ((0.1, 100), torch.rsqrt, 0.0, 0.01),
    "sqrt": ((0.1, 100), torch.sqrt, 0.0, 0.01),
    "log": ((0.5, 50), torch.log, 5e-2, 0.0),
}


def run(x, name, parties):
    X = fix_precision(x)
    if parties:
        X = X.share(*parties, crypto_provider=LocalDealer(seed=11))
    y = fn.FUNCTIONS[name](X)
    return (y.get() if parties else y).float_precision().double()


@pytest.mark.parametrize("parties", [(), ("alice", "bob"), ("alice", "bob", "charlie")], ids=["plain", "2party", "3party"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_function_error_on_range(name, parties):
    (lo, hi), ref, abs_tol, rel_tol = CASES[name]
    x = torch.linspace(lo, hi, 400)
    if lo > 0:  # also probe small inputs densely
        x = torch.cat([x, torch.logspace(torch.tensor(lo).log10().item(), torch.tensor(hi).log10().item(), 100)])
    expected = ref(x.double())
    err = (run(x, name, parties) - expected).abs()
    assert (err <= abs_tol + rel_tol * expected.abs()).all(), f"worst error {err.max().item():.3g}"


@pytest.mark.parametrize("parties", [(), ("alice", "bob", "charlie")], ids=["plain", "3party"])
def test_softmax_and_div(parties):
    torch.manual_seed(3)
    x = torch.rand(6, 10) * 4 - 2
    dealer = LocalDealer(seed=2)

    def prep(t):
        f = fix_precision(t)
        return f.share(*parties, crypto_provider=dealer) if parties else f

    def value(f):
        return (f.get() if parties else f).float_precision()

    assert (value(fn.softmax(prep(x))) - torch.softmax(x, -1)).abs().max() <= 3e-3
    y = torch.rand(6, 10) * 9 + 1
    assert ((value(fn.div(prep(x), prep(y))) - x / y).abs() <= 2e-3 + 0.002 * (x / y).abs()).all()
