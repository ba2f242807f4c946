"""Paillier products and additions with a plaintext whose work does not depend on its values.

A product ``c**k mod n**2`` by ``gmpy2.powmod`` costs time linear in ``k``'s bit length (nothing at all for
``k = 0``) and an inversion for ``k < 0``: when ``k`` encodes the owner's data, the command's duration gave
the magnitudes and signs of its values to the requester. Here every power has one exponent width, fixed by
the plaintext's dtype and exponent, and runs in ``gmpy2.powmod_sec`` (time set by the operands' sizes):

    c**k = b**(|k| + 2**B) * b**(-2**B),  b = c or c**-1 by k's sign, |k| < 2**B

Both ``c**-1`` and ``c**(+-2**B)`` come from ``c`` alone (the requester's ciphertext), once per ciphertext.
"""

from __future__ import annotations

from typing import Iterable

import gmpy2
import torch

from veil.he import _paillier_encoding as enc
from veil.he.value_free import largest


def exponent_bits(dtype: torch.dtype, exponent: int) -> int:
    """A width ``B`` with ``|k| < 2**B`` for every value of ``dtype`` encoded at base-16 ``exponent``."""
    return (largest(dtype) << (enc.LOG2_BASE * max(0, -exponent))).bit_length() + 1


def powers(pairs: Iterable[tuple], bits: int, nsq, cache: dict) -> list:
    """``[c**k mod nsq for c, k in pairs]``, each as one ``bits + 1``-bit power and one multiplication.

    ``cache`` keeps each ciphertext's inverse and corrections (keyed by the object: a broadcast or ``mm``
    uses one ciphertext many times); the caller keeps the ciphertexts alive while it does."""
    top = gmpy2.mpz(1) << bits
    out = []
    for c, k in pairs:
        entry = cache.get(id(c))
        if entry is None:
            up = gmpy2.powmod_sec(c, top, nsq)
            entry = cache[id(c)] = (c, gmpy2.invert(c, nsq), gmpy2.invert(up, nsq), up)
        k = gmpy2.mpz(k)
        if not -top < k < top:  # (the dtype bounds k: never for a value the caller encoded)
            raise ValueError("a plaintext is wider than its dtype allows")
        negative = int(k < 0)
        base, correction = entry[negative], entry[2 + negative]
        out.append(gmpy2.powmod_sec(base, abs(k) + top, nsq) * correction % nsq)
    return out


def fixed_width(m: int, n) -> gmpy2.mpz:
    """``m mod n`` plus a multiple of ``n`` that gives every result one bit length (``g**m = 1 + m*n`` then
    multiplies operands of one size, whatever ``m``'s sign or magnitude)."""
    width = n.bit_length() + 3
    t = -(-(gmpy2.mpz(1) << (width - 1)) // n)  # n*t >= 2**(width-1), n*(t+1) < 2**width
    return gmpy2.mpz(m) % n + n * t
