"""What a loaded CKKS context holds in memory, for the session quota (``veil worker --max-session-mb``).

Its wire bytes are the wrong measure: SEAL inflates its keys (compressed, ~60 of every 64 bits) and builds NTT and
RNS tables at every level of the modulus chain that are on no wire at all, so a public context without Galois
keys held 6 times its wire size (10.8 MB from 1.8 MB at ring 8192), one of ring 16384 and 6 primes 6 times
(44 MB from 7.5 MB). tracemalloc does not see SEAL's allocations; the bound below is from SEAL's own sizes, set
above the resident memory each extra loaded copy added (measured on Linux, MiB, 4 copies after one; the bound in
brackets): ring 8192 with no Galois keys 10.8 (15.0), with only the conjugation key 13.5 (17.2), with all
Galois keys 53 to 61 (69); ring 16384 of 6 primes 44 (53.5), with all Galois keys 244 to 255 (277; 171 on the
wire). What a copy holds beyond its keys' words and tables is about the same at both rings (10 to 14 MiB, the
most when each copy loads on a fresh thread, as a worker's do: the load's buffers stay in that thread's malloc
arena), so it is charged as half the key words up to :data:`KEY_SLACK_MOST`: charged 1.5 times its key words,
an honest ring-16384 context with Galois keys was 346 MiB, refused by a session quota it fits in (1.4 times).

The keys are counted part by part, each at its polynomials' width: SEAL loads any number of parts at one Galois
index (``size()`` counts indexes) and relinearization keys at any number of indexes (``has_relin_keys`` is one
bit), so counting one key per index charged a received context of 70 zero parts at the conjugation index,
zstd-compressed beside 9.5 MB of padding, 15 MB while it held 49 MB (8 relinearization indexes: 15 for 23).
The wire now refuses a key of other than one part per data prime, relinearization keys at more than one index
and Galois keys at more indexes than the ring has (:mod:`veil.he.ckks_wire`); the count here holds whatever SEAL
loaded.
"""

from __future__ import annotations

from typing import Any

#: bytes of one RNS word as SEAL holds it
_WORD = 8
#: what the allocator holds beside a loaded context's key words: this fraction of them (what small key sets
#: measured), at most :data:`KEY_SLACK_MOST` (10 to 14 MiB measured beside 38 and 203 MiB of words)
KEY_SLACK, KEY_SLACK_MOST = 0.5, 32 << 20
#: what SEAL's tables take per ring dimension times primes squared (seal_bytes measured 33 to 37 alone; the
#: context's other members, encoder and evaluator included, brought it to ~58)
TABLE_BYTES_PER_N_K2 = 64
#: what a loaded context holds besides (its SEAL and TenSEAL objects, the pool's slack; 2 to 3 MB measured)
FIXED_BYTES = 4 << 20


def held_bytes(ctx: Any) -> int:
    """An upper bound on the memory a loaded public CKKS context (:class:`veil.he.ckks.CKKSContext`) holds: its
    public, relinearization and Galois keys at full width, every part SEAL loaded, and SEAL's tables. Metadata
    only (sizes and counts; SEAL hands the key lists over in a few ms)."""
    parms = ctx.raw.seal_context().data.key_context_data().parms()
    n, k = parms.poly_modulus_degree(), len(parms.coeff_modulus())  # (the key level: data primes + special)
    words = _part_bytes(ctx.raw.public_key().data)
    for present, keys in ((ctx.raw.has_relin_keys, ctx.raw.relin_keys), (ctx.raw.has_galois_keys,
                                                                           ctx.raw.galois_keys)):
        if present():
            words += sum(_part_bytes(part) for index in keys().data.data() for part in index)
    return words + int(min(KEY_SLACK * words, KEY_SLACK_MOST)) + TABLE_BYTES_PER_N_K2 * n * k * k + FIXED_BYTES


def _part_bytes(part: Any) -> int:
    """What SEAL holds for one key part (a ciphertext at the key level): its polynomials' RNS words."""
    held = part.data()
    return held.size() * held.coeff_modulus_size() * held.poly_modulus_degree() * _WORD
