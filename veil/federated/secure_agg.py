"""Secure aggregation: the coordinator learns only the sum of the clients' updates.

Each client encodes its weighted update in fixed point (Z/2^64, 24 fractional
bits), splits it into one additive share per participant, keeps one and sends
the others straight to the other clients (worker to worker). Shares land in a
per-round inbox outside the object store, so nobody can search, read or
compute on them through pointers. Each client then returns the sum of the
shares it holds: every such partial sum is uniformly random on its own, and
their total is the sum of the updates. One round of client-to-client messages,
one message per client to the coordinator.

Security: honest-but-curious coordinator and clients, no collusion of all but
one client; integrity against malicious clients is out of scope.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.exceptions import RemoteExecutionError
from veil.messaging.allowlist import ALLOWLIST, register_worker_function
from veil.messaging.messages import CommandMessage
from veil.mpc.encoding import decode, encode, make_encoding
from veil.mpc.ring import random_ring
from veil.tensors import remote_ops

ENCODING = make_encoding(24)


def _inbox(worker: Any) -> dict:
    return worker.__dict__.setdefault("_secagg_inbox", {})


def _share_update(worker: Any, state: list, weight: float, peers: list, tag: int) -> None:
    """Client side: encode weight * state, keep one share, send one to each peer."""
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in state]) * float(weight)
    encoded = encode(flat, ENCODING)
    others = [random_ring(encoded.shape) for _ in peers]
    own = encoded.clone()
    for share in others:
        own -= share  # int64 arithmetic wraps: exactly Z/2^64
    for peer_id, share in zip(peers, others):
        peer = worker.resolve_worker(peer_id)
        worker.send_msg(CommandMessage("veil.secagg.deposit", (share, tag), {}, [], False), peer)
    _inbox(worker).setdefault(tag, []).append(own)


def _deposit(worker: Any, share: torch.Tensor, tag: int) -> None:
    if share.dtype != torch.int64:
        raise RemoteExecutionError("secure-aggregation shares are int64 ring elements")
    _inbox(worker).setdefault(tag, []).append(share)


def _partial_sum(worker: Any, tag: int, expected: int) -> torch.Tensor:
    """Sum of the shares held for this round; refuses until every participant's share arrived."""
    shares = _inbox(worker).get(tag, [])
    if len(shares) != expected:
        raise RemoteExecutionError(f"secure aggregation round {tag}: {len(shares)} of {expected} shares arrived")
    del _inbox(worker)[tag]
    total = torch.zeros_like(shares[0])
    for s in shares:
        total += s
    return total


def _discard(worker: Any, tag: int) -> None:
    _inbox(worker).pop(tag, None)


register_worker_function("veil.secagg.share", _share_update, shapes="none")
register_worker_function("veil.secagg.deposit", _deposit, shapes="none")
register_worker_function("veil.secagg.partial_sum", _partial_sum)
register_worker_function("veil.secagg.discard", _discard, shapes="none")


def secure_sum(state_pointers: dict[str, list], weights: dict[str, float], tag: int) -> list[torch.Tensor]:
    """Sum over clients of weight * state, seen by the caller only as a total.

    Args:
        state_pointers: worker id -> pointers to that client's state tensors (all on that worker).
        weights: worker id -> weight of its update.
        tag: a fresh round identifier.
    """
    ids = list(state_pointers)
    shapes = [p.shape for p in state_pointers[ids[0]]]
    for wid in ids:
        peers = [p for p in ids if p != wid]
        state = state_pointers[wid]
        remote_ops.call(ALLOWLIST.by_name("veil.secagg.share"), (state, weights[wid], peers, tag), {})
    total = None
    for wid in ids:
        location = state_pointers[wid][0].location
        ptr = remote_ops.call(ALLOWLIST.by_name("veil.secagg.partial_sum"), (tag, len(ids)), {}, location=location)
        part = ptr.get()
        total = part if total is None else total + part
    flat = decode(total, ENCODING, dtype=torch.float64)
    out, offset = [], 0
    for shape, p in zip(shapes, state_pointers[ids[0]]):
        n = int(torch.Size(shape).numel())
        out.append(flat[offset : offset + n].reshape(shape).to(p.dtype))
        offset += n
    return out


def discard_round(state_pointers: dict[str, list], tag: int) -> None:
    """Drops a failed round's shares on the clients that are still reachable."""
    for wid, state in state_pointers.items():
        try:
            remote_ops.call(ALLOWLIST.by_name("veil.secagg.discard"), (tag,), {}, location=state[0].location)
        except Exception:
            pass
