"""A crypto provider that is a worker: it deals straight to the parties.

The orchestrator asks the provider worker for ``count`` items of one kind
(Beaver triples for an op and shapes, truncation pairs, comparison keys) in
**one command message**, naming the object ids each party will store them
under. The provider generates the items and sends each party its shares
**directly** (worker to worker, ``worker.send_msg``); the orchestrator only
ever holds pointers, never triple material.

Seeded dealing (default) cuts the provider's traffic: each party gets a
32-byte seed from which it derives its shares of the *uniform* fields
(``a``, ``b``, masks); only one party also receives explicit corrections for
the *derived* fields (``c = op(a, b)``, ...). For an elementwise product
with 2 parties the provider sends 1 tensor instead of 6 (3 fields x 2
parties); with ``seeded=False`` every share is sent.

Bulk: a request for a key (kind + shapes) deals ``batch`` items; the spares
are kept (as pointers) for the next requests of the same key. ``batch``
starts at 1 and doubles per request of the same key up to ``max_batch``,
capped by ``max_elements`` ring elements per party and request.

Comparison material (masks and FSS keys, which are not a recipe) goes
through its own pair of worker functions, :mod:`veil.mpc.providers.fss_dealing`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Hashable, Sequence

import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import NO_RESULT, register_worker_function
from veil.mpc.material import dealer_generator, recipe, register_mac_key
from veil.mpc.fss import material as fss_material
from veil.mpc.prg import expand, new_seed
from veil.mpc.providers.fss_dealing import DEAL_COMPARISON
from veil.mpc.providers.base import Provider
from veil.mpc.ring import DTYPE, random_ring
from veil.mpc.sharing import split
from veil.mpc.runtime import DEALER_TAG
from veil.mpc.runtime import remote_handle as PointerTensor  # the injected runtime's handle (mpc imports no tensors)

DEAL = "veil.mpc.deal"
MAC_KEY = "veil.mpc.register_mac_key"
EXPAND = "veil.mpc.expand_material"


def _label(k: int, field: int) -> str:
    return f"{k}/{field}"


def _deal(worker: Any, kind: str, spec: Any, party_ids: list, ids: list, count: int, seeded: bool) -> None:
    """Runs on the provider: generates ``count`` items and sends each party its shares.

    Args:
        worker: The provider worker (passed by the executing worker).
        kind: A kind in :data:`veil.mpc.material.RECIPES`.
        spec: The kind's parameters (shapes, ...).
        party_ids: Worker ids of the parties, in share order.
        ids: Per party, the ids (``count`` x fields, item-major) to store under.
        count: Number of items.
        seeded: Send seeds + corrections instead of every share.
    """
    uniform_shapes, derived_shapes, derive = recipe(kind, spec)
    n_u, n = len(uniform_shapes), len(party_ids)
    gen = dealer_generator()
    parties = [worker.resolve_worker(pid) for pid in party_ids]
    if seeded:
        seeds = [new_seed() for _ in parties]
        corrections = []
        for k in range(count):
            uniform = [_sum(expand(s, _label(k, j), shape) for s in seeds) for j, shape in enumerate(uniform_shapes)]
            for j, value in enumerate(derive(uniform, gen)):
                others = [expand(s, _label(k, n_u + j), derived_shapes[j]) for s in seeds[:-1]]
                corrections.append(value - _sum(others) if others else value)
        for i, party in enumerate(parties):
            fix = corrections if i == n - 1 else []
            args = (torch.frombuffer(bytearray(seeds[i]), dtype=torch.uint8), kind, spec, count, fix)
            worker.send_msg(m.CommandMessage(EXPAND, args, {}, list(ids[i]), False), party)
        return
    per_party: list[list] = [[] for _ in parties]
    for k in range(count):
        uniform = [random_ring(shape) for shape in uniform_shapes]
        for value in uniform + derive(uniform, gen):
            for i, share in enumerate(split(value, n)):
                per_party[i].append(share)
    for i, party in enumerate(parties):
        objects = [m.StoredObject(oid, t, (DEALER_TAG,)) for oid, t in zip(ids[i], per_party[i])]  # never revealable
        worker.send_msg(m.ObjectMessage(objects), party)


def _sum(tensors) -> torch.Tensor:
    total = None
    for t in tensors:
        total = t if total is None else total + t
    return total


def _expand_material(worker: Any, seed: torch.Tensor, kind: str, spec: Any, count: int, corrections: list) -> list:
    """Runs on a party: derives its shares from the seed (+ corrections if last)."""
    uniform_shapes, derived_shapes, _ = recipe(kind, spec)
    seed_bytes = bytes(seed.to(torch.uint8).tolist())
    out, c = [], 0
    for k in range(count):
        for j, shape in enumerate(uniform_shapes):
            out.append(expand(seed_bytes, _label(k, j), shape))
        for j, shape in enumerate(derived_shapes):
            if corrections:
                out.append(corrections[c])
                c += 1
            else:
                out.append(expand(seed_bytes, _label(k, len(uniform_shapes) + j), shape))
    return out


register_worker_function(DEAL, _deal, shapes=NO_RESULT)
register_worker_function(EXPAND, _expand_material)
register_worker_function(MAC_KEY, lambda worker, key_id, alpha: register_mac_key(key_id, alpha), shapes=NO_RESULT)


class WorkerDealer(Provider):
    """Correlated randomness from a crypto-provider worker.

    Args:
        worker: The crypto provider's worker.
        owner: The orchestrator's worker (sends requests, owns the pointers).
        seeded: Deal seeds + corrections (fewer bytes) instead of all shares.
        max_batch: Most items dealt per request of one key.
        max_elements: Most ring elements per party in one request.
    """

    def __init__(self, worker: Any, owner: Any, seeded: bool = True, max_batch: int = 16,
                 max_elements: int = 1 << 23) -> None:
        self.worker = worker
        self.owner = owner
        self.seeded = seeded
        self.max_batch = max_batch
        self.max_elements = max_elements
        self._spare: dict[Hashable, deque] = {}
        self._next_batch: dict[Hashable, int] = {}
        self.requests = 0

    def __repr__(self) -> str:
        return f"WorkerDealer(worker={self.worker.id!r})"

    def _take(self, kind: str, spec: Any, parties: Sequence[Hashable]) -> dict:
        key = (kind, repr(spec), tuple(parties))
        spare = self._spare.setdefault(key, deque())
        if not spare:
            self._request(key, kind, spec, list(parties), spare)
        return spare.popleft()

    def _request(self, key, kind: str, spec: Any, parties: list, spare: deque) -> None:
        if kind == "comparison":  # FSS keys: not a recipe (fss_dealing.py)
            op = DEAL_COMPARISON
            party_shapes = [fss_material.field_shapes(spec[0], spec[1], i < 2) for i in range(len(parties))]
        else:
            op = DEAL
            uniform_shapes, derived_shapes, _ = recipe(kind, spec)
            party_shapes = [uniform_shapes + derived_shapes] * len(parties)
        per_item = max(1, max(sum(int(torch.Size(s).numel()) for s in shapes) for shapes in party_shapes))
        count = max(1, min(self._next_batch.get(key, 1), self.max_elements // per_item))
        self._next_batch[key] = min(2 * count, self.max_batch)
        ids = [[new_id() for _ in range(count * len(shapes))] for shapes in party_shapes]
        args = (spec, parties, ids, count, self.seeded) if op == DEAL_COMPARISON else (kind, spec, parties, ids, count,
                                                                                      self.seeded)
        self.owner.send_msg(m.CommandMessage(op, args, {}, [], False), self.worker)
        self.requests += 1
        locations = [self.owner.resolve_worker(p) for p in parties]
        for k in range(count):
            item = {}
            for p, loc, pids, shapes in zip(parties, locations, ids, party_shapes):
                item[p] = tuple(
                    PointerTensor(loc, pids[k * len(shapes) + j], self.owner, shape, DTYPE)
                    for j, shape in enumerate(shapes)
                )
            spare.append(item)

    def beaver_triples(self, op, shape_a, shape_b, parties, **op_kwargs):
        spec = (op, tuple(shape_a), tuple(shape_b), dict(sorted(op_kwargs.items())))
        return self._take("beaver", spec, parties)

    def truncation_pairs(self, shape, divisor, parties):
        return self._take("truncation", (tuple(shape), int(divisor)), parties)

    def zero_shares(self, shape, parties):
        return self._take("zero", (tuple(int(s) for s in shape),), parties)

    def comparison_keys(self, shape, n_values, parties):
        return self._take("comparison", (tuple(int(s) for s in shape), int(n_values)), parties)

    def register_mac_key(self, key_id, alpha):
        # Orchestrator -> provider only: the key never goes to a party.
        self.owner.send_msg(m.CommandMessage(MAC_KEY, (key_id, alpha), {}, [], False), self.worker)

    def authenticated_triples(self, key_id, op, shape_a, shape_b, parties, **op_kwargs):
        spec = (key_id, op, tuple(shape_a), tuple(shape_b), dict(sorted(op_kwargs.items())))
        return self._take("beaver_mac", spec, parties)

    def authenticated_truncation_pairs(self, key_id, shape, divisor, parties):
        return self._take("truncation_mac", (key_id, tuple(shape), int(divisor)), parties)


_DEALERS: dict[tuple[int, int], tuple[Any, Any, WorkerDealer]] = {}


def dealer_for(worker: Any, owner: Any, **options: Any) -> WorkerDealer:
    """The one WorkerDealer per (provider worker, orchestrator), so shares made
    with the same ``crypto_provider=cp`` combine (providers compare by identity)."""
    key = (id(worker), id(owner))
    entry = _DEALERS.get(key)
    if entry is None or entry[0] is not worker or entry[1] is not owner:
        entry = _DEALERS[key] = (worker, owner, WorkerDealer(worker, owner, **options))
    return entry[2]
