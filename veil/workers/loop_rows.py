"""An inline reply that goes after its request's audit rows, awaited by its connection, never by the event loop.

The event loop used to wait (up to 50 ms) for the rows an inline refusal handed to the row writer
(audit_writer.py), so that the reply went after them: at 50-100 ms a write every refusal held every connection and
ping that long. Now the loop hands the rows and moves on; the reply is wrapped (:class:`AfterRows`) and the
connection's reader awaits its rows (``RowWriter.written_async``) before sending it. A reply the read callback
would have written at once (lane_connection.py: only plain bytes) goes to the reader instead, so the
connection's replies keep their order. An inline get's allowed rows are queued the same way (the loop wrote each,
one database write per id): its reply waits for them however far behind the writer is, and is an error line in
place of the values if one was not written (a release is never answered before its allowed row is on record).
"""

from __future__ import annotations

from typing import Any

from veil.messaging import messages as m
from veil.messaging.serde import serialize
from veil.workers.audit_writer import NOT_RECORDED


class AfterRows:
    """``reply``, to be sent once the writer's row ``seq`` is written (and each of ``tickets``, the allowed rows of
    a release, is on record: else ``sender``'s error line goes instead)."""

    __slots__ = ("reply", "seq", "tickets", "sender")

    def __init__(self, reply: Any, seq: int, tickets: list | None = None, sender: str = "") -> None:
        self.reply, self.seq, self.tickets, self.sender = reply, seq, tickets, sender


def not_recorded(sender: str) -> bytes:
    """The reply of a release whose allowed row is not on record: one error line, no value."""
    return serialize(m.ErrorReply("RemoteExecutionError", NOT_RECORDED), sender=sender)


def after_rows(writer: Any, reply: Any, sender: str = "") -> Any:
    """``reply`` as it is, or wrapped when the loop thread handed rows not yet written or queued allowed rows
    (taken: the next request starts afresh)."""
    tickets = writer.take_allowed()
    seq = writer.take_mine()
    if reply is None:
        return reply
    if tickets:
        if not seq and all(t[0] is True for t in tickets):  # (on record already: the writer's thread wrote them
            return reply  # while the step ran) sent as any reply, no hand-off to the connection's reader
        return AfterRows(reply, seq, tickets, sender)
    return AfterRows(reply, seq) if seq else reply


async def released(writer: Any, reply: Any) -> Any:
    """The reply to send: a wrapped one once its rows are written (at most the writer's wait), an allowed row's
    however far behind the writer is (at most the writer's wait: then nothing is released)."""
    if type(reply) is AfterRows:
        if reply.tickets:
            if reply.seq:
                await writer.written_async(reply.seq, strict=True)
            if not all(t[0] is True for t in reply.tickets):
                return not_recorded(reply.sender)
            return reply.reply
        await writer.written_async(reply.seq)
        return reply.reply
    return reply
