"""What the compat worker functions (``veil.compat.encode`` / ``decode`` / ``share_own``) check before they
compute on a worker, so that neither their outcome nor their memory depends on the owner's values.

- Public parameters (``base``, ``precision_fractional``) are plain integers from the request, never a stored
  object: ``int(tensor)`` made the owner's value a parameter whose validity decided success.
- A result is sized, and refused by the session's quota, before it is computed (they are owner-sized), and
  computed a piece at a time (:func:`piecewise`): what it needs beside the result is bounded, whatever the
  input's size (a float16 decode of an expanded view needed ~20x its result's bytes at once, an encode ~4x).
- Values computed from the owner's data are encoded value-free: NaN as 0, anything beyond the ring's bound
  held at it, where ``encode`` would raise. With ``base`` chosen freely, success against
  ``EncodingOverflowError`` was a threshold oracle reading ``max |x|`` of data under review
  (``veil/he/value_free.py`` makes the same choice for HE plaintexts).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch

from veil.exceptions import register_remote_error
from veil.mpc.encoding import ENCODING_BOUND, FixedPointEncoding
from veil.mpc.errors import NotEncodedError
from veil.workers.quota import QuotaExceededError

#: the largest float64 below the ring's bound: an encoded magnitude never reaches 2^62
_ENCODED_LIMIT = math.nextafter(float(ENCODING_BOUND), 0.0)


@register_remote_error
class EncodingParameterError(NotEncodedError):
    """``base`` / ``precision_fractional`` are not plain integers. Value-free: the text names the parameters only,
    so it reaches the requester even when one of them was a stored owner tensor."""

    value_free = True


def encoding_of(base: Any, precision_fractional: Any) -> FixedPointEncoding:
    """The encoding named by two plain integers (a stored tensor, even of one element, is refused)."""
    if type(base) is not int or type(precision_fractional) is not int:
        raise EncodingParameterError("base and precision_fractional must be plain integers in the request, not stored objects")
    try:
        return FixedPointEncoding(base=base, precision_fractional=precision_fractional)
    except ValueError as e:  # (its text names the two integers only: value-free whatever the tensor holds)
        raise EncodingParameterError(str(e)) from None


class ResultOverQuotaError(QuotaExceededError):
    """The quota's refusal of a result sized from its shape alone: value-free, so it reaches the requester as
    a QuotaExceededError (its wire name) even when the input was the owner's data."""

    value_free = True


def check_room(worker: Any, numel: int, itemsize: int, op_name: str) -> None:
    """Refuses, before it is computed, a result of ``numel`` elements that would not fit the session's quota."""
    principal = worker.monitor.current_principal()
    if principal is None:
        return
    try:
        worker.monitor.check_room(principal, int(numel) * itemsize, op_name)
    except QuotaExceededError as e:
        raise ResultOverQuotaError(str(e)) from None


def encode_value_free(tensor: torch.Tensor, encoding: FixedPointEncoding) -> torch.Tensor:
    """``round(x * scale)`` as int64, never failing on values: NaN encodes as 0, +-inf and magnitudes past the
    ring's bound as the bound. Equal to :func:`veil.mpc.encoding.encode` wherever that succeeds."""
    x = tensor.detach().to(torch.float64)
    # (NaN by where, not nan_to_num: only data-oblivious ops, so that a value hidden from the requester, which
    # runs under veil/workers/oblivious.py, is encoded too; it stays hidden, an encoding releases nothing)
    x = torch.where(x == x, x, torch.zeros_like(x))
    scaled = torch.round(x * encoding.scale)
    return torch.clamp(scaled, -_ENCODED_LIMIT, _ENCODED_LIMIT).to(torch.int64)


#: elements an encode or decode computes at a time (its temporaries: a few float64/int64 copies of a piece)
PIECE_ELEMENTS = 1 << 16


def piecewise(fn: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fn(v)`` for an elementwise ``fn`` whose result has ``dtype``, computed a piece of at most
    :data:`PIECE_ELEMENTS` elements at a time into one result: the result is the only allocation of ``v``'s size
    (``fn``'s float64 and int64 temporaries of a whole expanded view were ~20x the result the quota sized)."""
    if v.numel() <= PIECE_ELEMENTS:
        return fn(v)
    out = torch.empty(v.shape, dtype=dtype)
    for src, dst in _pieces(v, out):
        dst.copy_(fn(src))
    return out


def _pieces(v: torch.Tensor, out: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Views of ``v`` and ``out`` (one shape) that cover them in pieces of at most :data:`PIECE_ELEMENTS` elements:
    slices along the first dimension, or, when one of its rows is larger, each row's pieces (views: an expanded
    ``v`` is never materialized)."""
    if v.numel() <= PIECE_ELEMENTS or v.dim() == 0:
        yield v, out
        return
    row = v[0].numel()
    if row <= PIECE_ELEMENTS:
        step = max(1, PIECE_ELEMENTS // max(row, 1))
        for i in range(0, v.shape[0], step):
            yield v[i:i + step], out[i:i + step]
        return
    for i in range(v.shape[0]):
        yield from _pieces(v[i], out[i])
