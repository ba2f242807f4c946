"""CKKS tensors against plain torch (absolute tolerance below)."""

from __future__ import annotations

import pytest
import torch

import veil.he as he
from veil.he import ckks
from veil.he.errors import (
    DepthExhaustedError,
    KeyMismatchError,
    MissingSecretKeyError,
    ShapeMismatchError,
    WrongKeyError,
)

TOL = 1e-4  # scale 2**40: errors are ~1e-6 for values of order 1


def close(a, b, tol=TOL):
    return a.shape == b.shape and torch.allclose(a.to(torch.float64), b.to(torch.float64), atol=tol, rtol=0)


def test_roundtrip_preserves_shape_and_dtype(small_ckks_ctx):
    for x in (torch.randn(5), torch.randn(2, 3, 4, dtype=torch.float64), torch.tensor(1.5)):
        out = he.encrypt(x, protocol="ckks", context=small_ckks_ctx).decrypt()
        assert out.dtype == x.dtype and close(out, x)


def test_long_vector_spans_segments(small_ckks_ctx):
    x = torch.randn(10_000)
    enc = ckks.encrypt(x, small_ckks_ctx)
    assert len(enc.segments) == 3
    assert close((enc + enc).decrypt(), 2 * x)


def test_elementwise_ops(small_ckks_ctx):
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    ea, eb = ckks.encrypt(a, small_ckks_ctx), ckks.encrypt(b, small_ckks_ctx)
    assert close((ea + eb).decrypt(), a + b)
    assert close((ea - eb).decrypt(), a - b)
    assert close((ea * eb).decrypt(), a * b)
    assert close((ea * b).decrypt(), a * b)
    assert close((ea * 2.5).decrypt(), a * 2.5)
    assert close((3 * ea + 1).decrypt(), 3 * a + 1)
    assert close((1 - ea).decrypt(), 1 - a)
    assert close((ea * torch.tensor([1.0, 2, 3, 4])).decrypt(), a * torch.tensor([1.0, 2, 3, 4]))
    assert close(ea.square().decrypt(), a * a)
    assert close(ea.reshape(4, 3).decrypt(), a.reshape(4, 3))


def test_dot_mm_sum(ckks_ctx):
    x, w = torch.randn(4, 6), torch.randn(6, 3)
    ex = ckks.encrypt(x, ckks_ctx)
    assert close(ex.mm(w).decrypt(), x @ w)
    assert close((ex @ w).decrypt(), x @ w)
    assert close(ex.dot(w[:, 0]).decrypt(), x @ w[:, 0])
    v = ckks.encrypt(x[0], ckks_ctx)
    assert close(v.dot(w[:, 1]).decrypt(), x[0] @ w[:, 1])
    assert close(v.mm(w).decrypt(), x[0] @ w)
    assert close(ex.sum().decrypt(), x.sum())


def test_public_context_computes_but_cannot_decrypt(ckks_ctx):
    pub = ckks_ctx.public()
    assert not pub.has_secret_key and pub.key_id == ckks_ctx.key_id
    x = torch.randn(8)
    enc = ckks.encrypt(x, pub)  # a client can encrypt with the public context
    doubled = enc * 2 + enc
    with pytest.raises(MissingSecretKeyError):
        doubled.decrypt()
    assert close(doubled.decrypt(ckks_ctx), 3 * x)


def test_mixing_contexts_and_wrong_key(ckks_ctx, small_ckks_ctx):
    a = ckks.encrypt(torch.randn(4), ckks_ctx)
    b = ckks.encrypt(torch.randn(4), small_ckks_ctx)
    with pytest.raises(KeyMismatchError):
        a + b
    with pytest.raises(WrongKeyError):
        a.decrypt(small_ckks_ctx)


def test_shape_mismatch(small_ckks_ctx):
    a = ckks.encrypt(torch.randn(4), small_ckks_ctx)
    with pytest.raises(ShapeMismatchError):
        a + ckks.encrypt(torch.randn(5), small_ckks_ctx)
    with pytest.raises(ShapeMismatchError):
        a * torch.randn(3)


def test_depth_exhausted_is_explained(small_ckks_ctx):
    e = ckks.encrypt(torch.randn(4), small_ckks_ctx)
    with pytest.raises(DepthExhaustedError, match="depth"):
        e * e * e * e


def test_nan_refused(small_ckks_ctx):
    with pytest.raises(ValueError):
        ckks.encrypt(torch.tensor([float("nan")]), small_ckks_ctx)
