"""A worker process keeps the memory it frees for its next requests (glibc malloc settings).

By default glibc hands large freed blocks back to the kernel: blocks over its (adaptive) mmap
threshold are unmapped, a thread's arena heap is unmapped as soon as it is empty, and the main
heap is trimmed past 2x the threshold. A worker's SMPC round allocates the same product-sized
tensors and receive buffers every call (mul 1e6: ~10k fresh 4 KiB pages per party per call), so
every call faulted them in again and the kernel zeroed them: 20-40% of a party's CPU on the
measured box (``bench/RESULTS.md``, #14/#19 netsmpc). With one arena, the largest mmap threshold
glibc allows and a high trim threshold, freed blocks are reused by the next call instead; the
process keeps its peak heap (up to ``TRIM_THRESHOLD`` above it is still returned).

Only the ``veil worker`` process does this (it owns its allocator); a library import never
changes the host application's malloc. ``VEIL_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: blocks up to this size come from the heap and are reused (glibc's maximum on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap beyond this goes back to the kernel
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Applies the settings; True if glibc took them. Call before the process starts threads
    (arenas made earlier keep their own heaps)."""
    if os.environ.get("VEIL_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt in this C library
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # one arena: a thread's own arena heap is unmapped whenever it empties, whatever the thresholds
    ok = mallopt(M_ARENA_MAX, 1) == 1
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and ok
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok


def physical_memory_mb() -> float:
    """This machine's memory, in MiB."""
    import psutil

    return psutil.virtual_memory().total / 2**20


def limit_address_space(max_mb: float | None) -> float | None:
    """Caps this process's address space (``RLIMIT_AS``) at ``max_mb`` MiB (None: the machine's memory;
    0: no cap); returns the cap set, in MiB.

    Why: an op's result is charged to a session's quota only once it exists (``monitor.store``), so a
    request for a huge result (``torch.zeros(n)``, a broadcast, a padding) is allocated first and refused
    after; within the cap such an allocation fails at once with torch's "can't allocate memory", a
    one-line error, and the worker keeps serving, where several sessions' allocations together could
    otherwise exhaust the machine and have the kernel kill the worker.

    Raises:
        ValueError: a cap the owner gave below twice what the process already maps (the default cap is
            then left off instead: a small machine still starts its worker).
    """
    import resource

    import psutil

    if not sys.platform.startswith("linux"):  # (as keep_freed_memory: the cap is tested on Linux only)
        return None
    given = max_mb is not None
    if max_mb is None:
        max_mb = physical_memory_mb()
    if max_mb <= 0:
        return None
    limit = int(max_mb * 2**20)
    size = psutil.Process().memory_info().vms  # what the process maps already
    if limit < 2 * size:
        if not given:
            return None
        raise ValueError(f"--max-memory-mb {max_mb:g} is too small: this worker process already maps "
                         f"{size / 2**20:.0f} MiB (give at least twice that)")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit / 2**20

