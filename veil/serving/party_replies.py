"""A serving client's checks of what each party answers (``info``, ``fetch``), before it uses any of it.

One party of a cluster may be hostile (or broken). It can always make a query fail, and in the
semi-honest model it can skew the value it holds a share of, but it must not make the client fail with a
bare ``TypeError``/``IndexError`` deep in decoding, nor return an output of another shape than the model's
(an int64 share of ``[5, 3]`` added to honest ``[1, 3]`` ones broadcast to a five-row "prediction"), nor
redirect the client to another owner's service. Each malformed reply is one :class:`ServingError` line
naming the party.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from veil.mpc.encoding import make_encoding
from veil.serving.errors import ServingError

#: most dimensions a served model's input or output has (a description past it is no model's)
MAX_DIMS = 16


def _sizes(value: Any, field: str) -> list:
    if (not isinstance(value, list) or not 1 <= len(value) <= MAX_DIMS
            or not all(type(d) is int and d >= 0 for d in value)):
        raise ValueError(f"{field} is not a list of 1 to {MAX_DIMS} sizes")
    return value


def checked_info(party: str, reply: Any, owner: Optional[str]) -> dict:
    """The service description ``party`` answered to ``info``, checked; ``owner``: the one the client pinned.

    Raises:
        ServingError: One line naming the party: the reply is no service description, or another owner's.
    """
    try:
        if not isinstance(reply, list) or len(reply) != 1 or not isinstance(reply[0], dict):
            raise ValueError("not one description")
        info = reply[0]
        _sizes(info.get("input_shape"), "input_shape")
        _sizes(info.get("output_shape"), "output_shape")
        make_encoding(info.get("precision_fractional"), info.get("base"))  # (its own bounds: the 64-bit ring)
        parties = info.get("parties")
        if not isinstance(parties, list) or not all(isinstance(p, str) for p in parties):
            raise ValueError("parties is not a list of worker ids")
        rows = info.get("max_rows")
        if rows is not None and (type(rows) is not int or rows < 1):
            raise ValueError("max_rows is not a positive integer")
    except (ValueError, TypeError) as e:
        raise ServingError(f"cluster worker {party!r} answered a malformed service description ({e})") from None
    if owner is not None and info.get("owner") != owner:
        raise ServingError(f"cluster worker {party!r} described another owner's service than {owner!r}'s")
    return info


def checked_share(party: str, reply: Any, output_shape: list, others: dict) -> torch.Tensor:
    """The output share ``party`` answered to ``fetch``, checked against the model's output shape and the
    shares ``others`` (party -> share) already received for this request.

    Raises:
        ServingError: One line naming the party: no int64 tensor of the output's shape, or another row count.
    """
    share = reply[0] if isinstance(reply, list) and len(reply) == 1 else None
    if (not isinstance(share, torch.Tensor) or share.dtype != torch.int64 or share.layout != torch.strided
            or share.dim() != len(output_shape) or list(share.shape[1:]) != list(output_shape[1:])
            or any(share.shape != other.shape for other in others.values())):
        raise ServingError(f"cluster worker {party!r} answered a malformed output share (not an int64 tensor of "
                           f"the model's output shape {output_shape}, or other rows than the other parties')")
    return share
