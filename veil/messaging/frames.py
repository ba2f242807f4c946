"""A framed message's containers: the parts a sender leaves it in, and the buffers a receiver owns.

A framed message is ``FRAME_MAGIC``, the msgpack header's length (4 bytes, little-endian), the header,
then the raw region of out-of-band tensor bytes (:mod:`veil.messaging.serde`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from veil.exceptions import SerializationError

#: first byte of a framed message (header + out-of-band tensor bytes); msgpack never uses 0xC1
FRAME_MAGIC = b"\xc1"


class FrameParts(list):
    """A framed message left in parts: ``[magic + header length + header, tensor bytes...]``, each
    tensor's bytes still a view of its memory. A network transport writes them straight to the
    socket, so a large ``.send()`` makes no copy of the tensor at all on the client. ``nbytes``:
    the whole message's length."""

    __slots__ = ("nbytes",)


class HandedParts(FrameParts):
    """FrameParts handed over in process together with the memory of their tensors: the tensors the
    parts view are fresh (an opening step's outputs, which nothing else holds) and the sender drops
    them, so :func:`deserialize` uses each large part in place (as it adopts an :class:`OwnedFrame`'s
    bytes) and the reply crosses with no copy at all. Only made in process (``VirtualWorker``): bytes
    from a socket are never one."""

    __slots__ = ()

    @classmethod
    def of(cls, parts: FrameParts) -> "HandedParts":
        handed = cls(parts)
        handed.nbytes = parts.nbytes
        return handed


def frame_nbytes(data: Any) -> int:
    """The length of a message as bytes or in parts (FrameParts, HandedParts)."""
    return data.nbytes if isinstance(data, FrameParts) else len(data)


def split_frame(data: bytes) -> tuple[memoryview, memoryview | None]:
    """``(msgpack header, raw region)``; the raw region is None for a plain (unframed) message."""
    view = memoryview(data)
    if not view.nbytes or view[0] != FRAME_MAGIC[0]:
        return view, None
    if view.nbytes < 5:
        raise SerializationError("truncated message frame")
    n = int.from_bytes(view[1:5], "little")
    if 5 + n > view.nbytes:
        raise SerializationError(f"message frame header of {n} bytes exceeds the {view.nbytes}-byte frame")
    return view[5: 5 + n], view[5 + n:]


class OwnedFrame(bytearray):
    """A received message's buffer that belongs to its decoder alone and is never reused (the
    network transports make one per large message). :func:`deserialize` lets the out-of-band
    tensor that fills at least half of its raw region (and ``ADOPT_MIN_BYTES``) use its memory in
    place instead of copying it; that tensor keeps the whole buffer alive, and decoding the same
    OwnedFrame twice would give tensors sharing memory."""

    __slots__ = ()


class OwnedBuffer(np.ndarray):
    """An :class:`OwnedFrame` whose bytes start uninitialized (:func:`owned_buffer`): a transport that
    knows a message's size receives straight into it. ``bytearray(n)`` zero-fills its ``n`` bytes first, a
    pass over memory the socket then overwrites (~4% of a network party's CPU under peer openings).
    Decoded from a ``memoryview`` of it, as an OwnedFrame is."""

    __slots__ = ()


def owned_buffer(nbytes: int) -> OwnedBuffer:
    """``nbytes`` uninitialized bytes for one received message (see :class:`OwnedBuffer`)."""
    return np.empty(nbytes, dtype=np.uint8).view(OwnedBuffer)


#: buffers the decoder may use in place (a message received into memory nothing else references)
OWNED = (OwnedFrame, OwnedBuffer)


def frame_pad(head: bytes) -> int:
    """Bytes to put in front of a framed message starting with ``head`` (its first 5 bytes or
    more) so that its raw tensor region starts on a 16-byte boundary; 0 when it cannot tell."""
    if len(head) < 5 or head[0] != FRAME_MAGIC[0]:
        return 0
    return -(5 + int.from_bytes(head[1:5], "little")) % 16
