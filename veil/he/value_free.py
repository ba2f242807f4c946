"""Encoding plaintexts computed from the owner's data without value-dependent outcomes.

An encrypted operation on a worker (``veil.he.op``, ``veil.fl.encrypt_state``) whose plaintext derives from
the owner's data must not fail, or change course, because of that data's values: with a key the requester
chose, success against ``EncodingOverflowError`` (or a NaN's error) was a threshold oracle on data under
review. So such a plaintext loses its non-finite entries (0), and what could overflow is decided from its
dtype and the key or context alone: Paillier refuses a dtype whose largest value could overflow the key at
the exponent used; CKKS clamps to :data:`CKKS_PLAIN_BOUND` and refuses a context that cannot encode it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from veil.exceptions import RemoteExecutionError
from veil.he import _paillier_encoding as enc

#: a CKKS plaintext computed from the owner's data is clamped to this magnitude, and the op runs only on a
#: context that encodes it: failure then depends on the context, never on values
CKKS_PLAIN_BOUND = float(2 ** 24)


def finite(t: torch.Tensor, what: str = "refused") -> torch.Tensor:
    """``t`` with its non-finite entries as 0 (a real tensor; complex ones are refused, ``what`` first)."""
    if t.is_complex():
        raise RemoteExecutionError(f"{what}: complex plaintexts are not supported")
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) if t.is_floating_point() else t


def largest(dtype: torch.dtype) -> int:
    """The largest magnitude a value of ``dtype`` can have (a signed integer's is its minimum's, one past its
    maximum: taking the maximum let -128 alone overflow an int8 that passed the room check)."""
    if dtype.is_floating_point:
        return int(torch.finfo(dtype).max)
    if dtype == torch.bool:
        return 1
    info = torch.iinfo(dtype)
    return max(int(info.max), -int(info.min))


def check_paillier_room(biggest: int, exponent: int, public_key: Any, what: str) -> None:
    """Refuses, from public facts alone, a plaintext as large as ``biggest`` encoded at base-16 ``exponent``
    that could overflow ``public_key``'s plaintext space."""
    if biggest * enc.BASE ** max(0, -exponent) > int(public_key.max_int):
        raise RemoteExecutionError(f"{what} could overflow this {public_key.n.bit_length()}-bit key (use a larger "
                                   "key or a narrower dtype)")


def ckks_clamped(t: torch.Tensor, probe: Callable[[float], Any], what: str) -> torch.Tensor:
    """``t`` as float64, finite and clamped to +-:data:`CKKS_PLAIN_BOUND`; ``probe(bound)`` encodes the bound
    itself (a public value) the way the operation will, so the context alone decides whether it runs."""
    t = finite(t.detach(), what).to(torch.float64).clamp_(-CKKS_PLAIN_BOUND, CKKS_PLAIN_BOUND)  # (a fresh tensor)
    try:
        probe(CKKS_PLAIN_BOUND)
    except Exception:  # noqa: BLE001 - TenSEAL's encoding error for this context and level
        raise RemoteExecutionError(f"{what}: this CKKS context cannot encode values up to {CKKS_PLAIN_BOUND:.0f}, "
                                   "the range a plaintext from the owner's data is clamped to") from None
    return t
