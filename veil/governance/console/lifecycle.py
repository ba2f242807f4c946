"""The console's requests in flight, so that stopping it waits for them before the owner's database closes.

A console request may be in the middle of a database write whose COMMIT answer was lost: its outcome is looked
up for up to ~10 s (workers/database.py). ``ConsoleServer.stop`` used to wait 5 s for the console's thread, and
the worker then closed the database under the request, which went on with a closed database (a decision
recorded without its audit row or lapses, answered with a 500). Now the stop ends the server (uvicorn takes no
new connection and no further request on an open one) and waits for the requests already running, up to
:data:`STOP_WAIT_S`. A request waiting for its client (a body trickled in, an answer the client does not read)
held the stop that long too (anyone reaching the port could): those waits are cut at the stop (:meth:`InFlight.
cut_client_waits`) and such a request is answered 503 in one line, if its answer had not started.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from veil.exceptions import VeilError

#: how long a stop waits for the requests in flight: past a lost COMMIT's lookup (the watchdog's 10 s stall
#: check and 5 s probe) with room to spare
STOP_WAIT_S = 30.0
#: what a request cut at the stop is answered (one line)
STOPPING = b"the owner console is stopping: the worker is shutting down\n"
#: how long the 503 of a request cut at the stop may take to go out
ANSWER_S = 1.0


class ConsoleStopping(VeilError):
    """A request's wait for its client, cut by the stop."""


class InFlight:
    """Counts the console's requests in flight; :meth:`wait_idle` waits until none is."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.count = 0
        self.stopping = False
        self._client_waits: set[tuple] = set()  # (loop, future set at the stop)

    async def from_client(self, awaitable: Any) -> Any:
        """``awaitable`` (a receive or send of the request: it waits for the client), or
        :class:`ConsoleStopping` once the console stops (after the stop: past :data:`ANSWER_S`; a request
        that was in the owner's database at the stop still sends its answer)."""
        if self.stopping:
            try:
                return await asyncio.wait_for(awaitable, ANSWER_S)
            except asyncio.TimeoutError:
                raise ConsoleStopping() from None
        loop = asyncio.get_running_loop()
        entry = (loop, loop.create_future())
        with self._changed:
            self._client_waits.add(entry)
        inner = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait((inner, entry[1]), return_when=asyncio.FIRST_COMPLETED)
        finally:
            with self._changed:
                self._client_waits.discard(entry)
        if inner.done():
            return inner.result()
        inner.cancel()
        raise ConsoleStopping()

    def cut_client_waits(self) -> None:
        """(any thread) ends every wait for a client, now and from now on."""
        with self._changed:
            self.stopping = True
            waits, self._client_waits = self._client_waits, set()
        for loop, cut in waits:
            try:
                loop.call_soon_threadsafe(_cut, cut)
            except RuntimeError:  # (its loop closed meanwhile)
                pass

    def enter(self) -> None:
        with self._changed:
            self.count += 1

    def leave(self) -> None:
        with self._changed:
            self.count -= 1
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Whether every request in flight ended within ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count == 0, timeout)


class TrackRequests:
    """ASGI middleware: each HTTP request is counted in ``in_flight`` while it runs (its handler's thread
    included: the request's task awaits it, and a pool thread is not cancelled with it)."""

    def __init__(self, app: Any, in_flight: InFlight) -> None:
        self.app, self.in_flight = app, in_flight

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        in_flight, started = self.in_flight, []
        in_flight.enter()

        async def receive_or_stop() -> Any:
            return await in_flight.from_client(receive())

        async def send_or_stop(message: dict) -> None:
            await in_flight.from_client(send(message))
            if message.get("type") == "http.response.start":
                started.append(True)

        try:
            await self.app(scope, receive_or_stop, send_or_stop)
        except ConsoleStopping:
            if not started:  # (one line, sent at most ANSWER_S: the client may read nothing)
                try:
                    await asyncio.wait_for(_answer_stopping(send), ANSWER_S)
                except Exception:  # noqa: BLE001 - the client is gone or stalled: nothing more to tell it
                    pass
        finally:
            in_flight.leave()


async def _answer_stopping(send: Any) -> None:
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close"),
                            (b"content-length", str(len(STOPPING)).encode())]})
    await send({"type": "http.response.body", "body": STOPPING})


def _cut(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
