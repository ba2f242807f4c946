"""The console's requests in flight, so that stopping it waits for them before the owner's database closes.

A console request may be in the middle of a database write whose COMMIT answer was lost: its outcome is looked
up for up to ~10 s (workers/database.py). ``ConsoleServer.stop`` used to wait 5 s for the console's thread, and
the worker then closed the database under the request, which went on with a closed database (a decision
recorded without its audit row or lapses, answered with a 500). Now the stop ends the server (uvicorn takes no
new connection and no further request on an open one) and waits for the requests already running, up to
:data:`STOP_WAIT_S`.
"""

from __future__ import annotations

import threading
from typing import Any

#: how long a stop waits for the requests in flight: past a lost COMMIT's lookup (the watchdog's 10 s stall
#: check and 5 s probe) with room to spare
STOP_WAIT_S = 30.0


class InFlight:
    """Counts the console's requests in flight; :meth:`wait_idle` waits until none is."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.count = 0

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
        self.in_flight.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.leave()
