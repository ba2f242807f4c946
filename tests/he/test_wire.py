"""Wire round trips through msgpack, and rejection of malformed input."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.he import BACKENDS, ckks, paillier, wire
from veil.he.errors import KeyMismatchError, MissingSecretKeyError, WireFormatError


def through_msgpack(d: dict) -> dict:
    # strict_types: fails if anything is not a msgpack-native value.
    return msgpack.unpackb(msgpack.packb(d, use_bin_type=True, strict_types=True), raw=False)


def test_registry_is_explicit():
    assert set(BACKENDS) == {"paillier", "ckks"}
    assert BACKENDS["paillier"].tensor_type is paillier.PaillierTensor


def test_paillier_tensor_roundtrip(paillier_keys):
    pub, priv = paillier_keys
    x = torch.tensor([[1.5, -2.0], [0.25, 8.0]])
    d = through_msgpack(wire.encode(paillier.encrypt(x, pub)))
    back = wire.decode(d)
    assert back.shape == x.shape and torch.equal(back.decrypt(priv), x)
    # The receiver has no private key, yet can compute.
    assert torch.equal((back * 2 + back).decrypt(priv), 3 * x)


def test_paillier_public_key_roundtrip_and_private_key_refused(paillier_keys):
    pub, priv = paillier_keys
    assert wire.decode(through_msgpack(wire.encode(pub))) == pub
    with pytest.raises(TypeError):
        wire.encode(priv)


def test_paillier_key_check_on_decode(paillier_keys, other_paillier_keys):
    d = wire.encode(paillier.encrypt(torch.tensor([1]), paillier_keys[0]))
    with pytest.raises(KeyMismatchError):
        wire.decode(d, public_key=other_paillier_keys[0])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("ct"),
        lambda d: d.update(ct=d["ct"][:-1]),
        lambda d: d.update(ct=b"\x00" * len(d["ct"])),
        lambda d: d.update(shape=[-1]),
        lambda d: d.update(shape="2"),
        lambda d: d.update(dtype="object"),
        lambda d: d.update(exponent=10**9),
        lambda d: d.update(exponent=True),
        lambda d: d.update(n=b"\x02"),
        lambda d: d.update(v=99),
        lambda d: d.update(kind="nonsense"),
        lambda d: d.update(he="rsa"),
    ],
)
def test_paillier_malformed_rejected(paillier_keys, mutate):
    d = wire.encode(paillier.encrypt(torch.tensor([1, 2]), paillier_keys[0]))
    mutate(d)
    with pytest.raises(ValueError):
        wire.decode(d)


def test_ckks_context_and_tensor_roundtrip(small_ckks_ctx):
    x = torch.randn(3, 4)
    ctx_wire = through_msgpack(wire.encode(small_ckks_ctx))
    t_wire = through_msgpack(wire.encode(ckks.encrypt(x, small_ckks_ctx)))
    worker_ctx = wire.decode(ctx_wire)
    assert not worker_ctx.has_secret_key  # the secret key never travels
    t = wire.decode(t_wire)  # found through the received context's key id
    y = t * 2
    with pytest.raises(MissingSecretKeyError):
        y.decrypt()
    back = wire.decode(through_msgpack(wire.encode(y)), context=small_ckks_ctx)
    assert torch.allclose(back.decrypt(), 2 * x, atol=1e-4)
    del worker_ctx, t, y


def test_ckks_unknown_context_and_garbage(small_ckks_ctx, ckks_ctx):
    d = wire.encode(ckks.encrypt(torch.randn(2), small_ckks_ctx))
    with pytest.raises(KeyMismatchError):
        wire.decode(d, context=ckks_ctx)
    unknown = dict(d, key_id=b"\x00" * 32)
    with pytest.raises(WireFormatError):
        wire.decode(unknown)
    bad = dict(d, segments=[b"garbage"])
    with pytest.raises(WireFormatError):
        wire.decode(bad, context=small_ckks_ctx)
    with pytest.raises(WireFormatError):
        wire.decode({"he": "ckks", "kind": "context", "v": 1, "data": b"not a context"})
    with pytest.raises(WireFormatError):
        wire.decode([1, 2])


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.integers(min_value=-(2**40), max_value=2**40), min_size=0, max_size=5),
    st.sampled_from([torch.int64, torch.int32, torch.float64]),
)
def test_property_paillier_wire_roundtrip(paillier_keys, values, dtype):
    pub, priv = paillier_keys
    x = torch.tensor(values, dtype=torch.int64).to(dtype)
    back = wire.decode(through_msgpack(wire.encode(paillier.encrypt(x, pub))))
    assert back.shape == x.shape
    assert torch.equal(back.decrypt(priv), x)
