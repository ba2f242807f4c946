"""Multi-core modular exponentiation for Paillier.

``gmpy2.powmod_base_list`` releases the GIL for the whole list, so a plain
thread pool keeps every core busy without spawning processes and without
pickling anything: threads share the integers in memory. The plaintexts never
reach these helpers, only random bases, the public modulus and key primes.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import gmpy2

# Below this many exponentiations the thread hand-off costs more than it saves.
_MIN_PARALLEL = 8

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def num_threads() -> int:
    """Threads used for bulk exponentiation: ``$VEIL_HE_THREADS`` or the usable cores."""
    env = os.environ.get("VEIL_HE_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != workers:  # noqa: SLF001 - resize on env change
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="veil-he")
        return _pool


def powmod_list(bases: list, exponent, modulus) -> list:
    """Return ``[pow(b, exponent, modulus) for b in bases]`` using every core.

    Args:
        bases: integers (``int`` or ``gmpy2.mpz``).
        exponent: one non-negative exponent shared by all bases.
        modulus: the modulus.

    Returns:
        A list of ``gmpy2.mpz`` in the order of ``bases``.
    """
    workers = num_threads()
    if workers == 1 or len(bases) < _MIN_PARALLEL:
        return gmpy2.powmod_base_list(bases, exponent, modulus)
    # A few chunks per thread smooths out uneven scheduling on a shared machine.
    n_chunks = min(len(bases), workers * 4)
    step = -(-len(bases) // n_chunks)
    chunks = [bases[i : i + step] for i in range(0, len(bases), step)]
    ex = _executor(workers)
    parts = ex.map(lambda ch: gmpy2.powmod_base_list(ch, exponent, modulus), chunks)
    out: list = []
    for part in parts:
        out.extend(part)
    return out
