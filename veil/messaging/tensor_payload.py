"""A tensor's bytes on the wire: ``[dtype name, shape, requires_grad, raw little-endian bytes]``.

Encoding reads the tensor's memory (no copy when it is contiguous); decoding checks the dtype
against a fixed table and every size against the bytes received before allocating, and builds
a tensor with its own memory (or, when the caller owns the buffer, adopts it in place).
:mod:`veil.messaging.serde` frames these payloads in and out of band.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import torch

from veil.exceptions import SerializationError

MAX_DIMS = 64
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_ITEMSIZE: dict[torch.dtype, int] = {dt: torch.empty((), dtype=dt).element_size() for dt in DTYPES.values()}
#: address alignment a tensor used in place must have (its element size; complex: its component's)
_ALIGN: dict[torch.dtype, int] = {dt: min(size, 8) for dt, size in _ITEMSIZE.items()}
#: out-of-band tensors at least this large are used in place when the decoder may adopt the buffer
ADOPT_MIN_BYTES = 1 << 16


# ------------------------------------------------------------------ tensors


def spans_past_storage(t: torch.Tensor) -> bool:
    """Whether the strided tensor ``t``'s shape reaches bytes past the end of its storage (a failed ``out=`` resize
    of a tensor whose storage cannot grow leaves one: the handler drops it, veil/workers/storage_overrun.py; the
    serializer refuses it too, so that no reply ever carries the process's memory beyond a storage). ~0.5 us for
    a contiguous tensor."""
    if t.layout is not torch.strided or t.is_meta or t.numel() == 0:
        return False
    if t.is_contiguous():
        last = t.storage_offset() + t.numel() - 1
    else:
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
    return (last + 1) * t.element_size() > t.untyped_storage().nbytes()


def _tensor_raw(t: torch.Tensor) -> tuple[list, memoryview]:
    """``([dtype name, shape, requires_grad], a view of its bytes)`` of a dense CPU tensor, no copy if contiguous."""
    if t.layout != torch.strided:
        raise SerializationError(f"cannot serialize a {t.layout} tensor (only dense tensors)")
    if t.dtype not in DTYPE_NAMES:
        raise SerializationError(f"cannot serialize dtype {t.dtype}")
    if spans_past_storage(t):
        raise SerializationError("cannot serialize a tensor whose shape spans past its storage")
    data = t.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    flat = data.reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # e.g. a broadcast size-1 tensor keeps stride 0
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    # Autograd history never travels: a leaf keeps requires_grad (parameters),
    # a computed result (e.g. a fetched loss) arrives as plain data.
    head = [DTYPE_NAMES[t.dtype], list(t.shape), bool(t.requires_grad and t.is_leaf)]
    raw = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
    return head, raw


def encode_tensor(t: torch.Tensor) -> bytes:
    """A dense CPU tensor as ``[dtype, shape, requires_grad, raw bytes]`` (in band: values, nested payloads)."""
    head, raw = _tensor_raw(t)
    # The same bytes as packing the 4-array, joined straight from the tensor's
    # memory: one copy instead of msgpack's buffer growth (~2x faster for MBs).
    return b"".join((b"\x94", msgpack.packb(head)[1:], _bin_header(raw.nbytes), raw))


def _bin_header(n: int) -> bytes:
    """msgpack's header of a bin of ``n`` bytes (bin 8/16/32)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


#: the tensor payload's 4-array header, dtype name, shape and flag fit in this many bytes
_HEAD_BYTES = 64 + 9 * MAX_DIMS


def _split_tensor_payload(payload: bytes) -> tuple[list, memoryview]:
    """``([dtype, shape, requires_grad], raw bytes view)`` without copying the raw bytes."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=_HEAD_BYTES + 16)
    unpacker.feed(payload[: _HEAD_BYTES + 5])
    if unpacker.read_array_header() != 4:
        raise SerializationError("tensor payload must be [dtype, shape, requires_grad, bytes]")
    head = [unpacker.unpack() for _ in range(3)]
    at = unpacker.tell()
    kind = payload[at] if at < len(payload) else None
    width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(kind)
    if width is None:
        raise SerializationError("tensor payload has a wrong field type")
    n = int.from_bytes(payload[at + 1: at + 1 + width], "big")
    start = at + 1 + width
    if start + n != len(payload):
        raise SerializationError("tensor payload length does not match its data")
    return head, memoryview(payload)[start:]


def tensor_spec(dtype_name: Any, shape: Any) -> tuple[torch.dtype, list[int]]:
    """Validates a (dtype name, shape) pair from the wire."""
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise SerializationError(f"unknown tensor dtype {dtype_name!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise SerializationError(f"tensor shape must be a list of at most {MAX_DIMS} sizes")
    for d in shape:
        if type(d) is not int or d < 0:
            raise SerializationError(f"invalid tensor dimension {d!r} in shape {shape!r}")
    return DTYPES[dtype_name], shape


def decode_tensor(payload: bytes) -> torch.Tensor:
    try:
        (dtype_name, shape, requires_grad), raw = _split_tensor_payload(payload)
    except SerializationError:
        raise
    except Exception as e:  # msgpack raises many types on hostile input; normalize them
        raise SerializationError(f"malformed tensor payload: {type(e).__name__}: {e}") from e
    return _build_tensor(dtype_name, shape, requires_grad, raw)


def _nbytes(dtype_name: Any, shape: Any) -> int:
    dtype, shape = tensor_spec(dtype_name, shape)
    return math.prod(shape) * _ITEMSIZE[dtype]


def _build_tensor(dtype_name: Any, shape: Any, requires_grad: Any, raw: memoryview,
                  adopt: bool = False) -> torch.Tensor:
    """A tensor with its own memory (one copy of ``raw``), after checking every field against ``raw``.

    ``adopt``: the tensor uses ``raw``'s memory in place when it is aligned for the dtype (the caller
    owns the buffer and never reuses it; the tensor keeps it alive)."""
    dtype, shape = tensor_spec(dtype_name, shape)
    if not isinstance(requires_grad, bool):
        raise SerializationError("tensor payload has a wrong field type")
    numel = math.prod(shape)
    itemsize = _ITEMSIZE[dtype]
    if len(raw) != numel * itemsize:
        raise SerializationError(
            f"tensor of shape {shape} and dtype {dtype_name} needs {numel * itemsize} bytes, got {len(raw)}"
        )
    if numel == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        if adopt:
            t = torch.frombuffer(raw, dtype=dtype)
            if t.data_ptr() % _ALIGN[dtype]:
                t = t.clone()  # misaligned for the dtype's kernels: one copy, as without adopt
            t = t.reshape(shape)
        else:
            # (a bytearray is writable: torch.frombuffer has nothing to warn about, and a
            # catch_warnings block would cost as much again as the copy of a small tensor)
            t = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    if requires_grad:
        if not (t.is_floating_point() or t.is_complex()):
            raise SerializationError(f"requires_grad is only valid for float tensors, not {dtype_name}")
        t.requires_grad_(True)
    return t
