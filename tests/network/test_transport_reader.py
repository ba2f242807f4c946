"""BlockingConnection reads binary frames itself: against frames websockets writes, split anywhere.

The server side here is websockets' own sans-I/O ServerProtocol behind a fake socket that hands
out its bytes in chunks of a chosen size (1 byte, odd sizes, everything at once), so frames and
headers are split across reads at every kind of boundary.
"""

import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

import veil.workers.websocket_transport as transport
from veil.messaging import messages as m
from veil.messaging.frames import FrameParts, OwnedBuffer
from veil.messaging.serde import deserialize, serialize
from veil.workers.websocket_transport import SEND_FRAGMENT, BlockingConnection


class FakeServer:
    """A socket whose peer is a websockets ServerProtocol; ``script`` follows the handshake."""

    def __init__(self, script: bytes, chunk: int, with_handshake: bool = False) -> None:
        self.server = ServerProtocol(max_size=None)
        self.segments: list[bytearray] = []  # reads never cross a segment boundary
        self.script, self.chunk, self.with_handshake = script, chunk, with_handshake
        self.received: list[Frame] = []  # frames the client sent
        self.reads: list[tuple] = []  # (the buffer each read went into, bytes read)

    def setsockopt(self, *args) -> None:
        pass

    def settimeout(self, timeout) -> None:
        pass

    def gettimeout(self):
        return None

    def close(self) -> None:
        pass

    def sendall(self, data) -> None:
        self.server.receive_data(bytes(data))
        for event in self.server.events_received():
            if isinstance(event, Request):
                self.server.send_response(self.server.accept(event))
                handshake = bytearray(b"".join(self.server.data_to_send()))
                if self.with_handshake:  # frames arrive in the same read as the handshake response
                    self.segments.append(handshake + self.script)
                else:
                    self.segments += [handshake, bytearray(self.script)]
            else:
                self.received.append(event)

    def recv_into(self, view, nbytes: int = 0) -> int:
        while self.segments and not self.segments[0]:
            self.segments.pop(0)
        if not self.segments:
            return 0  # EOF
        seg = self.segments[0]
        n = min(nbytes or len(view), len(view), self.chunk, len(seg))
        self.reads.append((view.obj if isinstance(view, memoryview) else view, n))
        view[:n] = seg[:n]
        del seg[:n]
        return n


def _connect(monkeypatch, script: bytes, chunk: int, max_size=None, with_handshake=False):
    fake = FakeServer(script, chunk, with_handshake)
    monkeypatch.setattr(transport.socket, "create_connection", lambda address, timeout=None: fake)
    return BlockingConnection("ws://127.0.0.1:1", {}, max_size=max_size), fake


def _frame(opcode, data, fin=True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=False)


def _payload(n: int) -> bytes:
    return (bytes(range(251)) * (n // 251 + 1))[:n]


CHUNKS = [1, 3, 4096, 1 << 30]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("with_handshake", [False, True])
def test_messages_split_across_reads_come_back_whole(monkeypatch, chunk, with_handshake):
    big = _payload((1 << 20) + 7 if chunk > 1 else 70_000)
    messages = [b"", b"x", _payload(125), _payload(126), _payload(65_536), big]
    script = b"".join(_frame(Opcode.BINARY, msg) for msg in messages)
    # a fragmented message with a ping between its fragments, then a text message
    script += _frame(Opcode.BINARY, big[:1000], fin=False) + _frame(Opcode.PING, b"hi")
    script += _frame(Opcode.CONT, big[1000:5000], fin=False) + _frame(Opcode.CONT, big[5000:])
    script += _frame(Opcode.TEXT, "héllo".encode())
    conn, fake = _connect(monkeypatch, script, chunk, with_handshake=with_handshake)
    if with_handshake and chunk >= 4096:
        assert not conn._direct  # the library read past the response: every byte goes through it
    for msg in messages + [big]:
        got = conn.recv(5)
        assert isinstance(got, (bytes, bytearray, memoryview)) and bytes(got) == msg
    assert conn.recv(5) == "héllo"
    assert [f.opcode for f in fake.received] == [Opcode.PONG] and fake.received[0].data == b"hi"


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_eof_in_the_middle_of_a_frame_is_a_lost_connection(monkeypatch, chunk):
    whole = _frame(Opcode.BINARY, _payload(70_000))
    for cut in (1, 3, 10, 5000, len(whole) - 1):
        conn, _ = _connect(monkeypatch, whole[:cut], chunk)
        with pytest.raises(ConnectionClosed):
            conn.recv(5)
    conn, _ = _connect(monkeypatch, _frame(Opcode.BINARY, b"a", fin=False) + _frame(Opcode.CONT, b"b", fin=False), chunk)
    with pytest.raises(ConnectionClosed):  # the message never finished
        conn.recv(5)


@pytest.mark.parametrize("chunk", [7, 1 << 30])
def test_messages_over_the_size_limit_fail_the_connection(monkeypatch, chunk):
    for script in (_frame(Opcode.BINARY, _payload(2000)),
                   _frame(Opcode.BINARY, _payload(600), fin=False) + _frame(Opcode.CONT, _payload(600))):
        conn, fake = _connect(monkeypatch, script, chunk, max_size=1000)
        with pytest.raises(ConnectionClosed):
            conn.recv(5)
        closes = [f for f in fake.received if f.opcode is Opcode.CLOSE]
        assert closes and Close.parse(closes[0].data).code == CloseCode.MESSAGE_TOO_BIG


def test_protocol_errors_stay_the_librarys(monkeypatch):
    masked = Frame(Opcode.BINARY, b"abc").serialize(mask=True)  # servers must not mask
    for script in (masked, _frame(Opcode.CONT, b"x"),  # a continuation of nothing
                   _frame(Opcode.BINARY, b"a", fin=False) + _frame(Opcode.BINARY, b"b")):  # not a continuation
        conn, fake = _connect(monkeypatch, script, 3)
        with pytest.raises(ConnectionClosed):
            conn.recv(5)
        closes = [f for f in fake.received if f.opcode is Opcode.CLOSE]
        assert closes and Close.parse(closes[0].data).code == CloseCode.PROTOCOL_ERROR


def test_the_servers_close_frame_ends_the_connection(monkeypatch):
    script = _frame(Opcode.BINARY, b"last") + Frame(Opcode.CLOSE, Close(1001, "bye").serialize()).serialize(mask=False)
    conn, fake = _connect(monkeypatch, script, 2)
    assert bytes(conn.recv(5)) == b"last"
    with pytest.raises(ConnectionClosed):
        conn.recv(5)
    assert [f.opcode for f in fake.received] == [Opcode.CLOSE]  # the library answered the close


@pytest.mark.parametrize("n", [70_000, (1 << 20) + 13])
def test_large_reply_tensors_use_the_received_buffer(monkeypatch, n):
    t = torch.randn(n // 4)
    reply = serialize(m.ObjectsReply([t, torch.arange(5)]), sender="alice")
    # fragmented the way the server sends large replies
    frames = [reply[at: at + SEND_FRAGMENT] for at in range(0, len(reply), SEND_FRAGMENT)]
    script = b"".join(_frame(Opcode.BINARY if i == 0 else Opcode.CONT, f, fin=i == len(frames) - 1)
                      for i, f in enumerate(frames))
    conn, _ = _connect(monkeypatch, script, 4096)
    got = conn.recv(5)
    buffer = got.obj if isinstance(got, memoryview) else got
    assert type(buffer) is OwnedBuffer
    back = deserialize(got)[0].objects
    assert torch.equal(back[0], t) and torch.equal(back[1], torch.arange(5))
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    assert start <= back[0].data_ptr() < start + len(buffer)  # in place, no copy ...
    assert back[0].data_ptr() % 16 == 0  # ... on an aligned address
    back[0].add_(1)  # writable (the buffer is the decoder's own)
    assert torch.equal(back[0], t + 1)
    copied = deserialize(bytes(got))[0].objects[0]  # plain bytes: a copy, as before
    assert torch.equal(copied, t + 1) and copied.data_ptr() != back[0].data_ptr()


def test_frame_parts_travel_as_one_message_the_library_reads(monkeypatch):
    t = torch.randn((SEND_FRAGMENT // 4) * 2 + 3)
    parts = serialize(m.ObjectMessage([m.StoredObject(5, t), m.StoredObject(6, torch.ones(3))]), sender="me",
                      parts_over=1000)
    assert type(parts) is FrameParts and parts.nbytes == len(b"".join(parts))
    conn, fake = _connect(monkeypatch, b"", 1 << 30)
    conn.send(parts)
    frames = [f for f in fake.received if f.opcode in (Opcode.BINARY, Opcode.CONT)]
    assert frames[0].opcode is Opcode.BINARY and frames[-1].fin and not any(f.fin for f in frames[:-1])
    data = b"".join(f.data for f in frames)
    assert data == b"".join(parts)
    objects = deserialize(data)[0].objects
    assert torch.equal(objects[0].obj, t) and torch.equal(objects[1].obj, torch.ones(3))


def _fragmented(data: bytes, sizes: list[int]) -> bytes:
    """``data`` as one fragmented message whose fragments have ``sizes`` (the last takes the rest)."""
    cuts, at = [], 0
    for n in sizes:
        cuts.append(data[at: at + n])
        at += n
    cuts.append(data[at:])
    return b"".join(_frame(Opcode.BINARY if i == 0 else Opcode.CONT, c, fin=i == len(cuts) - 1)
                    for i, c in enumerate(cuts))


@pytest.mark.parametrize("chunk", [3, 4096, 1 << 30])
@pytest.mark.parametrize("hint", ["exact", "larger", "smaller", "much smaller", "none", "over the limit"])
def test_a_reply_the_caller_sized_comes_back_the_same(monkeypatch, chunk, hint):
    """expect_reply sizes the buffer of the next fragmented reply; what comes back is exactly what was
    sent, decodes in place, and is trimmed to its length, whatever the expectation (too small: grown; too
    large: trimmed; over the connection's limit: ignored, and the limit still holds)."""
    t = torch.arange(70_000, dtype=torch.int64)
    reply = serialize(m.ObjectsReply([t, torch.ones(3)]), sender="bob")
    script = _fragmented(reply, [60, 9000, 200_000])
    size = {"exact": len(reply), "larger": len(reply) + 5000, "smaller": len(reply) // 2,
            "much smaller": 100, "none": 0, "over the limit": 10 << 20}[hint]
    conn, _ = _connect(monkeypatch, script, chunk, max_size=1 << 20)
    with transport.expect_reply(size):
        got = conn.recv(5)
    assert bytes(got) == reply
    buffer = got.obj if isinstance(got, memoryview) else got
    assert type(buffer) is OwnedBuffer and len(got) == len(reply)
    back = deserialize(got)[0].objects
    assert torch.equal(back[0], t) and torch.equal(back[1], torch.ones(3))
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    assert start <= back[0].data_ptr() < start + len(buffer)  # in place, even when read 3 bytes at a time
    assert getattr(transport._HINT, "nbytes", 0) == 0  # the expectation ends with its block


@pytest.mark.parametrize("chunk", [5, 1 << 30])
def test_a_sized_reply_still_meets_the_limit_and_a_cut_one_is_a_lost_connection(monkeypatch, chunk):
    """A sender's frames cannot take a sized buffer past the connection's limit (a frame declaring 2^40
    bytes fails the connection before anything is allocated for it), and a sized reply cut short is a
    lost connection, whose next expected reply starts clean."""
    huge = _frame(Opcode.BINARY, b"\xc1" + bytes(40), fin=False)
    huge += bytes((0x00, 0x7F)) + (1 << 40).to_bytes(8, "big")  # a continuation claiming 1 TiB
    conn, fake = _connect(monkeypatch, huge, chunk, max_size=1 << 20)
    with transport.expect_reply(1 << 19), pytest.raises(ConnectionClosed):
        conn.recv(5)
    closes = [f for f in fake.received if f.opcode is Opcode.CLOSE]
    assert closes and Close.parse(closes[0].data).code == CloseCode.MESSAGE_TOO_BIG
    whole = _fragmented(_payload(50_000), [100, 20_000])
    for cut in (30, 200, 20_150, len(whole) - 1):
        conn, _ = _connect(monkeypatch, whole[:cut], chunk, max_size=1 << 20)
        with transport.expect_reply(60_000), pytest.raises(ConnectionClosed):
            conn.recv(5)
        assert conn._msg is None


def test_a_large_messages_payload_is_received_into_the_message_not_the_read_buffer(monkeypatch):
    """Frame headers are read through the connection's read buffer, at most ``_HEAD_READ`` bytes at a
    message's start (a small reply still takes one read) and ``_FRAGMENT_HEAD_READ`` inside a fragmented
    one: a 4 MiB message's payload goes straight into its own buffer, not copied through the read buffer
    (a whole-buffer read there copied up to 1 MiB per fragment twice more)."""
    data = _payload(4 << 20)
    small = _payload(3000)
    script = _frame(Opcode.BINARY, small) + _fragmented(data, [200, SEND_FRAGMENT, SEND_FRAGMENT, SEND_FRAGMENT])
    conn, fake = _connect(monkeypatch, script, 1 << 30)
    fake.reads.clear()  # (the handshake's)
    assert bytes(conn.recv(5)) == small
    assert len(fake.reads) == 1  # the small reply and the next message's start, in one read
    assert bytes(conn.recv(5)) == data
    through_buffer = sum(n for buf, n in fake.reads if buf is conn._buffer.obj)
    assert through_buffer <= transport._HEAD_READ + 4 * transport._FRAGMENT_HEAD_READ
    assert sum(n for _, n in fake.reads) == len(script)  # every byte read once


def test_a_reply_much_smaller_than_expected_is_not_kept_in_the_larger_buffer(monkeypatch):
    """A caller that expected far more (a hint over twice the reply) gets the reply in a buffer of its
    own length: the expected room is not held while the reply lives; it still decodes in place."""
    t = torch.arange(20_000, dtype=torch.int64)
    reply = serialize(m.ObjectsReply([t]), sender="bob")
    conn, _ = _connect(monkeypatch, _fragmented(reply, [60, 9000]), 4096, max_size=1 << 20)
    with transport.expect_reply(3 * len(reply)):
        got = conn.recv(5)
    assert bytes(got) == reply and type(got.obj) is OwnedBuffer
    assert len(got.obj) < 2 * len(reply)  # (16 bytes of padding at most beside the reply)
    back = deserialize(got)[0].objects[0]
    start = torch.frombuffer(got.obj, dtype=torch.uint8).data_ptr()
    assert torch.equal(back, t) and start <= back.data_ptr() < start + len(got.obj)
