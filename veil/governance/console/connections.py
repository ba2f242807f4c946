"""uvicorn's HTTP protocol with the bounds the console needs: it is a thread of the worker's process and
shares its file descriptors, and its port is reachable by every local user (loopback is shared).

- at most ``MAX_CONNECTIONS`` open at once: one more takes the place of another, so connections held open by
  a slow client (anyone on loopback) do not lock the owner out. Never one answering a request of the owner's
  session (the app marks it: :func:`mark_owner_request`); first those that never carried such a request nor
  one sent to the secret host name (:class:`SessionHostMark`), those of the source (``auth_throttle.source_of``)
  holding the most connections first, then oldest first (by when they opened: a client that pipelines
  requests, or does not read its answers, is always "being answered" and used to be kept for good); then
  those that carried a request to the secret name (an owner not logged in yet), or come from a source an
  owner's session was seen from (off loopback: an owner whose session ended, logging in again), then the
  owner's idle keep-alive connections, longest idle first. With every connection answering the owner, the new one is
  closed at once;
- a connection that has not sent a whole request head within ``HEAD_SECONDS`` of opening (or of its last
  response) is closed: idle and half-sent requests (slowloris) do not hold a descriptor for good;
- a request whose body is not all in ``BODY_SECONDS`` after its head, or that is not answered in full
  ``REQUEST_SECONDS`` after its head (a client that does not read the answer), is closed: a body trickled a
  byte at a time does not hold a descriptor for good either;
- a request (head and body) of more than ``MAX_REQUEST_BYTES`` is closed (the console's forms are a few
  hundred bytes; ``app.MAX_FORM_BYTES`` answers a too-large form with a 413 before this);
- served as https (:func:`tls_protocol`), the TLS handshake runs on a connection already counted, replaceable
  and under the head deadline: a server's own TLS (asyncio's) hands a connection over only once its
  handshake is done, and held each one that never finished it, uncounted, for 60 s (anyone on the network
  could take every descriptor of the worker's process with stalled handshakes).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from veil.workers.auth_throttle import source_of

#: a browser opens about 6 connections per host; the rest of the worker's descriptors stay free
MAX_CONNECTIONS = 32
HEAD_SECONDS = 10.0
BODY_SECONDS = 10.0
#: far longer than any console page should take to answer
REQUEST_SECONDS = 90.0
MAX_REQUEST_BYTES = 256 * 1024


def tls_protocol(certfile: str, keyfile: str) -> type:
    """The console's protocol serving https with this certificate and key (loaded here: a bad pair raises)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return type("TLSBoundedH11Protocol", (BoundedH11Protocol,), {"tls": context})


#: the ASGI scope key of a request's :class:`_RequestMark`
OWNER_MARK = "veil.console.request"
#: the uvicorn ServerState attribute: sources (``source_of``) an owner's session was seen from -> when (loop
#: time); at most MAX_OWNER_SOURCES, the least recent dropped (only the owner's requests add to it)
OWNER_SOURCES = "veil_owner_sources"
MAX_OWNER_SOURCES = 16


class _RequestMark:
    __slots__ = ("owner", "session_host")

    def __init__(self) -> None:
        self.owner = False
        self.session_host = False  # sent to the console's secret host name (ConsoleServer.host_name)


def mark_owner_request(scope: dict) -> None:
    """The app found the owner's session on this request: its connection is not replaced while it is answered,
    and is replaced last afterwards (a scope of another server, e.g. a test client's, has no mark)."""
    mark = scope.get(OWNER_MARK)
    if mark is not None:
        mark.owner = True


def replaced_first(connections: Any) -> "BoundedH11Protocol | None":
    """The connection a new one takes the place of when all slots are held (None: every one is answering the
    owner)."""
    others = [c for c in connections if isinstance(c, BoundedH11Protocol) and c._replaceable()]
    if not others:
        return None
    per_source = Counter(c._source for c in others)
    owner_sources = getattr(getattr(others[0], "server_state", None), OWNER_SOURCES, {})
    return min(others, key=lambda c: c._replace_order(per_source, owner_sources))


class SessionHostMark:
    """ASGI middleware: a request sent to the console's secret host name (which only the owner was shown) marks
    its connection, which is then replaced only after every connection that never sent one: an owner who has
    the log-in page open but has not logged in yet is not pushed out by anyone on loopback reconnecting in a
    loop (their connections replace each other)."""

    def __init__(self, app: Any, session_host: str) -> None:
        self.app, self.session_host = app, session_host.lower().encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        mark = scope.get(OWNER_MARK) if scope["type"] == "http" else None
        if mark is not None:
            host = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"")
            mark.session_host = host.lower().rsplit(b":", 1)[0] == self.session_host
        await self.app(scope, receive, send)


class BoundedH11Protocol(H11Protocol):
    #: where set (:func:`tls_protocol`), each connection's TLS handshake runs here, under these bounds
    tls: ssl.SSLContext | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._timed_cycle: Any = None  # the request whose body and answer deadlines run
        self._request_bytes = 0
        self._waiting_since = 0.0  # (loop time) when its current wait for a head or a request began
        self._opened_at = 0.0  # (loop time)
        self._mark = _RequestMark()  # the current request's: the app marks a request of the owner's session
        self._carried_owner = False  # whether any request on it was the owner's (a logged-in browser's)
        self._carried_session_host = False  # whether any was sent to the secret host name (SessionHostMark)
        self._handshaking: bytearray | None = None  # while its TLS handshake runs here (tls)
        self._source = "?"  # the client's address as auth_throttle groups them (loopback is one source)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self._source = source_of(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if len(self.server_state.connections) >= MAX_CONNECTIONS:
            victim = replaced_first(self.server_state.connections)
            if victim is None:
                transport.abort()  # frees the descriptor now; never counted as a connection
                return
            victim.transport.abort()  # (its connection_lost follows)
        self._opened_at = self.loop.time()
        if self.tls is not None and not transport.get_extra_info("sslcontext"):
            # counted, replaceable and under the head deadline while its handshake runs (which closing this
            # transport ends); the HTTP protocol starts on the TLS transport the handshake makes
            transport.pause_reading()  # (the client's first bytes are the handshake's: start_tls reads them)
            self.connections.add(self)
            self.transport = transport
            self._await_head()
            self._tls_task = self.loop.create_task(self._start_tls(transport, self.tls))  # (held: not collected)
            return
        super().connection_made(transport)
        self._await_head()

    async def _start_tls(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        self._handshaking = bytearray()  # what arrives right after the handshake, before start_tls returns
        try:
            secured = await self.loop.start_tls(transport, self, context, server_side=True,
                                                ssl_handshake_timeout=HEAD_SECONDS)
        except Exception:  # noqa: BLE001 - any failed handshake (start_tls closed the connection)
            secured = None
        if secured is None or transport.is_closing():  # failed, or closed by a deadline or a replacement
            self._cancel_deadline()
            self.connections.discard(self)
            if secured is not None:
                secured.abort()
            return
        early, self._handshaking = bytes(self._handshaking), None
        super().connection_made(secured)  # (the head deadline set at the connection goes on running)
        if early:
            self.data_received(early)

    def _replaceable(self) -> bool:
        """Whether a new connection may take this one's place: not while it answers a request of the owner's
        session (its body still coming included: bounded by its deadlines), nor once it is closing."""
        if self.transport is None or self.transport.is_closing():
            return False
        answering = self.cycle is not None and not self.cycle.response_complete
        return not (answering and self._mark.owner)

    def _replace_order(self, per_source: Counter, owner_sources: Any = ()) -> tuple:
        """Which goes first: connections that never carried an owner's request nor one to the secret host name,
        those of the source holding the most connections first (off loopback, an owner not logged in yet is
        not pushed out by another address's reconnect loop), then by age (their own requests, pipelined or
        unread, do not make them look new); then those that carried one to the secret name (on loopback, an
        owner not logged in yet) or come from a source an owner's session was seen from (off loopback, an
        owner logging in again: a browser's ~6 connections made her source the largest, first replaced by
        a loop spread over 6 sources), then the owner's, each longest idle first."""
        if self._carried_owner or self._mark.owner:
            return (2, 0, self._waiting_since)
        if self._carried_session_host or self._mark.session_host or self._source in owner_sources:
            return (1, 0, self._waiting_since)
        return (0, -per_source[self._source], self._opened_at)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self.transport is not None:  # None: refused in connection_made
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._handshaking is not None:  # (the TLS transport reads on before start_tls hands it over)
            self._handshaking += data
            if len(self._handshaking) > MAX_REQUEST_BYTES:
                self.transport.close()
            return
        self._request_bytes += len(data)  # since the last answer (or the connection) began
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._request_bytes > MAX_REQUEST_BYTES:
            self.transport.close()
            return
        self._time_new_request()

    def _note_owner_source(self) -> None:
        """Remembers this connection's source once it carried an owner's request (bounded, per server). Never
        loopback: every local user shares it, and there the secret host name tells the owner apart."""
        if self._source in ("loopback", "?"):
            return
        seen = getattr(self.server_state, OWNER_SOURCES, None)
        if seen is None:
            seen = {}
            setattr(self.server_state, OWNER_SOURCES, seen)
        seen.pop(self._source, None)
        seen[self._source] = self.loop.time()
        while len(seen) > MAX_OWNER_SOURCES:
            del seen[next(iter(seen))]  # (the least recent: insertion order)

    def on_response_complete(self) -> None:
        if self._mark.owner:
            self._note_owner_source()
        self._carried_owner |= self._mark.owner
        self._carried_session_host |= self._mark.session_host
        super().on_response_complete()
        self._request_bytes = 0
        if not self.transport.is_closing() and not self._time_new_request():  # (one pipelined behind it)
            self._await_head()  # the next request (keep-alive) has the same deadline

    def _time_new_request(self) -> bool:
        """Starts the body and answer deadlines of a request whose head just arrived (the head's is over)."""
        cycle = self.cycle
        if cycle is None or cycle is self._timed_cycle or cycle.response_complete:
            return False
        if self._mark.owner:
            self._note_owner_source()
        self._carried_owner |= self._mark.owner
        self._carried_session_host |= self._mark.session_host
        self._mark = cycle.scope[OWNER_MARK] = _RequestMark()  # (the app runs after this: its task is queued)
        self._timed_cycle, self._waiting_since = cycle, self.loop.time()
        self._set_deadline(BODY_SECONDS, self._body_too_late)
        return True

    def _await_head(self) -> None:
        self._waiting_since = self.loop.time()
        self._set_deadline(HEAD_SECONDS, self._head_too_late)

    def _set_deadline(self, seconds: float, callback: Any) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, callback)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_late(self) -> None:
        self._deadline = None
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()

    def _body_too_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.cycle is not self._timed_cycle or self.cycle.response_complete:
            return
        if self.conn.their_state is h11.SEND_BODY:
            self.transport.close()
        else:  # the body is in: the answer has the rest of the request's time
            self._set_deadline(max(0.0, REQUEST_SECONDS - BODY_SECONDS), self._answer_too_late)

    def _answer_too_late(self) -> None:
        self._deadline = None
        if not self.transport.is_closing() and self.cycle is self._timed_cycle and not self.cycle.response_complete:
            self.transport.close()
