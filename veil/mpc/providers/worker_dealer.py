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

Offline/online split: ``with dealer.record() as plan: step()`` notes what
one call of ``step`` takes (kinds, shapes, counts); ``dealer.deal_ahead(plan,
repeat=k)`` deals that material for ``k`` calls before they run, in one
request per key (or a few, within ``max_elements``), so that the calls
themselves wait only on openings. Material waiting at the parties is bounded
by ``budget_bytes`` (owner-configurable): ``deal_ahead`` stops at the budget
and says how much it left out; when a key's items run out, ``on_exhausted``
decides: ``"deal"`` (default) deals on demand as before, ``"raise"`` raises
:class:`MaterialExhaustedError`. Every item is served once: it leaves its pool
when taken, and nothing puts it back (not even when the protocol that took it
fails).

Dealing in the background: ``deal_ahead(plan, repeat, background=True)``
or ``start_background(plan)`` (no end: keeps ``budget_bytes`` of material
ready as the calls take it) deals from a thread while the calls run, so they
wait only on openings (and on the thread, when they outrun it); errors
surface at the next take, ``stop_background()`` stops cleanly. See
:mod:`veil.mpc.providers.background`. The pools and counters below are
guarded by one condition (``_cond``) shared with that thread; requests are
sent outside it.

Comparison material (masks and FSS keys, which are not a recipe) goes
through its own pair of worker functions, :mod:`veil.mpc.providers.fss_dealing`.
A request's bounds, its fields' layout and the seeded corrections are worked out in
:mod:`veil.mpc.providers.dealing_recipe`.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch

from veil.exceptions import PermissionDeniedError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import NO_RESULT, register_worker_function
from veil.mpc.comparison_material import comparison_spec
from veil.mpc.material import (FROM_SHARES, WIDE_KINDS, dealer_generator, fields_from_shares, item_product_work,
                               provider_scope, recipe, register_mac_key, request_work_bound, split_shares,
                               split_wide, xor_fields)
from veil.mpc.fss import material as fss_material
from veil.mpc.prg import expand, new_seed
from veil.mpc.prg import seed_bytes as prg_seed_bytes
from veil.mpc.errors import ProviderError
from veil.mpc.providers.background import BackgroundDealing, BackgroundDealingError
from veil.mpc.providers.dealing_recipe import _corrections, _label, bounded_recipe, recipe_layout
from veil.mpc.providers import fss_dealing
from veil.mpc.providers.fss_dealing import DEAL_COMPARISON, MAX_BATCH_ELEMENTS, room_for
from veil.mpc.providers.base import RECORD_HOOKS, MaterialExhaustedError, Provider, check_distinct_parties
from veil.mpc.providers.dealing_sends import answering, replied, send_each, started_beside, wait_quietly
from veil.mpc.ring import DTYPE, random_ring
from veil.mpc.runtime import (DEALER_TAG, DEALT_FIXED, DEALT_FIXED_TAG, DEALT_ITEM_TAG, DEALT_LAYOUTS,
                              DEALT_MASK_TAG, DEALT_SOURCES_TAG, awaiting_replies, off_turn,
                              one_step_at_a_time, step_check, step_checkpoint)
from veil.mpc.runtime import remote_handle as PointerTensor  # the injected runtime's handle (mpc imports no tensors)
from veil.shapes import numel

DEAL = "veil.mpc.deal"
MAC_KEY = "veil.mpc.register_mac_key"
EXPAND = "veil.mpc.expand_material"


def _requester(worker: Any) -> str | None:
    """The provider-side scope of this request's secrets: its session at a network worker (None in-process)."""
    current = getattr(worker, "current_session", None)
    session = current() if current is not None else None
    return session.id if session is not None else None


def _deal(worker: Any, kind: str, spec: Any, party_ids: list, ids: list, count: int, seeded: bool) -> None:
    """Deals on behalf of the requesting session (its MAC keys and fixed masks only); see :func:`_deal_scoped`."""
    recipe_parts = _checked_request(kind, spec, party_ids, ids, count)
    # off the turn (it never touches the store; holding it while a party took its part, that party's requests
    # waiting on this worker stalled both workers); its parties' slots, then one dealing at a time while it
    # makes its material, waiting on the parties holding their slots alone (dealing_sends.py)
    with provider_scope(_requester(worker)), awaiting_replies(worker, party_ids) as answered, \
            one_step_at_a_time(worker) as made, off_turn():
        _deal_scoped(worker, kind, spec, party_ids, ids, count, seeded, recipe_parts, made, answered)


def _checked_request(kind: str, spec: Any, party_ids: list, ids: list, count: int) -> tuple:
    """A dealing request's recipe, refused in one line before it waits for anything."""
    uniform_shapes, derived_shapes, derive = bounded_recipe(kind, spec, count)
    check_distinct_parties(party_ids, "a dealing")
    fields, n = len(uniform_shapes) + len(derived_shapes), len(party_ids)
    if kind in FROM_SHARES and n != 2:  # (before any seed goes out: its derive takes two parties' shares)
        raise ProviderError(f"a {kind!r} item is dealt to two parties, not {n}")
    if type(ids) is not list or len(ids) != n or any(type(i) is not list or len(i) != count * fields for i in ids):
        raise ProviderError(f"a dealing of {count} {kind!r} items needs {count * fields} ids per party")
    return uniform_shapes, derived_shapes, derive


def _register_mac_key(worker: Any, key_id: str, alpha: Any) -> None:
    monitor = getattr(worker, "monitor", None)
    # a key is a value the requester sends: one named by id could be the owner's data (or derived from it),
    # which the provider would keep outside the monitor and compute every MAC dealt for the session with
    if monitor is not None and monitor.request_reads_owner_data():
        raise PermissionDeniedError("a MAC key is sent as a value; the data owner's objects cannot be one")
    with provider_scope(_requester(worker)):
        register_mac_key(key_id, alpha)


def _deal_scoped(worker: Any, kind: str, spec: Any, party_ids: list, ids: list, count: int, seeded: bool,
                 recipe_parts: tuple, made: Callable[[], None], answered: Callable[[int], None]) -> None:
    """Runs on the provider: generates ``count`` items and sends each party its shares.

    Args:
        worker: The provider worker (passed by the executing worker).
        kind: A kind in :data:`veil.mpc.material.RECIPES`.
        spec: The kind's parameters (shapes, ...).
        party_ids: Worker ids of the parties, in share order.
        ids: Per party, the ids (``count`` x fields, item-major) to store under.
        count: Number of items.
        seeded: Send seeds + corrections instead of every share.
        recipe_parts: The kind's checked recipe (:func:`_checked_request`).
        made: Gives the dealing slot up (the material is made; what is left is waiting on the parties).
        answered: Frees party ``i``'s slot (its reply came).
    """
    uniform_shapes, derived_shapes, derive = recipe_parts
    xor = xor_fields(kind, spec)  # fields shared by XOR instead of addition
    n = len(party_ids)
    gen = dealer_generator()
    parties = [worker.resolve_worker(pid) for pid in party_ids]  # (after the waits: a peer revoked meanwhile)
    if seeded:
        seeds = [new_seed() for _ in parties]
        # Every party but the last needs only its seed: sending it (the party expands its shares there)
        # runs beside the dealer's own part (the uniform fields' values from all seeds, derive, the last
        # party's corrections): network parties and big in-process ones on threads of their own (others once
        # the material is made: started_beside).
        size = count * (sum(map(numel, uniform_shapes)) + sum(map(numel, derived_shapes)))
        wait = started_beside([replied(_send_seed(worker, parties[i], seeds[i], kind, spec, count, ids[i]),
                                       answered, i) for i in range(n - 1)], parties[:-1], size)
        try:
            try:
                corrections = _corrections(kind, uniform_shapes, derived_shapes, derive, xor, seeds, count, gen)
            finally:
                made()  # (before any wait on a party, failed or not)
            with answering(answered, n - 1):
                worker.send_msg(_expand_msg(seeds[-1], kind, spec, count, corrections, ids[-1],
                                            fresh=kind not in WIDE_KINDS), parties[-1])
        except BaseException:
            wait_quietly(wait)
            raise
        wait()
        return
    per_party: list[list] = [[] for _ in parties]
    for k in range(count):
        step_check()  # (as the seeded corrections: a cancelled session's items are made for nobody)
        if kind in FROM_SHARES:  # the derived fields follow from each party's shares of the uniform ones
            for field_shares in fields_from_shares(derive, uniform_shapes, n, random_ring,
                                                   lambda v: split_shares(v, n, False)):
                for i, share in enumerate(field_shares):
                    per_party[i].append(share)
            continue
        uniform = [random_ring(shape) for shape in uniform_shapes]
        fields = uniform + derive(uniform, gen)
        if kind in WIDE_KINDS:  # 128-bit SPDZ2k fields: split with carries
            shares = split_wide(fields, n, random_ring)
        else:
            shares = [split_shares(v, n, j in xor) for j, v in enumerate(fields)]
        for field_shares in shares:
            for i, share in enumerate(field_shares):
                per_party[i].append(share)
    tags = [(DEALER_TAG, DEALT_ITEM_TAG + str(k)) + ((DEALT_FIXED_TAG,) if uniform == DEALT_FIXED else
                                                     (DEALT_MASK_TAG,) if uniform else ())
            + ((DEALT_SOURCES_TAG + ".".join(map(str, src)),) if src else ())
            for k, uniform, src in recipe_layout(kind, spec, count)]
    # never revealable; uniform fields may mask openings
    messages = [m.ObjectMessage([m.StoredObject(oid, t, tag) for oid, t, tag in zip(ids[i], per_party[i], tags)])
                for i in range(n)]
    made()
    send_each(worker, parties, messages, answered)


def _expand_msg(seed: bytes, kind: str, spec: Any, count: int, fix: list, ids: Sequence[int],
                fresh: bool = False) -> m.CommandMessage:
    """``fresh``: only this message holds the tensors in ``fix`` (the dealer drops them once it is sent), so an
    in-process party keeps them without a copy (``Outbox._exchange``). A 64-bit recipe's corrections are such
    tensors (``dealing_recipe._own``: corrected in place, one storage each); a 128-bit recipe's are not checked
    for it (with one party they are the derived values themselves) and keep the copy."""
    args = (torch.frombuffer(bytearray(seed), dtype=torch.uint8), kind, spec, count, fix)
    msg = m.CommandMessage(EXPAND, args, {}, list(ids), False)
    msg.fresh = fresh
    return msg


def _send_seed(worker: Any, party: Any, seed: bytes, kind: str, spec: Any, count: int,
               ids: Sequence[int]) -> Callable[[], Any]:
    """A party other than the last: its seed sent (it expands its shares there)."""
    return lambda: worker.send_msg(_expand_msg(seed, kind, spec, count, [], ids), party)


def _expand_material(worker: Any, seed: torch.Tensor, kind: str, spec: Any, count: int, corrections: list) -> list:
    """Runs on a party: derives its shares from the seed (+ corrections if last)."""
    uniform_shapes, derived_shapes, _ = bounded_recipe(kind, spec, count)
    try:  # (its form alone, before any value is read: prg.seed_bytes)
        seed_bytes = prg_seed_bytes(seed, "a dealing seed")
    except ValueError as e:
        raise ProviderError(str(e)) from None
    if type(corrections) is not list or len(corrections) not in (0, count * len(derived_shapes)) or any(
            not isinstance(t, torch.Tensor) or t.dtype != DTYPE or tuple(t.shape) != tuple(derived_shapes[i % len(
                derived_shapes)]) for i, t in enumerate(corrections)):
        raise ProviderError(f"a dealing's corrections must be none or {count * len(derived_shapes)} int64 tensors "
                            "of the derived fields' shapes")
    # refused by the session's quota before the streams are expanded (not sized before it runs, as a torch op is)
    room_for(worker, count * sum(fss_dealing.field_bytes(shape) for shape in uniform_shapes + derived_shapes),
             EXPAND)
    out, c = [], 0
    # up to 2^27 elements (1 GiB) per request: one request's at a time, handing the turn over between items and
    # every 16 MiB of a field (it held the party's turn ~2 s in one piece)
    with one_step_at_a_time(worker, "receiving"):
        for k in range(count):
            step_checkpoint()
            for j, shape in enumerate(uniform_shapes):
                out.append(expand(seed_bytes, _label(k, j), shape, between=step_checkpoint))
            for j, shape in enumerate(derived_shapes):
                if corrections:
                    out.append(corrections[c])
                    c += 1
                else:
                    out.append(expand(seed_bytes, _label(k, len(uniform_shapes) + j), shape, between=step_checkpoint))
    return out


register_worker_function(DEAL, _deal, shapes=NO_RESULT)
register_worker_function(EXPAND, _expand_material)
DEALT_LAYOUTS[EXPAND] = lambda args: recipe_layout(args[1], args[2], args[3])  # (seed, kind, spec, count, fixes)
register_worker_function(MAC_KEY, _register_mac_key, shapes=NO_RESULT)


@dataclass
class Plan:
    """What some calls take from a dealer: per key, ``(kind, spec, parties)`` and a count."""

    needs: dict = field(default_factory=dict)  # key -> [kind, spec, parties, count]

    def add(self, key: Hashable, kind: str, spec: Any, parties: Sequence[Hashable]) -> None:
        entry = self.needs.setdefault(key, [kind, spec, tuple(parties), 0])
        entry[3] += 1

    @property
    def items(self) -> int:
        return sum(e[3] for e in self.needs.values())


class WorkerDealer(Provider):
    """Correlated randomness from a crypto-provider worker.

    Args:
        worker: The crypto provider's worker.
        owner: The orchestrator's worker (sends requests, owns the pointers).
        seeded: Deal seeds + corrections (fewer bytes) instead of all shares.
        max_batch: Most items dealt per on-demand request of one key.
        max_elements: Most ring elements per party in one request.
        budget_bytes: Most bytes of material (all parties together) dealt
            ahead and not yet used.
        on_exhausted: ``"deal"`` (deal on demand when a key's pool is empty)
            or ``"raise"`` (:class:`MaterialExhaustedError`).
    """

    def __init__(self, worker: Any, owner: Any, seeded: bool = True, max_batch: int = 16,
                 max_elements: int = MAX_BATCH_ELEMENTS, budget_bytes: int = 1 << 30, on_exhausted: str = "deal") -> None:
        if on_exhausted not in ("deal", "raise"):
            raise ValueError(f"on_exhausted must be 'deal' or 'raise', got {on_exhausted!r}")
        self.worker = worker
        self.owner = owner
        self.seeded = seeded
        self.max_batch = max_batch
        self.max_elements = min(int(max_elements), MAX_BATCH_ELEMENTS)  # (providers refuse larger batches)
        self.budget_bytes = int(budget_bytes)
        self.on_exhausted = on_exhausted
        self._spare: dict[Hashable, deque] = {}
        self._next_batch: dict[Hashable, int] = {}
        self._item_bytes: dict[Hashable, int] = {}
        self._recording: list[Plan] = []
        #: bytes of material waiting at the parties (dealt, not yet taken)
        self.ahead_bytes = 0
        self.requests = 0
        #: items served so far
        self.served = 0
        # guards the pools and counters (a background dealing thread fills them); never held while sending
        self._cond = threading.Condition()
        self._background: BackgroundDealing | None = None

    def __repr__(self) -> str:
        return f"WorkerDealer(worker={self.worker.id!r})"

    @contextlib.contextmanager
    def record(self) -> Iterator[Plan]:
        """Notes every item taken inside the block (they are still dealt as usual).

        At the block's end the lazy products it created that are still alive pay the truncation they
        owe (``RECORD_HOOKS``), so that reading the block's results later takes recorded material; a
        product the block dropped is not truncated, nor recorded, and one that only autograd keeps for
        the backward pass is (material a step that never reads it leaves unused).
        """
        plan = Plan()
        self._recording.append(plan)
        try:
            with contextlib.ExitStack() as hooks:  # what the block's results still owe is part of its material
                for hook in RECORD_HOOKS:
                    hooks.enter_context(hook())
                yield plan
        finally:
            self._recording.remove(plan)

    def deal_ahead(self, plan: Plan, repeat: int = 1, background: bool = False) -> Any:
        """Deals ``repeat`` times the material of ``plan`` now, within ``budget_bytes``.

        With ``background=True`` a thread deals it while the calls run (see
        :meth:`start_background`) and the :class:`BackgroundDealing` is returned.

        Returns:
            ``{"items": dealt, "bytes": dealt bytes, "left_out": items that did
            not fit the budget}`` (those are dealt on demand, or raise, when taken).
        """
        if type(repeat) is not int or repeat < 1:
            raise ValueError(f"repeat must be a positive int, got {repeat!r}")
        if background:
            return self.start_background(plan, repeat)
        dealt = dealt_bytes = left_out = 0
        for key, (kind, spec, parties, count) in plan.needs.items():
            need = count * repeat
            spare = self._pool(key)
            while need > 0:
                per_item = self._bytes_per_item(key, kind, spec, parties)
                with self._cond:
                    room = (self.budget_bytes - self.ahead_bytes) // per_item
                if room <= 0:
                    left_out += need
                    break
                got = self._request(key, kind, spec, list(parties), spare, count=min(need, room))
                need -= got
                dealt += got
                dealt_bytes += got * per_item
        return {"items": dealt, "bytes": dealt_bytes, "left_out": left_out}

    def start_background(self, plan: Plan, repeat: int | None = None) -> BackgroundDealing:
        """Starts a thread that deals ``plan``'s material for ``repeat`` calls (None: until stopped,
        keeping up to ``budget_bytes`` ready) while the calls run; one at a time per dealer.

        Use as ``with dealer.start_background(plan): ...`` or stop with :meth:`stop_background`."""
        previous = self._background
        if previous is not None:
            if not previous.done:
                raise RuntimeError("this dealer already deals in the background: stop_background() first")
            previous.stop()  # finished: raises its error if no take did
        with self._cond:
            job = self._background = BackgroundDealing(self, plan, repeat)
        return job.start()

    def stop_background(self) -> dict | None:
        """Stops the background dealing (if any); what it dealt stays for later takes."""
        job = self._background
        return job.stop() if job is not None else None

    def drop_ahead(self) -> None:
        """Forgets every item dealt ahead (their pointers free the parties' copies)."""
        job = self._background
        if job is not None:
            job.stop(raise_error=False)  # dropping everything, its error included
        with self._cond:
            self._spare.clear()
            self.ahead_bytes = 0

    def _pool(self, key: Hashable) -> deque:
        with self._cond:
            return self._spare.setdefault(key, deque())

    def _take(self, kind: str, spec: Any, parties: Sequence[Hashable]) -> dict:
        key = (kind, repr(spec), tuple(parties))
        for plan in self._recording:
            plan.add(key, kind, spec, parties)
        spare = self._pool(key)
        while True:
            with self._cond:
                self._surface_background_error()
                job = self._background
                if not spare and job is not None and job.will_deal(key):
                    job.hungry.add(key)  # the thread deals whatever fits now
                    self._cond.notify_all()
                    try:
                        while not spare and job.will_deal(key) and job.error is None:
                            self._cond.wait()
                    finally:
                        job.hungry.discard(key)
                    self._surface_background_error()
                if spare:
                    item = spare.popleft()  # single use: nothing ever puts an item back
                    self.ahead_bytes -= self._item_bytes[key]
                    self.served += 1
                    self._cond.notify_all()  # room for the background thread
                    return item
                if self.on_exhausted == "raise":
                    raise MaterialExhaustedError(
                        f"no {kind} material dealt ahead is left for {spec!r}: deal_ahead more, raise "
                        "budget_bytes, or use on_exhausted='deal'")
            self._request(key, kind, spec, list(parties), spare)  # on demand, outside the lock

    def _surface_background_error(self) -> None:
        """Raises a failed background dealing's error, once (caller holds ``_cond``)."""
        job = self._background
        if job is not None and job.error is not None and not job.surfaced:
            job.surfaced = True
            self._background = None
            raise BackgroundDealingError(
                f"background dealing failed: {type(job.error).__name__}: {job.error}") from job.error

    def _shapes(self, kind: str, spec: Any, parties: Sequence[Hashable]) -> tuple[str, list]:
        if kind == "fss_comparison":  # FSS keys: not a recipe (fss_dealing.py)
            return DEAL_COMPARISON, [fss_material.field_shapes(spec[0], spec[1], i < 2) for i in range(len(parties))]
        uniform_shapes, derived_shapes, _ = recipe(kind, spec)
        return DEAL, [uniform_shapes + derived_shapes] * len(parties)

    def _bytes_per_item(self, key, kind: str, spec: Any, parties: Sequence[Hashable]) -> int:
        if key not in self._item_bytes:
            _, party_shapes = self._shapes(kind, spec, parties)
            self._item_bytes[key] = max(1, 8 * sum(int(torch.Size(s).numel()) for sh in party_shapes for s in sh))
        return self._item_bytes[key]

    def _request(self, key, kind: str, spec: Any, parties: list, spare: deque, count: int | None = None) -> int:
        """Deals items of one key into ``spare``: ``count`` of them (capped by ``max_elements``), or
        the on-demand batch (doubling per request up to ``max_batch``). Returns how many."""
        op, party_shapes = self._shapes(kind, spec, parties)
        # (as the provider counts: an empty field as one element, so a batch never passes its bound)
        per_item = max(1, max(sum(max(1, int(torch.Size(s).numel())) for s in shapes) for shapes in party_shapes))
        with self._cond:
            if count is None:
                count = max(1, min(self._next_batch.get(key, 1), self.max_elements // per_item))
                self._next_batch[key] = min(2 * count, self.max_batch)
            else:
                count = max(1, min(count, self.max_elements // per_item))
            if op == DEAL_COMPARISON:  # (the provider refuses more items per request: CPU per item)
                count = min(count, fss_dealing.MAX_COMPARISON_ITEMS)
            else:  # (and more product work per request: the dealing slot)
                count = min(count, max(1, request_work_bound() // max(1, item_product_work(kind, spec))))
        item_bytes = self._bytes_per_item(key, kind, spec, parties)
        ids = [[new_id() for _ in range(count * len(shapes))] for shapes in party_shapes]
        args = (spec, parties, ids, count, self.seeded) if op == DEAL_COMPARISON else (kind, spec, parties, ids, count,
                                                                                      self.seeded)
        self.owner.send_msg(m.CommandMessage(op, args, {}, [], False), self.worker)
        locations = [self.owner.resolve_worker(p) for p in parties]
        items = []
        for k in range(count):
            item = {}
            for p, loc, pids, shapes in zip(parties, locations, ids, party_shapes):
                item[p] = tuple(
                    PointerTensor(loc, pids[k * len(shapes) + j], self.owner, shape, DTYPE)
                    for j, shape in enumerate(shapes)
                )
            items.append(item)
        with self._cond:
            spare.extend(items)
            self.requests += 1
            self.ahead_bytes += count * item_bytes
            self._cond.notify_all()
        return count

    def beaver_triples(self, op, shape_a, shape_b, parties, **op_kwargs):
        spec = (op, tuple(shape_a), tuple(shape_b), dict(sorted(op_kwargs.items())))
        return self._take("beaver", spec, parties)

    def local_triples(self, op, shape_a, shape_b, parties):
        return self._take("beaver_local", (op, tuple(shape_a), tuple(shape_b), {}), parties)

    def truncation_pairs(self, shape, divisor, parties):
        return self._take("truncation", (tuple(shape), int(divisor)), parties)

    def zero_shares(self, shape, parties):
        return self._take("zero", (tuple(int(s) for s in shape),), parties)

    def comparison_keys(self, shape, n_values, parties):
        return self._take("fss_comparison", (tuple(int(s) for s in shape), int(n_values)), parties)

    def comparison_material(self, shape, n_values, parties, first_product=0):
        return self._take("comparison", comparison_spec(shape, n_values, first_product), parties)

    def fixed_operand_mask(self, fixed_id, shape, parties):
        return self._take("fixed_mask", (fixed_id, tuple(int(s) for s in shape)), parties)

    def fixed_operand_triples(self, fixed_id, op, shape_a, shape_b, parties, **op_kwargs):
        spec = (fixed_id, op, tuple(shape_a), tuple(shape_b), dict(sorted(op_kwargs.items())))
        return self._take("fixed_beaver", spec, parties)

    def register_mac_key(self, key_id, alpha):
        # Orchestrator -> provider only: the key never goes to a party.
        self.owner.send_msg(m.CommandMessage(MAC_KEY, (key_id, alpha), {}, [], False), self.worker)

    def authenticated_triples(self, key_id, op, shape_a, shape_b, parties, **op_kwargs):
        spec = (key_id, op, tuple(shape_a), tuple(shape_b), dict(sorted(op_kwargs.items())))
        return self._take("beaver_mac", spec, parties)

    def authenticated_truncation_pairs(self, key_id, shape, divisor, parties):
        return self._take("truncation_mac", (key_id, tuple(shape), int(divisor)), parties)

    def authenticated_zero_shares(self, shape, parties):
        return self._take("zero_mac", (tuple(int(s) for s in shape),), parties)

    def authenticated_comparison_material(self, key_id, shape, parties):
        return self._take("comparison_mac", (key_id, tuple(int(s) for s in shape)), parties)


_DEALERS: dict[tuple[int, int], tuple[Any, Any, WorkerDealer]] = {}


def dealer_for(worker: Any, owner: Any, **options: Any) -> WorkerDealer:
    """The one WorkerDealer per (provider worker, orchestrator), so shares made
    with the same ``crypto_provider=cp`` combine (providers compare by identity)."""
    key = (id(worker), id(owner))
    entry = _DEALERS.get(key)
    if entry is None or entry[0] is not worker or entry[1] is not owner:
        entry = _DEALERS[key] = (worker, owner, WorkerDealer(worker, owner, **options))
    return entry[2]
