"""Dealing FSS comparison material from a crypto-provider worker to the parties.

Two worker functions (the orchestrator never sees masks or keys):

* ``veil.mpc.deal_comparison`` runs on the provider: it draws the masks,
  derives the other additive fields and the DCF keys
  (:mod:`veil.mpc.fss.material`) and sends each party its part directly,
  worker to worker, in one message.
* ``veil.mpc.receive_comparison`` runs on each party: it checks every field
  (types, shapes, dtypes) and stores them under the ids the orchestrator
  chose. Seeded dealing: the party derives its shares of the masks (and, but
  for the last party, of the derived fields) from a 32-byte seed, as for the
  other recipes (:mod:`veil.mpc.providers.worker_dealer`); the DCF keys are
  always sent (both keys share their correction words, so no seed can stand
  in for them).

Bounded messages: DCF keys take ~2 kB per compared entry, so the provider
splits a request's items into messages of at most :data:`MESSAGE_BYTES` of
material per party (by item count, fresh seeds per message; callers see one
request). One item always travels whole: an item above
:data:`MAX_ITEM_BYTES` is refused before anything is dealt, so the comparison
(:func:`veil.mpc.comparison.sign_select_fss`) asks for one item per chunk of
at most ``chunk_entries()`` entries of a larger tensor (opened in one round).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from veil.messaging import messages as m
from veil.messaging.allowlist import NO_RESULT, register_worker_function
from veil.mpc.errors import ProviderError
from veil.mpc.providers.base import check_distinct_parties
from veil.mpc.fss import material as fss
from veil.mpc.prg import SEED_BYTES as _SEED_BYTES, expand, new_seed
from veil.mpc.prg import seed_bytes as prg_seed_bytes
from veil.mpc.ring import random_ring
from veil.mpc.providers.dealing_sends import send_each
from veil.mpc.runtime import DEALT_LAYOUTS, awaiting_replies, off_turn, one_step_at_a_time, step_checkpoint
from veil.mpc.sharing import split

DEAL_COMPARISON = "veil.mpc.deal_comparison"
RECEIVE_COMPARISON = "veil.mpc.receive_comparison"
#: bytes of a comparison seed (a uint8 tensor of them: prg.seed_bytes)
SEED_BYTES = _SEED_BYTES
#: most values multiplied by one comparison bit (argmax uses 2; 0 = the bit alone)
MAX_VALUES = 16
#: most tensor bytes of comparison material in one message to one party (items are grouped up to it)
MESSAGE_BYTES = 64 << 20
#: largest single item (one party's part): well under a worker's default 256 MB message limit
MAX_ITEM_BYTES = 192 << 20
#: most ring elements one received message may expand from seeds (1 GiB of int64, as a dealing request):
#: the sender names shape and count, and a worker function is not sized before it runs
MAX_RECEIVED_ELEMENTS = 1 << 27
#: most ring elements one received message may make a party expand from its seed, or check, as additive
#: fields: 2^27 took ~2 s of one core in one piece (a party's turn held throughout) and 1 GiB. The keys
#: dominate an honest message (a key holder's 64 MiB group, or its largest 192 MiB item, holds < 2^20 additive
#: elements for every n_values), so this leaves it 4x room
MAX_EXPANDED_ELEMENTS = 1 << 22
#: most comparison items in one request (and so in one message): each costs the provider a DCF key
#: generation (~30-70 ms whatever its size) and a party a check per field (~0.1 ms), so an item count alone
#: made minutes of CPU from one request; an honest dealer asks in requests of at most this many. 256 held the
#: provider's dealing slot (every other session's dealings wait for it) ~13-18 s per request of ~100 kB
MAX_COMPARISON_ITEMS = 64
#: most ring elements per party in a request of *several* items (the honest dealer's default ``max_elements``,
#: which it never exceeds); one item alone may hold up to the absolute bounds. A batch of the absolute bound
#: held the dealing slot for tens of seconds per request
MAX_BATCH_ELEMENTS = 1 << 23


#: what the store charges each stored tensor at least (``veil.workers.quota.MIN_TENSOR_BYTES``; mpc imports no
#: workers: a test keeps them equal): a dealt field is charged no less before it is made, or items of empty
#: fields (a shape of (0,)) cost nothing and a request made millions of tensors (red team:
#: test_redteam_session66_pieces.py)
MIN_FIELD_BYTES = 256


def field_bytes(shape: Any) -> int:
    """What one int64 field of ``shape`` is charged before it is made (:data:`MIN_FIELD_BYTES` at least)."""
    return max(8 * math.prod(int(d) for d in shape), MIN_FIELD_BYTES)


def room_for(worker: Any, nbytes: int, op_name: str) -> None:
    """Refuses, before it is expanded, material that would not fit the requesting session's quota (the
    store would refuse it afterwards, once it had filled memory). A peer's hand-offs are charged per
    requester account by the store (a link may hold several quotas), so a dealer peer is left to it.
    Duck-typed: mpc imports no workers."""
    monitor = getattr(worker, "monitor", None)
    principal = monitor.current_principal() if monitor is not None else None
    if principal is not None and not principal.is_peer:
        monitor.check_room(principal, nbytes, op_name)


def check_spec(spec: Any, count: Any) -> tuple[tuple, int]:
    """``(shape, n_values)`` from the wire, or ProviderError."""
    if not isinstance(spec, (tuple, list)) or len(spec) != 2:
        raise ProviderError("comparison spec must be (shape, n_values)")
    shape, n_values = spec
    if not isinstance(shape, (tuple, list)) or not all(type(s) is int and s >= 0 for s in shape):
        raise ProviderError(f"comparison shape must be a tuple of sizes, got {shape!r}")
    if type(n_values) is not int or not 0 <= n_values <= MAX_VALUES:
        raise ProviderError(f"comparison n_values must be an int in [0, {MAX_VALUES}], got {n_values!r}")
    if type(count) is not int or not 1 <= count <= MAX_COMPARISON_ITEMS:
        raise ProviderError(f"comparison item count must be an int in [1, {MAX_COMPARISON_ITEMS}] per request, "
                            f"got {count!r}")
    return tuple(shape), n_values


def _label(item: int, field: int) -> str:
    return f"cmp/{item}/{field}"


def item_bytes(shape: tuple, n_values: int, party: int, n_parties: int, seeded: bool) -> int:
    """Tensor bytes of one item in party ``party``'s message (seeded: only the last party gets
    corrections; only parties 0 and 1 get keys)."""
    n_add, n_masks = fss.n_additive(n_values), fss.n_masks(n_values)
    entries = math.prod(shape)
    if not seeded:
        additive = n_add
    else:
        additive = n_add - n_masks if party == n_parties - 1 else 0
    key = sum(math.prod(s) for s in fss.field_shapes(shape, n_values, True)[n_add:]) if party < 2 else 0
    return 8 * (additive * entries + key)


def _deal_comparison(worker: Any, spec: Any, party_ids: list, ids: list, count: int, seeded: bool) -> None:
    """Runs on the provider: ``count`` items, each party's part sent straight to it, in messages of
    at most :data:`MESSAGE_BYTES` per party."""
    shape, n_values = check_spec(spec, count)
    n = len(party_ids)
    check_distinct_parties(party_ids, "comparison dealing")
    if n < 2 or not isinstance(ids, list) or len(ids) != n:
        raise ProviderError("comparison dealing needs >= 2 parties and one id list per party")
    per_party = [len(fss.field_shapes(shape, n_values, i < 2)) for i in range(n)]
    if any(not isinstance(ids[i], list) or len(ids[i]) != count * per_party[i] for i in range(n)):
        raise ProviderError("comparison dealing needs, per party, one id per field of every item")
    largest = max(item_bytes(shape, n_values, i, n, bool(seeded)) for i in range(n))
    if largest > MAX_ITEM_BYTES:
        raise ProviderError(
            f"one comparison of {math.prod(shape)} entries needs {largest / 2**20:.0f} MiB of material per party "
            f"in one message, over the {MAX_ITEM_BYTES / 2**20:.0f} MiB limit: compare at most "
            f"{max(1, math.prod(shape) * MAX_ITEM_BYTES // largest)} entries at a time")
    elements = count * max(max(1, sum(math.prod(s) for s in fss.field_shapes(shape, n_values, i < 2)))
                           for i in range(n))  # (DCF key generation costs per entry too)
    bound = MAX_RECEIVED_ELEMENTS if count == 1 else MAX_BATCH_ELEMENTS
    if elements > bound:
        raise ProviderError(f"a dealing of {count} comparison items of shape {shape} makes {elements} ring elements "
                            f"per party, more than {bound} in one request")
    chunk = max(1, MESSAGE_BYTES // max(1, largest))
    for first in range(0, count, chunk):
        c = min(chunk, count - first)
        chunk_ids = [ids[i][first * per_party[i]:(first + c) * per_party[i]] for i in range(n)]
        # per message: its parties' slots, then one dealing at a time while it makes the material, which it
        # gives up before it waits on a party (dealing_sends.py); off the turn: it never touches the store, and
        # holding the turn while a party took its message stalled every session here, and through a request at
        # the party that waited on this worker, every session there too
        with awaiting_replies(worker, party_ids) as answered, one_step_at_a_time(worker) as made, off_turn():
            parties = [worker.resolve_worker(pid) for pid in party_ids]  # (after the waits: a peer revoked)
            messages = _chunk_messages(shape, n_values, chunk_ids, c, seeded, n)
            made()
            send_each(worker, parties, messages, answered)


def _chunk_messages(shape: tuple, n_values: int, ids: list, count: int, seeded: bool, n: int) -> list:
    """One message per party: ``count`` items, with fresh seeds."""
    seeds = [new_seed() for _ in range(n)] if seeded else None
    n_masks = fss.n_masks(n_values)
    shares: list[list] = [[] for _ in range(n)]  # explicit additive shares (or last party's corrections)
    keys: list[list] = [[], []]
    for k in range(count):
        # a DCF key generation per entry, ~25-80 us: a request's items took up to ~16 s of one core, every
        # other client of this worker waiting; they are let in between items, and between chunks of an item
        step_checkpoint()
        if seeded:
            masks = [_sum(expand(s, _label(k, j), shape) for s in seeds) for j in range(n_masks)]
        else:
            masks = [random_ring(shape) for _ in range(n_masks)]
        derived, key_pair = fss.derive(masks, n_values, between=step_checkpoint)  # (one item: up to ~3 s)
        for b in (0, 1):
            keys[b].extend(key_pair[b])
        if seeded:
            for j, value in enumerate(derived):
                others = [expand(s, _label(k, n_masks + j), shape) for s in seeds[:-1]]
                shares[-1].append(value - _sum(others))
            continue
        for value in masks + derived:
            for i, share in enumerate(split(value, n)):
                shares[i].append(share)
    messages = []
    for i in range(n):
        seed = torch.frombuffer(bytearray(seeds[i]), dtype=torch.uint8) if seeded else None
        args = (list(shape), n_values, count, seed, shares[i], keys[i] if i < 2 else [])
        messages.append(m.CommandMessage(RECEIVE_COMPARISON, args, {}, list(ids[i]), False))
    return messages


def _sum(tensors) -> torch.Tensor:
    total = None
    for t in tensors:
        total = t if total is None else total + t
    return total


def _receive_comparison(worker: Any, shape: Any, n_values: Any, count: Any, seed: Any, shares: Any,
                        keys: Any) -> list:
    """Runs on a party: checks and returns its fields (stored under the command's ids)."""
    shape, n_values = check_spec((shape, n_values), count)
    if not isinstance(shares, list) or not isinstance(keys, list):
        raise ProviderError("comparison shares and keys must be lists of tensors")
    n_add, n_masks = fss.n_additive(n_values), fss.n_masks(n_values)
    n_key = len(fss.field_shapes(shape, n_values, True)) - n_add
    holds_key = bool(keys)
    elements = count * n_add * max(1, math.prod(shape))  # (an empty shape still costs a loop per field)
    if elements > MAX_EXPANDED_ELEMENTS:
        raise ProviderError(f"{count} comparison items of shape {shape} make {elements} ring elements of additive "
                            f"fields, more than {MAX_EXPANDED_ELEMENTS} in one message")
    if seed is not None:
        room_for(worker, count * n_add * field_bytes(shape), RECEIVE_COMPARISON)
    if holds_key and len(keys) != count * n_key:
        raise ProviderError(f"expected {count * n_key} DCF key tensors, got {len(keys)}")
    if seed is not None:
        try:  # (its form alone, before any value is read: prg.seed_bytes)
            key = prg_seed_bytes(seed, "a comparison seed")
        except ValueError as e:
            raise ProviderError(str(e)) from None
        n_fix = count * (n_add - n_masks)
        if len(shares) not in (0, n_fix):
            raise ProviderError(f"expected 0 or {n_fix} corrections, got {len(shares)}")
    elif len(shares) != count * n_add:
        raise ProviderError(f"expected {count * n_add} comparison shares, got {len(shares)}")
    with one_step_at_a_time(worker, "receiving"):  # (what it expanded is held until stored: one at a time)
        return _received_items(shape, n_values, count, key if seed is not None else None, shares, keys)


def _received_items(shape: tuple, n_values: int, count: int, seed: bytes | None, shares: list, keys: list) -> list:
    """Every item's fields, expanded and checked, handing the party's turn over between items (256 one-entry
    items held it ~1 s for a message of a hundred bytes; the provider no longer waits on it holding its own)."""
    n_add, n_masks = fss.n_additive(n_values), fss.n_masks(n_values)
    n_key = len(fss.field_shapes(shape, n_values, True)) - n_add
    out: list = []
    fixes = iter(shares)
    for k in range(count):
        step_checkpoint()
        if seed is None:
            item = shares[k * n_add:(k + 1) * n_add]
        else:
            item = [expand(seed, _label(k, j), shape) for j in range(n_masks)]
            item += [next(fixes) if shares else expand(seed, _label(k, j), shape)
                     for j in range(n_masks, n_add)]
        if keys:
            item = list(item) + keys[k * n_key:(k + 1) * n_key]
        try:
            fss.check_fields(item, shape, n_values, bool(keys))
        except ValueError as e:
            raise ProviderError(f"received comparison material is malformed: {e}") from None
        out.extend(item)
    return out


register_worker_function(DEAL_COMPARISON, _deal_comparison, shapes=NO_RESULT)
register_worker_function(RECEIVE_COMPARISON, _receive_comparison)


def _received_layout(args: tuple) -> list[tuple[int, bool]]:
    """``(item, uniform?)`` of what ``_receive_comparison`` returns: per item the masks (uniform), the
    other additive fields, then the DCF keys (key holders only)."""
    shape, n_values, count, _, _, keys = args
    n_add, n_masks = fss.n_additive(n_values), fss.n_masks(n_values)
    n_key = len(fss.field_shapes(tuple(shape), n_values, True)) - n_add if keys else 0
    fields = [j < n_masks for j in range(n_add + n_key)]
    return [(k, uniform) for k in range(count) for uniform in fields]


DEALT_LAYOUTS[RECEIVE_COMPARISON] = _received_layout
