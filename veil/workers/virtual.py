"""VirtualWorker: an in-process worker whose messages still cross the wire format."""

from __future__ import annotations

from typing import Any

from veil.messaging.serde import FrameParts, HandedParts, OwnedFrame, frame_pad
from veil.messaging.tensor_payload import ADOPT_MIN_BYTES
from veil.workers.base import BaseWorker


def owned_frame(parts: FrameParts) -> memoryview:
    """A framed message left in parts, copied once into a buffer of its own (as a network transport
    receives one): its raw tensor region on a 16-byte boundary, so the decoder may use a large
    tensor's bytes in place (serde ``adopt``) instead of copying them a second time."""
    head = bytes(memoryview(parts[0]).cast("B")[:5])
    pad = frame_pad(head)
    frame = OwnedFrame(pad + parts.nbytes)
    with memoryview(frame) as view:
        at = pad
        for part in parts:
            part = memoryview(part).cast("B")
            view[at: at + part.nbytes] = part
            at += part.nbytes
    return memoryview(frame)[pad:]


class VirtualWorker(BaseWorker):
    """A worker living in this Python process (simulations, tests, tutorials).

    Every request is serialized and deserialized exactly as for a network worker,
    so anything that works here exercises the same wire format and checks. Large
    requests cross as one owned buffer, as a network transport's received frames do:
    the tensor bytes are copied once on the way (not joined, then copied again by the
    decoder). Large fresh replies (an opening step's outputs, which nothing on the
    worker holds) are handed over with their memory (serde ``HandedParts``): the
    caller's decoder uses it in place, so they cross with no copy at all. Requests
    keep their copy: their tensors are the caller's (a ``.send()`` must not leave the
    worker's stored object sharing memory with the caller's tensor).
    """

    #: requests over this many bytes reach :meth:`_recv_msg` in parts (made one owned buffer there)
    frame_parts_over: int | None = ADOPT_MIN_BYTES
    #: fresh replies over this many bytes leave in parts (made one owned buffer, unless ``own_replies`` is off)
    reply_parts_over: int | None = ADOPT_MIN_BYTES
    #: hand fresh replies in parts over with their memory (False: as FrameParts, like a network server's)
    own_replies = True

    def _recv_msg(self, data: Any) -> Any:
        if type(data) is FrameParts:
            data = owned_frame(data)
        return super()._recv_msg(data)

    def _serve_decoded(self, msg: Any, sender: str, prelude: list) -> Any:
        reply = super()._serve_decoded(msg, sender, prelude)
        # (FrameParts only for a reply marked fresh: BaseWorker._reply_bytes)
        return HandedParts.of(reply) if self.own_replies and type(reply) is FrameParts else reply
