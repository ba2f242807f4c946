"""Building blocks of secure aggregation: key agreement, mask expansion, Shamir sharing.

* Key agreement: X25519 (``cryptography``), the shared secret stretched by
  HKDF-SHA256 bound to the round, so a pair's mask differs every round.
* Mask expansion: a 32-byte seed keys ChaCha20; its keystream read as int64
  is a uniform vector of Z/2^64 (the ring of :mod:`veil.mpc.ring`).
* Shamir secret sharing over GF(p), p = 2^521 - 1 (a Mersenne prime larger
  than any 32-byte secret): any ``threshold`` shares give the secret, fewer
  give nothing (Shamir 1979). Coefficients come from ``secrets``.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = (1 << 521) - 1
#: round tags are ints in [0, 2^64): what the wire carries as one integer (the derivations below encode them in
#: 16 bytes: a tag >= 2^127 overflowed there, after the round had started)
TAG_LIMIT = 1 << 64
SHARE_BYTES = 66  # ceil(521 / 8)
_RAW = serialization.Encoding.Raw


def check_round_tag(tag: object) -> None:
    """Refuses a round tag outside [0, :data:`TAG_LIMIT`), in one line."""
    if type(tag) is not int or not 0 <= tag < TAG_LIMIT:
        raise ValueError("a secure-aggregation round tag must be an int in [0, 2^64), got "
                         + (repr(tag)[:40] if type(tag) is int else f"a {type(tag).__name__}"))


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def public_of(private: bytes) -> bytes:
    """The public key of a raw 32-byte private key (checks a reconstructed key against the one advertised)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def pair_seed(private: bytes, peer_public: bytes, tag: int) -> bytes:
    """The seed both ends of a pair derive: HKDF(X25519(sk_u, pk_v)), bound to the round tag."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = b"veil-secagg-pair" + int(tag).to_bytes(16, "big", signed=True)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def expand(seed: bytes, n: int) -> torch.Tensor:
    """``n`` uniform elements of Z/2^64 (int64) from a 32-byte seed."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(8 * n))
    return torch.from_numpy(np.frombuffer(stream, dtype=np.int64).copy())


# -- Shamir over GF(PRIME) -------------------------------------------------------------------

def share(secret: bytes, n: int, threshold: int) -> list[int]:
    """Shares of ``secret`` for the points x = 1..n; any ``threshold`` of them reconstruct it."""
    if not 1 <= threshold <= n:
        raise ValueError(f"threshold must be in [1, {n}], got {threshold}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out.append(y)
    return out


def reconstruct(points: dict[int, int], nbytes: int = 32) -> bytes:
    """The secret from ``{x: share}`` (Lagrange interpolation at 0); needs ``threshold`` points."""
    total = 0
    for xi, yi in points.items():
        num, den = 1, 1
        for xj in points:
            if xj != xi:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, PRIME - 2, PRIME)) % PRIME
    return total.to_bytes(nbytes, "big")


def to_tensor(values: list[int]) -> torch.Tensor:
    """Field elements as one uint8-valued int64 tensor [len, SHARE_BYTES] (for the wire)."""
    rows = [list(v.to_bytes(SHARE_BYTES, "big")) for v in values]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(values), SHARE_BYTES)


def from_tensor(t: torch.Tensor) -> list[int]:
    if t.dtype != torch.int64 or t.dim() != 2 or t.shape[1] != SHARE_BYTES or bool(((t < 0) | (t > 255)).any()):
        raise ValueError("malformed Shamir shares")
    return [int.from_bytes(bytes(row), "big") for row in t.tolist()]


def bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.tensor(list(b), dtype=torch.int64)


def tensor_bytes(t: torch.Tensor, n: int = 32) -> bytes:
    if t.dtype != torch.int64 or t.shape != (n,) or bool(((t < 0) | (t > 255)).any()):
        raise ValueError(f"expected {n} bytes as an int64 tensor")
    return bytes(t.tolist())
