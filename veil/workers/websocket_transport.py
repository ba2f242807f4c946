"""A blocking websocket connection for request/reply clients, on websockets' sans-I/O protocol.

Why not ``websockets.sync.client``: it reads on a background thread and hands
each message to the caller through a queue, a thread hop per reply that costs
more than the rest of a small remote op. A request/reply client has exactly one
message in flight, so the calling thread can read its reply from the socket
itself. The websocket protocol (handshake, framing, masking, ping/pong, close)
is still entirely the websockets library's; this file only moves bytes.
It needs no event loop, so it works the same from scripts and from Jupyter.
"""

from __future__ import annotations

import secrets
import select
import socket
import ssl as ssl_module
from typing import Any

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidHandshake
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the pure-Python fallback of the same library
    from websockets.utils import apply_mask

_READ_CHUNK = 1 << 20
#: large messages are masked in chunks of this size (a multiple of 4: each chunk starts at mask offset 0)
_MASK_CHUNK = 1 << 18


class BlockingConnection:
    """One websocket connection, used by one thread at a time (callers hold a lock).

    Args:
        url: ``ws://host:port`` or ``wss://host:port``.
        headers: extra handshake headers (authentication).
        ssl_context: TLS context for ``wss://``.
        open_timeout: seconds for TCP connect + TLS + handshake.
        max_size: largest message accepted from the server, in bytes.

    Raises:
        InvalidHandshake: the server refused the handshake (``InvalidStatus`` has the HTTP status).
        OSError: the server cannot be reached (``TimeoutError`` on timeout).
    """

    def __init__(self, url: str, headers: dict[str, str], ssl_context: "ssl_module.SSLContext | None" = None,
                 open_timeout: float = 10.0, max_size: int | None = None) -> None:
        uri = parse_uri(url)
        self.protocol = ClientProtocol(uri, max_size=max_size)
        self._buffer = memoryview(bytearray(_READ_CHUNK))
        sock = socket.create_connection((uri.host, uri.port), timeout=open_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests must not wait for Nagle
            if uri.secure:
                context = ssl_context or ssl_module.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=uri.host)
            self.sock = sock
            request = self.protocol.connect()
            request.headers.update(headers)
            self.protocol.send_request(request)
            self._flush()
            self.response = self._await_handshake()
        except BaseException:
            sock.close()
            raise
        self._parts: list[bytes] = []

    def _flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            if chunk:
                self.sock.sendall(chunk)

    def _feed(self) -> list[Any]:
        # Into one buffer kept for the connection: sock.recv(1 MiB) allocates (and maps) a fresh
        # MiB per call, ~15 us for every small reply; the protocol copies what it is fed anyway.
        n = self.sock.recv_into(self._buffer)
        if n:
            self.protocol.receive_data(self._buffer[:n])
        else:
            self.protocol.receive_eof()
        events = self.protocol.events_received()
        self._flush()  # pongs and close acknowledgements
        return events

    def _await_handshake(self) -> Response:
        while True:
            for event in self._feed():
                if isinstance(event, Response):
                    if self.protocol.handshake_exc is not None:
                        raise self.protocol.handshake_exc
                    return event
            if self.protocol.handshake_exc is not None:
                raise self.protocol.handshake_exc
            if self.protocol.close_expected() or self.protocol.state.name == "CLOSED":
                raise InvalidHandshake("connection closed during the opening handshake")

    def send(self, data: bytes) -> None:
        """Sends one binary message."""
        protocol = self.protocol
        if protocol.state is not State.OPEN or protocol.expect_continuation_frame or protocol.extensions:
            protocol.send_binary(data)  # let the library raise or frame it
            self._flush()
            return
        # One final, masked binary frame (RFC 6455 5.2), exactly what send_binary would write, without
        # Frame.serialize's copies: small messages go out in one write, large ones are masked in
        # cache-sized chunks straight from the caller's buffer.
        self._flush()
        n = len(data)
        mask = secrets.token_bytes(4)
        if n < 126:
            head = bytes((0x82, 0x80 | n))
        elif n < 1 << 16:
            head = b"\x82\xfe" + n.to_bytes(2, "big")
        else:
            head = b"\x82\xff" + n.to_bytes(8, "big")
        if n <= _MASK_CHUNK:
            self.sock.sendall(head + mask + apply_mask(data, mask))
            return
        self.sock.sendall(head + mask)
        view = memoryview(data).cast("B")
        for at in range(0, n, _MASK_CHUNK):
            self.sock.sendall(apply_mask(view[at: at + _MASK_CHUNK], mask))

    def recv(self, timeout: float | None) -> bytes | bytearray | str:
        """Blocks until the next whole message arrives (``TimeoutError`` after ``timeout`` s).

        A binary message may come back as a ``bytearray`` (the frame's own buffer, not copied again).
        """
        self.sock.settimeout(timeout)
        while True:
            for event in self._feed():
                if not isinstance(event, Frame):
                    continue
                if event.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
                    if event.opcode is not Opcode.CONT:
                        self._parts = []
                        self._text = event.opcode is Opcode.TEXT
                    self._parts.append(event.data)
                    if event.fin:  # a whole frame's data is already a fresh buffer: no copy
                        data = b"".join(self._parts) if len(self._parts) > 1 else self._parts[0]
                        self._parts = []
                        return data.decode() if self._text else data
            state = self.protocol.state.name
            if state == "CLOSED":
                raise self.protocol.close_exc
            if state == "CLOSING":  # the peer sent its close frame: nothing more will come
                rcvd, sent = self.protocol.close_rcvd, self.protocol.close_sent
                raise ConnectionClosedError(rcvd, sent, True if rcvd is not None and sent is not None else None)

    def poll(self) -> bool:
        """Handles frames that arrived while idle (answers the server's keepalive pings).

        Returns:
            False once the connection is closed (the server gave up on it, or the socket broke).
        """
        previous = self.sock.gettimeout()  # a later send must not inherit the short poll timeout
        try:
            while select.select([self.sock], [], [], 0)[0]:
                self.sock.settimeout(1.0)
                self._feed()  # the protocol queues a pong per ping; _feed sends it
                if self.protocol.state.name != "OPEN":
                    return False
        except (OSError, ConnectionClosed):  # TimeoutError is an OSError
            return False
        finally:
            try:
                self.sock.settimeout(previous)
            except OSError:
                pass
        return self.protocol.state.name == "OPEN"

    def close(self) -> None:
        """Sends a close frame (best effort) and closes the socket."""
        try:
            if self.protocol.state.name == "OPEN":
                self.protocol.send_close()
                self.sock.settimeout(0.5)
                self._flush()
        except (OSError, ConnectionClosed):
            pass
        finally:
            self.sock.close()
