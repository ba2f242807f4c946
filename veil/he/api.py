"""``veil.he.encrypt``: one entry point for every HE backend.

The hook attaches ``torch.Tensor.encrypt(protocol=..., **kwargs)`` to this
function, so its keyword names are part of the public API.
"""

from __future__ import annotations

from typing import Any

from veil.he.backends import BACKENDS


def encrypt(tensor: Any, protocol: str = "paillier", **kwargs: Any) -> Any:
    """Encrypt ``tensor`` with the backend named by ``protocol``.

    Args:
        tensor: a torch tensor (or array / number).
        protocol: ``"paillier"`` (needs ``public_key=``) or ``"ckks"`` (needs ``context=``).
        **kwargs: passed to the backend, e.g. ``precision=`` for Paillier floats.

    Returns:
        A :class:`~veil.he.paillier.PaillierTensor` or :class:`~veil.he.ckks.CKKSTensor`.

    Raises:
        ValueError: unknown protocol.
    """
    backend = BACKENDS.get(protocol)
    if backend is None:
        raise ValueError(f"unknown HE protocol {protocol!r}; available: {sorted(BACKENDS)}")
    return backend.encrypt(tensor, **kwargs)
