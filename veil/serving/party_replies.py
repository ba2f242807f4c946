"""A serving client's checks of what each party answers (``info``, ``fetch``), before it uses any of it,
and the model owner's of the parties' ``open`` replies (:func:`agreed_opener`).

One party of a cluster may be hostile (or broken). It can always make a query fail, and in the
semi-honest model it can skew the value it holds a share of, but it must not make the client fail with a
bare ``TypeError``/``IndexError`` deep in decoding, nor return an output of another shape than the model's
(an int64 share of ``[5, 3]`` added to honest ``[1, 3]`` ones broadcast to a five-row "prediction"), nor
redirect the client to another owner's service, nor make the owner's cluster file pin a user it does not
know the owner as. Each malformed reply is one :class:`ServingError` line naming the party; a party's own
text in it is quoted bounded, on one line (:func:`~veil.serving.errors.quoted`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from veil.mpc.encoding import make_encoding
from veil.serving.errors import ServingError, quoted

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
        raise ServingError(f"cluster worker {party!r} answered a malformed service description ({quoted(e)})") from None
    if owner is not None and info.get("owner") != owner:
        raise ServingError(f"cluster worker {party!r} described another owner's service than {owner!r}'s")
    return info


def checked_share(party: str, reply: Any, output_shape: list, others: dict,
                  rows: Optional[int] = None) -> torch.Tensor:
    """The output share ``party`` answered to ``fetch``, checked against the model's output shape, the ``rows``
    the client submitted (when it knows them) and the shares ``others`` (party -> share) already received for
    this request. (Against ``others`` alone, a hostile party answering first set the row count: the honest
    party's share was the one refused, and named.)

    Raises:
        ServingError: One line naming the party: no int64 tensor of the output's shape, or another row count.
    """
    share = reply[0] if isinstance(reply, list) and len(reply) == 1 else None
    if (not isinstance(share, torch.Tensor) or share.dtype != torch.int64 or share.layout != torch.strided
            or share.dim() != len(output_shape) or list(share.shape[1:]) != list(output_shape[1:])
            or (rows is not None and share.shape[0] != rows)
            or any(share.shape != other.shape for other in others.values())):
        raise ServingError(f"cluster worker {party!r} answered a malformed output share (not an int64 tensor of "
                           f"the model's output shape {output_shape} with the request's rows)")
    return share


def agreed_opener(parties: list, replies: list) -> Optional[str]:
    """The user every party answered the owner's ``open`` as (clients pin it: ``Cluster.owners``); None when
    none named one (parties from before ``open`` named the opener).

    Raises:
        ServingError: One line naming the parties' answers: they name different users, or some none (a hostile
            or misconfigured party: a cluster file pinning one of them would send clients to a user that some
            party does not know the owner as, or to whoever that party says).
    """
    users = []
    for party, reply in zip(parties, replies):
        if isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], str) and reply[0]:
            users.append(reply[0])
        elif isinstance(reply, list) and not reply:
            users.append(None)
        else:
            raise ServingError(f"cluster worker {party!r} answered open with something else than its user name")
    if all(u is None for u in users):
        return None
    if len(set(users)) != 1:
        answers = ", ".join(f"{p!r}: {'nothing' if u is None else repr(quoted(u))}" for p, u in zip(parties, users))
        raise ServingError(f"the cluster's parties answered open as different users ({answers}): a party is hostile "
                           "or misconfigured, and clients could not pin this service's owner")
    return users[0]
