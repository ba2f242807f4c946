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
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from veil.workers.reply_frames import ONE_WRITE, _write_frame

log = logging.getLogger("veil.workers.websocket_server")

_BINARY, _OPEN = Opcode.BINARY, State.OPEN


class LaneConnection(ServerConnection):
    """A server connection whose reader-idle binary frames go to :attr:`lane` first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: ``data -> (reply, decoded)`` (``InlineLane.try_inline`` for this connection's session); set
        #: by the reader once the session is being served
        self.lane: Callable[[bytes], tuple] | None = None
        #: ``(data, reply, decoded)`` of the frame the reader gets next: what the lane did with it
        self.handoff: tuple | None = None

    def _reader_idle(self) -> bool:
        frames = self.recv_messages.frames
        waiter = frames.get_waiter
        return waiter is not None and not waiter.done() and not frames.queue

    def process_event(self, event: Any) -> None:
        lane = self.lane
        if lane is None or type(event) is not Frame or event.opcode is not _BINARY or not event.fin \
                or not self._reader_idle():
            super().process_event(event)
            return
        data = event.data
        try:
            reply, decoded = lane(data)
        except Exception:  # (try_inline answers its own failures; this is a defect, served by the reader)
            log.exception("the inline lane failed on a request")
            reply, decoded = None, None
        if type(reply) is bytes and len(reply) <= ONE_WRITE and not self.paused \
                and self.send_in_progress is None and self.protocol.state is _OPEN:
            _write_frame(self.transport, 0x02, True, reply)
            return
        self.handoff = (data, reply, decoded)
        super().process_event(event)

    def take_handoff(self, data: Any) -> tuple[Any, Any]:
        """``(reply, decoded)`` the lane computed for ``data`` (the message the reader just received);
        ``(None, None)`` when the lane did not see it."""
        handoff, self.handoff = self.handoff, None
        if handoff is None or not (handoff[0] is data or handoff[0] == data):
            return None, None
        return handoff[1], handoff[2]
