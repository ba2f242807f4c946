"""Dealing in the background: a thread keeps a plan's material ready while the online phase runs.

``dealer.start_background(plan, repeat=None)`` (or ``dealer.deal_ahead(plan,
repeat, background=True)``) starts one thread that asks the crypto provider
for the material of ``plan`` (what one call takes, from
``WorkerDealer.record``), call after call in the order the calls consume it:
first one call's worth, then rounds that double up to half the budget. With
``repeat=None`` it keeps dealing as the material is taken, until stopped.

* **Bounded**: material waiting at the parties never exceeds the dealer's
  ``budget_bytes``; the thread waits for the online phase to take items
  before it deals more (a request that would not fit is made smaller).
* **Waits**: a take finds its item dealt, or waits for the thread when the
  thread will deal that key (the thread then deals whatever fits, at least
  one item); when not one more item fits the budget (it is full of material
  the caller does not take), or the thread has dealt all its calls, the take
  falls back to ``on_exhausted`` (deal on demand, or
  :class:`MaterialExhaustedError`).
* **Errors**: a failure of the thread (a lost provider, a refused request)
  ends it; the next take raises :class:`BackgroundDealingError` (from the
  original error) once, and later takes deal as without it. ``stop()``
  raises an error no take surfaced.
* **Stop**: ``stop()`` (or leaving ``with job:``) lets a request in flight
  finish, joins the thread and keeps what was dealt for later takes.

The parties handle the thread's requests next to the online phase's: the
worker's per-request state (its requester) is per thread
(``BaseWorker.requester``), and the in-process object store locks its writes.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Hashable

from veil.exceptions import register_remote_error
from veil.mpc.errors import ProviderError

if TYPE_CHECKING:
    from veil.mpc.providers.worker_dealer import Plan, WorkerDealer


class BackgroundDealingError(ProviderError):
    """The crypto provider's background dealing failed (the original error is its cause)."""


register_remote_error(BackgroundDealingError)


class BackgroundDealing:
    """One background dealing thread of a :class:`WorkerDealer` (see the module docstring).

    Attributes:
        items: Items dealt so far.
        bytes: Bytes (all parties) dealt so far.
        error: The exception that ended the thread, or None.
    """

    def __init__(self, dealer: "WorkerDealer", plan: "Plan", repeat: int | None) -> None:
        if repeat is not None and (type(repeat) is not int or repeat < 1):
            raise ValueError(f"repeat must be a positive int or None, got {repeat!r}")
        self.dealer, self.plan, self.repeat = dealer, plan, repeat
        self.needs = [(key, kind, spec, tuple(parties), count) for key, (kind, spec, parties, count)
                      in plan.needs.items() if count > 0]
        for key, kind, spec, parties, _ in self.needs:
            per_item = dealer._bytes_per_item(key, kind, spec, parties)
            if per_item > dealer.budget_bytes:
                raise ValueError(f"one {kind} item ({per_item} bytes) does not fit budget_bytes="
                                 f"{dealer.budget_bytes}: raise the budget or deal it on demand")
        #: per key, items still to deal (None: no end)
        self.left: dict[Hashable, int] | None = (
            None if repeat is None else {key: count * repeat for key, _, _, _, count in self.needs})
        self.items = self.bytes = 0
        self.error: BaseException | None = None
        self.surfaced = False
        self.done = False
        #: keys a take is waiting for (the thread deals them as soon as one item fits)
        self.hungry: set = set()
        #: a take waits, and not one more item fits the budget: takes fall back to ``on_exhausted``
        self.stuck = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="veil-background-dealer", daemon=True)

    def start(self) -> "BackgroundDealing":
        self._thread.start()
        return self

    # ------------------------------------------------------------ the take's side (under dealer._cond)

    def will_deal(self, key: Hashable) -> bool:
        """Whether a take of ``key`` should wait for this thread (caller holds the dealer's lock)."""
        if self.done or self._stop.is_set() or self.stuck:
            return False
        if self.left is None:
            return any(k == key for k, *_ in self.needs)
        return self.left.get(key, 0) > 0

    # ------------------------------------------------------------ control

    def stop(self, raise_error: bool = True) -> dict:
        """Stops dealing (a request in flight finishes) and joins the thread; keeps what was dealt.

        Returns ``{"items", "bytes"}`` dealt; raises the thread's error if no take surfaced it."""
        self._stop.set()
        cond = self.dealer._cond
        with cond:
            cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        with cond:
            if self.dealer._background is self:
                self.dealer._background = None
            unsurfaced, self.surfaced = (self.error if not self.surfaced else None), True
        if unsurfaced is not None and raise_error:
            raise BackgroundDealingError(f"background dealing failed: {type(unsurfaced).__name__}: "
                                         f"{unsurfaced}") from unsurfaced
        return {"items": self.items, "bytes": self.bytes}

    def wait(self) -> dict:
        """Waits until every call's material was dealt (``repeat`` given), then :meth:`stop`."""
        if self.repeat is None:
            raise ValueError("a background dealing without repeat never finishes: call stop()")
        self._thread.join()
        return self.stop()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "BackgroundDealing":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.stop(raise_error=exc_type is None)

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        dealer = self.dealer
        try:
            call_bytes = sum(count * dealer._bytes_per_item(key, kind, spec, parties)
                             for key, kind, spec, parties, count in self.needs)
            most_calls = max(1, dealer.budget_bytes // max(1, 2 * call_bytes))  # one round: half the budget
            calls = 1
            while not self._stop.is_set() and self.needs:
                for key, kind, spec, parties, count in self.needs:
                    want = count * calls if self.left is None else min(count * calls, self.left[key])
                    while want > 0:
                        fits = self._room_for(key, dealer._bytes_per_item(key, kind, spec, parties), want)
                        if not fits:
                            return  # stopped
                        spare = dealer._pool(key)
                        got = dealer._request(key, kind, spec, list(parties), spare, count=fits)
                        with dealer._cond:
                            want -= got
                            self.items += got
                            self.bytes += got * dealer._bytes_per_item(key, kind, spec, parties)
                            if self.left is not None:
                                self.left[key] -= got
                            dealer._cond.notify_all()
                if self.left is not None and not any(self.left.values()):
                    return
                calls = min(2 * calls, most_calls)
        except BaseException as e:  # noqa: BLE001  (surfaced to the caller at its next take)
            self.error = e
        finally:
            with dealer._cond:
                self.done = True
                self.stuck = False
                dealer._cond.notify_all()

    def _room_for(self, key: Hashable, per_item: int, want: int) -> int:
        """Items of ``key`` to deal now: ``want`` once they fit the budget, or as many as fit (at
        least one) while a take waits; 0 once stopped."""
        dealer = self.dealer
        with dealer._cond:
            while not self._stop.is_set():
                room = (dealer.budget_bytes - dealer.ahead_bytes) // per_item
                if room >= want or (room >= 1 and self.hungry):
                    self.stuck = False
                    return min(room, want)
                stuck = bool(self.hungry)  # the waiting take will not free room: it falls back
                if stuck != self.stuck:
                    self.stuck = stuck
                    dealer._cond.notify_all()
                dealer._cond.wait()
            self.stuck = False
            return 0
