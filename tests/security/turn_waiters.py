"""Two other requests around a thread that is outside its turn: one takes the turn, one waits for it.

Shared by the tests that check code running inside ``cancellation.outside_turn`` hands over no turn it lacks
(a checkpoint, a nested ``outside_turn``): if it did, the waiter would enter while the other still holds the lock.
"""

from __future__ import annotations

import threading
import time

from veil.workers import cancellation


class TurnTakenAndAwaited:
    """Start from inside ``outside_turn``: ``holder`` takes the lock and keeps it until ``release``; ``waiter`` then
    queues for it. ``waiter_entered(t)`` says whether the waiter got in within ``t`` seconds."""

    def __init__(self, lock: cancellation.FairLock) -> None:
        self._lock = lock
        self._holds, self._release, self._entered = threading.Event(), threading.Event(), threading.Event()

    def _holder(self) -> None:
        self._lock.acquire()
        self._holds.set()
        self._release.wait(120)  # (until the test releases it: a 5 s cap let the waiter in on a loaded machine)
        self._lock.release()

    def _waiter(self) -> None:
        self._lock.acquire()
        self._entered.set()
        self._lock.release()

    def start(self) -> None:
        threading.Thread(target=self._holder, daemon=True).start()
        self._holds.wait(120)
        threading.Thread(target=self._waiter, daemon=True).start()
        t0 = time.monotonic()
        while not self._lock._waiters and time.monotonic() - t0 < 120:
            time.sleep(0.001)

    def waiter_entered(self, timeout: float) -> bool:
        return self._entered.wait(timeout)

    def release(self) -> None:
        self._release.set()
