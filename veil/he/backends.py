"""The registry of homomorphic-encryption backends: one adapter module per library.

Each :class:`Backend` says which Python types it owns, how to encrypt, and
how each of its wire kinds is written and read. The generic entry points
(:func:`veil.he.encrypt`, :mod:`veil.he.wire`) only look things up here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import phe

from veil.he import ckks, ckks_wire, paillier, paillier_wire


@dataclass(frozen=True)
class Backend:
    """One homomorphic-encryption library's adapter.

    Attributes:
        name: protocol name used by ``encrypt(..., protocol=name)`` and the wire tag ``"he"``.
        tensor_type: the encrypted tensor class.
        encrypt: ``encrypt(tensor, **kwargs) -> tensor_type``.
        encoders: ``(python type, wire kind, to_wire)`` triples, checked in order.
        decoders: wire kind -> ``from_wire(d, **options)``; options it does not
            take are dropped by :mod:`veil.he.wire`.
        decoder_options: wire kind -> names of the keyword options it accepts.
    """

    name: str
    tensor_type: type
    encrypt: Callable[..., Any]
    encoders: tuple[tuple[type, str, Callable[[Any], dict]], ...]
    decoders: dict[str, Callable[..., Any]]
    decoder_options: dict[str, tuple[str, ...]] = field(default_factory=dict)


PAILLIER = Backend(
    name="paillier",
    tensor_type=paillier.PaillierTensor,
    encrypt=paillier.encrypt,
    encoders=(
        (paillier.PaillierTensor, "tensor", paillier_wire.tensor_to_wire),
        (phe.PaillierPublicKey, "public_key", paillier_wire.public_key_to_wire),
    ),
    decoders={
        "tensor": paillier_wire.tensor_from_wire,
        "public_key": paillier_wire.public_key_from_wire,
    },
    decoder_options={"tensor": ("public_key",), "public_key": ()},
)

CKKS = Backend(
    name="ckks",
    tensor_type=ckks.CKKSTensor,
    encrypt=ckks.encrypt,
    encoders=(
        (ckks.CKKSTensor, "tensor", ckks_wire.tensor_to_wire),
        (ckks.CKKSContext, "context", ckks_wire.context_to_wire),
    ),
    decoders={
        "tensor": ckks_wire.tensor_from_wire,
        "context": ckks_wire.context_from_wire,
    },
    decoder_options={"tensor": ("context",), "context": ()},
)

BACKENDS: dict[str, Backend] = {
    PAILLIER.name: PAILLIER,
    CKKS.name: CKKS,
}
