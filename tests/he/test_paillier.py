"""Paillier tensors against plain torch (exact for integers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import veil.he as he
from veil.he import paillier
from veil.he.errors import (
    EncodingOverflowError,
    KeyMismatchError,
    UnsupportedOperationError,
    WrongKeyError,
)

FLOAT_TOL = 1e-6


@pytest.fixture(scope="module")
def keys(paillier_keys):
    return paillier_keys


def test_int_roundtrip_exact_any_shape(keys):
    pub, priv = keys
    for x in (torch.tensor(7), torch.arange(-6, 6).reshape(3, 2, 2), torch.tensor([2**40, -(2**50)])):
        enc = he.encrypt(x, protocol="paillier", public_key=pub)
        out = enc.decrypt(private_key=priv)
        assert out.dtype == x.dtype and out.shape == x.shape
        assert torch.equal(out, x)


def test_int32_dtype_preserved(keys):
    pub, priv = keys
    x = torch.tensor([[1, -2], [3, 4]], dtype=torch.int32)
    assert torch.equal(paillier.encrypt(x, pub).decrypt(priv), x)


def test_float_roundtrip_within_precision(keys):
    pub, priv = keys
    x = torch.randn(4, 5, dtype=torch.float64) * 100
    out = paillier.encrypt(x, pub).decrypt(priv)
    assert out.dtype == torch.float64
    assert torch.allclose(out, x, atol=2**-32, rtol=0)


def test_arithmetic_matches_torch_ints(keys):
    pub, priv = keys
    a, b = torch.tensor([[1, -2, 3], [4, 5, -6]]), torch.tensor([[7, 8, -9], [0, 1, 2]])
    ea, eb = paillier.encrypt(a, pub), paillier.encrypt(b, pub)
    cases = {
        "add": ((ea + eb), a + b),
        "sub": ((ea - eb), a - b),
        "neg": (-ea, -a),
        "scalar_mul": (ea * 3, a * 3),
        "rmul_neg": (-4 * ea, -4 * a),
        "plain_mul": (ea * b, a * b),
        "plain_add": (ea + b, a + b),
        "rsub": (10 - ea, 10 - a),
        "broadcast": (ea * torch.tensor([1, -1, 2]), a * torch.tensor([1, -1, 2])),
        "sum": (ea.sum(), a.sum()),
        "sum0": (ea.sum(0), a.sum(0)),
        "sum1k": (ea.sum(1, keepdim=True), a.sum(1, keepdim=True)),
        "index": (ea[1], a[1]),
        "slice": (ea[:, 1:], a[:, 1:]),
        "reshape": (ea.reshape(3, 2), a.reshape(3, 2)),
        "t": (ea.t(), a.t()),
        "matmul": (ea @ torch.tensor([[1, 2], [3, 4], [5, 6]]), a @ torch.tensor([[1, 2], [3, 4], [5, 6]])),
    }
    for name, (enc, expected) in cases.items():
        got = enc.decrypt(priv)
        assert torch.equal(got, expected), name
        assert enc.shape == expected.shape, name


def test_float_arithmetic(keys):
    pub, priv = keys
    a = torch.tensor([0.5, -1.25, 3.1])
    w = torch.tensor([0.3, 2.0, -0.7])
    ea = paillier.encrypt(a, pub)
    assert torch.allclose((ea * w).decrypt(priv), a * w, atol=FLOAT_TOL)
    assert torch.allclose((ea + w).decrypt(priv), a + w, atol=FLOAT_TOL)
    assert torch.allclose((ea / 4).decrypt(priv), a / 4, atol=FLOAT_TOL)
    assert torch.allclose((ea * 0.1 + ea).decrypt(priv), a * 0.1 + a, atol=FLOAT_TOL)


def test_int_plus_float_promotes(keys):
    pub, priv = keys
    e = paillier.encrypt(torch.tensor([1, 2]), pub)
    out = (e + 0.5).decrypt(priv)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([1.5, 2.5]))
    assert (e / 2).decrypt(priv).dtype == torch.float32


def test_positional_and_keyword_decrypt(keys):
    pub, priv = keys
    e = paillier.encrypt(torch.tensor([3]), pub)
    assert torch.equal(e.decrypt(priv), e.decrypt(private_key=priv))


def test_obfuscate_changes_ciphertexts_not_values(keys):
    pub, priv = keys
    e = paillier.encrypt(torch.tensor([3, 4]), pub)
    o = e.obfuscate()
    assert o.ciphertexts() != e.ciphertexts()
    assert torch.equal(o.decrypt(priv), torch.tensor([3, 4]))


def test_interop_with_phe(keys):
    import phe

    pub, priv = keys
    e = paillier.encrypt(torch.tensor([5, -3]), pub)
    nums = [phe.EncryptedNumber(pub, c, e.exponent) for c in e.ciphertexts()]
    assert [priv.decrypt(n) for n in nums] == [5, -3]


def test_ciphertext_times_ciphertext_is_refused(keys):
    pub, _ = keys
    e = paillier.encrypt(torch.tensor([1]), pub)
    with pytest.raises(UnsupportedOperationError, match="ciphertext"):
        e * e


def test_wrong_key_and_mixed_keys(keys, other_paillier_keys):
    pub, _ = keys
    pub2, priv2 = other_paillier_keys
    e, e2 = paillier.encrypt(torch.tensor([1]), pub), paillier.encrypt(torch.tensor([1]), pub2)
    with pytest.raises(WrongKeyError):
        e.decrypt(priv2)
    with pytest.raises(KeyMismatchError):
        e + e2
    with pytest.raises(TypeError):
        e.decrypt()


def test_overflow_is_reported(keys):
    pub, _ = keys
    with pytest.raises(EncodingOverflowError):
        paillier.encrypt(torch.tensor([2.0**600], dtype=torch.float64), pub)
    with pytest.raises(ValueError):
        paillier.encrypt(torch.tensor([float("nan")]), pub)


def test_unknown_protocol():
    with pytest.raises(ValueError, match="unknown HE protocol"):
        he.encrypt(torch.tensor([1.0]), protocol="rsa")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=-(2**62), max_value=2**62), min_size=1, max_size=6))
def test_property_int_encode_decode(keys, values):
    pub, priv = keys
    x = torch.tensor(values, dtype=torch.int64)
    assert torch.equal(paillier.encrypt(x, pub).decrypt(priv), x)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=6))
def test_property_float_encode_decode(keys, values):
    pub, priv = keys
    x = torch.tensor(values, dtype=torch.float64)
    out = paillier.encrypt(x, pub).decrypt(priv)
    assert np.allclose(out.numpy(), x.numpy(), atol=2**-32, rtol=0)


@pytest.mark.slow
def test_2048_bit_smoke():
    pub, priv = paillier.keygen(n_length=2048)
    x = torch.tensor([1.5, -2.0, 3.25])
    e = he.encrypt(x, protocol="paillier", public_key=pub)
    assert torch.allclose(((e + e) * 2).decrypt(priv), x * 4)
