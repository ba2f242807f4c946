"""Frames of skeleton commands (``veil/workers/skeletons.py``), the small request of every training step:
written without building the message (:func:`serialize_skeleton`, :class:`SkeletonFramer`: the same
bytes as :func:`veil.messaging.serde.serialize` of the ``SkeletonCommand``) and a use without
definition read with msgpack's own types (:func:`decode_skeleton_use`; anything else goes to
:func:`veil.messaging.serde.deserialize`)."""

from __future__ import annotations

from typing import Any

import msgpack

from veil.exceptions import SerializationError
from veil.messaging.messages import SkeletonCommand
from veil.messaging.serde import _NATIVE_KEEP, WIRE_VERSION, _pack_native, serialize

_SKELETON_TYPE = SkeletonCommand.TYPE


def serialize_skeleton(sender: str, prelude: list | None, skeleton: int, ids: list, return_ids: list,
                       define: list | None) -> bytes:
    """:func:`serialize` of ``SkeletonCommand(skeleton, ids, return_ids, define)`` without building it
    (the small synchronous command of every training step); the same bytes."""
    message = [WIRE_VERSION, _SKELETON_TYPE, sender, prelude or [], skeleton, ids, return_ids, define]
    if define is None:
        try:
            return _pack_native(message)
        except (TypeError, ValueError, OverflowError):  # a prelude of deferred commands with our types
            pass
    return serialize(SkeletonCommand(skeleton, ids, return_ids, define), sender, prelude)


class SkeletonFramer:
    """:func:`serialize_skeleton` of uses (no definition) from one sender, for a caller that sends to one
    destination at a time (the outbox, under that destination's send lock): its own msgpack Packer (no
    thread-local lookup) and the frame's constant head (array of 8, version, type, sender) packed once.
    The same bytes: msgpack encodes each element of an array on its own."""

    __slots__ = ("sender", "_head", "_packer")

    def __init__(self, sender: str) -> None:
        self.sender = sender
        self._head = b"\x98" + msgpack.packb([WIRE_VERSION, _SKELETON_TYPE, sender], use_bin_type=True)[1:]
        self._packer = msgpack.Packer(strict_types=True, use_bin_type=True)

    def use(self, prelude: list | None, skeleton: int, ids: list, return_ids: list) -> bytes:
        try:
            # the last five elements as an array of 5 (its one-byte header dropped) after the head
            tail = self._packer.pack([prelude or [], skeleton, ids, return_ids, None])
        except (TypeError, ValueError, OverflowError):  # a prelude of deferred commands with our types
            return serialize(SkeletonCommand(skeleton, ids, return_ids, None), self.sender, prelude)
        if len(tail) > _NATIVE_KEEP:  # its buffer grew with a large batch: not kept
            self._packer = msgpack.Packer(strict_types=True, use_bin_type=True)
        return self._head + tail[1:]


_SKELETON_HEAD = bytes((0x98, WIRE_VERSION, SkeletonCommand.TYPE))  # fixarray of 8, version, type


def _no_ext(code: int, data: bytes) -> Any:
    raise SerializationError("not a skeleton use")  # (caught below: the general decoder takes it)


def decode_skeleton_use(data: Any) -> tuple | None:
    """``(SkeletonCommand, sender, prelude)`` of the most frequent request, a skeleton command without
    definition whose prelude holds only ids to free, decoded with msgpack's own types only (no ext
    hook, no frame, no thread-local state); None for anything else, which :func:`deserialize` then
    decodes (and checks) as usual. The checks are deserialize's, for this one shape."""
    if type(data) is not bytes or data[:3] != _SKELETON_HEAD:
        return None
    try:
        value = msgpack.unpackb(data, raw=False, ext_hook=_no_ext)
    except Exception:  # an ext type (a definition, deferred commands), or malformed: the general decoder
        return None
    if type(value) is not list or len(value) != 8 or value[7] is not None:
        return None
    sender, prelude = value[2], value[3]
    if type(sender) is not str or type(prelude) is not list:
        return None
    for item in prelude:
        if type(item) is not int:
            return None
    # SkeletonCommand(value[4], value[5], value[6]) without the dataclass __init__ (~1 K instructions)
    msg = _new_object(SkeletonCommand)
    msg.skeleton = value[4]
    msg.ids = value[5]
    msg.return_ids = value[6]
    msg.define = None
    return msg, sender, prelude


_new_object = object.__new__
