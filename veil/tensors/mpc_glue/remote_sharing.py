"""Placing shares on workers, and resolving ``crypto_provider=worker``.

``share_on_workers`` splits a value among worker parties with seeded shares:
parties ``0 .. n-2`` each receive a 32-byte seed and derive their share with
the PRG (:mod:`veil.mpc.prg`); only the last party receives a tensor,
``x - sum(PRG(seed_i))``. The data owner sends 1 tensor instead of ``n``
(half the bytes for 2 parties). The orchestrator never keeps a share: it
holds one pointer per party.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from veil.compat.encoding_guards import check_room
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import register_worker_function
from veil.mpc.errors import MPCError
from veil.mpc.prg import expand, new_seed, seed_bytes
from veil.mpc.providers.base import Provider
from veil.mpc.providers.dealing_recipe import MAX_DEAL_ELEMENTS
from veil.mpc.providers.worker_dealer import dealer_for
from veil.mpc.ring import DTYPE, random_ring
from veil.tensors.mpc_glue.runtime import one_round
from veil.tensors.pointer import PointerTensor
from veil.workers.base import BaseWorker

PRG_SHARE = "veil.mpc.prg_share"
_LABEL = "share"


def _prg_share(worker: Any, seed: torch.Tensor, shape: list) -> torch.Tensor:
    """Runs on a party: its share, derived from a seed the data owner sent.

    The requester names the shape and a worker function is not sized before it runs (output_bounds sizes
    torch ops only): the share is bounded like a dealing and refused by the session's quota before the
    stream is expanded, not after it filled memory."""
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise MPCError("a seeded share needs its shape as a list of whole numbers >= 0")
    try:  # (its form alone: a seed whose values decided success was an oracle on a share named as the seed)
        key = seed_bytes(seed, "a seeded share's seed")
    except ValueError as e:
        raise MPCError(str(e)) from None
    numel = math.prod(shape)
    if numel > MAX_DEAL_ELEMENTS:
        raise MPCError(f"a seeded share of {numel} elements is more than {MAX_DEAL_ELEMENTS} in one request")
    check_room(worker, numel, 8, PRG_SHARE)
    return expand(key, _LABEL, shape)


register_worker_function(PRG_SHARE, _prg_share)


def is_worker(value: Any) -> bool:
    """True for a veil worker (as opposed to a party id for local simulation)."""
    return isinstance(value, BaseWorker)


def local_worker_of(workers: Sequence[Any]) -> Any:
    """The orchestrator's worker: the hook's local worker."""
    return workers[0].hook.local_worker


def share_on_workers(value: torch.Tensor, workers: Sequence[Any], seeded: bool = True) -> list[PointerTensor]:
    """Splits an int64 tensor among workers; returns one pointer per party.

    Args:
        value: The encoded (int64) tensor.
        workers: Distinct worker parties, in share order.
        seeded: Seeded shares (default) or every share sent in full.
    """
    owner = local_worker_of(workers)
    if any(w is owner for w in workers):
        raise MPCError("the local worker cannot hold a share; share among remote workers")
    value = value.detach().to(DTYPE)
    shape = list(value.shape)
    requests, oids, last = [], [new_id() for _ in workers], value
    for w, oid in zip(workers[:-1], oids):
        if seeded:
            seed = new_seed()
            wire_seed = torch.frombuffer(bytearray(seed), dtype=torch.uint8)
            requests.append((owner, m.CommandMessage(PRG_SHARE, (wire_seed, shape), {}, [oid], False), w))
            last = last - expand(seed, _LABEL, shape)
        else:
            piece = random_ring(shape)
            requests.append((owner, m.ObjectMessage([m.StoredObject(oid, piece)]), w))
            last = last - piece
    requests.append((owner, m.ObjectMessage([m.StoredObject(oids[-1], last)]), workers[-1]))
    # pointers first: if a party fails, dropping them frees the shares the others stored
    pointers = [PointerTensor(w, oid, owner, tuple(shape), DTYPE) for w, oid in zip(workers, oids)]
    one_round(requests, "sharing a value")  # every party's share in flight at once
    return pointers


def resolve_provider(crypto_provider: Any, parties: Sequence[Any]) -> Provider:
    """A Provider for ``crypto_provider``: itself, or the dealer of a worker.

    Raises:
        MPCError: If the provider worker is also a party (it would see shares
            of the triples it dealt and of the data).
    """
    if not is_worker(crypto_provider):
        return crypto_provider
    if any(p is crypto_provider for p in parties):
        raise MPCError(f"crypto provider {crypto_provider.id!r} cannot also be a party")
    return dealer_for(crypto_provider, local_worker_of([crypto_provider]))
