"""The memory a client hosted in a Ray actor may keep (``ClientHost(client_memory_mb=)``).

A hosted client is an in-process worker: its requests come with no session, so no per-session quota
(``--max-session-mb``) charges what they store. Without a bound, one client's requests (an update of any
size, a command whose result is huge, objects never freed) grew its actor's memory, and with it the
memory of every client that actor hosts, until the actor died. After each request the host measures the
client's objects (its owner's data excepted, as a quota does) and, past the limit, frees what that request
stored and answers it with one line.

Objects count with their tags and description (as the session quota counts them). A request may also
store on sibling clients of the same actor (a move, a secure-aggregation deposit: direct calls, no request
of theirs): every client it reaches is measured after it, and what it stored there freed past the limit.

Secure-aggregation rounds live outside the store, and in process (no session) their per-session cap does
not apply: each is charged for the peers it may hold (``n`` as advertised) and for the ids it holds (a
string of any length each), and a request that opens or grows rounds past the limit has them discarded.

What this does not bound: a single command's transient peak (its result is freed right after, and an
allocation past the machine's memory fails at once) and an object grown in place by a later request
(refused, not shrunk).
"""

from __future__ import annotations

import math
import sys
from itertools import chain
from typing import Any, Callable

from veil.messaging import messages as m
from veil.messaging.serde import serialize
from veil.workers.quota import _nbytes, metadata_nbytes

#: bytes a secure-aggregation round is charged: its keys and seeds, then per peer it may hold (its public
#: key, its two shares and their dict entries: ~1.3 KiB measured with short ids, so an upper bound), and
#: each id string it holds at its own size
ROUND_BYTES = 1024
PEER_BYTES = 2048


class MemoryLimit:
    """``client_memory_mb`` of one host: ``nbytes`` is None for no limit."""

    def __init__(self, client_memory_mb: float | None) -> None:
        if client_memory_mb is not None and not (type(client_memory_mb) in (int, float)
                                                 and 0 < client_memory_mb < math.inf):
            raise ValueError("client_memory_mb must be a positive number of MiB (or None)")
        self.mb = client_memory_mb
        self.nbytes = None if client_memory_mb is None else int(client_memory_mb * 2**20)
        self._reached: dict | None = None  # while a request runs: id(client) -> (client, its snapshot before)

    def serve(self, worker: Any, handle: Callable[[], bytes]) -> bytes:
        """``handle()`` (one request of ``worker``'s), or, when it left ``worker`` or a sibling client it reached
        (:meth:`reached`) above the limit, the refusal (and what it stored on those clients, freed)."""
        if self.nbytes is None:
            return handle()
        self._reached = {id(worker): (worker, self._snapshot(worker))}
        try:
            reply = handle()
            over = [(w, held) for w, held in ((w, self.held(w)) for w, _ in self._reached.values())
                    if held > self.nbytes]
            if not over:
                return reply
            freed = sum(self._free_new(w, self._reached[id(w)][1]) for w, _ in over)
        finally:
            self._reached = None
        client, held = max(over, key=lambda pair: pair[1])
        return serialize(m.ErrorReply("QuotaExceededError", (
            f"client {client.id!r} would hold {held / 2**20:.1f} MiB of objects, more than client_memory_mb="
            f"{self.mb:g} (the limit sy.ray.federated_clients sets on each hosted client): the {freed} objects "
            "this request stored are freed")), sender=worker.id)

    def reached(self, sibling: Any) -> None:
        """A client of this host the request under way reaches in process (a move, a deposit: no request of
        its own): measured after the request too (snapshot now, before anything reaches it)."""
        reached = self._reached
        if reached is not None and id(sibling) not in reached:
            reached[id(sibling)] = (sibling, self._snapshot(sibling))

    @staticmethod
    def _snapshot(worker: Any) -> tuple[set, dict]:
        """The ids of the client's objects, and each secure-aggregation round's charge, now."""
        return ({oid for oid, _ in worker.monitor.owner_entries()},
                {key: round_bytes(state) for key, state in _rounds(worker).items()})

    @staticmethod
    def held(worker: Any) -> int:
        """Bytes the client's objects hold (its owner's data aside; with their tags and descriptions), and its
        secure-aggregation rounds."""
        rounds = sum(round_bytes(state) for state in _rounds(worker).values())
        return rounds + sum(_nbytes(e.obj) + metadata_nbytes(e.tags, e.description)
                            for _, e in worker.monitor.owner_entries() if not e.protected)

    @staticmethod
    def _free_new(worker: Any, before: tuple[set, dict]) -> int:
        """Frees what the request stored on ``worker``: its new objects, and rounds it opened or grew (a grown
        round is spoilt for its protocol anyway). Returns how many."""
        new = [oid for oid, e in worker.monitor.owner_entries() if oid not in before[0] and not e.protected]
        if new:  # (through the worker's own handler: what a delete of them would do, and nothing more)
            worker._recv_msg(serialize(m.DeleteMessage(new), sender=worker.id))
        rounds = _rounds(worker)
        grown = [key for key, state in rounds.items() if round_bytes(state) > before[1].get(key, -1)]
        for key in grown:
            del rounds[key]
        return len(new) + len(grown)


def round_bytes(state: Any) -> int:
    """What a secure-aggregation round is charged: :data:`ROUND_BYTES`, :data:`PEER_BYTES` per peer it may hold,
    and every peer id it holds at its size (``share_keys``, ``deposit`` and ``masked_input`` take ids of any
    length)."""
    ids = chain(state.ids, state.publics, state.held, state.deposited_keys, state.masked_with or (),
                getattr(state, "confirmed", None) or ())
    return ROUND_BYTES + PEER_BYTES * state.n + sum(sys.getsizeof(i) for i in ids)


def _rounds(worker: Any) -> dict:
    """The client's secure-aggregation rounds (``veil.federated.secure_agg``: none until one is advertised)."""
    return worker.__dict__.get("_secagg_rounds") or {}
