"""The only module that knows veil's wire format.

A message is a msgpack array ``[version, type, sender, prelude, *fields]``; the
prelude is what the receiver does first, in order: an integer frees an object
(pointer garbage collection), an array runs a deferred command (pipelining).
Values that msgpack does not know natively travel as msgpack *ext* types with a
code from ``EXT_CODES``; tensors are ``[dtype name, shape, requires_grad, raw
little-endian bytes]``. Decoding never runs code: no pickle, no ``torch.load``;
dtypes come from a fixed table, shapes and byte lengths are checked before any
allocation, and every failure becomes a :class:`SerializationError`.

Tensor payloads of a message travel *out of band*: when a message holds tensors
at its top level (fields, lists/maps in them, and the object of a StoredObject
there: ``.send()``), :func:`serialize` writes
``0xC1 | u32 header length | msgpack header | raw tensor bytes ...``, where each
tensor in the header is a small ``TENSOR_OOB`` ext ``[dtype, shape,
requires_grad, byte length]`` and its bytes follow the header in order. That is
one copy from tensor memory into the frame, and one from the frame into the
received tensor (its own memory: it aliases nothing the sender or a replayed
frame could change). ``0xC1`` is the one byte msgpack never uses, so a frame is
told apart from a plain message (tensors nested in ext payloads, values for
persistence) by its first byte. Decoding checks every length against what was
received before allocating, and that the raw region is consumed exactly.

Extensions (pointers, HE ciphertexts, shared tensors) register an encoder for
their Python type and a decoder for their ext code with :func:`register_ext`.
"""

from __future__ import annotations

import operator
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import torch

from veil.exceptions import CommandTimeoutError, SerializationError, VersionMismatchError
from veil.messaging.frames import FRAME_MAGIC, OWNED, FrameParts, HandedParts, OwnedFrame, split_frame
from veil.messaging.messages import FIELD_NAMES, MESSAGE_TYPES, CommandMessage, Descriptor, ObjectRef, StoredObject
from veil.messaging.tensor_payload import (  # noqa: F401  (DTYPES, MAX_DIMS, tensor_spec: re-exported)
    ADOPT_MIN_BYTES, DTYPE_NAMES, DTYPES, MAX_DIMS, _build_tensor, _nbytes, _tensor_raw, decode_tensor,
    encode_tensor, tensor_spec)

WIRE_VERSION = 2  # 2: listing and search pages (ListObjectsMessage and SearchMessage carry after=)
#: how deeply ext payloads may nest (a tuple in a tuple in ...). Each level is a
#: nested call into msgpack's C unpacker; a few hundred overflow the C stack
#: (SIGSEGV) long before Python's recursion limit, so the limit is checked here.
MAX_EXT_DEPTH = 32

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for
    raise ImportError("veil's wire format assumes a little-endian host")

class EXT_CODES:
    TENSOR = 1
    POINTER = 2
    REF = 3
    SLICE = 4
    ELLIPSIS = 5
    DTYPE = 6
    TUPLE = 7
    DEVICE = 8
    SIZE = 9
    DESCRIPTOR = 10
    STORED_OBJECT = 11
    TENSOR_OOB = 12  # a message's tensor whose bytes follow the header (framed messages only)
    MEMORY_FORMAT = 13
    # 20..39: extensions (HE ciphertexts, shared tensors, plans)


@dataclass
class DecodeContext:
    """What decoding needs from the receiving side (to rebuild pointers it will own)."""

    make_pointer: Callable[..., Any] | None = None
    #: the network session the decode is for (None: none; HE decoding scopes received CKKS contexts by it)
    session: Callable[[], Any] | None = None


# ----------------------------------------------------------- ext registry

Encoder = Callable[[Any], tuple[int, bytes]]
Decoder = Callable[[bytes, DecodeContext], Any]

_ENCODERS: dict[type, Encoder] = {}
_DECODERS: dict[int, Decoder] = {}


def register_ext(code: int, types: tuple[type, ...], encode: Callable[[Any], bytes], decode: Decoder) -> None:
    """Teaches the wire format a new type (explicit registry, one entry per type)."""
    if code in _DECODERS:
        raise ValueError(f"ext code {code} is already registered")
    _DECODERS[code] = decode
    for tp in types:
        _ENCODERS[tp] = lambda obj, _c=code, _e=encode: (_c, _e(obj))


class _Level(threading.local):
    level = 0  # the per-thread default, read without getattr's default (which raises and catches)


_depth = _Level()  # ext nesting of the decode running on this thread
_pack_depth = _Level()  # and of the encode


def _pack(value: Any) -> bytes:
    # The same depth limit as decoding: whatever encodes also decodes.
    level = _pack_depth.level
    if level >= MAX_EXT_DEPTH:
        raise SerializationError(f"value nested deeper than {MAX_EXT_DEPTH} levels")
    _pack_depth.level = level + 1
    try:
        return msgpack.packb(value, default=_default, strict_types=True, use_bin_type=True)
    finally:
        _pack_depth.level = level


def _unpack(payload: bytes, ctx: DecodeContext) -> Any:
    level = _depth.level
    if level >= MAX_EXT_DEPTH:
        raise SerializationError(f"value nested deeper than {MAX_EXT_DEPTH} levels")
    _depth.level = level + 1
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False, ext_hook=_hook_for(ctx))
    finally:
        _depth.level = level


class _OOBLocal(threading.local):
    out = region = None  # per-thread defaults (no getattr default, which raises and catches)


_oob = _OOBLocal()  # the out-of-band buffers of the message being encoded / decoded on this thread


def _default(obj: Any) -> msgpack.ExtType:
    out = _oob.out
    if out is not None and type(obj) in _OOB_TENSOR_TYPES and _pack_depth.level in out.levels:
        head, raw = _tensor_raw(obj)
        out.buffers.append(raw)
        return msgpack.ExtType(EXT_CODES.TENSOR_OOB, msgpack.packb([*head, raw.nbytes]))
    encoder = _ENCODERS.get(type(obj))
    if encoder is None:
        for tp, enc in _ENCODERS.items():  # subclasses (nn.Parameter, namedtuples)
            if isinstance(obj, tp):
                encoder = enc
                break
    if encoder is None:
        raise SerializationError(f"cannot serialize object of type {type(obj).__name__}")
    code, payload = encoder(obj)
    return msgpack.ExtType(code, payload)


_CTX_SENTINEL = DecodeContext()
_REF_CODE = EXT_CODES.REF


def _hook_for(ctx: DecodeContext) -> Callable[[int, bytes], Any]:
    """msgpack's ext hook for ``ctx``. Object references, the most frequent ext by far (every
    pointer argument of every command), are decoded inline: the same check as ``_decode_ref``,
    the decoder registered for that code (codes are never re-registered)."""
    hook = ctx.__dict__.get("_ext_hook")
    if hook is None:
        def hook(code: int, data: bytes) -> Any:
            if code == _REF_CODE:
                if len(data) != 8:
                    raise SerializationError("object reference must be an 8-byte id")
                return ObjectRef(int.from_bytes(data, "little"))
            return _ext_hook(code, data, ctx)

        ctx.__dict__["_ext_hook"] = hook  # one closure per context (a worker's lives as long as it)
    return hook


def _ext_hook(code: int, data: bytes, ctx: DecodeContext) -> Any:
    if code == EXT_CODES.TENSOR_OOB:
        return _take_oob_tensor(data)
    decoder = _DECODERS.get(code)
    if decoder is None:
        raise SerializationError(f"unknown ext type code {code}")
    return decoder(data, ctx)


class _OutOfBand:
    """Encoding: the tensor views of the frame so far. Decoding: the raw region after the header,
    handed out in order. ``levels``: the ext nesting levels whose tensors travel out of band (the
    message's own fields, and the payload of a StoredObject among them, see :func:`_oob_inside`)."""

    __slots__ = ("buffers", "view", "at", "levels", "adopt", "parts")

    def __init__(self, view: memoryview | None = None, adopt: bool = False, parts: list | None = None) -> None:
        self.buffers: list[memoryview] = []
        self.view, self.at, self.levels, self.adopt = view, 0, {1}, adopt
        self.parts = parts  # HandedParts: one buffer per tensor, in order (``at`` counts parts)


def _oob_inside(state: "_OutOfBand | None", level: int, run: Callable[[], Any]) -> Any:
    """Runs a nested pack/unpack whose tensors travel out of band too (only serde's own pure encoders:
    their payload bytes exist only inside this frame, never cached or stored apart from it)."""
    inner = level + 1
    opened = state is not None and level in state.levels and inner not in state.levels
    if opened:
        state.levels.add(inner)
    try:
        return run()
    finally:
        if opened:
            state.levels.discard(inner)


def _take_oob_tensor(data: bytes) -> torch.Tensor:
    region = _oob.region
    if region is None or _depth.level not in region.levels:  # a frame's own fields only, not other payloads
        raise SerializationError("out-of-band tensor outside a framed message")
    head = msgpack.unpackb(data, raw=False)
    if not isinstance(head, list) or len(head) != 4 or type(head[3]) is not int:
        raise SerializationError("out-of-band tensor header must be [dtype, shape, requires_grad, byte length]")
    dtype_name, shape, requires_grad, n = head
    if region.parts is not None:
        return _take_handed_part(region, dtype_name, shape, requires_grad, n)
    if n != _nbytes(dtype_name, shape) or n > len(region.view) - region.at:  # before any allocation
        raise SerializationError(f"out-of-band tensor of {n} bytes does not match its shape or the frame")
    raw = region.view[region.at: region.at + n]
    region.at += n
    # In place only for the tensor that is most of the frame: it keeps the whole buffer alive, and
    # what it holds must stay close to what the worker accounts for it (session quotas).
    if region.adopt and n >= ADOPT_MIN_BYTES and 2 * n >= len(region.view) and not raw.readonly:
        return _build_tensor(dtype_name, shape, requires_grad, raw, adopt=True)
    return _build_tensor(dtype_name, shape, requires_grad, raw)


def _take_handed_part(region: _OutOfBand, dtype_name: Any, shape: Any, requires_grad: Any, n: Any) -> torch.Tensor:
    """The next tensor of a :class:`HandedParts` message: its own part, used in place from
    ``ADOPT_MIN_BYTES`` on (the sender handed the memory over), copied below that."""
    parts, k = region.parts, region.at
    if n != _nbytes(dtype_name, shape) or k >= len(parts) or parts[k].nbytes != n:
        raise SerializationError(f"out-of-band tensor of {n} bytes does not match its shape or its part")
    raw = parts[k]
    region.at = k + 1
    return _build_tensor(dtype_name, shape, requires_grad, raw, adopt=n >= ADOPT_MIN_BYTES and not raw.readonly)


def _list_payload(data: bytes, ctx: DecodeContext, n: int | None = None) -> list:
    value = _unpack(data, ctx)
    if not isinstance(value, list) or (n is not None and len(value) != n):
        raise SerializationError("malformed ext payload")
    return value


def _decode_slice(data: bytes, ctx: DecodeContext) -> slice:
    parts = _list_payload(data, ctx, 3)
    for p in parts:
        if p is not None and type(p) is not int:
            raise SerializationError(f"slice bounds must be int or None, got {p!r}")
    return slice(*parts)


def _decode_ref(data: bytes, ctx: DecodeContext) -> ObjectRef:
    if len(data) != 8:
        raise SerializationError("object reference must be an 8-byte id")
    return ObjectRef(int.from_bytes(data, "little"))


def _decode_dtype(data: bytes, ctx: DecodeContext) -> torch.dtype:
    name = _unpack(data, ctx)
    if name not in DTYPES:
        raise SerializationError(f"unknown dtype {name!r}")
    return DTYPES[name]


def _decode_device(data: bytes, ctx: DecodeContext) -> torch.device:
    name = _unpack(data, ctx)
    if name not in ("cpu", "meta"):
        raise SerializationError(f"device {name!r} not accepted")
    return torch.device(name)


#: the memory formats a message may name (``clone(memory_format=...)``, ``contiguous(...)``)
MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d,
}
_MEMORY_FORMAT_NAMES = {v: k for k, v in MEMORY_FORMATS.items()}


def _decode_memory_format(data: bytes, ctx: DecodeContext) -> torch.memory_format:
    name = _unpack(data, ctx)
    if not isinstance(name, str) or name not in MEMORY_FORMATS:
        raise SerializationError(f"unknown memory format {name!r}")
    return MEMORY_FORMATS[name]


def _decode_size(data: bytes, ctx: DecodeContext) -> torch.Size:
    dims = _list_payload(data, ctx)
    if not all(type(d) is int for d in dims):
        raise SerializationError("torch.Size must hold integers")
    return torch.Size(dims)


def _decode_descriptor(data: bytes, ctx: DecodeContext) -> Descriptor:
    oid, shape, dtype, rg, tags, desc = _list_payload(data, ctx, 6)
    tensor_spec(dtype, list(shape) if isinstance(shape, (list, tuple)) else shape)
    return Descriptor(oid, tuple(shape), dtype, bool(rg), tuple(tags), desc)


def _decode_stored(data: bytes, ctx: DecodeContext) -> StoredObject:
    oid, obj, tags, desc, allowed = _oob_inside(_oob.region, _depth.level,
                                                lambda: _list_payload(data, ctx, 5))
    if type(oid) is not int or not isinstance(tags, list) or not isinstance(desc, str):
        raise SerializationError("malformed stored object")
    if allowed is not None and not (isinstance(allowed, list) and all(isinstance(u, str) for u in allowed)):
        raise SerializationError("allowed_users must be a list of user ids")
    return StoredObject(oid, obj, tuple(tags), desc, tuple(allowed) if allowed is not None else None)


register_ext(EXT_CODES.TENSOR, (torch.Tensor,), encode_tensor, lambda d, ctx: decode_tensor(d))
# ids are the most frequent value on the wire: fixed 8 bytes, no nested msgpack
register_ext(EXT_CODES.REF, (ObjectRef,), lambda r: r.id.to_bytes(8, "little"), _decode_ref)
register_ext(EXT_CODES.SLICE, (slice,), lambda s: _pack([s.start, s.stop, s.step]), _decode_slice)
register_ext(EXT_CODES.ELLIPSIS, (type(Ellipsis),), lambda e: b"", lambda d, ctx: Ellipsis)
def _encode_dtype(dt: torch.dtype) -> bytes:
    if dt not in DTYPE_NAMES:  # uint16, float8, complex32, ...: not in the wire's dtype table
        raise SerializationError(f"cannot send dtype {dt}: the wire carries {', '.join(sorted(DTYPES))}")
    return _pack(DTYPE_NAMES[dt])


register_ext(EXT_CODES.DTYPE, (torch.dtype,), _encode_dtype, _decode_dtype)
register_ext(EXT_CODES.SIZE, (torch.Size,), lambda s: _pack(list(s)), _decode_size)
register_ext(EXT_CODES.TUPLE, (tuple,), lambda t: _pack(list(t)), lambda d, ctx: tuple(_list_payload(d, ctx)))
register_ext(EXT_CODES.DEVICE, (torch.device,), lambda dev: _pack(str(dev.type)), _decode_device)
register_ext(EXT_CODES.MEMORY_FORMAT, (torch.memory_format,), lambda f: _pack(_MEMORY_FORMAT_NAMES[f]),
             _decode_memory_format)
register_ext(
    EXT_CODES.DESCRIPTOR,
    (Descriptor,),
    lambda x: _pack([x.id, list(x.shape), x.dtype, x.requires_grad, list(x.tags), x.description]),
    _decode_descriptor,
)
register_ext(
    EXT_CODES.STORED_OBJECT,
    (StoredObject,),
    lambda s: _oob_inside(_oob.out, _pack_depth.level, lambda: _pack(
        [s.id, s.obj, list(s.tags), s.description, None if s.allowed_users is None else list(s.allowed_users)]
    )),
    _decode_stored,
)
#: tensors that travel out of band (other subclasses, e.g. pointers, keep their registered encoders)
_OOB_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# Order matters for isinstance fallback: torch.Size before tuple.
_ENCODERS = {torch.Size: _ENCODERS.pop(torch.Size), **_ENCODERS}


# --------------------------------------------------------------- messages


class _NativePacker(threading.local):
    packer = None  # this thread's msgpack Packer (packb would build one, with its buffer, per call)


_NATIVE = _NativePacker()
_NATIVE_KEEP = 1 << 16  # a packer whose buffer grew past this (a large batch) is not kept


def _pack_native(message: list) -> bytes:
    """``message`` packed as msgpack's own types only (no ``default``: a type of ours raises TypeError;
    the packer resets itself on errors, and never calls back into Python, so it is never re-entered)."""
    packer = _NATIVE.packer
    if packer is None:
        packer = _NATIVE.packer = msgpack.Packer(strict_types=True, use_bin_type=True)
    data = packer.pack(message)
    if len(data) > _NATIVE_KEEP:
        _NATIVE.packer = None
    return data


#: message type -> its field values in wire order, as a tuple (one C call per message)
_FIELD_GETTERS: dict[type, Callable[[Any], tuple]] = {}


def _field_getter(cls: type) -> Callable[[Any], tuple]:
    names = FIELD_NAMES.get(cls)
    if names is None:
        raise SerializationError(f"{cls.__name__} is not a registered message type")
    if len(names) > 1:
        getter = operator.attrgetter(*names)
    elif names:
        one = operator.attrgetter(names[0])
        getter = lambda msg: (one(msg),)  # noqa: E731
    else:
        getter = lambda msg: ()  # noqa: E731
    _FIELD_GETTERS[cls] = getter
    return getter


def serialize(msg: Any, sender: str = "", prelude: list | None = None,
              parts_over: int | None = None) -> bytes | FrameParts:
    """Encodes a message dataclass, with its prelude (deletions and deferred commands).

    ``parts_over``: a framed message longer than this comes back as :class:`FrameParts` (for
    transports that write it themselves) instead of one joined buffer.
    """
    cls = type(msg)
    get_fields = _FIELD_GETTERS.get(cls)
    if get_fields is None:
        get_fields = _field_getter(cls)
    try:
        # Top-level tuples (command args) travel as plain arrays; handlers accept both.
        values = [v if type(v) is not tuple else list(v) for v in get_fields(msg)]
        message = [WIRE_VERSION, cls.TYPE, sender, prelude or [], *values]
        try:  # most messages hold only msgpack's own types (pointers arrive pre-encoded): one pack call
            return _pack_native(message)
        except (TypeError, ValueError, OverflowError):  # a type of ours (a tensor, a tuple...): the full encoder
            pass
        previous, _oob.out = _oob.out, _OutOfBand()
        try:
            header = _pack(message)
            buffers = _oob.out.buffers
        finally:
            _oob.out = previous
    except SerializationError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise SerializationError(f"cannot serialize {cls.__name__}: {e}") from e
    if not buffers:
        return header
    head = FRAME_MAGIC + len(header).to_bytes(4, "little") + header
    if parts_over is not None:
        nbytes = len(head) + sum(b.nbytes for b in buffers)
        if nbytes > parts_over:
            parts = FrameParts((head, *buffers))
            parts.nbytes = nbytes
            return parts
    # the only copy of the tensors' bytes on the way out: straight from their memory into the frame
    return b"".join((head, *buffers))


def _opaque(code: int, payload: bytes) -> None:
    return None


def envelope(data: bytes, ext_hook: Callable[[int, bytes], Any] = _opaque) -> Any:
    """The message array with ext payloads left opaque (``None``, or what ``ext_hook(code, payload)``
    makes of them): a cheap look at type and fields.

    Builds no objects and runs no decoder; raises like msgpack on malformed input.
    """
    header, _ = split_frame(data)
    return msgpack.unpackb(header, raw=False, strict_map_key=False, ext_hook=ext_hook)


_COMMAND_FIELDS = len(FIELD_NAMES[CommandMessage])


def _short(value: Any, limit: int = 60) -> str:
    """A sender's value as an error message may quote it: its repr, cut (a nested frame's could be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def deserialize(data: bytes, ctx: DecodeContext | None = None) -> tuple[Any, str, list[int]]:
    """Decodes bytes into ``(message, sender, prelude)``; any failure is a SerializationError."""
    if type(data) is HandedParts:  # in process, the tensors' memory handed over with them
        header, raw = split_frame(data[0])
        if raw is None:
            raise SerializationError("handed parts without a message frame")
        region = _OutOfBand(raw, parts=[memoryview(p).cast("B") for p in data[1:]])
    else:
        if type(data) is FrameParts:  # a message captured on its way to a transport (tests, benchmarks)
            data = b"".join(data)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SerializationError(f"expected bytes, got {type(data).__name__}")
        adopt = type(data) is OwnedFrame or (type(data) is memoryview and type(data.obj) in OWNED)
        header, raw = split_frame(data)
        region = _OutOfBand(raw, adopt) if raw is not None else None
    previous = _oob.region
    swap = region is not None or previous is not None  # (a plain message on a clean thread: nothing to set)
    if swap:
        _oob.region = region
    try:
        ctx = ctx or _CTX_SENTINEL
        hook = ctx.__dict__.get("_ext_hook") or _hook_for(ctx)
        level = _depth.level  # (_unpack, inlined: one request, one decode call)
        if level >= MAX_EXT_DEPTH:
            raise SerializationError(f"value nested deeper than {MAX_EXT_DEPTH} levels")
        _depth.level = level + 1
        try:
            value = msgpack.unpackb(header, raw=False, strict_map_key=False, ext_hook=hook)
        finally:
            _depth.level = level
        if region is not None and region.at != (raw.nbytes if region.parts is None else len(region.parts)):
            left = raw.nbytes - region.at if region.parts is None else sum(p.nbytes for p in region.parts[region.at:])
            raise SerializationError(f"message frame has {left} bytes no field refers to")
    except (SerializationError, CommandTimeoutError):  # (a request's deadline or cancellation, met while decoding)
        raise
    except Exception as e:  # msgpack raises many types on hostile input; normalize them
        raise SerializationError(f"malformed message: {type(e).__name__}: {e}") from e
    finally:
        if swap:
            _oob.region = previous
    if not isinstance(value, list) or len(value) < 4:
        raise SerializationError("a message must be an array [version, type, sender, prelude, ...]")
    version, type_code, sender, prelude, *field_values = value
    if version != WIRE_VERSION:
        raise VersionMismatchError(
            f"wire-format version {_short(version)} is not supported (this worker speaks {WIRE_VERSION})")
    cls = MESSAGE_TYPES.get(type_code) if type(type_code) is int else None
    if cls is None:
        raise SerializationError(f"unknown message type {_short(type_code)}")
    names = FIELD_NAMES[cls]
    if len(field_values) != len(names):
        raise SerializationError(f"{cls.__name__} takes {len(names)} fields, got {len(field_values)}")
    if not isinstance(sender, str) or not isinstance(prelude, list):
        raise SerializationError("message sender must be a string and its prelude a list")
    for item in prelude:
        if type(item) is not int and not (type(item) is list and (
                len(item) == _COMMAND_FIELDS or (3 <= len(item) <= 4 and type(item[0]) is int))):
            raise SerializationError("a prelude holds object ids to free, deferred commands and skeleton uses")
    return cls(*field_values), sender, prelude


def encode_value(value: Any) -> bytes:
    """Encodes a bare value (tests, plans, persistence)."""
    return _pack(value)


def decode_value(data: bytes, ctx: DecodeContext | None = None) -> Any:
    try:
        return _unpack(data, ctx or _CTX_SENTINEL)
    except SerializationError:
        raise
    except Exception as e:
        raise SerializationError(f"malformed value: {type(e).__name__}: {e}") from e
