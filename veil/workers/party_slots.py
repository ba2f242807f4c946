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
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator

from veil.workers import cancellation
from veil.workers.cancellation import FairSlots

#: (the slots are the generic fair slots: users in turns, all of a waiter's names or none)
PartySlots = FairSlots


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
