"""Validation helpers shared by the HE wire adapters.

Wire dictionaries may come from the network, so every field is checked for
type and range before any of it reaches a cryptographic library.
"""

from __future__ import annotations

import torch

from veil.messaging.serde import DTYPES as _WIRE_DTYPES

from veil.he.errors import WireFormatError

WIRE_VERSION = 1
MAX_NDIM = 32
MAX_NUMEL = 2**31

# dtypes a decrypted tensor may take: the wire format's table, less the complex ones.
DTYPES: dict[str, torch.dtype] = {k: v for k, v in _WIRE_DTYPES.items() if not v.is_complex}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def field(d: dict, name: str, kind: type | tuple[type, ...]):
    """``d[name]``, checked to be an instance of ``kind`` (bool is never an int here)."""
    if name not in d:
        raise WireFormatError(f"wire dict is missing the field {name!r}")
    value = d[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise WireFormatError(f"wire field {name!r} has the wrong type (bool)")
    if not isinstance(value, kind):
        raise WireFormatError(f"wire field {name!r} has the wrong type ({type(value).__name__})")
    return value


def header(d, backend: str, kind: str) -> None:
    """Check the common ``he``/``kind``/``v`` fields."""
    if not isinstance(d, dict):
        raise WireFormatError(f"expected a dict, got {type(d).__name__}")
    if d.get("he") != backend or d.get("kind") != kind:
        raise WireFormatError(f"expected a {backend}/{kind} wire dict, got {d.get('he')!r}/{d.get('kind')!r}")
    if d.get("v") != WIRE_VERSION:
        raise WireFormatError(f"unsupported {backend} wire version {d.get('v')!r} (expected {WIRE_VERSION})")


def shape(d: dict) -> tuple[int, ...]:
    value = field(d, "shape", list)
    if len(value) > MAX_NDIM or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise WireFormatError("wire field 'shape' must be a list of at most 32 non-negative ints")
    numel = 1
    for s in value:
        numel *= s
    if numel > MAX_NUMEL:
        raise WireFormatError("wire tensor is too large")
    return tuple(value)


def dtype(d: dict) -> torch.dtype:
    name = field(d, "dtype", str)
    if name not in DTYPES:
        raise WireFormatError(f"unsupported dtype {name!r} in wire dict")
    return DTYPES[name]
