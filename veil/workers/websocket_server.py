"""WebsocketServerWorker: a data owner's worker served over websockets (asyncio).

Each connection is authenticated in the opening handshake (see
``websocket_auth``) and becomes a session. Requests from all sessions are
handled one at a time on a single handler thread: the store needs no locks,
torch ops do not compete for the 2 CPU cores they would share anyway, and the
asyncio loop stays free to read, refuse and answer other connections while an
operation runs.

Per request the server
- replaces the envelope's claimed sender with the session id (so ``created_by``
  is the authenticated session, never a name the client chose),
- hands the reference monitor (``veil/workers/monitor.py``) a Principal for
  the session: the monitor scopes names to the session's namespace (its own
  objects, the owner's shared data, hand-offs), applies the owner's rules and
  writes every release and refusal to this worker's audit log (OwnerDB), and
- checks any claimed ``user`` of a get/move against the principals the
  connection proved.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from veil.exceptions import PermissionDeniedError, WorkerNotFoundError
from veil.messaging import messages as m
from veil.messaging.serde import serialize
from veil.workers.base import BaseWorker
from veil.workers.monitor import Principal
from veil.workers.persistence import OwnerDB
from veil.workers.websocket_auth import Session, TokenTable, authenticate, tokens_from_headers
from veil.workers.websocket_client import MAX_SIZE_HEADER

if TYPE_CHECKING:
    import ssl

    from veil.hook import TorchHook

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE = 256 * 2**20
DEFAULT_MAX_CONNECTIONS = 64

#: requests that move data out of the worker -> audit action name
OUTBOUND: dict[type, str] = {m.GetObjectsMessage: "get", m.MoveMessage: "move", m.RemoteGetMessage: "remote_get"}


def _ids_of(msg: Any) -> list:
    if type(msg) is m.RemoteGetMessage:
        return [msg.id]
    ids = getattr(msg, "ids", None)
    return ids if isinstance(ids, list) else []


class WebsocketServerWorker(BaseWorker):
    """A worker that serves authenticated network clients.

    Args:
        hook: the TorchHook of the server process.
        id: the worker's name (clients use the same name).
        host: interface to listen on (``127.0.0.1`` by default: expose it on purpose).
        port: TCP port; 0 picks a free one (see :attr:`bound_port` once ready).
        tokens: who may connect, as whom (at least one token is required).
        db: durable audit log and key-value/ledger store (in memory if None).
        max_message: largest request accepted, in bytes; larger ones close that
            connection with code 1009 (clients check the advertised limit first).
        ssl_context: serve TLS (``wss://``) when given.
        max_connections: further connections are refused with HTTP 503.
    """

    def __init__(
        self,
        hook: "TorchHook | None" = None,
        id: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8777,
        tokens: TokenTable | None = None,
        *,
        db: OwnerDB | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        ssl_context: "ssl.SSLContext | None" = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(hook, id=id, **kwargs)
        if tokens is None or len(tokens) == 0:
            raise ValueError(f"worker {self.id!r} needs at least one access token to serve")
        self.host, self.port, self.tokens = host, port, tokens
        self.db = db if db is not None else OwnerDB()
        self.monitor.audit_sink = self._audit_row  # audit rows go to the owner's durable log
        self.max_message, self.ssl_context, self.max_connections = max_message, ssl_context, max_connections
        self.peers: dict[str, BaseWorker] = {}
        self.bound_port: int | None = None
        self.sessions: dict[str, Session] = {}
        self._handshakes: dict[ServerConnection, Session] = {}
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"veil-{self.id}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None

    # ------------------------------------------------------------ peers

    def add_peer(self, worker: BaseWorker) -> None:
        """Lets this worker reach ``worker`` (moves, pointer chains). Only peers are reachable."""
        self.peers[worker.id] = worker

    def resolve_worker(self, worker_id: str) -> BaseWorker:
        peer = self.peers.get(worker_id)
        if peer is None:
            raise WorkerNotFoundError(
                f"worker {self.id!r} has no peer {worker_id!r} (the data owner configures peers with --peer)"
            )
        return peer

    # ------------------------------------------------------------ requests

    def current_session(self) -> Session | None:
        """The session whose request is being handled on this thread (None outside requests)."""
        return getattr(self._local, "session", None)

    def serve_bytes(self, data: bytes, session: Session) -> bytes:
        """Handles one request of ``session``; always returns reply bytes."""
        self._local.session = session
        try:
            return self._recv_msg(data)
        finally:
            self._local.session = None

    def principal(self, sender: str) -> Principal:
        """The authenticated session (the claimed sender is ignored); plain worker semantics in-process."""
        session = self.current_session()
        if session is None:
            return super().principal(sender)
        principal = session.principal
        if principal is None:
            principal = session.principal = Principal(
                session.id, session.user, namespace=session.id,
                roles=frozenset(p.role for p in session.principals), isolated=True)
        return principal

    def _audit_row(self, action: str, principal: Principal, ids: list, outcome: str, detail: str) -> None:
        self._audit(action, principal.user, principal.session, ids, outcome, detail)

    def requesting_user(self) -> str | None:
        session = self.current_session()
        return session.user if session is not None else super().requesting_user()

    def _handle(self, msg: Any, sender: str) -> Any:
        session = self.current_session()
        if session is None:  # in-process use (owner scripts, tests): plain worker semantics
            return super()._handle(msg, sender)
        action = OUTBOUND.get(type(msg))
        principal = session.user
        try:
            if action in ("get", "move"):
                principal = msg.user = session.claim_user(msg.user)
            return super()._handle(msg, session.id)
        except PermissionDeniedError as e:
            if not getattr(e, "audited", False):  # the monitor wrote its own refusals
                self._audit(action or type(msg).__name__, principal, session.id, _ids_of(msg), "refused", str(e))
            raise

    def _audit(self, action: str, principal: str, session: str, ids: list, outcome: str, detail: str) -> None:
        try:
            self.db.audit(self.id, action, principal, session, ids, outcome, detail)
        except Exception:  # a full disk must not turn a refusal into an allowed request
            log.exception("worker %s: could not write the audit log", self.id)
            if outcome == "allowed":
                raise

    def end_session(self, session: Session) -> int:
        """Frees everything the session created; returns how many objects were freed."""
        self.sessions.pop(session.id, None)
        return self.monitor.end_session(session.id)

    # ------------------------------------------------------------ handshake

    def _check_handshake(self, connection: ServerConnection, request: Any) -> Any:
        if len(self.sessions) + len(self._handshakes) >= self.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        try:
            session = authenticate(self.tokens, tokens_from_headers(request.headers))
        except PermissionDeniedError as e:
            peer = connection.remote_address[0] if connection.remote_address else "?"
            self.db.audit(self.id, "connect", "?", "-", (), "refused", f"from {peer}: {e}")
            return connection.respond(HTTPStatus.UNAUTHORIZED, "access token required\n")
        self._handshakes[connection] = session
        return None

    def _add_headers(self, connection: ServerConnection, request: Any, response: Any) -> Any:
        response.headers[MAX_SIZE_HEADER] = str(self.max_message)
        return response

    async def _on_connection(self, ws: ServerConnection) -> None:
        session = self._handshakes.pop(ws)
        self.sessions[session.id] = session
        loop = asyncio.get_running_loop()
        try:
            async for data in ws:
                if isinstance(data, str):
                    reply = serialize(m.ErrorReply("SerializationError", "text frames are not accepted; send binary"),
                                      sender=self.id)
                else:
                    reply = await loop.run_in_executor(self._executor, self.serve_bytes, data, session)
                await ws.send(reply)
        except ConnectionClosed:
            pass  # the client went away (or sent an oversized frame): free its objects below
        finally:
            await loop.run_in_executor(self._executor, self.end_session, session)

    # ------------------------------------------------------------ lifecycle

    async def serve_async(self, on_ready: Callable[["WebsocketServerWorker"], None] | None = None,
                          handle_signals: bool = False) -> None:
        """Serves until :meth:`stop` (or SIGINT/SIGTERM when ``handle_signals``)."""
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self.stop)
        async with serve(
            self._on_connection, self.host, self.port, process_request=self._check_handshake,
            process_response=self._add_headers, max_size=self.max_message, max_queue=4, compression=None,
            ssl=self.ssl_context, open_timeout=10, ping_interval=30, ping_timeout=60, close_timeout=2,
        ) as server:
            self.bound_port = next(iter(server.sockets)).getsockname()[1]
            if on_ready is not None:
                on_ready(self)
            await self._stop
        self._executor.shutdown(wait=True)
        for peer in self.peers.values():
            close = getattr(peer, "close", None)
            if close is not None:
                close()
        self.db.close()

    def serve_forever(self, on_ready: Callable[["WebsocketServerWorker"], None] | None = None,
                      handle_signals: bool = True) -> None:
        """Blocking :meth:`serve_async` (the ``veil worker`` command)."""
        asyncio.run(self.serve_async(on_ready, handle_signals))

    def stop(self) -> None:
        """Stops serving (thread-safe); open connections are closed, their objects freed."""
        loop, fut = self._loop, self._stop
        if loop is None or fut is None:
            return

        def _set() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.call_soon_threadsafe(_set)

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{self.host}:{self.bound_port or self.port}"
