"""The length-doubling PRG of the FSS tree: fixed-key AES, batched.

``G(s)`` for a 128-bit seed ``s`` (two int64 words whose lowest bit is 0)
gives, per side ``σ`` in {0 = left, 1 = right}, a child seed, a control bit
and ``k`` value words. Each output block is Matyas–Meyer–Oseas with a public
fixed key per block kind: ``AES_{key_j}(u) xor u`` with ``u = s | σ`` (the
side is the seed's free low bit, so the two sides never share an input).
The child's control bit is its lowest bit, which is then cleared. In the
ideal-cipher model these outputs are independent and uniform for a uniform
seed (Guo et al., "Efficient and Secure Multiparty Computation from
Fixed-Key Block Ciphers", S&P 2020).

Keeping the side in the input, not in the key, lets an evaluator expand only
the side it walks: one ECB call per block kind over the whole batch, with a
different side per entry. Encryption runs in OpenSSL (AES-NI) through the
``cryptography`` package, on int64 tensors viewed as bytes.
"""

from __future__ import annotations

import hashlib
import threading
from functools import lru_cache

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: block kinds: 0 = child seed, 1.. = value words (2 per block), then the leaf
#: conversion uses kinds starting at LEAF
SEED_KIND = 0
VALUE_KIND = 1
LEAF_KIND = 64


@lru_cache(maxsize=None)
def _key(kind: int) -> bytes:
    # Public, fixed, distinct keys ("nothing up my sleeve": a hash of the label).
    return hashlib.sha256(b"veil.mpc.fss.prg/" + str(kind).encode()).digest()[:16]


_LOCAL = threading.local()


def _encryptor(kind: int):
    # ECB keeps no state between blocks, so one context per key serves every
    # call (creating one costs about as much as encrypting 10 kB); per thread,
    # since a context is not safe to share.
    cache = _LOCAL.__dict__.setdefault("encryptors", {})
    enc = cache.get(kind)
    if enc is None:
        enc = cache[kind] = Cipher(algorithms.AES(_key(kind)), modes.ECB()).encryptor()
    return enc


def mmo(kind: int, u: torch.Tensor) -> torch.Tensor:
    """``AES_{key_kind}(u) xor u`` for each 128-bit row of ``u`` ((..., 2) int64)."""
    u = u.contiguous()
    nbytes = u.numel() * 8
    out = torch.empty(nbytes + 16, dtype=torch.uint8)  # OpenSSL wants one spare block
    if nbytes:
        _encryptor(kind).update_into(memoryview(u.view(torch.uint8).reshape(-1).numpy()), memoryview(out.numpy()))
    result = out[:nbytes].view(torch.int64).view(u.shape)
    result ^= u
    return result


def value_words(kind0: int, u: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` pseudo-random int64 words per row of ``u`` ((..., 2)) -> (..., k)."""
    blocks = [mmo(kind0 + j, u) for j in range((k + 1) // 2)]
    words = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
    return words if k == words.shape[-1] else words[..., :k]


def expand(u: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One side of ``G`` per seed, from ``u = seed | side`` ((..., 2) int64).

    Returns:
        ``(child seeds (..., 2) with lowest bit 0, control bits (...) 0/1
        int64, values (..., k) int64)``.
    """
    child = mmo(SEED_KIND, u)
    t = child[..., 0] & 1
    child[..., 0] ^= t
    return child, t, value_words(VALUE_KIND, u, k)


def convert(seeds: torch.Tensor, k: int) -> torch.Tensor:
    """Leaf conversion: ``k`` uniform ring elements per seed ((..., 2) -> (..., k))."""
    return value_words(LEAF_KIND, seeds, k)
