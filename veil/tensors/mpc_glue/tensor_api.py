"""The SMPC verbs TorchHook attaches to ``torch.Tensor`` (see ``veil.hook``).

``fix_precision``/``fix_prec`` encode floats, ``float_precision``/
``float_prec`` decode, ``share`` secret-shares an *integer* tensor among
workers (fixed-precision tensors define their own ``share``).
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc.errors import NotEncodedError
from veil.tensors.additive import AdditiveSharingTensor
from veil.tensors.additive import share as share_int
from veil.tensors.fixed_precision import fix_precision, float_precision  # noqa: F401  (re-exported verbs)


def share(tensor: torch.Tensor, *parties: Any, crypto_provider: Any = None, **options: Any) -> AdditiveSharingTensor:
    """``x.share(alice, bob, crypto_provider=cp)`` for integer tensors.

    Raises:
        NotEncodedError: For floating-point tensors (``fix_precision()`` first).
        ValueError: Without a crypto provider or with fewer than 2 parties.
    """
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise NotEncodedError(
            f"cannot secret-share a {tensor.dtype} tensor: encode it first, "
            "x.fix_precision().share(alice, bob, crypto_provider=cp)"
        )
    if len(parties) < 2:
        raise ValueError(f"share() needs at least 2 parties, got {len(parties)}")
    return share_int(tensor, parties, crypto_provider, **options)

