"""A reply's frames, written to the transport as header and payload under the library's send context: a
large reply as one fragmented binary message (RFC 6455 5.4) of at most ``REPLY_FRAGMENT`` per frame
(the server's bulk replies: ``.get()``, peer fetches), any other as one frame (:func:`_send_one`)."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.server import ServerConnection

from veil.messaging.frames import FrameParts
from veil.workers.share_slots import send_with_fd
from veil.workers.websocket_transport import frame_head

#: replies larger than this go out as a fragmented message of chunks this size (:func:`_send_fragmented`):
#: one frame of 100 MB would cost fresh 100 MB copies (websockets' Frame.serialize, the transport's
#: buffer); chunks go out from the reply's memory, under the library's flow control
REPLY_FRAGMENT = 1 << 20


def _fragments(data: bytes) -> Any:
    view = memoryview(data)
    return (view[at: at + REPLY_FRAGMENT] for at in range(0, len(view), REPLY_FRAGMENT))


def _part_fragments(parts: FrameParts) -> Any:
    """A reply left in parts (header, then each tensor's memory), as fragments of at most
    REPLY_FRAGMENT: the tensor bytes go from their memory to the frames, with no joined copy."""
    for part in parts:
        view = memoryview(part).cast("B")
        for at in range(0, view.nbytes, REPLY_FRAGMENT):
            yield view[at: at + REPLY_FRAGMENT]


#: frames up to this long go to the transport as one joined write (one system call, one segment: the
#: reader finds the whole frame in one read); longer ones as their header and then their own memory
ONE_WRITE = 1 << 16


def _write_frame(transport: Any, opcode: int, fin: bool, data: Any) -> None:
    head = frame_head((0x80 if fin else 0) | opcode, len(data))  # (unmasked: a server's frame)
    if len(data) <= ONE_WRITE:
        transport.write(b"".join((head, data)))
    else:
        transport.write(head)
        transport.write(data)


async def _send_fragmented(ws: ServerConnection, fragments: Any) -> None:
    """A large reply as one fragmented binary message (RFC 6455 5.4), what ``ws.send(fragments)`` sends,
    with each frame handed to the transport as its header and then its payload's memory: websockets makes
    each fragment a Frame whose ``serialize`` copies it into a fresh buffer first (~5% of a party's CPU
    under peer fetches). Frames still go out under the library's send context (its flow control, its
    close handling, pings and pongs between frames) and, with TLS, through the same transport. While the
    reply is being written the transport's low-water mark is 0: the next frame is written when the
    previous one left the transport's buffer, so it goes to the socket at once instead of being copied
    into that buffer behind the last few KiB."""
    if ws.protocol.extensions:  # (never: served without compression) frames the library would transform
        await ws.send(fragments)
        return
    transport = ws.transport
    while ws.send_in_progress is not None:  # (as the library: one fragmented message at a time)
        await asyncio.shield(ws.send_in_progress)
    ws.send_in_progress = ws.loop.create_future()
    transport.set_write_buffer_limits(ws.write_limit_high, 0)
    try:
        opcode, pending = 0x02, None
        for piece in fragments:
            if pending is not None:
                async with ws.send_context():  # raises ConnectionClosed once the connection is closing
                    _write_frame(transport, opcode, False, pending)
                opcode = 0x00
            pending = piece
        async with ws.send_context():
            _write_frame(transport, opcode, True, pending if pending is not None else b"")
    finally:
        transport.set_write_buffer_limits(ws.write_limit_high, ws.write_limit_low)
        ws.send_in_progress.set_result(None)
        ws.send_in_progress = None


async def _send_one(ws: ServerConnection, data: Any) -> None:
    """A reply of one frame, what ``ws.send(data)`` sends, written as :func:`_send_fragmented` writes each
    frame: the library's path builds a Frame, serializes it into its list of pending writes and flushes
    that list on leaving its send context (~7 K instructions, ~8% of the server's work per small round
    trip). Under the same send context (its state check, flow control), so pings and closes still go
    between whole frames."""
    if ws.protocol.extensions or ws.send_in_progress is not None:  # (a fragmented reply is still going out)
        await ws.send(data)
        return
    async with ws.send_context():
        _write_frame(ws.transport, 0x02, True, data)


async def send_with_descriptor(ws: ServerConnection, data: bytes, raw: Any, fd: int) -> bool:
    """A reply of one frame with a file descriptor attached to its first bytes (a share slot's, over a Unix
    socket: ``share_slots.py``), written on ``raw`` (the connection's socket, duplicated) when nothing is
    waiting in the transport's buffer, so the frame keeps its place in the stream; False when it could not go
    (then nothing went)."""
    if ws.protocol.extensions or ws.send_in_progress is not None:
        return False
    async with ws.send_context():
        transport = ws.transport
        if transport.get_write_buffer_size():
            return False
        frame = b"".join((frame_head(0x82, len(data)), data))
        sent = send_with_fd(raw, frame, fd)
        if sent and sent < len(frame):
            transport.write(frame[sent:])  # (behind the first bytes, which carried the descriptor)
    return sent > 0
