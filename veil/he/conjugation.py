"""The real part of a CKKS result: what a model owner releases when the key holder could have encrypted complex
values.

A CKKS slot is a complex number. TenSEAL encrypts and decrypts real parts only, but the key holder can encrypt
``x + i*y`` (SEAL's encoder takes complex vectors) and read the imaginary part of what comes back: a plaintext
product with real weights gives ``x @ W`` in the real parts and ``y @ W`` in the imaginary ones, twice the linear
queries per batch, and the imaginary parts carry the computation's noise that the (real) flooding leaves alone.
``c + conj(c)`` decrypts to twice the real part, exactly, whatever ``c`` holds: one key switch with the
conjugation Galois key (element ``2n - 1``), at no level. The key holder makes that key; a context without it
is refused by the encrypted evaluation (:mod:`veil.he.evaluation`).

TenSEAL generates all of a context's Galois keys or none (tens of MB to ~180 MB on the wire) and drops Galois
keys from a context that holds its secret key when it loads one; :func:`add_conjugation_key` keeps the one key
(~1.4 MB at ring 8192) beside the context, and :meth:`veil.he.ckks.CKKSContext.public` puts it in the public
context that leaves.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import tenseal as ts
import tenseal.sealapi as sealapi

from veil.he.seal_bytes import proto_fields

#: attribute of a CKKSContext holding a conjugation key made for it (sealapi.GaloisKeys, and its SEAL bytes)
_KEYS, _KEY_BYTES = "_veil_conjugation_keys", "_veil_conjugation_key_bytes"


def element(ctx: Any) -> int:
    """SEAL's Galois element of complex conjugation for ``ctx``'s ring (``2n - 1``)."""
    return 2 * ctx.raw.seal_context().data.key_context_data().parms().poly_modulus_degree() - 1


def keys(ctx: Any) -> Any | None:
    """The Galois keys that hold ``ctx``'s conjugation key (sealapi.GaloisKeys), or None. Metadata only."""
    made = ctx.__dict__.get(_KEYS)
    if made is not None:
        return made
    if ctx.raw.has_galois_keys():
        held = ctx.raw.galois_keys().data
        if held.has_key(element(ctx)):
            return held
    return None


def add_conjugation_key(ctx: Any) -> None:
    """Makes the conjugation key of a context that holds its secret key (a few ms) and keeps it with ``ctx``."""
    if keys(ctx) is not None:
        return
    data = ctx.raw.seal_context().data
    made = sealapi.GaloisKeys()
    sealapi.KeyGenerator(data, ctx.raw.secret_key().data).create_galois_keys([element(ctx)], made)
    with tempfile.TemporaryDirectory() as folder:  # (sealapi saves to a path only)
        path = os.path.join(folder, "conjugation")
        made.save(path)
        with open(path, "rb") as f:
            ctx.__dict__[_KEY_BYTES] = f.read()
    ctx.__dict__[_KEYS] = made


def public_bytes_with_key(ctx: Any) -> bytes | None:
    """``ctx``'s public TenSEAL bytes with the conjugation key made for it (None: none was made): TenSEAL's
    context message, its public members (field 2) given the Galois keys field (5)."""
    key = ctx.__dict__.get(_KEY_BYTES)
    if key is None or ctx.raw.has_galois_keys():
        return None
    data = ctx.raw.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                             save_relin_keys=True)
    out = b""
    for number, kind, value in proto_fields(data):
        if kind != 2:  # (TenSEAL's context message has only length-delimited fields)
            raise ValueError("unexpected TenSEAL context layout")
        value = bytes(value) + (_field(5, key) if number == 2 else b"")
        out += _field(number, value)
    return out


def real_part_doubled(vector: Any, galois_keys: Any) -> Any:
    """``vector + conj(vector)``: twice its slots' real parts, imaginary parts exactly zero (up to the key
    switch's noise, made of random digits of the vector's fresh ``c1`` times the key's own noise: no value of
    the vector's). TenSEAL has no conjugation and builds no vector from a SEAL ciphertext, so the conjugate
    goes back into the vector's own bytes (its ciphertext field, 2)."""
    context = vector.context()
    conjugate = sealapi.Ciphertext()
    sealapi.Evaluator(context.seal_context().data).complex_conjugate(vector.ciphertext()[0], galois_keys,
                                                                       conjugate)
    with tempfile.TemporaryDirectory() as folder:  # (sealapi saves to a path only)
        path = os.path.join(folder, "conjugate")
        conjugate.save(path)
        with open(path, "rb") as f:
            saved = f.read()
    out = b""
    for number, kind, value in proto_fields(vector.serialize()):
        if kind == 2:
            out += _field(number, saved if number == 2 else bytes(value))
        else:
            out += _varint(number << 3 | kind) + (_varint(value) if kind == 0 else bytes(value))
    return vector.add(ts.ckks_vector_from(context, out))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload

