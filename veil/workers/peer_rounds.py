"""The rounds of peer openings a worker's sessions run, and what each publishes to which peers.

One :class:`PeerRounds` per worker (:func:`rounds_of`). A session's peer opening registers its round
(:meth:`PeerRounds.open`: the readers, the peers it publishes to), publishes its outputs once
(:meth:`~PeerRounds.publish`), waits until every reader took them (:meth:`~PeerRounds.wait_taken`) and
ends it (:meth:`~PeerRounds.close`). A peer's fetch takes a round's outputs once per reader, for a round
id this worker registered with the same step (:meth:`~PeerRounds.take` on a handler thread,
:meth:`~PeerRounds.take_on_loop` parked on the event loop). A round is consumed once: when it ends its id
is remembered as closed and later fetches for it are refused. Fetches that arrive before their round is
registered or published wait, bounded in number (in all and per peer) and time. The messages and the
protocol around these rounds: :mod:`veil.workers.peer_openings`.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from veil.exceptions import RemoteExecutionError
from veil.workers import cancellation

#: how long a party waits for the other parties' outputs and for its readers, and a fetch for its round
#: (the environment variable is for tests and very slow machines)
WAIT_SECONDS = float(os.environ.get("VEIL_PEER_WAIT_SECONDS", "60"))
#: rounds open at once on one worker, and fetches waiting for their round (in all, and per peer: an
#: honest peer's connection has one request in flight at a time)
MAX_OPEN_ROUNDS = 64
MAX_WAITING_FETCHES = 32
MAX_WAITING_PER_PEER = 4
#: ended round ids remembered (late fetches for them are refused at once, not left waiting)
CLOSED_MEMORY = 4096


class PeerOpeningError(RemoteExecutionError):
    """A peer opening that cannot go on (a refused or missing share, a party that did not answer)."""


@dataclass
class _Round:
    namespace: str
    name: str
    readers: frozenset  # the peers this party publishes to
    round_id: str = ""
    published: list | None = None
    taken: set = field(default_factory=set)


class PeerRounds:
    """The peer openings a worker's sessions are running, and what they publish to their peers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open: dict[str, _Round] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._waiting: dict[str, int] = {}
        #: per round id, the futures of fetches parked for it on an event loop (:func:`serve_fetch_on_loop`),
        #: resolved when that round is published or ends (then each takes, or is refused)
        self._parked: dict[str, list[tuple[Any, Any]]] = {}

    def _changed(self, *ready: str) -> None:
        """(Under ``_cond``.) Wakes the waiters on threads (fetches, ``wait_taken``) and the fetches parked on a
        loop for the rounds in ``ready``, just published or ended: the only changes that end a fetch's wait
        (each wake is a write to that loop's self-pipe and a turn of the loop)."""
        self._cond.notify_all()
        for round_id in ready:
            for loop, fut in self._parked.pop(round_id, ()):
                try:
                    loop.call_soon_threadsafe(_resolve, fut)
                except RuntimeError:  # that loop is closed (the server stopped): nothing waits there
                    pass

    def open(self, namespace: str, round_id: str, name: str, readers: frozenset) -> _Round:
        """Registers a round whose outputs (once published) go to ``readers``, each once."""
        with self._cond:
            if round_id in self._open or round_id in self._closed:
                raise PeerOpeningError(f"peer opening round {round_id!r} is not fresh")
            if len(self._open) >= MAX_OPEN_ROUNDS:
                raise PeerOpeningError("too many peer openings in progress on this worker")
            rnd = _Round(namespace, name, readers, round_id)
            self._open[round_id] = rnd
            self._changed()
            return rnd

    def publish(self, rnd: _Round, tensors: list) -> None:
        """The round's tensors for its readers (never written afterwards: replies send them from memory)."""
        with self._cond:
            rnd.published = tensors
            self._changed(rnd.round_id)

    def check_fresh(self, round_id: str) -> None:
        """Refuses a round id in use or ended, before the step consumes any dealt mask."""
        with self._cond:
            if round_id in self._open or round_id in self._closed:
                raise PeerOpeningError(f"peer opening round {round_id!r} is not fresh")

    def close(self, round_id: str, rnd: _Round | None = None) -> None:
        """Ends a round (opened, failed or abandoned): its id is never served again."""
        with self._cond:
            if rnd is not None and self._open.get(round_id) is rnd:
                del self._open[round_id]
            elif round_id in self._open:  # another session's round of that id: not ours to end
                return
            self._closed[round_id] = None
            while len(self._closed) > CLOSED_MEMORY:
                self._closed.popitem(last=False)
            self._changed(round_id)

    def end_session(self, namespace: str) -> None:
        with self._cond:
            ended = [r for r, rnd in self._open.items() if rnd.namespace == namespace]
            for round_id in ended:
                del self._open[round_id]
                self._closed[round_id] = None
            self._changed(*ended)

    def take(self, round_id: str, reader: str, name: str, wait: float = WAIT_SECONDS) -> list | None:
        """What ``round_id`` published to peer ``reader``, once; waits up to ``wait`` seconds for the round
        to be registered and published here (None: not yet, ask again)."""
        deadline = time.monotonic() + wait
        with self._cond:
            if not self._ready(round_id):
                self._start_waiting(round_id, reader)
                try:
                    while not self._ready(round_id):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(min(left, 0.5))
                        cancellation.check()  # the fetching peer hung up: free its waiting slot, take nothing
                finally:
                    self._stop_waiting(reader)
            return self._hand_over(round_id, reader, name)

    async def take_on_loop(self, round_id: str, reader: str, name: str, wait: float, closed: Any) -> list | None:
        """:meth:`take` for a fetch served on an event loop: parked (a future resolved when its round is
        published or ends, no thread) instead of blocking, within the same waiting limits. Raises what ``take``
        raises (before anything is taken), and ConnectionError when ``closed`` (the connection's future)
        is done first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        with self._cond:
            if self._ready(round_id):
                return self._hand_over(round_id, reader, name)
            self._start_waiting(round_id, reader)
        try:
            while True:
                fut = loop.create_future()
                with self._cond:
                    if self._ready(round_id):
                        break
                    self._parked.setdefault(round_id, []).append((loop, fut))
                try:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    await asyncio.wait((fut, closed), timeout=left, return_when=asyncio.FIRST_COMPLETED)
                    if closed.done():
                        raise ConnectionError("the fetching peer hung up")
                finally:
                    if not fut.done():  # its round did not change: not left behind in the table
                        with self._cond:
                            parked = [(lp, f) for lp, f in self._parked.get(round_id, ()) if f is not fut]
                            if parked:
                                self._parked[round_id] = parked
                            else:
                                self._parked.pop(round_id, None)
        finally:
            with self._cond:
                self._stop_waiting(reader)
        with self._cond:
            return self._hand_over(round_id, reader, name)

    def _ready(self, round_id: str) -> bool:
        """(Under ``_cond``.) Whether a fetch of ``round_id`` stops waiting: the round published or ended."""
        rnd = self._open.get(round_id)
        return round_id in self._closed or (rnd is not None and rnd.published is not None)

    def _start_waiting(self, round_id: str, reader: str) -> None:
        """(Under ``_cond``.) Counts a fetch that waits, within the limits (raises past them)."""
        rnd = self._open.get(round_id)
        if rnd is not None and reader not in rnd.readers:
            raise PeerOpeningError(f"{reader!r} is not a reader of round {round_id!r}")
        if sum(self._waiting.values()) >= MAX_WAITING_FETCHES \
                or self._waiting.get(reader, 0) >= MAX_WAITING_PER_PEER:
            raise PeerOpeningError("too many peer fetches waiting for their rounds on this worker")
        self._waiting[reader] = self._waiting.get(reader, 0) + 1

    def _stop_waiting(self, reader: str) -> None:
        self._waiting[reader] -= 1
        if not self._waiting[reader]:
            del self._waiting[reader]

    def _hand_over(self, round_id: str, reader: str, name: str) -> list | None:
        """(Under ``_cond``.) The round's outputs for ``reader``, marked taken; None: not published yet."""
        if round_id in self._closed:
            raise PeerOpeningError(f"no peer opening round {round_id!r} here (ended, or never registered)")
        rnd = self._open.get(round_id)
        if rnd is None or rnd.published is None:
            return None  # not registered or not published yet: the fetching party asks again until its wait runs out
        if reader not in rnd.readers:
            raise PeerOpeningError(f"{reader!r} is not a reader of round {round_id!r}")
        if reader in rnd.taken:
            raise PeerOpeningError(f"{reader!r} already took its share of round {round_id!r}")
        if name != rnd.name:
            raise PeerOpeningError(f"round {round_id!r} opens {rnd.name!r}, not {name!r}")
        rnd.taken.add(reader)
        self._changed()
        return rnd.published

    def wait_taken(self, round_id: str, rnd: _Round) -> None:
        """Until every reader took the round's outputs; raises past the wait or when cancelled."""
        deadline = time.monotonic() + WAIT_SECONDS
        with self._cond:
            while len(rnd.taken) < len(rnd.readers):
                if self._open.get(round_id) is not rnd:
                    raise PeerOpeningError(f"peer opening round {round_id!r} was ended")
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(rnd.readers - rnd.taken)
                    raise PeerOpeningError(f"peer opening round {round_id!r}: {missing} never took their shares")
                self._cond.wait(min(left, 0.5))
                cancellation.check()  # the orchestrator disconnected, or the command ran out of time


_MAKE_LOCK = threading.Lock()


def rounds_of(worker: Any) -> PeerRounds:
    rounds = getattr(worker, "_peer_rounds", None)
    if rounds is None:
        with _MAKE_LOCK:  # a fetch (outside the worker lock) and its round's request may both come first
            rounds = getattr(worker, "_peer_rounds", None)
            if rounds is None:
                rounds = worker._peer_rounds = PeerRounds()
    return rounds


def _resolve(fut: Any) -> None:
    if not fut.done():
        fut.set_result(None)
