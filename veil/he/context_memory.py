"""What a loaded CKKS context holds in memory, for the session quota (``veil worker --max-session-mb``).

Its wire bytes are the wrong measure: SEAL inflates its keys (compressed, ~60 of every 64 bits) and builds NTT and
RNS tables at every level of the modulus chain that are on no wire at all, so a public context without Galois
keys held 6 times its wire size (10.8 MB from 1.8 MB at ring 8192), one of ring 16384 and 6 primes 6 times
(44 MB from 7.5 MB). tracemalloc does not see SEAL's allocations; the bound below is from SEAL's own sizes, set
above the resident memory each extra loaded copy added (measured on Linux, MiB, 4 copies after one; the bound in
brackets): ring 8192 with no Galois keys 10.8 (15.0), with only the conjugation key 13.5 (17.2), with all
Galois keys 56 to 64 (69); ring 16384 of 6 primes 44 (53.5), with all Galois keys 246 (346; 171 on the wire).
"""

from __future__ import annotations

from typing import Any

#: bytes of one RNS word as SEAL holds it
_WORD = 8
#: SEAL's pool holds a loaded key up to this many times its words (1.15 to 1.8, measured)
KEY_OVERHEAD = 1.5
#: what SEAL's tables take per ring dimension times primes squared (seal_bytes measured 33 to 37 alone; the
#: context's other members, encoder and evaluator included, brought it to ~58)
TABLE_BYTES_PER_N_K2 = 64
#: what a loaded context holds besides (its SEAL and TenSEAL objects, the pool's slack; 2 to 3 MB measured)
FIXED_BYTES = 4 << 20


def held_bytes(ctx: Any) -> int:
    """An upper bound on the memory a loaded public CKKS context (:class:`veil.he.ckks.CKKSContext`) holds: its
    public, relinearization and Galois keys at full width and SEAL's tables. Metadata only (sizes and counts)."""
    parms = ctx.raw.seal_context().data.key_context_data().parms()
    n, k = parms.poly_modulus_degree(), len(parms.coeff_modulus())  # (the key level: data primes + special)
    key_switching = (k - 1) * 2 * k * n * _WORD  # one key: a pair of polynomials per data prime, over all k
    words = 2 * k * n * _WORD  # the public key
    if ctx.raw.has_relin_keys():
        words += key_switching
    if ctx.raw.has_galois_keys():
        words += ctx.raw.galois_keys().data.size() * key_switching
    return int(KEY_OVERHEAD * words) + TABLE_BYTES_PER_N_K2 * n * k * k + FIXED_BYTES
