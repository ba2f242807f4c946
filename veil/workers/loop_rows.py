"""An inline reply that goes after its request's refusal rows, awaited by its connection, never by the event loop.

The event loop used to wait (up to 50 ms) for the rows an inline refusal handed to the row writer
(audit_writer.py), so that the reply went after them: at 50-100 ms a write every refusal held every connection and
ping that long. Now the loop hands the rows and moves on; the reply is wrapped (:class:`AfterRows`) and the
connection's reader awaits its rows (``RowWriter.written_async``) before sending it. A reply the read callback
would have written at once (lane_connection.py: only plain bytes) goes to the reader instead, so the
connection's replies keep their order.
"""

from __future__ import annotations

from typing import Any


class AfterRows:
    """``reply``, to be sent once the writer's row ``seq`` is written."""

    __slots__ = ("reply", "seq")

    def __init__(self, reply: Any, seq: int) -> None:
        self.reply, self.seq = reply, seq


def after_rows(writer: Any, reply: Any) -> Any:
    """``reply`` as it is, or wrapped when the loop thread handed rows not yet written (taken: the next request
    starts afresh)."""
    seq = writer.take_mine()
    return AfterRows(reply, seq) if seq and reply is not None else reply


async def released(writer: Any, reply: Any) -> Any:
    """The reply to send: a wrapped one once its rows are written (at most the writer's wait)."""
    if type(reply) is AfterRows:
        await writer.written_async(reply.seq)
        return reply.reply
    return reply
