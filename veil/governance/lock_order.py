"""The governance lock and a network worker's turn, taken together without one waiting under the other.

Release decisions hold the governance lock across the owner's database outside the turn (release.py
``_decide_all``: filings, approvals used up, give-backs): a write whose COMMIT answer was lost is looked up for
up to ~10 s. Code that held the turn while it waited for the lock (the owner's run-time policy change, a stored
policy decision synced from another replica, a decision by admin message) held every other session's command
that long. The reverse, holding the lock while waiting for the turn, would hold every release decision and a
revocation's lapses behind a long command. So neither is held while waiting for the other: the lock is taken
at once or the turn is handed back until the lock is free, then both are tried again. Once only: retried for as
long as the lock was taken meanwhile, release decisions of other sessions coming back to back (outside the
turn, while other commands queued for it) starved the owner's change for as long as they kept coming. The
second miss takes the lock outside the turn and keeps it while waiting for the turn: a wait in the turn's queue
(a long command hands the turn over at its next checkpoint), which release decisions wait for at most, once.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from veil.governance.state import governance
from veil.workers import cancellation


#: how often a command waiting for the lock checks its deadline and cancellation
CHECK_EVERY_S = 0.05


def _acquire(lock: Any) -> None:
    """``lock.acquire()``, ending with the current command's timeout or cancellation error while it waits (a
    release decision in a lost COMMIT's lookup held it ~10 s; a frozen database longer: the command waited past
    its deadline, and past the worker's stop). A plain wait outside a command."""
    token = cancellation.current_token()
    if token is None:
        lock.acquire()
        return
    while not lock.acquire(timeout=CHECK_EVERY_S):
        token.check()


def _wait_until_free(lock: Any) -> None:
    _acquire(lock)
    lock.release()


@contextmanager
def held_outside_turn(lock: Any) -> Iterator[None]:
    """``lock``, waited for outside the current request's turn when another thread holds it (a plain wait: for a
    lock that code outside the turn never holds while waiting for the turn)."""
    if not lock.acquire(blocking=False):
        with cancellation.outside_turn():
            _acquire(lock)
    try:
        yield
    finally:
        lock.release()


@contextmanager
def governance_lock(worker: Any) -> Iterator[None]:
    """The worker's governance lock, for code that may run in the current request's turn: it waits for the
    lock outside the turn (``cancellation.outside_turn``: a no-op outside a network worker's request) and
    returns holding both."""
    lock = governance(worker).lock
    if not lock.acquire(blocking=False):
        with cancellation.outside_turn():
            _wait_until_free(lock)
        if not lock.acquire(blocking=False):  # (taken again meanwhile: kept this time, see the module doc)
            with cancellation.outside_turn():
                _acquire(lock)
    try:
        yield
    finally:
        lock.release()


@contextmanager
def turn_and_governance_lock(worker: Any, turn: Any) -> Iterator[None]:
    """``turn`` (a network worker's ``FairLock``; None: none) and the governance lock, for a thread that holds
    neither (the server's policy sync); in a request's turn already, the governance lock as :func:`governance_lock`
    takes it (owner code a command runs, a worker function calling ``worker.set_policy``: a FairLock is not
    re-entrant, and taking it again waited for itself, holding every session's command for ever)."""
    lock = governance(worker).lock
    if turn is not None and cancellation.running_in(turn):
        with governance_lock(worker):
            yield
        return
    if turn is None:
        with lock:
            yield
        return
    turn.acquire()
    if not lock.acquire(blocking=False):
        turn.release()
        _wait_until_free(lock)
        turn.acquire()
        if not lock.acquire(blocking=False):  # (taken again meanwhile: kept this time, see the module doc)
            turn.release()
            lock.acquire()
            turn.acquire()
    try:
        yield
    finally:
        lock.release()
        turn.release()
