"""What the compat worker functions (``veil.compat.encode`` / ``decode`` / ``share_own``) check before they
compute on a worker, so that neither their outcome nor their memory depends on the owner's values.

- Public parameters (``base``, ``precision_fractional``) are plain integers from the request, never a stored
  object: ``int(tensor)`` made the owner's value a parameter whose validity decided success.
- A result is sized, and refused by the session's quota, before it is computed (they are owner-sized).
- Values computed from the owner's data are encoded value-free: NaN as 0, anything beyond the ring's bound
  held at it, where ``encode`` would raise. With ``base`` chosen freely, success against
  ``EncodingOverflowError`` was a threshold oracle reading ``max |x|`` of data under review
  (``veil/he/value_free.py`` makes the same choice for HE plaintexts).
"""

from __future__ import annotations

import math
from typing import Any

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
