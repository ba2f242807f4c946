"""A crypto provider's per-party slots: which parties a dealing is sending to, and waiting on, now.

A provider's dealing generates its material holding the worker's one dealing slot
(:func:`veil.workers.cancellation.one_at_a_time`), then gives it up and sends each party its part, waiting on
their replies (a peer link's timeout is 120 s). Holding the dealing slot through those waits let a party that
never answered stall every session's dealings, to other parties too. The waits are bounded per party instead:
a dealing takes the slots of all its parties at once (all or none, so two dealings naming the same parties in
other orders never wait for each other), before the dealing slot; each party's slot is freed when it answers.
At most one dealing's material waits on each party, as the dealing slot bounded it to one in all before.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Callable, Hashable, Iterable, Iterator

from veil.workers import cancellation


class PartySlots:
    """Slots keyed by party, each dealing taking all of its own at once.

    Waiters are served as :class:`veil.workers.cancellation.ArrivalSlot` serves them: requesters (users) in
    turns, each one's waiters in arrival order, one that was just served behind the others. A waiter whose
    parties are all free takes them unless a waiter ahead of it that could take its own now needs one of them;
    a waiter that cannot take its own (one of its parties is busy) holds nothing back for them, so a dealing
    queued for a party that never answers keeps no other party from the dealings behind it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy: set = set()
        self._waiting: dict[object, deque[tuple[object, frozenset]]] = {}  # requester -> (ticket, parties)
        self._rotation: deque[object] = deque()  # requesters with waiters, the next to be served first
        # bumped at every change: a waiter woken with none since its last look (its poll's interval) looks again
        # at nothing (a queue of hundreds of connections' waiters each walking it every 50 ms was CPU for nothing)
        self._version = 0

    def _free_for(self, ticket: object, parties: frozenset) -> bool:
        """Whether ``parties`` may be taken now by ``ticket`` (None: one that has not queued). Under _cond."""
        if parties & self._busy:
            return False
        claimed: set = set()  # parties the waiters ahead that could take theirs now would take
        for requester in self._rotation:
            for other, wanted in self._waiting[requester]:
                if other is ticket:
                    return not (parties & claimed)
                if not (wanted & self._busy) and not (wanted & claimed):
                    claimed |= wanted
        return not (parties & claimed)

    def try_take(self, parties: Iterable[Hashable]) -> bool:
        """Takes every one of ``parties`` if that needs no wait."""
        wanted = frozenset(parties)
        with self._cond:
            if not self._free_for(None, wanted):
                return False
            self._busy |= wanted
            self._version += 1
            return True

    def take(self, parties: Iterable[Hashable], poll: Callable[[], None], interval: float = 0.05,
             requester: object = None) -> None:
        """Waits until every one of ``parties`` is free in ``requester``'s turn, then takes them all, calling
        ``poll`` (which may raise: the waiter then leaves, holding none) between waits."""
        wanted, ticket = frozenset(parties), object()
        with self._cond:
            mine = self._waiting.get(requester)
            if mine is None:
                mine = self._waiting[requester] = deque()
                self._rotation.append(requester)
            mine.append((ticket, wanted))
            self._version += 1
        seen = -1
        try:
            while True:
                with self._cond:
                    if seen != self._version:
                        seen = self._version
                        if self._free_for(ticket, wanted):
                            self._busy |= wanted
                            self._leave(requester, mine, ticket, served=True)
                            return
                    self._cond.wait(interval)
                poll()
        except BaseException:
            with self._cond:
                if any(t is ticket for t, _ in mine):
                    self._leave(requester, mine, ticket, served=False)
                self._cond.notify_all()  # (what it would have taken first may be free for others now)
            raise

    def _leave(self, requester: object, mine: deque, ticket: object, served: bool) -> None:
        """Takes ``ticket`` off its requester's waiters; a requester just served goes behind the others, one
        whose waiter gave up keeps its place for the rest (under _cond)."""
        self._version += 1
        for k, (t, _) in enumerate(mine):
            if t is ticket:
                del mine[k]
                break
        if not mine:
            del self._waiting[requester]
            self._rotation.remove(requester)
        elif served:
            self._rotation.remove(requester)
            self._rotation.append(requester)

    def release(self, party: Hashable) -> None:
        with self._cond:
            self._busy.discard(party)
            self._version += 1
            self._cond.notify_all()


@contextmanager
def awaiting(slots: PartySlots, parties: list, requester: object = None) -> Iterator[Callable[[Hashable], None]]:
    """Holds the slots of every one of ``parties`` for the block, which gets a call that frees one party's slot
    early (its reply came); the rest are freed at the end. Waited for outside the worker's turn, its deadline
    and cancellation checked. Outside a network worker's request nothing is held (no turn is handed over)."""
    if not cancellation.in_request_turn():
        yield lambda party: None
        return
    held = set(parties)
    lock = threading.Lock()  # (replies come on the threads the sends run on)
    if not slots.try_take(held):
        with cancellation.outside_turn():
            slots.take(held, cancellation.check, requester=requester)

    def answered(party: Hashable) -> None:
        with lock:
            if party not in held:
                return
            held.discard(party)
        slots.release(party)

    try:
        yield answered
    finally:
        for party in list(held):
            answered(party)
