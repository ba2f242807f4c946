"""WebsocketClientWorker: a remote worker, used exactly like a VirtualWorker.

The worker's ``_recv_msg`` forwards the already-serialized request over a
websocket and returns the reply bytes, so everything above it (pointers, send,
get, move, modules) is unchanged. The connection is blocking and needs no event
loop (``websocket_transport``), so it works from plain scripts and from Jupyter
(where an asyncio loop is already running in the main thread).

Failures are explicit: a server that is gone, restarted or silent past
``timeout`` raises :class:`ConnectionLostError` (never a hang); the next request
reconnects (a new session: objects of the old one are gone on the server).

Idle connections stay open: one keepalive thread per process answers the
server's pings on connections nobody is using (``KEEPALIVE_INTERVAL``). A
``lazy`` connection (a worker's peer connection, which holds no session state)
that the server closed anyway is reopened silently on its next request.
"""

from __future__ import annotations

import os
import select
import socket
import ssl as ssl_module
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from veil.exceptions import ConnectionLostError, PermissionDeniedError, SerializationError
from veil.workers.base import BaseWorker
from veil.workers.websocket_admin import AdminLoadMessage, RemoteObjectsView
from veil.workers.skeletons import ClientSkeletons
from veil.workers.websocket_auth import handshake_headers
from veil.messaging.frames import FrameParts, frame_nbytes
from veil.workers.websocket_transport import SEND_FRAGMENT, BlockingConnection

if TYPE_CHECKING:
    from veil.hook import TorchHook

MAX_SIZE_HEADER = "X-Veil-Max-Message"
#: seconds between keepalive polls of idle connections (servers ping every 30 s by default)
KEEPALIVE_INTERVAL = 1.0
#: longest the keepalive thread waits for the next bytes of a posted request's reply that is being received
#: (the thread serves every connection of the process: a peer that stops in the middle of a frame must not hold
#: it, and the other connections' pings, for the whole reply timeout; the connection is dropped instead)
KEEPALIVE_READ_SECONDS = 5.0
DEFAULT_CLIENT_MAX_MESSAGE = 1 << 30  # replies up to 1 GiB (a 100 MB tensor is fine)


class WebsocketClientWorker(BaseWorker):
    """A worker served by ``veil worker`` (a :class:`WebsocketServerWorker`) elsewhere.

    Args:
        hook: the TorchHook whose registry this worker joins.
        id: the remote worker's name (must match the server's ``--id``).
        host: server host name.
        port: server port.
        token: access token (default: the ``VEIL_TOKEN`` environment variable).
        extra_tokens: more tokens presented on the same connection (e.g. another
            user's, to ``.get(user=...)`` as that user, or the owner's admin token).
        secure: use TLS (``wss://``).
        cafile: CA bundle or self-signed certificate to trust for TLS.
        timeout: seconds to wait for each reply before raising ConnectionLostError.
        connect_timeout: seconds to wait for the connection and handshake.
        lazy: connect on first use instead of now (servers use this for peers).
        local_socket: on the same host, move to the worker's Unix socket once authenticated over loopback
            TCP (:mod:`veil.workers.local_socket`; a server's peer links do: SMPC shares between parties).
    """

    #: large requests arrive as FrameParts: the transport writes tensor bytes from their memory
    frame_parts_over = SEND_FRAGMENT

    def __init__(
        self,
        hook: "TorchHook | None" = None,
        id: str | None = None,
        host: str = "localhost",
        port: int = 8777,
        token: str | None = None,
        *,
        extra_tokens: tuple | list = (),
        secure: bool = False,
        cafile: str | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        max_message: int = DEFAULT_CLIENT_MAX_MESSAGE,
        lazy: bool = False,
        local_socket: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(hook, id=id, **kwargs)
        token = token if token is not None else os.environ.get("VEIL_TOKEN")
        if not token:
            raise PermissionDeniedError(
                f"no access token for worker {self.id!r}: pass token=... or set VEIL_TOKEN "
                "(veil workers always authenticate; the worker's owner issues tokens)"
            )
        self.host, self.port = host, int(port)
        self.url = f"{'wss' if secure else 'ws'}://{host}:{self.port}"
        self.timeout, self.connect_timeout, self.max_message = timeout, connect_timeout, max_message
        self._headers = handshake_headers(token, tuple(extra_tokens))
        self._ssl = None
        if secure:
            self._ssl = ssl_module.create_default_context(cafile=cafile)
        self._conn: BlockingConnection | None = None
        self._server_max: int | None = None
        self._lock = threading.Lock()  # one request in flight per connection keeps replies in order
        self._lazy, self._local_socket = lazy, local_socket
        self._lost_while_idle = False
        # Posted requests are numbered (tickets) in the order they were sent; the connection answers them
        # in that order, so the k-th reply read is ticket k's, whichever thread reads it: each poster
        # collects its own ticket's reply, and posts of several threads may be in flight at once.
        self._tickets = 0  # requests posted so far (the last ticket given)
        self._read_upto = 0  # tickets whose replies were read (or lost), in order
        self._early: dict[int, Any] = {}  # replies read ahead of their collect(), by ticket
        self._lost_tickets: set[int] = set()  # tickets whose connection dropped before they were answered
        #: why this link may not connect (a server's peer link whose name the owner revoked), "" when it may
        self.refused = ""
        _watch(self)
        if not lazy:
            with self._lock:
                self._connect()

    # ----------------------------------------------------------- connection

    def _connect(self) -> BlockingConnection:
        if self.refused:
            raise PermissionDeniedError(f"the link to worker {self.id!r} is closed: {self.refused}")
        try:
            conn = BlockingConnection(self.url, self._headers, self._ssl, self.connect_timeout, self.max_message,
                                      local=self._local_socket)
        except InvalidStatus as e:
            status = e.response.status_code
            if status == 401:
                raise PermissionDeniedError(f"worker {self.id!r} at {self.url} refused the access token") from None
            if status == 429:  # (auth_throttle: this address failed too often; said whatever the token)
                wait = e.response.headers.get("Retry-After", "")
                wait = f"{wait} s" if wait.isdigit() else "a while"
                raise PermissionDeniedError(f"worker {self.id!r} at {self.url} refused: too many failed "
                                            f"authentications from this address; try again in {wait}") from None
            raise ConnectionLostError(f"worker {self.id!r} at {self.url} refused the connection (HTTP {status})") from None
        except (OSError, TimeoutError, InvalidHandshake) as e:
            raise ConnectionLostError(f"cannot reach worker {self.id!r} at {self.url}: {type(e).__name__}: {e}") from None
        self._conn = conn  # published before `refused` is read again: refuse() either sees it or is seen here
        if self.refused:  # refused while this connection was being made: it never carries a request
            self._conn = None
            conn.close()
            raise PermissionDeniedError(f"the link to worker {self.id!r} is closed: {self.refused}")
        header = conn.response.headers.get(MAX_SIZE_HEADER)
        self._server_max = int(header) if header and header.isdigit() else None
        # a new connection is a new session: skeleton numbers start over (peers' lazy connections send none)
        self._skeletons = None if self._lazy else ClientSkeletons(conn)
        return conn

    def connect(self) -> "WebsocketClientWorker":
        """(Re)opens the connection now; otherwise it happens on the next request."""
        with self._lock:
            self._drop()
            self._connect()
        return self

    def _drop(self) -> None:
        # replies still owed to posted requests will never come: collect() says so, once each (the
        # replies already read stay valid)
        self._lost_tickets.update(range(self._read_upto + 1, self._tickets + 1))
        self._read_upto = self._tickets
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken: nothing more to release
                pass

    def close(self) -> None:
        """Closes the connection; the server frees every object this session created. A request in flight
        on another thread ends at once with ConnectionLostError (its reply would never be read)."""
        if not self._lock.acquire(blocking=False):
            conn = self._conn  # the other thread holds the lock while it waits for the reply: wake its read
            if conn is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed
                    pass
            self._lock.acquire()
        try:
            self._drop()
        finally:
            self._lock.release()

    def refuse(self, reason: str) -> None:
        """Closes the link and keeps it closed (every later request raises PermissionDeniedError naming
        ``reason``) until :meth:`admit`: a server's peer link to a worker whose name its owner revoked.

        Never waits for a thread using the link: that peer may stall a handshake for the whole connect
        timeout (or a reply for the reply timeout). Its open connection is shut (a request in flight on it
        fails), and a connection being made is closed by :meth:`_connect` as soon as it is made."""
        self.refused = reason or "refused"
        if not self._lock.acquire(blocking=False):
            conn = self._conn
            if conn is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed
                    pass
            return
        try:
            self._drop()
        finally:
            self._lock.release()

    def admit(self) -> None:
        """Lets a refused link connect again (on its next request)."""
        self.refused = ""

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def share_slots(self) -> Any:
        """The share slots the worker handed over the current connection (None off a Unix link)."""
        conn = self._conn
        return conn.slot_maps if conn is not None else None

    def __del__(self) -> None:
        try:
            self._drop()
        except Exception:
            pass

    # ------------------------------------------------------------- transport

    def _keepalive(self) -> None:
        """Answers pings on an idle connection (never waits for a request in flight)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            while self._read_upto < self._tickets:  # a posted request's reply is on its way: poll would
                if self._conn is None or not select.select([self._conn.sock], [], [], 0)[0]:  # drop it: read it
                    return  # (nothing arrived: the request's own thread reads it)
                # a reply being transmitted has each read bounded; a ping ahead of a reply not sent yet (a
                # long command) waits for it with the reply timeout, as the request's own thread would
                arriving = self._conn.data_frame_arriving()
                self._read_owed(KEEPALIVE_READ_SECONDS if arriving else None)
            if self._conn is not None and not self._conn.poll():
                self._drop()
                self._lost_while_idle = True
        finally:
            self._lock.release()

    def _recv_msg(self, data: bytes | FrameParts) -> bytes:
        """Forwards one serialized request and returns the serialized reply."""
        lock = self._lock
        lock.acquire()  # (not ``with``: ~1 K instructions less on every round trip)
        try:
            conn = self._conn
            if (conn is None or self._lost_while_idle or type(data) is not bytes
                    or (self._server_max is not None and len(data) > self._server_max)):
                conn = self._checked_connection(data)  # (the usual small request passes its checks above)
            try:
                conn.send(data)
                while self._read_upto < self._tickets:  # replies to posted requests come first: kept for collect()
                    self._read_owed()
                reply = conn.recv(self.timeout)
            except (TimeoutError, ConnectionClosed, OSError) as e:  # TimeoutError is an OSError
                raise self._connection_lost(e) from None
        finally:
            lock.release()
        if type(reply) is not bytearray and not isinstance(reply, (bytes, bytearray, memoryview)):
            # (the usual small reply is a bytearray, tested first; a large one is an OwnedFrame, or a view of one)
            raise SerializationError(f"worker {self.id!r} answered with a text frame")
        return reply

    def post(self, data: bytes | FrameParts) -> int:
        """Sends one serialized request without waiting and returns its ticket: :meth:`collect` of it
        returns its reply. The outbox posts full batches of deferred commands so this process builds the
        next batch while the worker runs this one."""
        with self._lock:
            return self._send_owed(self._checked_connection(data), data)

    def try_post(self, data: bytes) -> int:
        """:meth:`post` only if that cannot block on this connection: it is open (no connect, no
        reconnect after a loss) and no other thread is using it. Its ticket, or 0: nothing was sent."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            conn = self._conn
            if conn is None or self._lost_while_idle or (self._server_max is not None and len(data) > self._server_max):
                return 0
            return self._send_owed(conn, data)
        finally:
            self._lock.release()

    def _send_owed(self, conn: BlockingConnection, data: bytes | FrameParts) -> int:
        """(Under the lock.) Sends a posted request, whose reply :meth:`collect` then owes; its ticket."""
        try:
            conn.send(data)
        except (ConnectionClosed, OSError) as e:
            raise self._connection_lost(e) from None
        self._tickets += 1
        return self._tickets

    def collect(self, ticket: int) -> bytes:
        """The reply to the request posted with ``ticket`` (ConnectionLostError if the connection dropped
        before it came); the replies of earlier tickets are read on the way and kept for their posters."""
        with self._lock:
            while ticket not in self._early:
                if ticket in self._lost_tickets:
                    self._lost_tickets.discard(ticket)
                    raise ConnectionLostError(f"connection to worker {self.id!r} at {self.url} was lost before it "
                                              "answered a request sent ahead (a batch of deferred commands, a "
                                              "peer fetch); its results are gone")
                if not self._read_upto < ticket <= self._tickets or self._conn is None:
                    raise RuntimeError(f"collect() of ticket {ticket}, which is not owed")
                try:
                    self._read_owed()
                except ConnectionLostError:  # (the drop marked this ticket lost too: reported here, once)
                    self._lost_tickets.discard(ticket)
                    raise
            reply = self._early.pop(ticket)
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            raise SerializationError(f"worker {self.id!r} answered with a text frame")
        return reply

    def _read_owed(self, timeout: float | None = None) -> None:
        """Reads the next owed reply into ``_early`` (under the lock), each read waiting up to ``timeout`` s
        (default: the reply timeout)."""
        try:
            reply = self._conn.recv(timeout=self.timeout if timeout is None else timeout)
        except (TimeoutError, ConnectionClosed, OSError) as e:
            raise self._connection_lost(e) from None
        self._read_upto += 1
        self._early[self._read_upto] = reply

    def _checked_connection(self, data: bytes | FrameParts) -> BlockingConnection:
        """The open connection for a request of ``data`` (under the lock)."""
        if self._lost_while_idle:
            self._lost_while_idle = False
            if not self._lazy:  # the old session's objects are gone on the server: say so
                raise ConnectionLostError(f"worker {self.id!r} at {self.url} closed the idle connection; "
                                          f"objects of that session are gone (the next request reconnects)")
        conn = self._conn if self._conn is not None else self._connect()
        size = frame_nbytes(data)
        if self._server_max is not None and size > self._server_max:
            raise SerializationError(
                f"message of {size} bytes exceeds worker {self.id!r}'s limit of {self._server_max} bytes"
            )
        return conn

    def _connection_lost(self, e: Exception) -> ConnectionLostError:
        """A transport failure: the connection is dropped (a late reply would answer the wrong request;
        the next request starts over)."""
        self._drop()
        if isinstance(e, TimeoutError):
            return ConnectionLostError(f"worker {self.id!r} at {self.url} did not answer within {self.timeout} s")
        if isinstance(e, ConnectionClosed):
            return ConnectionLostError(f"connection to worker {self.id!r} at {self.url} was lost: {e}")
        return ConnectionLostError(f"connection to worker {self.id!r} at {self.url} failed: {e}")

    # ------------------------------------------------------------- owner view

    @property
    def _objects(self) -> RemoteObjectsView:
        """The server's store, id -> object (needs the owner's admin token among the tokens)."""
        return RemoteObjectsView(self)

    def load(self, obj: Any, tags: tuple | list = (), description: str = "", private: bool = False,
             allowed_users: tuple | list | None = None) -> int:
        """Loads owner data on the server (needs the admin token); returns its id."""
        tags = list(tags) or list(getattr(obj, "tags", ()) or ())
        description = description or getattr(obj, "description", "") or ""
        allowed = None if allowed_users is None else [allowed_users] if isinstance(allowed_users, str) \
            else list(allowed_users)  # (one user's name, as sy.private_tensor reads it)
        msg = AdminLoadMessage(obj, tags, description, bool(private), allowed)
        return self.hook.local_worker.send_msg(msg, self).objects[0]

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None else "disconnected"
        return f"<WebsocketClientWorker id:{self.id} {self.url} {state}>"


# ------------------------------------------------------------------ keepalive

_WATCHED: "weakref.WeakSet[WebsocketClientWorker]" = weakref.WeakSet()
_WATCH_LOCK = threading.Lock()
_watcher: threading.Thread | None = None


def _watch(worker: WebsocketClientWorker) -> None:
    global _watcher
    with _WATCH_LOCK:
        _WATCHED.add(worker)
        if _watcher is None or not _watcher.is_alive():
            _watcher = threading.Thread(target=_keepalive_loop, name="veil-keepalive", daemon=True)
            _watcher.start()


def _keepalive_loop() -> None:
    while True:
        time.sleep(KEEPALIVE_INTERVAL)
        with _WATCH_LOCK:
            workers = list(_WATCHED)
        for w in workers:
            try:
                w._keepalive()
            except Exception:  # a broken connection is found again by its next request
                pass
        del workers
