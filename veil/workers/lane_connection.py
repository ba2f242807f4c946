"""Requests served from the connection's read callback when its reader is idle.

websockets hands every frame from ``data_received`` to an assembler queue; the connection's
reader task wakes up, takes it, and the reply goes back through the library's send path. For a
small request that the inline lane serves on the event loop anyway, that hand-over (a future
resolved, a task step, an async generator, a send context) costs about as much as the kernel's
share of the round trip: a websockets echo served straight from the read callback answers in
about half the time of one served by the reader task (measured in bench/RESULTS.md).

:class:`LaneConnection` serves such a request where the frame is parsed, but only when the
reader is idle at a message boundary (waiting for a frame, none queued): every earlier request
of the connection has then been answered, so replies keep their order. It calls the same lane
the reader would call (``try_inline``: lock, monitor and budgets unchanged); a reply it cannot
write at once (large, flow control, a fragmented send under way), and any request the lane does
not take, goes to the reader as before with what was computed for it (:attr:`handoff`), so
nothing runs twice. Control frames, text frames, fragments and frames before the session's
reader starts take the library's path untouched.

Fairness and memory (red team, tests/security/test_redteam_lane.py): one read callback serves at
most ``LANE_BURST`` frames, the rest of the read goes to the reader, which yields to the event loop
between queued requests (:meth:`backlog`): a client pipelining thousands of requests in one segment
no longer holds every other session for seconds. While the connection's writes are paused (a client
that does not read its replies) its reading is paused too: websockets answers pings with pongs
whatever the write buffer holds, and pings never reach the queue whose backlog pauses reading. The
backlog is also held to the session's message limit in bytes (websockets counts frames only:
:meth:`_queue_frame`).

Until its opening request is whole a connection is reported to :attr:`openings` (the worker's
``OpeningConnections``), which bounds what it may send and how many such connections are kept.
"""

from __future__ import annotations

from typing import Any, Callable

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from veil.workers import local_socket
from veil.workers.base import YIELD_EVERY
from veil.workers.reply_frames import ONE_WRITE, _write_frame

_BINARY, _OPEN = Opcode.BINARY, State.OPEN
_DATA = (Opcode.BINARY, Opcode.TEXT, Opcode.CONT)

#: frames one read callback may serve; the rest of that read goes to the reader (the granularity at
#: which a batch on a handler thread yields to other sessions)
LANE_BURST = YIELD_EVERY


class LaneConnection(ServerConnection):
    """A server connection whose reader-idle binary frames go to :attr:`lane` first."""

    def __init__(self, *args: Any, openings: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: ``OpeningConnections`` told of this connection until its opening request is whole (None: not told)
        self.openings = openings
        self._opening = False
        #: ``data -> (reply, decoded)`` (``InlineLane.lane_request`` for this connection's session, which
        #: never raises); set by the reader once the session is being served
        self.lane: Callable[[bytes], tuple] | None = None
        #: ``(data, reply, decoded)`` of the frame the reader gets next: what the lane did with it
        self.handoff: tuple | None = None
        self._burst = 0  # frames the lane may still serve in this read callback
        #: the task serving this connection's session (its end frees the session's objects); set by the reader
        self.serving: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        frames = self.recv_messages  # its backlog pauses and resumes reading through _sync_reading, as writes do
        frames.pause = frames.resume = self._sync_reading
        unix = local_socket.is_unix(transport)
        if unix:
            local_socket.widen(transport.get_extra_info("socket"))
        if self.openings is not None:
            peer = transport.get_extra_info("peername")
            self._opening = True
            self.openings.add(self, local_socket.SOURCE if unix else
                              str(peer[0]) if isinstance(peer, tuple) and peer else "?")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._opening:
            self._opening = False
            self.openings.discard(self)
        super().connection_lost(exc)

    def _sync_reading(self) -> None:
        """Reading is paused while the assembler's backlog (in frames, or in bytes past the session's
        message limit) or the write buffer is over its mark (the library's own flags, set before it calls
        here; pausing and resuming twice is harmless)."""
        frames = self.recv_messages
        if not frames.paused and self._over_budget():
            frames.paused = True  # (the assembler calls back here as its queue shrinks: looked at again then)
        if frames.paused or self.paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._sync_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._sync_reading()

    def data_received(self, data: bytes) -> None:
        if self._opening and not self.openings.received(self, len(data)):
            return  # (its opening request is too large: dropped)
        self._burst = LANE_BURST
        try:
            super().data_received(data)
        finally:
            self._burst = 0
        if self._opening and self.request is not None:
            self._opening = False
            self.openings.discard(self)

    def backlog(self) -> bool:
        """Whether requests are queued for the reader (it then lets other connections' callbacks run
        before it serves the next one)."""
        return bool(self.recv_messages.frames.queue)

    def _reader_idle(self) -> bool:
        frames = self.recv_messages.frames
        waiter = frames.get_waiter
        return waiter is not None and not waiter.done() and not frames.queue

    def process_event(self, event: Any) -> None:
        lane = self.lane
        if lane is None or type(event) is not Frame or event.opcode is not _BINARY or not event.fin \
                or self._burst <= 0 or not self._reader_idle():
            self._queue_frame(event)
            return
        self._burst -= 1
        data = event.data
        reply, decoded = lane(data)  # (it answers its own failures: anything raised here closes the connection)
        if type(reply) is bytes and len(reply) <= ONE_WRITE and not self.paused \
                and self.send_in_progress is None and self.protocol.state is _OPEN:
            _write_frame(self.transport, 0x02, True, reply)
            return
        self.handoff = (data, reply, decoded)
        self._queue_frame(event)

    def _queue_frame(self, event: Any) -> None:
        """The library queues a frame for the reader; then the queue's bytes are held to the session's message
        limit: websockets bounds it in frames only (5 of them, each up to that limit), so a session whose reader
        was busy (a long command, a waiting fetch) had 5 times its memory quota queued. Past it reading pauses
        until the reader takes frames (:meth:`_sync_reading`)."""
        super().process_event(event)
        if type(event) is Frame and event.opcode in _DATA and not self.recv_messages.paused and self._over_budget():
            self.recv_messages.paused = True
            self.transport.pause_reading()

    def _budget(self) -> int | None:
        return self.protocol.max_message_size

    def _over_budget(self) -> bool:
        queue, budget = self.recv_messages.frames.queue, self._budget()
        return bool(queue) and budget is not None and sum(len(f.data) for f in queue) > budget

    def take_handoff(self, data: Any) -> tuple[Any, Any]:
        """``(reply, decoded)`` the lane computed for ``data`` (the message the reader just received);
        ``(None, None)`` when the lane did not see it."""
        handoff, self.handoff = self.handoff, None
        if handoff is None or not (handoff[0] is data or handoff[0] == data):
            return None, None
        return handoff[1], handoff[2]
