"""The worker's start-up heap moved out of the cyclic garbage collector's way.

Importing torch and veil leaves ~190,000 container objects (modules, functions, types, op tables) that live
as long as the process. CPython's full collection walks all of them every time (100-270 ms on the 2-core
host, measured with ``gc.collect()`` right after start-up), and its oldest-generation collections come
around every few hundred thousand allocations, so one landed inside a request now and then: an online SMPC
call over network workers took half a second instead of ~50 ms (bench/RESULTS.md, thirty-seventh landing).
``gc.freeze()`` (Python 3.7+, bpo-31558) moves every object alive at that point into a permanent generation
the collector never scans; objects made later are collected as before. Whatever garbage a cycle holds at
start-up is collected first, so freezing keeps nothing that was already dead.

``VEIL_GC_FREEZE=0`` leaves the collector as Python sets it (for measurements).
"""

from __future__ import annotations

import gc
import os


def freeze_startup_heap() -> bool:
    """Collects once, then freezes everything alive; returns whether it froze."""
    if os.environ.get("VEIL_GC_FREEZE", "1") == "0":
        return False
    gc.collect()
    gc.freeze()
    return True
