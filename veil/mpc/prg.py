"""Seeded pseudo-random ring elements (for seeded, "PRG", shares).

A party that knows a 32-byte seed can derive a long uniform tensor from it
locally, so a dealer (or data owner) sends the seed instead of the tensor.
The expansion is AES-128 in counter mode (OpenSSL through ``cryptography``,
AES-NI where the CPU has it) under a key cut from SHA-256(seed | label), read as
little-endian int64: a cryptographic PRG, unlike torch's Mersenne Twister.
It runs at ~1.5 GB/s here, 3-4x SHAKE-256 (which veil used before), so
seeding costs little even in-process.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from typing import Sequence

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from veil.mpc.ring import DTYPE

SEED_BYTES = 32


def new_seed() -> bytes:
    """A fresh seed from the operating system's CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def expand(seed: bytes, label: str, shape: Sequence[int]) -> torch.Tensor:
    """Uniform int64 tensor of ``shape`` derived from ``(seed, label)``.

    Args:
        seed: Secret seed (``SEED_BYTES`` bytes).
        label: Distinguishes independent streams derived from one seed.
        shape: Output shape.

    Raises:
        ValueError: If the seed is malformed.
    """
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed must be {SEED_BYTES} bytes")
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=DTYPE)
    # one independent stream per label; AES-128 (10 rounds) is 1.4x faster than AES-256 at 128-bit security
    key = hashlib.sha256(bytes(seed) + b"|" + label.encode()).digest()[:16]
    raw = bytearray(8 * numel + 15)  # update_into wants block_size - 1 spare bytes
    Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update_into(bytes(8 * numel), raw)
    return torch.frombuffer(raw, dtype=torch.uint8)[: 8 * numel].view(DTYPE).reshape(shape)
