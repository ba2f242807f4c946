"""Homomorphic encryption for veil: Paillier (python-paillier) and CKKS (TenSEAL).

Quick tour::

    pub, priv = veil.he.paillier.keygen(n_length=2048)
    enc = veil.he.encrypt(x, protocol="paillier", public_key=pub)
    (enc + enc).decrypt(priv)

    ctx = veil.he.ckks.context()
    enc = veil.he.encrypt(x, protocol="ckks", context=ctx)
    enc.mm(w).decrypt()
"""

from veil.he import aggregation, ckks, errors, evaluation, paillier, wire
from veil.he.api import encrypt
from veil.he.backends import BACKENDS, Backend
from veil.he.ckks import CKKSContext, CKKSTensor
from veil.he.paillier import PaillierTensor
from veil.he import remote  # noqa: E402  registers ciphertexts with the wire format and workers
from veil.he.remote import HEPointer

__all__ = [
    "BACKENDS",
    "Backend",
    "CKKSContext",
    "CKKSTensor",
    "PaillierTensor",
    "aggregation",
    "ckks",
    "encrypt",
    "errors",
    "evaluation",
    "paillier",
    "wire",
]
