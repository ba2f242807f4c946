"""How the kernel schedules a worker process: ``veil worker --sched batch``.

When the worker processes of a local cluster share the host's cores with the orchestrator (a
``Cluster(auto_managed=True)``: parties, crypto provider and the scientist's process on one machine),
every request the orchestrator sends wakes a worker thread, and under the default policy the woken
thread may preempt the orchestrator on its own core before it sent the round's next request: on the
2-core test machine 30% of the second party's requests of a peer round left 0.2-0.95 ms late (p90
0.9 ms against 45 us; ``bench/RESULTS.md``). ``SCHED_BATCH`` (Linux, sched(7)) marks the workers'
threads as throughput work: a woken one never preempts the running task, it waits for a free core or
for the orchestrator to block on the round's replies, a few microseconds later. CPU shares are
unchanged (same nice level); a worker alone on its machine is unaffected.
"""

from __future__ import annotations

import os

POLICIES = ("normal", "batch")


def set_policy(policy: str) -> bool:
    """Applies ``policy`` to every thread of this process (threads started later inherit it). False where
    the platform has no such policy (``normal`` always holds)."""
    if policy not in POLICIES:
        raise ValueError(f"scheduling policy must be one of {POLICIES}, got {policy!r}")
    if policy == "normal":
        return True
    setter = getattr(os, "sched_setscheduler", None)
    if setter is None or not hasattr(os, "SCHED_BATCH"):
        return False
    for tid in _threads():
        try:
            setter(tid, os.SCHED_BATCH, os.sched_param(0))
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass
    return True


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: the calling thread (pid 0) only
        return [0]
