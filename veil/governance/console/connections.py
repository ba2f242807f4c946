"""uvicorn's HTTP protocol with two bounds the console needs: it is a thread of the worker's process and
shares its file descriptors, and its port is reachable by every local user (loopback is shared).

- at most ``MAX_CONNECTIONS`` open at once: one more is closed as soon as it is accepted;
- a connection that has not sent a whole request head within ``HEAD_SECONDS`` of opening (or of its last
  response) is closed: idle and half-sent requests (slowloris) do not hold a descriptor for good.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

#: a browser opens about 6 connections per host; the rest of the worker's descriptors stay free
MAX_CONNECTIONS = 32
HEAD_SECONDS = 10.0


class BoundedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.server_state.connections) >= MAX_CONNECTIONS:
            transport.abort()  # frees the descriptor now; never counted as a connection
            return
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self.transport is not None:  # None: refused in connection_made
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and self.scope is not None and not self.cycle.response_complete:
            self._cancel_deadline()  # a whole head arrived: the request runs as long as it needs

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()  # the next request (keep-alive) has the same deadline

    def _await_head(self) -> None:
        self._cancel_deadline()
        self._head_deadline = self.loop.call_later(HEAD_SECONDS, self._head_too_late)

    def _cancel_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_late(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()
