"""Encrypted aggregation of model updates for federated learning.

Flow: each client calls :func:`encrypt_update` with the key holder's public
key (Paillier) or public context (CKKS); the aggregator, which holds no
secret key, calls :func:`aggregate_encrypted`; only the key holder can call
:func:`decrypt_update`, and it sees nothing but the (weighted) sum.

Every tensor is flattened before encryption so CKKS packs it densely (a
weight matrix would otherwise take one ciphertext per row); shapes travel
alongside in the clear, as they are not secret.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from veil.he import _wire_checks as chk
from veil.he import flooding, wire
from veil.he.api import encrypt
from veil.he.ckks import CKKSTensor
from veil.he.errors import EncodingOverflowError, ShapeMismatchError, WireFormatError


@dataclass
class EncryptedUpdate:
    """A client's (or the aggregate's) model update, encrypted tensor by tensor.

    Attributes:
        tensors: parameter name -> flattened encrypted tensor.
        shapes: parameter name -> original shape.
        dtypes: parameter name -> original dtype.
        weight: total weight folded into ``tensors`` (1 per unweighted client,
            or the sum of the weights given to :func:`aggregate_encrypted`).
    """

    tensors: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    weight: float = 1.0


def encrypt_update(
    update: Mapping[str, torch.Tensor],
    *,
    protocol: str = "ckks",
    public_key: Any = None,
    context: Any = None,
    precision: float | None = None,
) -> EncryptedUpdate:
    """Encrypt a model update (``name -> tensor``, e.g. a state dict delta).

    Args:
        update: the plaintext update.
        protocol: ``"ckks"`` (needs ``context``, public is enough) or
            ``"paillier"`` (needs ``public_key``).
        precision: Paillier float precision (see :mod:`veil.he.paillier`).
    """
    kwargs: dict[str, Any]
    if protocol == "ckks":
        kwargs = {"context": context}
    elif protocol == "paillier":
        kwargs = {"public_key": public_key, "precision": precision}
    else:
        raise ValueError(f"unknown HE protocol {protocol!r} for aggregation")
    tensors, shapes, dtypes = {}, {}, {}
    for name, t in update.items():
        t = t.detach().cpu()
        # Aggregates are averages, so integer updates are encrypted as floats.
        flat = t.reshape(-1) if t.is_floating_point() else t.reshape(-1).to(torch.get_default_dtype())
        tensors[name] = encrypt(flat, protocol=protocol, **kwargs)
        shapes[name] = tuple(t.shape)
        dtypes[name] = flat.dtype
    return EncryptedUpdate(tensors, shapes, dtypes, 1.0)


def aggregate_encrypted(
    updates: Sequence[EncryptedUpdate], weights: Sequence[float] | None = None
) -> EncryptedUpdate:
    """Sum encrypted updates, optionally weighted (e.g. by client sample counts).

    Needs no secret key. Weights are public plaintexts; for CKKS a weighted
    sum spends one multiplication level.

    Raises:
        ShapeMismatchError: updates disagree on parameter names or shapes.
        veil.he.errors.KeyMismatchError: updates are under different keys (from the backend).
    """
    if not updates:
        raise ValueError("aggregate_encrypted needs at least one update")
    if weights is not None and len(weights) != len(updates):
        raise ValueError(f"got {len(weights)} weights for {len(updates)} updates")
    if weights is not None and not all(_finite(w) for w in weights):
        raise ValueError("aggregation weights must be finite numbers")
    # (a negative weight cancels another's in the total the key holder's bound scales with; 0 counts for nothing)
    if any(float(w) < 0 for w in (weights or ())) or any(not u.weight >= 0 for u in updates):
        raise ValueError("aggregation weights must not be negative (a client's sample count: 0 counts for nothing)")
    first = updates[0]
    for u in updates[1:]:
        if u.shapes != first.shapes:
            raise ShapeMismatchError("updates disagree on parameter names or shapes")
    total: dict[str, Any] = {}
    for i, u in enumerate(updates):
        w = None if weights is None else weights[i]
        for name, t in u.tensors.items():
            term = t if w is None else t * w
            total[name] = term if name not in total else total[name] + term
    # Inputs may be partial aggregates that already carry a folded weight.
    if weights is None:
        weight = float(sum(u.weight for u in updates))
    else:
        weight = float(sum(float(w) * u.weight for w, u in zip(weights, updates)))
    return EncryptedUpdate(total, dict(first.shapes), dict(first.dtypes), weight)


def _finite(x: Any) -> bool:
    """Whether ``x`` is a finite number, an int past float64's range being none (float() of it raised a bare
    OverflowError)."""
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _positive(x: Any) -> bool:
    """A finite number above 0 (bool is no number here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and _finite(x) and x > 0


def decrypt_update(
    aggregate: EncryptedUpdate, key: Any = None, *, average: bool = True, bound: float | None = None,
    max_weight: float | None = None,
) -> dict[str, torch.Tensor]:
    """Decrypt an aggregate (key holder only).

    CKKS decryptions come back flooded (:mod:`veil.he.flooding`): a decryption handed out as is gives away
    the secret key's noise. Flooding hides honest ciphertexts' noise only: a client that crafts its ciphertext
    can put the key itself in the sum, so pass ``bound`` to refuse sums no honest update reaches.

    Args:
        aggregate: output of :func:`aggregate_encrypted`.
        key: Paillier private key, or a CKKS context holding the secret key
            (``None`` uses the CKKS tensors' own context).
        average: divide by the aggregate's total weight (FedAvg); else return the sum.
        bound: the largest magnitude of an honest client's value: a decrypted sum beyond ``bound`` times the
            aggregate's weight raises :class:`~veil.he.errors.EncodingOverflowError` (nothing returned).
        max_weight: with ``bound``, required: the largest total weight you expect (e.g. the number of clients,
            or the samples they may hold). The aggregate's weight is what its senders wrote; one above
            ``max_weight`` (1e300 would lift the bound off any sum) raises ValueError, nothing decrypted.

    Weights: finite and not negative; an aggregate of weight 0 has nothing to average (``average=False`` gives
    its sum); an average that is not finite (a tiny weight's, 5e-324 say) is refused.
    """
    weight = aggregate.weight
    if not _finite(weight):  # (a NaN weight made the bound's comparison false: nothing refused)
        raise ValueError(f"the aggregate's weight is not finite ({repr(weight)[:40]}); refused")
    if weight < 0 or (weight == 0 and (average or bound is not None)):
        raise ValueError(f"the aggregate's weight is {weight:g}: nothing to average or bound; refused")
    if bound is not None:
        # (NaN or inf: `sum > bound * weight` never held, so a bound read as NaN refused no crafted sum)
        if not _positive(bound):
            raise ValueError(f"decrypt_update(bound=) is a finite, positive magnitude, not {repr(bound)[:40]}")
        if not _positive(max_weight):
            raise ValueError("decrypt_update(bound=) needs max_weight= (a finite, positive ceiling): the "
                             "aggregate's weight, which the bound scales with, is what its senders claim")
        if weight > max_weight:
            raise ValueError(f"the aggregate's weight {weight:g} exceeds max_weight={max_weight:g}; refused, "
                             "nothing decrypted")
    out = {}
    for name, t in aggregate.tensors.items():
        plain = t.decrypt(key) if key is not None else t.decrypt()
        plain = plain.to(torch.float64)
        if bound is not None and plain.numel() and float(plain.abs().max()) > bound * weight:
            raise EncodingOverflowError(f"parameter {name!r}: the decrypted sum exceeds {bound:g} times the "
                                        "aggregate's weight (a crafted ciphertext?); refused")
        if isinstance(t, CKKSTensor):
            plain = plain + flooding.gaussian(plain.numel(), flooding.sigma(t.context.global_scale)).reshape(plain.shape)
        if average:
            plain = plain / weight
        plain = plain.to(aggregate.dtypes.get(name, torch.float32))
        if average and plain.is_floating_point() and not torch.isfinite(plain).all():  # (as weight 0 is)
            raise ValueError(f"parameter {name!r}: the average over the aggregate's weight {weight:g} is not "
                             f"finite in {plain.dtype}; refused")
        out[name] = plain.reshape(aggregate.shapes[name])
    return out


def update_to_wire(u: EncryptedUpdate) -> dict:
    """Msgpack-native form of an :class:`EncryptedUpdate`."""
    return {
        "he": "update",
        "v": chk.WIRE_VERSION,
        "weight": float(u.weight),
        "params": [
            {"name": n, "shape": list(u.shapes[n]), "dtype": chk.dtype_name(u.dtypes[n]), "data": wire.encode(t)}
            for n, t in u.tensors.items()
        ],
    }


def update_from_wire(d: dict, **options: Any) -> EncryptedUpdate:
    """Inverse of :func:`update_to_wire`; ``options`` as for :func:`veil.he.wire.decode`."""
    if not isinstance(d, dict) or d.get("he") != "update" or d.get("v") != chk.WIRE_VERSION:
        raise WireFormatError("not an encrypted-update wire dict")
    weight = chk.field(d, "weight", (float, int))
    if not _finite(weight) or weight < 0:
        raise WireFormatError("an encrypted update's weight must be a finite number, not negative")
    tensors, shapes, dtypes = {}, {}, {}
    for p in chk.field(d, "params", list):
        if not isinstance(p, dict):
            raise WireFormatError("update params must be dicts")
        name = chk.field(p, "name", str)
        shapes[name], dtypes[name] = chk.shape(p), chk.dtype(p)
        tensors[name] = wire.decode(chk.field(p, "data", dict), **options)
        numel = 1
        for s in shapes[name]:
            numel *= s
        if tuple(tensors[name].shape) != (numel,):
            raise WireFormatError(f"parameter {name!r}: ciphertext count does not match its shape")
    return EncryptedUpdate(tensors, shapes, dtypes, float(weight))


__all__ = [
    "EncryptedUpdate",
    "aggregate_encrypted",
    "decrypt_update",
    "encrypt_update",
    "update_from_wire",
    "update_to_wire",
]
