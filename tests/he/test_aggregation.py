"""Encrypted FedAvg: the decrypted aggregate equals the plaintext (weighted) mean."""

from __future__ import annotations

import msgpack
import pytest
import torch

from veil.he import aggregation as agg
from veil.he.errors import KeyMismatchError, ShapeMismatchError


def updates(n_clients=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)} for _ in range(n_clients)]


def plain_mean(ups, weights=None):
    weights = weights or [1.0] * len(ups)
    tot = sum(weights)
    return {k: sum(w * u[k] for w, u in zip(weights, ups)) / tot for k in ups[0]}


@pytest.mark.parametrize("weights", [None, [10, 30, 60]])
def test_ckks_fedavg(small_ckks_ctx, weights):
    ups = updates()
    pub = small_ckks_ctx.public()  # clients and aggregator hold only this
    enc = [agg.encrypt_update(u, protocol="ckks", context=pub) for u in ups]
    total = agg.aggregate_encrypted(enc, weights=weights)
    out = agg.decrypt_update(total, small_ckks_ctx)
    expected = plain_mean(ups, weights)
    for k in expected:
        assert out[k].shape == expected[k].shape
        assert torch.allclose(out[k], expected[k], atol=1e-4)


@pytest.mark.parametrize("weights", [None, [2, 5, 1]])
def test_paillier_fedavg(paillier_keys, weights):
    pub, priv = paillier_keys
    ups = updates()
    enc = [agg.encrypt_update(u, protocol="paillier", public_key=pub) for u in ups]
    out = agg.decrypt_update(agg.aggregate_encrypted(enc, weights=weights), priv)
    expected = plain_mean(ups, weights)
    for k in expected:
        assert torch.allclose(out[k], expected[k], atol=1e-6)


def test_sum_without_average(paillier_keys):
    pub, priv = paillier_keys
    ups = [{"c": torch.tensor([1.0, 2.0])}, {"c": torch.tensor([3.0, 4.0])}]
    enc = [agg.encrypt_update(u, protocol="paillier", public_key=pub) for u in ups]
    out = agg.decrypt_update(agg.aggregate_encrypted(enc), priv, average=False)
    assert torch.equal(out["c"], torch.tensor([4.0, 6.0]))


def test_update_wire_roundtrip(paillier_keys):
    pub, priv = paillier_keys
    u = agg.encrypt_update(updates(1)[0], protocol="paillier", public_key=pub)
    d = msgpack.unpackb(msgpack.packb(agg.update_to_wire(u), use_bin_type=True), raw=False)
    back = agg.update_from_wire(d)
    out = agg.decrypt_update(back, priv)
    assert torch.allclose(out["w"], updates(1)[0]["w"], atol=1e-6)


def test_mismatches(paillier_keys, other_paillier_keys):
    a = agg.encrypt_update({"x": torch.ones(2)}, protocol="paillier", public_key=paillier_keys[0])
    b = agg.encrypt_update({"x": torch.ones(2)}, protocol="paillier", public_key=other_paillier_keys[0])
    c = agg.encrypt_update({"x": torch.ones(3)}, protocol="paillier", public_key=paillier_keys[0])
    with pytest.raises(KeyMismatchError):
        agg.aggregate_encrypted([a, b])
    with pytest.raises(ShapeMismatchError):
        agg.aggregate_encrypted([a, c])
    with pytest.raises(ValueError):
        agg.aggregate_encrypted([a], weights=[1, 2])
