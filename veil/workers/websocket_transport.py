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

import logging
import secrets
import select
import socket
import ssl as ssl_module
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidHandshake
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from veil.messaging.frames import FrameParts, frame_pad, owned_buffer
from veil.workers import local_socket, share_slots
from veil.workers.share_slots import SlotMaps

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the pure-Python fallback of the same library
    from websockets.utils import apply_mask


class NoWireLogger(logging.LoggerAdapter):
    """The logger veil hands the websockets library for every connection it makes or accepts (server, client,
    peer): never at DEBUG, whatever the owner's logging configuration. The library's DEBUG records dump
    each handshake header (``Authorization: Bearer <token>``, ``X-Veil-Tokens``) and each frame's bytes
    (tensor values, SMPC shares); its INFO and higher records (listening, closed, errors) still go through."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.getLogger(name), {})

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging's name
        return level > logging.DEBUG and self.logger.isEnabledFor(level)

    def debug(self, *args: Any, **kwargs: Any) -> None:
        pass

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs


#: for the client side of every connection (WebsocketClientWorker, peers)
CLIENT_LOGGER = NoWireLogger("websockets.client")
#: for every connection a veil worker accepts
SERVER_LOGGER = NoWireLogger("websockets.server")

_READ_CHUNK = 1 << 20
#: most bytes one read for a frame header takes at the start of a message: a small reply (the usual
#: one) still comes in one system call, while a large message's payload beyond it is received straight
#: into the message's buffer (reads of 1 MiB here took up to a whole fragment each time and copied it twice
#: more: into the read buffer, then into the message; ~5% of a party's CPU under mul 1e6's 16 MB fetches)
_HEAD_READ = 1 << 16
#: the same inside a fragmented message, where the next frame is another large fragment (or a control frame)
_FRAGMENT_HEAD_READ = 1 << 12
#: large messages are masked in chunks of this size (a multiple of 4: each chunk starts at mask offset 0)
_MASK_CHUNK = 1 << 18
#: messages larger than this are sent as fragments of this size
SEND_FRAGMENT = 1 << 20

_HINT = threading.local()  # the calling thread's expected reply size (expect_reply)


@contextmanager
def expect_reply(nbytes: int) -> Iterator[None]:
    """The calling thread's fragmented replies in this block are received into one buffer of about
    ``nbytes`` (trimmed or grown to what really comes), instead of one grown per fragment: in a
    ``veil worker`` (whose malloc keeps freed memory in its heap) growing a 16 MB reply by 1 MiB
    fragments made realloc move it again and again, ~10% of a party's CPU under peer fetches.
    The size is the caller's own expectation (a peer fetch knows the shapes it will accept), never
    one the sender announced: a hostile peer cannot make this side allocate more than it expected
    or than the connection's size limit."""
    previous = getattr(_HINT, "nbytes", 0)
    _HINT.nbytes = max(0, int(nbytes))
    try:
        yield
    finally:
        _HINT.nbytes = previous


def frame_head(b0: int, n: int, masked: bool = False) -> bytes:
    """A frame's header (RFC 6455 5.2): first byte ``b0`` (FIN, RSV, opcode), then the payload length
    ``n`` in its shortest form; ``masked``: a client's frame (its 4-byte mask key follows the header)."""
    m = 0x80 if masked else 0
    if n < 126:
        return bytes((b0, m | n))
    if n < 1 << 16:
        return bytes((b0, m | 126)) + n.to_bytes(2, "big")
    return bytes((b0, m | 127)) + n.to_bytes(8, "big")

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

    _masks, _mask_at = b"", 0  # frame masks not used yet (see _next_mask)

    def __init__(self, url: str, headers: dict[str, str], ssl_context: "ssl_module.SSLContext | None" = None,
                 open_timeout: float = 10.0, max_size: int | None = None, local: bool = False) -> None:
        uri = parse_uri(url)
        self.max_size = max_size
        self._buffer = memoryview(bytearray(_READ_CHUNK))
        self._parts: list[bytes] = []  # a message the protocol is assembling (slow path)
        self._text = False
        self._rbuf = bytearray()  # received bytes not consumed yet; always starts at a frame boundary
        self._msg: Any = None  # a fragmented binary message being assembled (fast path): an OwnedBuffer
        self._size = self._pad = 0  # its payload bytes so far, and where they start in it
        self._direct = False
        self._early: list[Any] = []
        #: the share slots a peer hands over this connection (a Unix link only: ``share_slots.py``)
        self.slot_maps: SlotMaps | None = None
        local = local and not uri.secure and local_socket.enabled()
        sock = socket.create_connection((uri.host, uri.port), timeout=open_timeout)
        self._handshake(uri, sock, {**headers, local_socket.ASK_HEADER: "1"} if local else headers, ssl_context)
        if local:  # the same session over the worker's Unix socket, if it told one (local_socket.py)
            self._go_local(uri, open_timeout)
        # Frames are read here only if the handshake left no frame bytes inside the protocol (veil
        # servers send nothing first); otherwise every byte goes through the protocol, as it did.
        reader = getattr(self.protocol, "reader", None)
        self._direct = reader is not None and getattr(reader, "buffer", b"?") == b"" and not self._early

    def _handshake(self, uri: Any, sock: socket.socket, headers: dict[str, str],
                   ssl_context: "ssl_module.SSLContext | None", deadline: float | None = None) -> None:
        """The opening handshake on ``sock`` (closed if it fails); by ``deadline`` (monotonic) if given."""
        self.protocol = ClientProtocol(uri, max_size=self.max_size, logger=CLIENT_LOGGER)
        try:
            if getattr(sock, "family", None) != socket.AF_UNIX:  # (test doubles have none)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests must not wait for Nagle
            if uri.secure:
                context = ssl_context or ssl_module.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=uri.host)
            self.sock = sock
            request = self.protocol.connect()
            request.headers.update(headers)
            self.protocol.send_request(request)
            self._flush()
            self.response = self._await_handshake(deadline)
            self._timeout = sock.gettimeout()
        except BaseException:
            sock.close()
            raise

    def _go_local(self, uri: Any, timeout: float) -> None:
        """Moves to the Unix socket the worker named in its response (with the one-time ticket it gave) and
        closes the TCP connection; keeps TCP when there is none, or the socket refuses, stalls, breaks or does
        not prove it is the worker's. Only a worker reached over loopback may name one."""
        told = None  # (veil workers send no frame first)
        if not self._early and local_socket.from_loopback(self.sock):
            told = local_socket.hop(self.response.headers)
        limit = min(timeout, local_socket.OPEN_TIMEOUT)
        deadline = time.monotonic() + limit  # the whole hop, not each read (a trickling squatter held it forever)
        sock = local_socket.connect(told[0], limit) if told else None
        if sock is None:
            return
        tcp = self.protocol, self.sock, self.response, self._timeout
        try:  # only the ticket's first half goes there: the tokens stay on TCP (a squatter learns nothing)
            self._handshake(uri, sock, {local_socket.TICKET_HEADER: told[1][:32]}, None, deadline)
            if self._early:
                raise InvalidHandshake("frames before the first request")
            if not local_socket.proven(self.response.headers, told[1]):
                raise InvalidHandshake("the local socket did not prove it is the worker's")
        except Exception:  # noqa: BLE001  (refused, e.g. a slot taken; or broken: TCP it stays)
            sock.close()
            self.protocol, self.sock, self.response, self._timeout = tcp
            self._early = []
            return
        sock.settimeout(tcp[3])  # sends before the first read wait as on TCP, not what the hop's deadline left
        self._timeout = tcp[3]
        protocol, old = tcp[0], tcp[1]
        try:  # a clean close of the unused TCP session (the worker ends it as any other)
            protocol.send_close(1000)
            for chunk in protocol.data_to_send():
                if chunk:
                    old.sendall(chunk)
        except OSError:
            pass
        old.close()
        if share_slots.enabled():
            self.slot_maps = SlotMaps()

    def _read_into(self, buffer: Any, nbytes: int = 0) -> int:
        """``sock.recv_into``; on a link that takes share slots, with room for the descriptors a reply brings."""
        maps = self.slot_maps
        if maps is None:
            return self.sock.recv_into(buffer, nbytes)
        got, ancdata, _, _ = self.sock.recvmsg_into([buffer[:nbytes] if nbytes else buffer], maps.read_size(),
                                                    socket.MSG_CMSG_CLOEXEC)
        if ancdata:
            maps.received(ancdata)
        return got

    def _flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            if chunk:
                self.sock.sendall(chunk)

    def _feed(self) -> list[Any]:
        # Into one buffer kept for the connection: sock.recv(1 MiB) allocates (and maps) a fresh
        # MiB per call, ~15 us for every small reply; the protocol copies what it is fed anyway.
        n = self._read_into(self._buffer)
        if n:
            self.protocol.receive_data(self._buffer[:n])
        else:
            self.protocol.receive_eof()
        events = self.protocol.events_received()
        self._flush()  # pongs and close acknowledgements
        return events

    def _await_handshake(self, deadline: float | None = None) -> Response:
        while True:
            if deadline is not None:  # each read waits only what is left
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the opening handshake took too long")
                self.sock.settimeout(left)
            events = self._feed()
            for i, event in enumerate(events):
                if isinstance(event, Response):
                    if self.protocol.handshake_exc is not None:
                        raise self.protocol.handshake_exc
                    self._early = events[i + 1:]  # frames that came with the response come first
                    return event
            if self.protocol.handshake_exc is not None:
                raise self.protocol.handshake_exc
            if self.protocol.close_expected() or self.protocol.state.name == "CLOSED":
                raise InvalidHandshake("connection closed during the opening handshake")

    def send(self, data: "bytes | FrameParts") -> None:
        """Sends one binary message (serde ``FrameParts``: its parts, in order, as one message)."""
        protocol = self.protocol
        if protocol.state is not State.OPEN or protocol.expect_continuation_frame or protocol.extensions:
            protocol.send_binary(b"".join(data) if type(data) is FrameParts else data)  # the library raises or frames it
            self._flush()
            return
        # Masked binary frames (RFC 6455 5.2), exactly what send_binary would write, without
        # Frame.serialize's copies: small messages go out in one write, large ones are masked in
        # cache-sized chunks straight from the caller's buffer. Messages over SEND_FRAGMENT travel as
        # a fragmented message (5.4): the server's websockets then buffers, slices and unmasks one
        # fragment at a time instead of three fresh copies of the whole message.
        self._flush()
        if type(data) is FrameParts:
            self._send_parts(data)
            return
        n = len(data)
        if n <= SEND_FRAGMENT:
            self._send_frame(data, 0x82, n)
            return
        view = memoryview(data).cast("B")
        for at in range(0, n, SEND_FRAGMENT):
            part = view[at: at + SEND_FRAGMENT]
            last = at + SEND_FRAGMENT >= n
            self._send_frame(part, (0x80 if last else 0) | (0x02 if at == 0 else 0x00), len(part))

    def _send_parts(self, parts: list) -> None:
        """One fragmented message: each part in fragments of at most SEND_FRAGMENT, masked from its memory."""
        pieces = []
        for part in parts:
            view = memoryview(part).cast("B")
            pieces.extend(view[at: at + SEND_FRAGMENT] for at in range(0, view.nbytes, SEND_FRAGMENT))
        if not pieces:
            pieces.append(b"")
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            self._send_frame(piece, (0x80 if i == last else 0) | (0x02 if i == 0 else 0x00), len(piece))

    def _next_mask(self) -> bytes:
        # RFC 6455 masks must be unpredictable (10.3): from the OS CSPRNG as before, but read 4 KiB
        # at a time (one getrandom per 1024 frames instead of one per frame)
        at = self._mask_at
        if at >= len(self._masks):
            self._masks, at = secrets.token_bytes(4096), 0
        self._mask_at = at + 4
        return self._masks[at: at + 4]

    def _send_frame(self, data: Any, head1: int, n: int) -> None:
        mask = self._next_mask()
        head = frame_head(head1, n, masked=True)
        if n <= _MASK_CHUNK:
            self.sock.sendall(head + mask + apply_mask(data, mask))
            return
        self.sock.sendall(head + mask)
        view = memoryview(data).cast("B")
        for at in range(0, n, _MASK_CHUNK):
            self.sock.sendall(apply_mask(view[at: at + _MASK_CHUNK], mask))

    def recv(self, timeout: float | None) -> bytes | bytearray | memoryview | str:
        """Blocks until the next whole message arrives (``TimeoutError`` after ``timeout`` s).

        A binary message comes back as a ``bytearray``, or for large ones a ``memoryview`` of an
        ``OwnedBuffer`` that nothing else references: the decoder uses it in place.
        """
        if timeout != self._timeout:  # each settimeout is a system call (ioctl)
            self.sock.settimeout(timeout)
            self._timeout = timeout
        if not self._direct:
            return self._recv_via_protocol()
        while True:
            message = self._next_frame()
            if message is not None:
                return message

    # ------------------------------------------------------------ frames read here
    #
    # The reply path reads binary data frames itself: websockets' parser copies every byte twice
    # (its stream buffer, then a slice per frame) and assembles fragments with a third copy. Here a
    # frame's payload is received straight into the message's buffer. Everything else (control
    # frames: ping, pong, close; text; masked or reserved-bit frames, which are errors from a
    # server; frames while closing) is handed to the protocol whole, at a frame boundary, so the
    # library keeps deciding what is valid and answers pings and closes.

    def _fill(self, k: int) -> None:
        """Reads until at least ``k`` bytes are buffered: up to ``_HEAD_READ`` at a message's start, and
        inside a fragmented message up to ``_FRAGMENT_HEAD_READ`` (the next fragment's header)."""
        while len(self._rbuf) < k:
            n = self._read_into(self._buffer, _HEAD_READ if self._msg is None else _FRAGMENT_HEAD_READ)
            if not n:
                self._eof()
            self._rbuf += self._buffer[:n]

    def _eof(self) -> None:
        """The peer closed the TCP connection: always raises ConnectionClosed."""
        mid_frame = bool(self._rbuf) or self._msg is not None
        self._rbuf.clear()
        self._msg = None
        self.protocol.receive_eof()
        self.protocol.events_received()
        if self.protocol.state is State.CLOSED and not mid_frame:
            raise self.protocol.close_exc
        raise ConnectionClosedError(self.protocol.close_rcvd, self.protocol.close_sent, None)

    def _next_frame(self) -> bytes | bytearray | str | None:
        """Consumes one frame; returns a message once one is complete."""
        buf = self._rbuf
        if len(buf) < 2:
            self._fill(2)
        b0, b1 = buf[0], buf[1]
        n = b1 & 0x7F
        head = 2
        if n >= 126:
            head = 4 if n == 126 else 10
            if len(buf) < head:
                self._fill(head)
            n = int.from_bytes(buf[2:head], "big")
        opcode = b0 & 0x0F
        if self._msg is not None and opcode in (0x01, 0x02):
            self.protocol.fail(CloseCode.PROTOCOL_ERROR, "expected a continuation frame")
            self._flush()
            raise ConnectionClosedError(None, self.protocol.close_sent, None)
        if (b0 & 0x70 or b1 & 0x80 or self._parts or self.protocol.state is not State.OPEN
                or not (opcode == 0x02 if self._msg is None else opcode == 0x00)):
            return self._protocol_frame(head + n)
        message = self._msg
        size = n if message is None else self._size + n
        if self.max_size is not None and size > self.max_size:
            self.protocol.fail(CloseCode.MESSAGE_TOO_BIG, f"over size limit ({size} > {self.max_size} bytes)")
            self._flush()
            raise ConnectionClosedError(None, self.protocol.close_sent, None)
        have = min(len(buf) - head, n)
        if message is None and have == n and b0 & 0x80:  # a whole small message is buffered (the common reply)
            message = buf[head: head + n]
            del buf[: head + n]
            return message
        if message is None:
            # A veil frame's raw tensor region is placed at a 16-byte boundary of the buffer, so the
            # decoder can use large tensors' bytes where they are (serde ``adopt``): that needs the
            # message's first 5 bytes, which may come in a later read than the frame's header.
            if have < min(n, 5):
                self._fill(head + min(n, 5))
                have = min(len(buf) - head, n)
            self._pad = frame_pad(buf[head: head + min(have, 5)])
            room = n
            if not b0 & 0x80:  # the first of several fragments: sized as the caller expects, if it said
                hint = getattr(_HINT, "nbytes", 0)
                if hint > n and (self.max_size is None or hint <= self.max_size):
                    room = hint
            message = owned_buffer(self._pad + room)  # (uninitialized: the bytes are received over it)
            start = self._pad
        else:
            start = self._pad + self._size  # the payload so far
            if start + n > len(message):  # more fragments than the caller expected: a larger buffer, the
                room = max(start + n, 2 * len(message))  # payload so far copied (doubling: a message of k
                if self.max_size is not None:  # fragments is copied O(1) times per byte), never past the limit
                    room = min(room, self._pad + self.max_size)
                grown = owned_buffer(room)
                grown[:start] = message[:start]
                message = grown
        self._size = size
        with memoryview(message) as view:
            view[start: start + have] = memoryview(buf)[head: head + have]
            del buf[: head + have]
            rest = view[start + have: start + n]
            while rest:
                got = self._read_into(rest)
                if not got:
                    self._msg = message
                    self._eof()
                rest = rest[got:]
            rest.release()  # (its export would keep the buffer from being trimmed)
        if b0 & 0x80:
            self._msg = None
            end = self._pad + size
            if 2 * end < len(message):  # much smaller than expected: not holding the rest while it lives
                trimmed = owned_buffer(end)
                trimmed[:] = message[:end]
                message = trimmed
            return memoryview(message)[self._pad: end]
        self._msg = message
        return None

    def data_frame_arriving(self) -> bool:
        """Whether a data frame is being received: one is half read, or the next frame (buffered here, or the
        first byte waiting in the socket, which must be readable) is a binary or continuation frame. False for
        a control frame first (a ping ahead of a reply not sent yet) or where the socket cannot be peeked (TLS)."""
        if self._msg is not None:
            return True
        if self._rbuf:
            first = self._rbuf[0]
        else:
            try:
                got = self.sock.recv(1, socket.MSG_PEEK)
            except (ValueError, OSError):  # (an SSLSocket takes no flags)
                return False
            if not got:
                return False
            first = got[0]
        return (first & 0x0F) in (0x00, 0x02)

    def _frame_buffered(self) -> bool:
        buf = self._rbuf
        if len(buf) < 2:
            return False
        n, head = buf[1] & 0x7F, 2
        if n >= 126:
            head = 4 if n == 126 else 10
            if len(buf) < head:
                return False
            n = int.from_bytes(buf[2:head], "big")
        return len(buf) >= head + n

    def _protocol_frame(self, size: int) -> bytes | str | None:
        """Hands the next frame (``size`` bytes with its header) to the protocol."""
        while size:
            if not self._rbuf:
                self._fill(1)
            take = min(len(self._rbuf), size)
            self.protocol.receive_data(bytes(self._rbuf[:take]))
            del self._rbuf[:take]
            size -= take
        events = self.protocol.events_received()
        self._flush()  # pongs and close acknowledgements
        message = self._take_message(events)
        if message is not None:
            return message
        self._check_open()
        return None

    def _take_message(self, events: list[Any]) -> bytes | str | None:
        """The message completed by ``events`` (consumed from the front; what follows it stays)."""
        while events:
            event = events.pop(0)
            if not isinstance(event, Frame) or event.opcode not in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
                continue
            if event.opcode is not Opcode.CONT:
                self._parts = []
                self._text = event.opcode is Opcode.TEXT
            self._parts.append(event.data)
            if event.fin:  # a whole frame's data is already a fresh buffer: no copy
                data = b"".join(self._parts) if len(self._parts) > 1 else self._parts[0]
                self._parts = []
                return data.decode() if self._text else data
        return None

    def _check_open(self) -> None:
        state = self.protocol.state.name
        if state == "CLOSED":
            raise self.protocol.close_exc
        if state == "CLOSING":  # the peer sent its close frame: nothing more will come
            rcvd, sent = self.protocol.close_rcvd, self.protocol.close_sent
            raise ConnectionClosedError(rcvd, sent, True if rcvd is not None and sent is not None else None)

    def _recv_via_protocol(self) -> bytes | bytearray | str:
        while True:
            if not self._early:
                self._early = self._feed()
            message = self._take_message(self._early)
            if message is not None:
                return message
            self._check_open()

    def poll(self) -> bool:
        """Handles frames that arrived while idle (answers the server's keepalive pings).

        Returns:
            False once the connection is closed (the server gave up on it, or the socket broke).
        """
        previous = self.sock.gettimeout()  # a later send must not inherit the short poll timeout
        try:
            while select.select([self.sock], [], [], 0)[0]:
                self.sock.settimeout(1.0)
                self._timeout = 1.0
                if not self._direct:
                    self._feed()  # the protocol queues a pong per ping; _feed sends it
                else:
                    self._fill(len(self._rbuf) + 1)
                    while self._frame_buffered():
                        self._next_frame()  # pings are answered; a message nobody asked for is dropped
                if self.protocol.state.name != "OPEN":
                    return False
        except (OSError, ConnectionClosed):  # TimeoutError is an OSError
            return False
        finally:
            try:
                self.sock.settimeout(previous)
                self._timeout = previous
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
            if self.slot_maps is not None:
                self.slot_maps.close()
