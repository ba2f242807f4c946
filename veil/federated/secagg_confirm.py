"""The consistency round of secure aggregation (Bonawitz et al. 2017, sec. 4.3), between masked_input and unmask.

Each client checks only the survivor and dropout lists it is given, so without this round a lying coordinator
could give each client lists of its own: name a target's mask partners as dropped to some clients (who hand
over shares of the partners' keys) and the target as a survivor to others (who hand over shares of its
self-mask seed), and unmask the target's input alone.

Here every client confirms exactly one survivor set U3 per round (``veil.secagg.confirm``) and answers with
one tag per member of U3: a MAC of (round, U3) under the key it shares with that member (from their X25519
keys: the ones each client deposited itself over its authenticated peer link, so the coordinator cannot
derive them). ``unmask`` then requires the set it confirmed itself, and valid tags from at least ``t``
members of it (itself included). Two different sets confirmed by ``t`` clients each would need ``2t``
clients; ``t`` is a majority of U1. A key revealed at unmask (a dropped client's) lets the coordinator forge
tags only towards that dropped client, which is not in U3.

That argument needs one U1 and one t for every client, and the coordinator tells each client its own: told
apart (each list with a majority threshold of its own), four clients handed over a client's key as dropped,
and its forged tags then let two others unmask a target that masked with it alone. So each client also sends
its view (round, n, t, U1 in order: :func:`view_digest`) with its deposit, peer to peer where the coordinator
cannot change it, and masks only with survivors that shared under its own view (:func:`check_views`): every
client whose shares or tags bear on a masked input then holds one view, and the argument above holds among them.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import torch

from veil.exceptions import RemoteExecutionError
from veil.federated import secagg_crypto as sc

TAG_BYTES = 32


def view_digest(tag: int, n: int, threshold: int, ids: list) -> bytes:
    """What a client was told of a round: its tag, n, t and U1 in share order (each id length-prefixed)."""
    message = b"veil-secagg-view|" + b"".join(int(v).to_bytes(16, "big", signed=True) for v in (tag, n, threshold))
    return hashlib.sha256(message + b"".join(len(v.encode()).to_bytes(8, "big") + v.encode() for v in ids)).digest()


def check_views(state: Any, me: str, survivors: list) -> None:
    """Refuses to mask with a survivor that shared its keys under another view of the round than this client's
    (it sent it with its deposit; :func:`view_digest`)."""
    mine = state.views.get(me)
    if mine is None or any(state.views.get(v) != mine for v in survivors):
        raise RemoteExecutionError("masked_input: refused (a survivor was told another participant list, n or "
                                   "threshold for this round than this client)")


def _tag(private: bytes, peer_public: bytes, round_tag: int, survivors: list) -> bytes:
    """The MAC of (round, sorted U3) under the pair key of this client and ``peer_public`` (a key of its own,
    not the pair mask's seed)."""
    key = hashlib.sha256(b"veil-secagg-confirm|" + sc.pair_seed(private, peer_public, round_tag)).digest()
    # each id length-prefixed: joined by a separator, ["a\0b", "c"] and ["a", "b\0c"] were one message
    message = int(round_tag).to_bytes(16, "big", signed=True) + b"".join(
        len(v.encode()).to_bytes(8, "big") + v.encode() for v in sorted(survivors))
    return hmac.new(key, message, hashlib.sha256).digest()


def confirm(state: Any, me: str, tag: int, survivors: list) -> torch.Tensor:
    """This client's one confirmation of ``survivors`` (U3): a tag per member, in ``survivors`` order."""
    masked = state.masked_with
    if masked is None or state.confirmed is not None or me not in survivors or not set(survivors) <= set(masked) \
            or len(survivors) < state.threshold:
        raise RemoteExecutionError("confirm: refused (confirmed before, or a survivor set this client did not mask "
                                   "with)")
    state.confirmed = sorted(survivors)
    return torch.tensor([list(_tag(state.private, state.publics[v], tag, survivors)) for v in survivors],
                        dtype=torch.int64)


def check(state: Any, me: str, tag: int, survivors: list, tags: Any) -> None:
    """Refuses an unmask over a survivor set other than the one this client confirmed, or one that fewer than
    ``t`` of its members (this client included) confirmed to it: ``tags`` row k is survivors[k]'s tag for it."""
    if state.confirmed is None or state.confirmed != sorted(survivors):
        raise RemoteExecutionError("unmask: refused (not the survivor set this client confirmed)")
    if not isinstance(tags, torch.Tensor) or tags.dtype != torch.int64 or tuple(tags.shape) != (len(survivors),
                                                                                                 TAG_BYTES) \
            or bool(((tags < 0) | (tags > 255)).any()):
        raise RemoteExecutionError("unmask: one 32-byte confirmation per survivor expected")
    valid = 1  # (this client's own confirmation: state.confirmed)
    for v, row in zip(survivors, tags.tolist()):
        if v != me and hmac.compare_digest(bytes(row), _tag(state.private, state.publics[v], tag, survivors)):
            valid += 1
    if valid < state.threshold:
        raise RemoteExecutionError(f"unmask: refused ({valid} of the survivors confirmed this set, "
                                   f"{state.threshold} needed)")


def for_client(confirmations: dict, survivors: list, me: str) -> torch.Tensor:
    """Coordinator side: the tags addressed to ``me`` (row k from survivors[k]; zeros where it sent none)."""
    at = survivors.index(me)
    rows = [confirmations[v][at] if v in confirmations else torch.zeros(TAG_BYTES, dtype=torch.int64)
            for v in survivors]
    return torch.stack(rows)
