"""Ciphertexts held and computed on by a worker that cannot decrypt them."""

import pytest
import torch

import veil as sy
from veil.exceptions import RemoteExecutionError
from veil.he.remote import HEPointer


@pytest.fixture(scope="module")
def paillier_keys():
    return sy.he.paillier.keygen(n_length=512)


def test_paillier_through_a_pointer(hook, paillier_keys):
    pub, priv = paillier_keys
    alice = sy.VirtualWorker(hook, id="he_alice")
    x = torch.tensor([1.5, -2.0, 3.25])
    p = x.encrypt(protocol="paillier", public_key=pub).send(alice)
    assert isinstance(p, HEPointer) and p.shape == (3,)
    stored = alice._objects[p.id_at_location]
    assert type(stored).__name__ == "PaillierTensor"  # the worker holds a ciphertext, not x
    out = ((p + p) * 3 - torch.tensor([1.0, 1.0, 1.0])).sum()
    assert torch.allclose(out.get().decrypt(priv), ((x + x) * 3 - 1).sum(), atol=1e-5)
    with pytest.raises(RemoteExecutionError, match="cannot multiply two ciphertexts"):
        p * p
    assert torch.allclose((p + 1).get().decrypt(priv), x + 1, atol=1e-5)  # still serving


def test_ckks_worker_gets_public_context_only_over_the_wire(hook):
    from veil.messaging.serde import decode_value, encode_value

    ctx = sy.he.ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60], global_scale=2**40)
    assert not decode_value(encode_value(ctx)).has_secret_key  # what a network worker would load
    alice = sy.VirtualWorker(hook, id="he_alice2")
    x = torch.tensor([1.0, -2.0, 3.0, 0.5])
    p = x.encrypt(protocol="ckks", context=ctx).send(alice)
    got = (p * p + p).get().decrypt()
    assert torch.allclose(got, x * x + x, atol=1e-3)
    w = torch.tensor([0.5, 1.0, -1.0, 2.0])
    assert torch.allclose(p.dot(w).get().decrypt(), (x * w).sum(), atol=1e-3)


def test_paillier_neg_and_sum_take_any_exponent(hook, paillier_keys):
    """neg and sum bridge no exponents: a tensor whose exponent drifted far below 0 (products with
    fractional plaintexts) still negates and sums remotely; adding a plaintext to it is refused."""
    pub, priv = paillier_keys
    alice = sy.VirtualWorker(hook, id="he_alice_exp")
    x = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float64)
    c = x.encrypt(protocol="paillier", public_key=pub)
    for _ in range(8):
        c = c * torch.tensor([0.7, 0.7, 0.7], dtype=torch.float64)
    assert c.exponent < -70, c.exponent  # more than MAX_EXPONENT_SHIFT digits from 0
    p = c.send(alice)
    want = x * 0.7 ** 8
    assert torch.allclose((-p).get().decrypt(priv), -want, atol=1e-9)
    assert torch.allclose(p.sum().get().decrypt(priv), want.sum(), atol=1e-9)
    with pytest.raises(RemoteExecutionError, match="digits apart"):
        p + 1.0
