"""Released floats carry their values, not hidden bits.

A NaN prints as ``nan`` whatever its 51 (float64; 22 for float32) payload bits and its sign bit hold, and a
zero prints as ``0`` (or ``-0``, in the preview's head only) whatever its sign: a hostile plan can pack records
into them, and the owner, reading ``[nan, nan, ...]`` or ``[0, 0, ...]``, would approve the records. Every
value derived from owner data leaves the worker (get, move) with each NaN the canonical quiet NaN (positive,
no payload: what ``float("nan")`` is) and each zero positive; every other value is bit for bit as stored.

Signed zero, decided: made positive. It carries one bit per element that no preview beyond the head shows;
the sign of a zero result of data under review is not a value a scientist needs (``1/x`` of it is the only
thing it changes), and the owner approved a zero.

The digest a release request binds to (:func:`veil.governance.requests.digest`) is of this form too, so that
what the owner approves is exactly what goes out.
"""

from __future__ import annotations

from typing import Any

import torch

#: float dtypes whose arithmetic torch runs directly (the others, float8, are canonicalized through float32)
_NATIVE = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})


def _canonical_real(t: torch.Tensor) -> torch.Tensor:
    wide = t if t.dtype in _NATIVE else t.float()  # float8: exact both ways for every value that is not NaN
    nan = wide.isnan()
    if not bool((nan | ((wide == 0) & wide.signbit())).any()):
        return t
    # (-0.0 + 0.0 is +0.0 in IEEE arithmetic; every other non-NaN value is unchanged by adding zero)
    fixed = torch.where(nan, torch.tensor(float("nan"), dtype=wide.dtype), wide + 0.0)
    return fixed if wide is t else fixed.to(t.dtype)


def canonical_floats(value: Any) -> Any:
    """``value`` with canonical NaNs and positive zeros when it is a float or complex tensor holding other ones
    (a new tensor: the stored one is never changed); anything else is returned as it is."""
    if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
        return value
    if value.layout != torch.strided or value.is_meta:  # (never serialized: the release refuses them itself)
        return value
    t = value.detach()
    if t.is_complex():
        parts = torch.view_as_real(t.resolve_conj())
        fixed = _canonical_real(parts)
        return value if fixed is parts else torch.view_as_complex(fixed.contiguous())
    fixed = _canonical_real(t)
    if fixed is t:
        return value
    if isinstance(value, torch.nn.Parameter):  # (a module's parameter arrives as one)
        return torch.nn.Parameter(fixed, requires_grad=value.requires_grad)
    return fixed.requires_grad_(value.requires_grad) if value.requires_grad else fixed


def released(oid: int, entry: Any) -> Any:
    """What a get or move lets out of ``entry``: a value derived from owner data in canonical form."""
    from veil.governance.provenance import sources_of

    obj = entry.obj
    if isinstance(obj, torch.Tensor) and (obj.is_floating_point() or obj.is_complex()) and sources_of(oid, entry):
        return canonical_floats(obj)
    return obj
