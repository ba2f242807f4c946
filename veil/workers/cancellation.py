"""Per-command time limits and cancellation, checked cooperatively by long loops.

A network worker runs each command with a :class:`CancelToken` (its deadline,
and a flag set when the session that sent it disconnects). Long-running code
calls :func:`check` (plan interpreter: once per plan execution) or
:func:`checkpoint` (plan ``fit``: once per batch), which raise
:class:`CommandTimeoutError` / :class:`CommandCancelledError` when the command
must stop. ``checkpoint`` also lets commands of other sessions run in between
(the server hands its worker lock to whoever waits, see :class:`FairLock`), so one
long ``fit`` does not block everybody else.

Outside a network worker (in-process workers, local plans) there is no token and
both calls cost one thread-local lookup.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Hashable, Iterable, Iterator

from veil.exceptions import CommandCancelledError, CommandTimeoutError


class CancelToken:
    """The limits of one running command: a deadline and a cancellation flag."""

    def __init__(self, what: str = "command", seconds: float | None = None) -> None:
        self.what = what
        self.seconds = seconds
        self.deadline: float | None = None
        self.cancelled = False  # set once (a bool: read before every command of a batch, never waited on)
        self.reason = ""

    def start(self) -> None:
        """Starts the clock (when the command gets to run, not when it was queued)."""
        if self.seconds:
            self.deadline = time.monotonic() + self.seconds

    def restart(self) -> None:
        """:meth:`start` then :meth:`check` in one call (the next command of a batch: the whole limit
        again, and none starts once cancelled; a deadline just set has not passed)."""
        if self.seconds:
            self.deadline = time.monotonic() + self.seconds
        elif self.deadline is not None:
            self.check()
            return
        if self.cancelled:
            raise CommandCancelledError(f"{self.what} was cancelled: {self.reason}")

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self.cancelled = True

    def check(self) -> None:
        if self.cancelled:
            raise CommandCancelledError(f"{self.what} was cancelled: {self.reason}")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise CommandTimeoutError(
                f"{self.what} ran past the worker's limit of {self.seconds:g} s per command "
                f"(the data owner sets it with --max-command-seconds)"
            )


class _Current(threading.local):
    # class attributes are the per-thread defaults: a getattr(..., None) on a thread that never set
    # them raises and swallows an AttributeError each call (the event loop thread, every request)
    token: "CancelToken | None" = None
    yield_turn: "Callable[[], None] | None" = None
    turn: "FairLock | None" = None


_local = _Current()


@contextmanager
def running(token: CancelToken | None, yield_turn: Callable[[], None] | None = None,
            turn: "FairLock | None" = None) -> Iterator[None]:
    """Makes ``token`` (and the server's turn-yielding hook and worker lock) current on this thread."""
    previous = _local.token, _local.yield_turn, _local.turn
    _local.token, _local.yield_turn, _local.turn = token, yield_turn, turn
    try:
        yield
    finally:
        _local.token, _local.yield_turn, _local.turn = previous


@contextmanager
def outside_turn() -> Iterator[None]:
    """Hands the worker lock back while the block waits on other workers (a peer opening: each party
    waits for the others' shares, which their requests deliver here under this same lock); returns
    holding it again. The block must not touch the store. A no-op outside a network worker's request."""
    turn = _local.turn
    if turn is None:
        yield
        return
    # The block holds no turn: a checkpoint in it hands over none, and an outside_turn nested in it neither
    # releases the lock again (another request's by then) nor takes it twice on the way out (a thread waiting
    # for itself).
    yield_turn, _local.yield_turn, _local.turn = _local.yield_turn, None, None
    turn.release()
    try:
        yield
    finally:
        turn.acquire()
        _local.yield_turn, _local.turn = yield_turn, turn


class FairSlots:
    """Slots keyed by a name (a party), each waiter taking all of the ones it names at once, all or none.

    Requesters (users) are served in turns, each one's waiters in arrival order, one that was just served
    behind the others (``threading.Lock`` is not fair: a session with several connections could take it again
    and again while another's step waited; plain arrival order put an honest step behind every waiting request
    of a requester with K connections). A waiter whose names are all free takes them unless a waiter ahead of
    it that could take its own now needs one of them; a waiter that cannot take its own (one of its names is
    busy) holds nothing back for them, so a dealing queued for a party that never answers keeps no other party
    from the dealings behind it (:mod:`veil.workers.party_slots`)."""

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


class ArrivalSlot(FairSlots):
    """One mutex taken in turns among requesters (:class:`FairSlots` over a single name): an honest step waits
    for at most one step of each other requester (and the one holding the slot); a waiter cancelled meanwhile
    gives its place up."""

    _ONE = ("slot",)

    def try_take(self) -> bool:  # type: ignore[override]
        return super().try_take(self._ONE)

    def take(self, poll: Callable[[], None], interval: float = 0.05,  # type: ignore[override]
             requester: object = None) -> None:
        """Waits for the slot in ``requester``'s turn behind its own earlier waiters, calling ``poll`` (which
        may raise) between waits."""
        super().take(self._ONE, poll, interval, requester)

    def release(self) -> None:  # type: ignore[override]
        super().release(self._ONE[0])


@contextmanager
def one_at_a_time(slot: ArrivalSlot, requester: object = None) -> Iterator[Callable[[], None]]:
    """Holds ``slot`` for the block: a section that hands the turn over (:func:`checkpoint`) yet must run alone
    on this worker. Waited for outside the turn, in ``requester``'s turn (:class:`ArrivalSlot`), its deadline
    and cancellation checked, so the holder gets its turn back meanwhile. The block gets a call that gives the
    slot up early (a provider's dealing, once its material is made, before it waits on the parties). Outside a
    network worker's request nothing is held (no turn is handed over there)."""
    if _local.turn is None:
        yield _nothing
        return
    if not slot.try_take():
        with outside_turn():
            slot.take(check, requester=requester)
    held = [True]
    lock = threading.Lock()

    def give_up() -> None:
        with lock:  # (once: a second release would free the slot of the step that took it next)
            if not held[0]:
                return
            held[0] = False
        slot.release()

    try:
        yield give_up
    finally:
        give_up()


def _nothing() -> None:
    return None


def in_request_turn() -> bool:
    """Whether this thread runs a network worker's request holding its turn (not inside :func:`outside_turn`)."""
    return _local.turn is not None


def running_in(turn: "FairLock") -> bool:
    """Whether this thread runs a request in ``turn`` now (holds it: not inside :func:`outside_turn`)."""
    return _local.turn is turn


def check() -> None:
    """Raises if the current command is past its deadline or was cancelled."""
    token = _local.token
    if token is not None:
        token.check()


def current_token() -> CancelToken | None:
    """The running command's token (None outside a network worker's request). A batch of deferred
    commands restarts its clock per command: a batch is not one command."""
    return _local.token


def checkpoint() -> None:
    """:func:`check`, then lets waiting commands of other sessions run before continuing."""
    check()
    yield_turn = _local.yield_turn
    if yield_turn is not None:
        yield_turn()
        check()


class FairLock:
    """A mutex handed over in arrival order, where long commands give way to short ones.

    The server holds it while a request runs, so the store sees one request at a
    time (``threading.Lock`` is not fair, so waiters are queued explicitly). A
    long command calls :meth:`yield_turn` between batches: it hands the lock to
    the waiting requests and queues itself in a *background* queue, served when
    no ordinary request waits, or once it has waited ``max_background_wait``
    seconds (so it still progresses, and still reaches its deadline, under load).
    """

    def __init__(self, max_background_wait: float = 0.1) -> None:
        self.max_background_wait = max_background_wait
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: deque[threading.Event] = deque()
        self._background: deque[tuple[threading.Event, float]] = deque()

    def _next(self) -> threading.Event | None:
        """Who gets the lock now (called with the mutex held)."""
        if self._background and (
            not self._waiters or time.monotonic() - self._background[0][1] > self.max_background_wait
        ):
            return self._background.popleft()[0]
        if self._waiters:
            return self._waiters.popleft()
        return None

    def acquire(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # the releaser handed the lock over: it is ours, still marked held

    def try_acquire(self) -> bool:
        """Takes the lock only if nobody holds it (the server's inline fast path); never waits."""
        if self._held:  # (a stale read only sends this request to a handler thread; the test below decides)
            return False
        mutex = self._mutex
        mutex.acquire()  # (not ``with``: this runs for every request, ~1 K instructions less)
        try:
            if self._held:
                return False
            self._held = True
            return True
        finally:
            mutex.release()

    def release(self) -> None:
        mutex = self._mutex
        mutex.acquire()
        try:
            if not self._waiters and not self._background:  # the usual case (every inline request): no call
                self._held = False
                return
            turn = self._next()
            if turn is not None:
                turn.set()
            else:
                self._held = False
        finally:
            mutex.release()

    def yield_turn(self) -> None:
        """Lets the waiting requests run first (no-op when nobody waits); returns holding the lock."""
        with self._mutex:
            if not self._waiters:
                return
            mine = threading.Event()
            self._background.append((mine, time.monotonic()))
            turn = self._next()
            turn.set()  # never ours: an ordinary request waits, and ours has not waited yet
        mine.wait()

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
