"""The memory a client hosted in a Ray actor may keep (``ClientHost(client_memory_mb=)``).

A hosted client is an in-process worker: its requests come with no session, so no per-session quota
(``--max-session-mb``) charges what they store. Without a bound, one client's requests (an update of any
size, a command whose result is huge, objects never freed) grew its actor's memory, and with it the
memory of every client that actor hosts, until the actor died. After each request the host measures the
client's objects (its owner's data excepted, as a quota does) and, past the limit, frees what that request
stored and answers it with one line.

Secure-aggregation rounds live outside the store, and in process (no session) their per-session cap does
not apply: each is charged for the peers it may hold (``n`` as advertised), and a request that opens rounds
past the limit has them discarded.

What this does not bound: a single command's transient peak (its result is freed right after, and an
allocation past the machine's memory fails at once) and an object grown in place by a later request
(refused, not shrunk).
"""

from __future__ import annotations

import math
from typing import Any

from veil.messaging import messages as m
from veil.messaging.serde import serialize
from veil.workers.quota import _nbytes

#: bytes a secure-aggregation round is charged: its keys and seeds, then per peer it may hold (its public
#: key, its two shares and their dict entries: an upper bound)
ROUND_BYTES = 1024
PEER_BYTES = 1024


class MemoryLimit:
    """``client_memory_mb`` of one host: ``nbytes`` is None for no limit."""

    def __init__(self, client_memory_mb: float | None) -> None:
        if client_memory_mb is not None and not (type(client_memory_mb) in (int, float)
                                                 and 0 < client_memory_mb < math.inf):
            raise ValueError("client_memory_mb must be a positive number of MiB (or None)")
        self.mb = client_memory_mb
        self.nbytes = None if client_memory_mb is None else int(client_memory_mb * 2**20)

    @staticmethod
    def ids(worker: Any) -> tuple[set, set]:
        """The ids of the client's objects and secure-aggregation rounds now (before a request)."""
        return {oid for oid, _ in worker.monitor.owner_entries()}, set(_rounds(worker))

    @staticmethod
    def held(worker: Any) -> int:
        """Bytes the client's objects hold (its owner's data aside), and its secure-aggregation rounds."""
        rounds = sum(ROUND_BYTES + PEER_BYTES * state.n for state in _rounds(worker).values())
        return rounds + sum(_nbytes(e.obj) for _, e in worker.monitor.owner_entries() if not e.protected)

    def checked(self, worker: Any, before: tuple[set, set], reply: bytes) -> bytes:
        """``reply``, or, when the request left the client above the limit, the refusal (and what the request
        stored, freed)."""
        held = self.held(worker)
        if held <= self.nbytes:
            return reply
        new = [oid for oid, e in worker.monitor.owner_entries() if oid not in before[0] and not e.protected]
        if new:  # (through the worker's own handler: what a delete of them would do, and nothing more)
            worker._recv_msg(serialize(m.DeleteMessage(new), sender=worker.id))
        rounds = _rounds(worker)
        for key in set(rounds) - before[1]:
            del rounds[key]
            new.append(key)
        return serialize(m.ErrorReply("QuotaExceededError", (
            f"client {worker.id!r} would hold {held / 2**20:.1f} MiB of objects, more than client_memory_mb="
            f"{self.mb:g} (the limit sy.ray.federated_clients sets on each hosted client): the {len(new)} objects "
            "this request stored are freed")), sender=worker.id)


def _rounds(worker: Any) -> dict:
    """The client's secure-aggregation rounds (``veil.federated.secure_agg``: none until one is advertised)."""
    return worker.__dict__.get("_secagg_rounds") or {}
