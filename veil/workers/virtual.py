"""VirtualWorker: an in-process worker whose messages still cross the wire format."""

from __future__ import annotations

from typing import Any

import msgpack

from veil.messaging import messages as m
from veil.messaging.frames import FrameParts, HandedParts, frame_pad, owned_buffer
from veil.messaging.serde import EXT_CODES, envelope
from veil.messaging.tensor_payload import ADOPT_MIN_BYTES
from veil.mpc.party import BORROWS, OpenMessage, step_name
from veil.workers.base import BaseWorker


def owned_frame(parts: FrameParts) -> memoryview:
    """A framed message left in parts, copied once into a buffer of its own (as a network transport
    receives one): its raw tensor region on a 16-byte boundary, so the decoder may use a large
    tensor's bytes in place (serde ``adopt``) instead of copying them a second time."""
    head = bytes(memoryview(parts[0]).cast("B")[:5])
    pad = frame_pad(head)
    frame = owned_buffer(pad + parts.nbytes)  # (uninitialized: every byte is written below)
    with memoryview(frame) as view:
        at = pad
        for part in parts:
            part = memoryview(part).cast("B")
            view[at: at + part.nbytes] = part
            at += part.nbytes
    return memoryview(frame)[pad:]


def borrows_only(head: bytes) -> bool:
    """True for a request (its framed header, ``head``) whose opening step and deferred commands are all
    party functions that only read their tensor arguments and return fresh tensors
    (:data:`veil.mpc.party.BORROWS`: a Beaver product's combine with the opened e and f, a truncation
    finish with the opened c), deletions aside. Nothing such a request runs can write into, store or
    return the memory of a tensor it carries, so its tensors may be used in place (the caller's own
    opened values), without the copy that keeps any other request's stored results apart from the
    caller's memory. Read from the header alone (ext payloads left opaque); anything unexpected: False.
    And besides the steps' own checks of their parameters, no step's keyword arguments may carry a
    tensor or a reference (an ``out=`` would make an op write into the caller's buffer): only plain
    values and tuples of them."""
    try:
        env = envelope(head, _ext_mark)
    except Exception:  # noqa: BLE001  (the decoder reports a malformed request; here it is only copied)
        return False
    if type(env) is not list or len(env) < 4 or type(env[3]) is not list:
        return False
    if env[1] == OpenMessage.TYPE:
        if len(env) < 7 or type(env[4]) is not str or env[4] not in BORROWS or not _plain(env[6]):
            return False
    elif env[1] != m.DeleteMessage.TYPE:
        return False
    for item in env[3]:
        if type(item) is int:  # a deletion
            continue
        if type(item) is not list or len(item) < 3 or step_name(item[0]) not in BORROWS or not _plain(item[2]):
            return False
    return True


class _Opaque:
    """An ext payload :func:`borrows_only` does not look into (a tensor, a reference, ...)."""


_OPAQUE = _Opaque()


def _ext_mark(code: int, payload: bytes) -> Any:
    if code == EXT_CODES.TUPLE:  # a tuple's items, looked at like the rest (a tensor inside stays opaque)
        return msgpack.unpackb(payload, raw=False, strict_map_key=False, ext_hook=_ext_mark)
    return _OPAQUE


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` (a header's keyword arguments) holds only plain values: no opaque ext, nested
    at most a few levels (the steps' parameters are flat: an op name, flags, a convolution's geometry)."""
    if type(value) is dict:
        value = value.values()
    elif type(value) is not list:
        return value is not _OPAQUE
    return depth < 4 and all(_plain(v, depth + 1) for v in value)


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
    worker's stored object sharing memory with the caller's tensor), except a request of
    protocol steps that only read them (:func:`borrows_only`: the opened values of a
    Beaver product or a truncation, which every party reads and none keeps) and a dealer's
    seeded material for its last party (its corrections, which only the dealer held: handed
    over with their memory, ``Outbox._exchange``).
    """

    #: its objects live in the requester's process: a party here may be handed an opened value the
    #: threat model keeps from remote parties (a truncation's whole c; ``WorkerRuntime.in_process``)
    in_this_process = True
    #: requests over this many bytes reach :meth:`_recv_msg` in parts (made one owned buffer there)
    frame_parts_over: int | None = ADOPT_MIN_BYTES
    #: fresh replies over this many bytes leave in parts (made one owned buffer, unless ``own_replies`` is off)
    reply_parts_over: int | None = ADOPT_MIN_BYTES
    #: hand fresh replies in parts over with their memory (False: as FrameParts, like a network server's)
    own_replies = True

    def _recv_msg(self, data: Any) -> Any:
        if type(data) is FrameParts:
            data = HandedParts.of(data) if borrows_only(data[0]) else owned_frame(data)
        return super()._recv_msg(data)

    def _serve_decoded(self, msg: Any, sender: str, prelude: list) -> Any:
        reply = super()._serve_decoded(msg, sender, prelude)
        # (FrameParts only for a reply marked fresh: BaseWorker._reply_bytes)
        return HandedParts.of(reply) if self.own_replies and type(reply) is FrameParts else reply
