"""Generic HE wire entry points for the core serializer.

``encode(obj)`` turns any HE object (encrypted tensor, Paillier public key,
CKKS context) into a dict of msgpack-native values tagged ``{"he": <backend>,
"kind": ..., "v": 1}``; ``decode(d)`` validates and rebuilds it. Private keys
are refused: they never leave their owner.
"""

from __future__ import annotations

from typing import Any

import phe

from veil.he.backends import BACKENDS
from veil.he.errors import WireFormatError


def is_he_object(obj: Any) -> bool:
    """Whether :func:`encode` knows ``obj``'s type."""
    return any(isinstance(obj, typ) for b in BACKENDS.values() for typ, _, _ in b.encoders)


def is_wire(d: Any) -> bool:
    """Whether ``d`` looks like a dict produced by :func:`encode` (not yet validated)."""
    return isinstance(d, dict) and isinstance(d.get("he"), str) and d["he"] in BACKENDS


def encode(obj: Any) -> dict:
    """Serialize an HE object to a msgpack-ready dict.

    Raises:
        TypeError: ``obj`` is a private key or not an HE object.
    """
    if isinstance(obj, phe.PaillierPrivateKey):
        raise TypeError("Paillier private keys are never serialized to the wire")
    for backend in BACKENDS.values():
        for typ, _, to_wire in backend.encoders:
            if isinstance(obj, typ):
                return to_wire(obj)
    raise TypeError(f"{type(obj).__name__} is not a homomorphic-encryption object")


def decode(d: Any, **options: Any) -> Any:
    """Validate and rebuild an object written by :func:`encode`.

    Args:
        d: the wire dict.
        **options: optional hints passed to the backends that take them:
            ``public_key`` (Paillier tensors must be under it) and ``context``
            (the CKKS context to load tensors against).

    Raises:
        WireFormatError: unknown backend or kind, or malformed content.
    """
    if not isinstance(d, dict):
        raise WireFormatError(f"expected an HE wire dict, got {type(d).__name__}")
    backend = BACKENDS.get(d.get("he")) if isinstance(d.get("he"), str) else None
    if backend is None:
        raise WireFormatError(f"unknown HE backend {d.get('he')!r}; known: {sorted(BACKENDS)}")
    kind = d.get("kind")
    decoder = backend.decoders.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise WireFormatError(f"unknown {backend.name} wire kind {kind!r}")
    accepted = backend.decoder_options.get(kind, ())
    return decoder(d, **{k: v for k, v in options.items() if k in accepted and v is not None})
