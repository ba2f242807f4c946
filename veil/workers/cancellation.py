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
from typing import Callable, Iterator

from veil.exceptions import CommandCancelledError, CommandTimeoutError


class CancelToken:
    """The limits of one running command: a deadline and a cancellation flag."""

    def __init__(self, what: str = "command", seconds: float | None = None) -> None:
        self.what = what
        self.seconds = seconds
        self.deadline: float | None = None
        self.cancelled = threading.Event()
        self.reason = ""

    def start(self) -> None:
        """Starts the clock (when the command gets to run, not when it was queued)."""
        if self.seconds:
            self.deadline = time.monotonic() + self.seconds

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self.cancelled.set()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise CommandCancelledError(f"{self.what} was cancelled: {self.reason}")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise CommandTimeoutError(
                f"{self.what} ran past the worker's limit of {self.seconds:g} s per command "
                f"(the data owner sets it with --max-command-seconds)"
            )


_local = threading.local()


@contextmanager
def running(token: CancelToken | None, yield_turn: Callable[[], None] | None = None) -> Iterator[None]:
    """Makes ``token`` (and the server's turn-yielding hook) current on this thread."""
    previous = getattr(_local, "token", None), getattr(_local, "yield_turn", None)
    _local.token, _local.yield_turn = token, yield_turn
    try:
        yield
    finally:
        _local.token, _local.yield_turn = previous


def check() -> None:
    """Raises if the current command is past its deadline or was cancelled."""
    token = getattr(_local, "token", None)
    if token is not None:
        token.check()


def checkpoint() -> None:
    """:func:`check`, then lets waiting commands of other sessions run before continuing."""
    check()
    yield_turn = getattr(_local, "yield_turn", None)
    if yield_turn is not None:
        yield_turn()
        check()


class FairLock:
    """A mutex handed to waiters in arrival order (``threading.Lock`` is not fair).

    The server holds it while a request runs, so the store sees one request at a
    time; :meth:`yield_turn` hands it to the next waiter and queues the holder behind.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: deque[threading.Event] = deque()

    def acquire(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # release() handed the lock over: it is ours, still marked held

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._held = False

    def yield_turn(self) -> None:
        """Lets everyone already waiting run first (no-op when nobody waits)."""
        with self._mutex:
            if not self._waiters:
                return
        self.release()
        self.acquire()

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
