"""Paillier key generation that honours a deadline.

``phe.generate_paillier_keypair`` finds each prime with one ``gmpy2.next_prime`` call: seconds to minutes
at 4096-16384 bits, with no point at which a deadline or a cancelled command could stop it (and it loops
for ever on an odd length). Here each prime is drawn candidate by candidate from ``secrets`` (its two top
bits set, so ``n = p*q`` has exactly the asked length, odd or even), screened by one gcd with the product of
the small primes, then tested (``gmpy2.is_prime``: Baillie-PSW and a Miller-Rabin round); the check runs
between candidates, each of which costs at most one modular power of the prime's size.
"""

from __future__ import annotations

import secrets
import time
from typing import Callable, Optional

import gmpy2
import phe

from veil.exceptions import CommandTimeoutError
from veil.workers import cancellation

#: odd primes below 2**12 multiplied together: one gcd screens out ~87% of odd candidates before a power
_SMALL_PRIMES = gmpy2.mpz(1)
for _p in range(3, 1 << 12, 2):
    if gmpy2.is_prime(_p):
        _SMALL_PRIMES *= _p
del _p

MIN_BITS = 16  # below this there are too few primes of the length for two distinct ones to be quick


def _prime(bits: int, check: Callable[[], None]) -> gmpy2.mpz:
    """A uniformly drawn prime of exactly ``bits`` bits whose two top bits are set."""
    top = gmpy2.mpz(3) << (bits - 2)
    while True:
        check()
        candidate = gmpy2.mpz(secrets.randbits(bits)) | top | 1
        if gmpy2.gcd(candidate, _SMALL_PRIMES) == 1 or candidate < 1 << 12:
            if gmpy2.is_prime(candidate, 25):
                return candidate


def keygen(n_length: int, deadline: Optional[float] = None) -> tuple[phe.PaillierPublicKey, phe.PaillierPrivateKey]:
    """A fresh key pair with a modulus of exactly ``n_length`` bits.

    Args:
        n_length: the modulus's bit length (odd lengths too).
        deadline: a ``time.monotonic()`` instant after which generation stops; the running worker command's
            deadline and cancellation are checked as well.

    Raises:
        CommandTimeoutError: past ``deadline`` (or the command's own; CommandCancelledError when cancelled).
    """
    if not isinstance(n_length, int) or isinstance(n_length, bool) or n_length < MIN_BITS:
        raise ValueError(f"a Paillier modulus needs at least {MIN_BITS} bits, not {n_length!r}")

    def check() -> None:
        cancellation.check()
        if deadline is not None and time.monotonic() > deadline:
            raise CommandTimeoutError(f"generating a {n_length}-bit Paillier key ran past its deadline")

    while True:
        p = _prime((n_length + 1) // 2, check)
        q = _prime(n_length // 2, check)
        n = p * q
        # (p != q, and gcd(n, (p-1)(q-1)) = 1: certain for primes of one length, checked for lengths that differ)
        if p != q and n.bit_length() == n_length and gmpy2.gcd(n, (p - 1) * (q - 1)) == 1:
            public = phe.PaillierPublicKey(int(n))
            return public, phe.PaillierPrivateKey(public, int(p), int(q))
