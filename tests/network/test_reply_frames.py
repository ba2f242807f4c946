"""The server's large replies: frames written as header + the payload's memory (reply_frames._send_fragmented).

The frames are parsed back with websockets' own frame parser: one fragmented binary message (RFC 6455
5.4) whose data is exactly the reply, what ``ws.send(iterable)`` would have sent.
"""

import asyncio
import contextlib

import pytest
import torch
from websockets.exceptions import ConnectionClosedError
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from veil.messaging import messages as m
from veil.messaging.frames import FrameParts
from veil.messaging.serde import deserialize, serialize
from veil.workers.reply_frames import REPLY_FRAGMENT, _fragments, _part_fragments, _send_fragmented


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.limits: list[tuple] = []

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.limits.append((high, low))


class _Protocol:
    extensions: list = []


class _WS:
    """What _send_fragmented uses of a websockets ServerConnection; ``fail_at``: the send context of that
    frame raises ConnectionClosed (the connection closed meanwhile)."""

    write_limit_high, write_limit_low = 1 << 15, None

    def __init__(self, fail_at: int | None = None) -> None:
        self.transport, self.protocol, self.send_in_progress = _Transport(), _Protocol(), None
        self.loop = asyncio.get_running_loop()
        self.fail_at, self.frames = fail_at, 0

    @contextlib.asynccontextmanager
    async def send_context(self):
        if self.frames == self.fail_at:
            raise ConnectionClosedError(None, None)
        yield
        self.frames += 1


def _parse(data: bytes) -> list[Frame]:
    reader = StreamReader()
    reader.feed_data(data)
    frames = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            next(parser)
        except StopIteration as done:
            frames.append(done.value)
        else:  # pragma: no cover - a frame cut short
            raise AssertionError("truncated frame")
    return frames


@pytest.mark.parametrize("parts", [True, False])
def test_large_replies_are_one_fragmented_message_of_exactly_their_bytes(parts):
    t = torch.randn(REPLY_FRAGMENT // 4 * 2 + 77)
    small = torch.arange(100_000)  # a part shorter than one fragment (the header: a frame under 126 bytes)
    reply = serialize(m.ObjectsReply([t, small, torch.ones(3)]), sender="w", parts_over=REPLY_FRAGMENT)
    assert type(reply) is FrameParts
    whole = b"".join(reply)

    async def run():
        ws = _WS()
        await _send_fragmented(ws, _part_fragments(reply) if parts else _fragments(whole))
        return ws

    ws = asyncio.run(run())
    frames = _parse(b"".join(ws.transport.writes))
    assert frames[0].opcode is Opcode.BINARY and all(f.opcode is Opcode.CONT for f in frames[1:])
    assert frames[-1].fin and not any(f.fin for f in frames[:-1])
    assert all(len(f.data) <= REPLY_FRAGMENT for f in frames)
    assert b"".join(f.data for f in frames) == whole
    back = deserialize(whole)[0].objects
    assert torch.equal(back[0], t) and torch.equal(back[1], small)
    assert ws.send_in_progress is None
    assert ws.transport.limits == [(1 << 15, 0), (1 << 15, None)]  # low-water 0 while writing, then restored


def test_a_connection_closed_mid_reply_raises_and_frees_the_connection_for_the_close():
    reply = serialize(m.ObjectsReply([torch.randn(REPLY_FRAGMENT)]), sender="w", parts_over=REPLY_FRAGMENT)

    async def run():
        ws = _WS(fail_at=2)
        with pytest.raises(ConnectionClosedError):
            await _send_fragmented(ws, _part_fragments(reply))
        return ws

    ws = asyncio.run(run())
    assert ws.send_in_progress is None and ws.transport.limits[-1] == (1 << 15, None)
    assert len(_parse(b"".join(ws.transport.writes))) == 2  # nothing written after the close
