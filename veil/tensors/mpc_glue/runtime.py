"""The worker party runtime: SMPC protocol steps on shares held by veil workers.

Implements :class:`veil.mpc.runtime.PartyRuntime` for :class:`PointerTensor`
handles and registers it at import time (``import veil`` does). Per protocol
round:

* **run on a party**: one ``CommandMessage`` naming the result ids, deferred
  (pipelined): it rides, in order, on the next request to that party, which
  is almost always the next opening. A failing step raises on that request.
* **open**: one :class:`~veil.mpc.party.OpenMessage` per party, all in
  flight at once; the replies are gathered before the round ends.
* **fetch**: one ``GetObjectsMessage`` per party for every share being
  reconstructed, all in flight at once.

Concurrency: a round to network workers is sent from this thread
(``Outbox.send_round``): every request is written before any reply is read,
so the parties run at once without a thread per further party (its hand-offs
and GIL waits were ~35% of the orchestrator's CPU in CNN batch-1 inference).
Other workers that block in socket reads (``concurrent_requests``) are sent
to from a small thread pool, one request per party connection (each
connection keeps one request in flight, so replies stay in order). In-process workers (VirtualWorker) get
the same pool only for **big rounds** (:func:`parallel_in_process`: at least
:data:`PARALLEL_MIN_ELEMENTS` ring elements in a party's largest tensor, and two parties'
``torch.get_num_threads()`` fit on cores idle at that moment): each party's handler then
runs on its own thread, so the torch kernels of different parties (which
release the GIL) run at once, like the parties' own processes would; small
rounds stay inline, where a hand-off costs more than it saves. Every request
to one worker is still sent under the sender's per-destination lock (one
request in flight per party), the reference monitor's per-request state is
per thread, the store has its own lock. A round raises only
after every party answered or failed, so nothing is left in flight for the
next query (except a posted peer round: its replies carry nothing and are read
behind the next request to each party, :data:`POST_PEER_ROUNDS`); a lost
connection raises :class:`PartyUnreachableError` (an
MPCError and a ConnectionLostError), an unexpected local failure
:class:`PartyFailedError`; an error a party reported (a refusal, a protocol
error) is raised as that party's own error class.

The worker side of an opening (:func:`_handle_open`) asks the reference
monitor first: only openable steps, on objects the requester may compute
on, with fresh dealer masks where a share is not the requester's.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import ipaddress
import math
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from veil.workers.accounts import ACTING
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc.errors import PartyFailedError, party_error
from veil.mpc.party import LIGHT, WIRE_PREFIX, OpenMessage, check_openable, ring_words, run_openable, step_name
from veil.mpc.runtime import DEALER_TAG, PartyRuntime, register_runtime, set_awaiting_replies, set_step_check
from veil.tensors.pointer import PointerTensor, pointer_meta
from veil.tensors.remote_ops import _ref
from veil.workers import cancellation, party_slots
from veil.workers.audit_writer import rows_held_by_reply
from veil.workers.base import register_handler
from veil.workers.monitor import DEALER_TAG as MONITOR_DEALER_TAG
from veil.workers.peer_openings import PeerOpenMessage
from veil.workers.websocket_client import WebsocketClientWorker

assert DEALER_TAG == MONITOR_DEALER_TAG, "veil.mpc.runtime.DEALER_TAG must match the monitor's"

#: most requests in flight at once from one orchestrator (one per party connection)
MAX_CONCURRENT = 16

#: opened ring elements from which a round between peer-enabled parties goes party to party. A peer
#: round moves the same bytes as the star (for 2 parties) but off the orchestrator, whose serial share of
#: the round it saves (~25 ns per element); it costs one more hop and, per party, a request and a reply
#: each way per other party (~1 ms): below ~2^15 elements the star is the faster and cheaper round
#: (bench/RESULTS.md, "Peer openings for comparisons"). The environment variable is for benchmarks.
PEER_MIN_ELEMENTS = int(os.environ.get("VEIL_PEER_MIN_ELEMENTS", str(1 << 15)))

#: peer rounds to network workers are posted (``Outbox.send_round(post=...)``): the orchestrator goes on
#: to its next round without reading the replies, which carry nothing (the opened values stay at the
#: parties); each party finds the next round's request waiting when it finishes one. A failure is raised
#: at the next request to that party. ``VEIL_POST_PEER_ROUNDS=0``: every peer round is waited for (benchmarks)
POST_PEER_ROUNDS = os.environ.get("VEIL_POST_PEER_ROUNDS", "1") != "0"

#: ring elements in a round's largest tensor from which in-process parties run the round on threads of
#: their own. The size of one tensor, not of all: a round's step makes one pass of torch ops per tensor,
#: and two party threads hand the GIL over at every op, so what pays for a thread is the ops' size. A
#: comparison step on 2^14 entries (~100 ops on a dozen such tensors) was 19 ms inline against 26 ms on
#: threads; from 5*10^4 entries on the threads win (bench/RESULTS.md, "Thirteenth landing")
PARALLEL_MIN_ELEMENTS = 1 << 15
#: a light step's tensors (:data:`veil.mpc.party.LIGHT`: a Beaver or truncation mask, a truncation finish, a
#: few passes each) count this much less: such a round on threads lost to the same round inline up to 2^17
#: entries (a matmul's mask and finish round on 2^16: ~0.1 ms of ~5, bench/RESULTS.md "Twenty-fifth landing")
LIGHT_STEP_DISCOUNT = 4

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_IN_POOL = threading.local()  # set on the pool's threads: a round started there runs inline (no nested waits)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(MAX_CONCURRENT, thread_name_prefix="veil-mpc-round",
                                       initializer=_mark_pool_thread)
        return _POOL


def _mark_pool_thread() -> None:
    _IN_POOL.active = True


def waits_on_network(worker: Any) -> bool:
    """True for a worker whose requests block in socket reads (worth sending concurrently).

    Network client workers, and any worker class that sets ``concurrent_requests = True``.
    """
    return isinstance(worker, WebsocketClientWorker) or bool(getattr(worker, "concurrent_requests", False))


def parallel_in_process(elements: int, parties: int) -> bool:
    """True when ``parties`` in-process parties should run a round of ``elements`` ring elements
    per party on threads of their own: the round is big, this thread is not a pool thread, and
    idle cores take two parties' torch threads (``torch.get_num_threads()`` each, :func:`_spare_cores`)."""
    if parties < 2 or elements < PARALLEL_MIN_ELEMENTS or getattr(_IN_POOL, "active", False):
        return False
    return _spare_cores(parties)


def _spare_cores(parties: int) -> bool:
    """A second party's torch threads fit beside the first's on cores that are idle right now (more
    parties take turns on them): on a busy machine another thread only adds hand-offs and the
    page faults of two parties' temporaries alive at once, so the round stays inline."""
    need = 2 * torch.get_num_threads()
    return _cores() - _running_elsewhere() >= need


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _running_elsewhere() -> int:
    """Threads running or runnable on this machine now, this one excepted (Linux's /proc/loadavg;
    0 where it cannot be read)."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(running - 1, 0)


def elements_of(values: Any) -> int:
    """Ring elements of the largest pointer or tensor among ``values`` (a party's work estimate: the
    size of its step's torch ops)."""
    largest = 0
    for leaf in m.arg_leaves(values):  # protocol arguments: lists, tuples, dicts (pytree's walk is ~3x slower)
        if type(leaf) is PointerTensor:
            n = math.prod(pointer_meta(leaf)[0])  # (its shape as plain values: .shape costs a dispatch)
        elif isinstance(leaf, torch.Tensor):
            n = leaf.numel()
        else:
            continue
        largest = max(largest, n)
    return largest


def step_elements(name: str, values: Any) -> int:
    """:func:`elements_of` a step's arguments, discounted for a light step (:data:`LIGHT_STEP_DISCOUNT`)."""
    return elements_of(values) // _discount(name)


def _discount(name: Any) -> int:
    """What a step's tensor entries are divided by in a round's work estimate (a light step's: more)."""
    return LIGHT_STEP_DISCOUNT if name in LIGHT else 1


def _op_discount(op: Any) -> int:
    """:func:`_discount` of the step a deferred command runs (1 for a command that is no party step)."""
    return _discount(step_name(op))


def _queued_largest(owner: Any, location: Any) -> int:
    """Elements of the largest tensor in the deferred steps riding on the next request to ``location``
    (a Beaver product's combine rides on the truncation round that follows it), light steps discounted."""
    queued = getattr(owner, "queued_largest", None)
    return queued(location, _op_discount) if queued is not None else 0


def one_round(requests: Sequence[tuple[Any, Any, Any]], what: str, return_errors: bool = False,
              elements: int = 0, post: bool = False) -> list[Any]:
    """Sends every ``(owner, message, location)`` request and returns the replies, in order.

    Requests to network workers are all in flight at once; the round ends
    when every party answered or failed (see the module docstring for errors).
    With ``return_errors`` a failed request's exception takes its reply's place.
    ``elements``: ring elements of the largest tensor a party's step touches (or a
    deferred step riding on its request, whichever is larger): from
    :data:`PARALLEL_MIN_ELEMENTS` on, in-process parties run at once too
    (:func:`parallel_in_process`). ``post``: a round to network workers whose replies carry nothing
    is posted (:data:`POST_PEER_ROUNDS`); its replies are then None and a failure is raised at the
    next request to that party.
    """
    if _one_thread(requests):
        replies, errors = requests[0][0].send_round([(msg, loc) for _, msg, loc in requests],
                                                    post=what if post and POST_PEER_ROUNDS else None)
        return _settle(requests, replies, errors, what, return_errors)
    futures = _start(requests, elements)
    replies: list[Any] = [None] * len(requests)
    errors: list[tuple[int, BaseException]] = []
    for k, (o, msg, loc) in enumerate(requests):
        if k in futures:
            continue
        try:
            replies[k] = o.send_msg(msg, loc)
        except BaseException as e:  # noqa: BLE001  (gathered: the other parties' requests finish first)
            errors.append((k, e))
    for k, fut in futures.items():
        try:
            replies[k] = fut.result()
        except BaseException as e:  # noqa: BLE001
            errors.append((k, e))
    errors.sort(key=lambda item: item[0])
    return _settle(requests, replies, errors, what, return_errors)


def _loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1): a worker reached there runs on this host."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:  # another host name
        return False


def _one_thread(requests: Sequence[tuple[Any, Any, Any]]) -> bool:
    """True when one thread sends the whole round (``Outbox.send_round``): several requests of one
    owner, each to a different network worker that takes a request without waiting for its reply."""
    if len(requests) < 2:
        return False
    owner = requests[0][0]
    seen = set()
    for o, _, loc in requests:
        if o is not owner or type(loc) is not WebsocketClientWorker or id(loc) in seen:
            return False
        seen.add(id(loc))
    return hasattr(owner, "send_round")


def _start(requests: Sequence[tuple[Any, Any, Any]], elements: int) -> dict:
    """Submits the requests that run on the pool (all but the first concurrent one); position -> future."""
    concurrent = [k for k, (_, _, loc) in enumerate(requests) if waits_on_network(loc)]
    if len(concurrent) < len(requests):
        in_process = [k for k in range(len(requests)) if k not in concurrent]
        if elements < PARALLEL_MIN_ELEMENTS:  # the deferred steps riding on the requests may be the big part
            elements = max(elements, *(_queued_largest(requests[k][0], requests[k][2]) for k in in_process))
        if parallel_in_process(elements, len(in_process)):
            concurrent = list(range(len(requests)))
    if len(concurrent) < 2:
        return {}
    pool = _pool()
    return {k: pool.submit(_carried(requests[k][0].send_msg), requests[k][1], requests[k][2])
            for k in concurrent[1:]}  # the first runs on this thread


def _carried(fn: Callable) -> Callable:
    """``fn``, run on a pool thread with this context's requester account (a network worker sending for
    one of its sessions: veil/workers/accounts.py); as is otherwise (a client: the hot path)."""
    if ACTING.get() is None:
        return fn
    return functools.partial(contextvars.copy_context().run, fn)


def _settle(requests: Sequence[tuple[Any, Any, Any]], replies: list, errors: list, what: str,
            return_errors: bool) -> list[Any]:
    if errors and return_errors and all(isinstance(e, Exception) for _, e in errors):
        for k, e in errors:
            replies[k] = e
        return replies
    if errors:
        k, e = errors[0]  # (in order of precedence: Outbox.send_round lists an earlier posted round's failure first)
        error = party_error(e, getattr(requests[k][2], "id", requests[k][2]), what)
        if error is e:
            raise e  # the party's own refusal or protocol error, as its own class
        raise error from e
    return replies


def _wire(value: Any) -> Any:
    """``value`` with every PointerTensor as an ObjectRef (lists, tuples and dicts walked; pytree's
    tree_map costs ~30 us a step, several per round and party). The reference is the pointer's own,
    already encoded (``remote_ops._ref``): msgpack copies it without calling back into serde."""
    tp = type(value)
    if tp is PointerTensor:
        return _ref(value)
    if tp is list:
        return [_wire(v) for v in value]
    if tp is tuple:
        return tuple(_wire(v) for v in value)
    if tp is dict:
        return {k: _wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, dict)):  # namedtuples, OrderedDicts: the general walk
        return tree_map(lambda v: _ref(v) if type(v) is PointerTensor else v, value)
    return value


def _first_pointer(values: Any) -> PointerTensor:
    for leaf in m.arg_leaves(values):
        if type(leaf) is PointerTensor:
            return leaf
    raise PartyFailedError("a remote protocol step has no share on a worker")


class WorkerRuntime(PartyRuntime):
    """Protocol steps on veil workers (VirtualWorker, network workers), through pointers."""

    handle_types = (PointerTensor,)

    def location(self, handle: PointerTensor) -> Any:
        return handle.location

    def describe(self, handle: PointerTensor) -> tuple:
        shape, dtype, _ = pointer_meta(handle)
        return shape, dtype

    def run_on_party(self, name: str, args: tuple, kwargs: dict, outputs: Any) -> Any:
        first = _first_pointer((args, kwargs))
        single = isinstance(outputs, torch.Tensor)  # the usual shapes (a tensor, a tuple of tensors) skip pytree
        plain_tuple = type(outputs) is tuple and all(isinstance(t, torch.Tensor) for t in outputs)
        flat, spec = ([outputs], None) if single else (list(outputs), None) if plain_tuple else tree_flatten(outputs)
        ids = [new_id() for _ in flat]
        owner, location = first.owner, first.location
        msg = m.CommandMessage(WIRE_PREFIX + name, _wire(args), _wire(kwargs), ids, False)
        owner.defer_command(location, msg)  # rides on the next request to that party (its next opening)
        ptrs = [PointerTensor(location, oid, owner, t.shape, t.dtype) for oid, t in zip(ids, flat)]
        if single:
            return ptrs[0]
        return tuple(ptrs) if plain_tuple else tree_unflatten(ptrs, spec)

    def open_on_parties(self, name: str, per_party: Sequence[tuple], kwargs: dict) -> list[list[torch.Tensor]]:
        requests = []
        for args in per_party:
            first = _first_pointer(args)
            requests.append((first.owner, OpenMessage(name, _wire(tuple(args)), kwargs), first.location))
        # the work estimate matters only to in-process parties (network ones always run at once)
        in_process = not all(waits_on_network(loc) for _, _, loc in requests)
        elements = max(step_elements(name, args) for args in per_party) if per_party and in_process else 0
        return [list(reply.objects) for reply in one_round(requests, f"opening {name!r}", elements=elements)]

    def opens_among(self, parties: Sequence[Any]) -> bool:
        return all(peer_openings_enabled(p) for p in parties)

    def open_at_parties(self, name: str, per_party: Sequence[tuple], kwargs: dict,
                        outputs: Sequence[torch.Tensor], top_bits: bool = False) -> list[list[PointerTensor]] | None:
        """A peer opening (:mod:`veil.workers.peer_openings`) when every party is a worker enabled for
        them (:func:`enable_peer_openings`) and the opened values have at least :data:`PEER_MIN_ELEMENTS`
        elements; None (a star opening) otherwise. ``top_bits``: parties after the first get handles to
        the packed top bits of the one opened value instead (uint8, 8 entries a byte)."""
        if ring_words(outputs) < PEER_MIN_ELEMENTS:  # (a comparison's packed bits: 1/64 of a word per entry)
            return None
        firsts = [_first_pointer(args) for args in per_party]
        if not all(peer_openings_enabled(p.location) for p in firsts):
            return None
        round_id = secrets.token_hex(16)  # unguessable: a peer cannot aim a share at a round it is not in
        parties = [p.location.id for p in firsts]
        requests, handles = [], []
        packed = [(((sum(t.numel() for t in outputs) + 7) // 8,), torch.uint8)]
        for k, (first, args) in enumerate(zip(firsts, per_party)):
            ids = [new_id() for _ in outputs]
            msg = PeerOpenMessage(name, _wire(tuple(args)), kwargs, round_id, parties, ids,
                                  "top_bits" if top_bits else "")
            requests.append((first.owner, msg, first.location))
            layout = packed if top_bits and k else [(tuple(t.shape), t.dtype) for t in outputs]
            handles.append([PointerTensor(first.location, oid, first.owner, shape, dtype)
                            for oid, (shape, dtype) in zip(ids, layout)])
        elements = max(elements_of(args) for args in per_party)
        # One peer round at a time per set of parties from this process: each party serves a session's
        # requests in order, so two threads' rounds reaching the parties in opposite orders would each
        # hold one party waiting for the other's share of a round queued behind it.
        with _peer_round_lock(firsts):
            one_round(requests, f"peer opening {name!r}", elements=elements, post=True)
        return handles

    def one_host(self, parties: Sequence[Any]) -> bool:
        # network workers this process reaches over loopback all run on this host
        return all(type(p) is WebsocketClientWorker and _loopback(p.host) for p in parties)

    def in_process(self, handle: PointerTensor) -> bool:
        # a VirtualWorker: a request of protocol steps that only read it uses an opened value in place
        # (veil.workers.virtual.borrows_only). Only a worker class that says so: a handle on a party in
        # another process over some other transport (a Ray actor's client) is not one
        return getattr(type(handle.location), "in_this_process", False) is True

    def fetch(self, handles: Sequence[PointerTensor]) -> list[torch.Tensor]:
        """One GetObjectsMessage per (owner, location) for all shares opened together."""
        groups: dict[tuple[int, int], list[int]] = {}
        for k, p in enumerate(handles):
            groups.setdefault((id(p.owner), id(p.location)), []).append(k)
        order = list(groups.values())
        requests = [(handles[idx[0]].owner, m.GetObjectsMessage([handles[k].id_at_location for k in idx]),
                     handles[idx[0]].location) for idx in order]
        out: list = [None] * len(handles)
        elements = max((elements_of([handles[k] for k in idx]) for idx in order), default=0)
        for idx, reply in zip(order, one_round(requests, "an opening", elements=elements)):
            for k, value in zip(idx, reply.objects):
                handles[k].mark_freed()
                out[k] = value
        return out

    def deliver(self, requests: Sequence[tuple[Any, Any, Any]]) -> list[Any]:
        return one_round(requests, "dealing")

    def beside(self, calls: Sequence[Callable[[], Any]], parties: Sequence[Any], elements: int) -> Callable[[], list]:
        """On the pool when worth a thread: network ``parties``, or in-process ones big enough
        (:func:`parallel_in_process`, the caller counting as one more party)."""
        if not calls or not (all(waits_on_network(p) for p in parties)
                             or parallel_in_process(elements, len(calls) + 1)):
            return super().beside(calls, parties, elements)
        pool = _pool()
        futures = [pool.submit(_carried(call)) for call in calls]

        def wait() -> list:
            results: list[Any] = [None] * len(futures)
            errors: list[tuple[int, BaseException]] = []
            for k, fut in enumerate(futures):
                try:
                    results[k] = fut.result()
                except BaseException as e:  # noqa: BLE001  (gathered: every call finishes first)
                    errors.append((k, e))
            if errors:
                raise errors[0][1]
            return results

        return wait

    def handle(self, location: Any, object_id: int, owner: Any, shape: Sequence[int], dtype: torch.dtype) -> Any:
        return PointerTensor(location, object_id, owner, tuple(shape), dtype)


#: the workers (client connections, by identity) whose parties open among themselves
_PEER_OPENINGS: dict[int, Any] = {}


def enable_peer_openings(*workers: Any, enabled: bool = True) -> None:
    """Beaver openings among these network workers go party to party (peer openings) instead of
    through this process, when every party of a product is enabled. Each worker's server must reach
    the others as peers under their ids, and accept them (``veil worker --peer ID=ADDR --peer-token``
    and ``--accept-peer ID=TOKEN``; :class:`veil.serving.Cluster` with ``peer_openings=True``)."""
    for w in workers:
        if enabled:
            if not waits_on_network(w):
                raise ValueError(f"peer openings need network workers; {getattr(w, 'id', w)!r} is in-process")
            _PEER_OPENINGS[id(w)] = w
        else:
            _PEER_OPENINGS.pop(id(w), None)


def peer_openings_enabled(worker: Any) -> bool:
    return _PEER_OPENINGS.get(id(worker)) is worker


_PEER_ROUND_LOCKS: dict[tuple, threading.Lock] = {}


def _peer_round_lock(handles: Sequence[PointerTensor]) -> threading.Lock:
    key = tuple(sorted({id(h.location) for h in handles}))
    with _POOL_LOCK:
        return _PEER_ROUND_LOCKS.setdefault(key, threading.Lock())


_SLOTS_LOCK = threading.Lock()


def _one_dealing_at_a_time(worker: Any, slot: str = "dealing") -> Any:
    """A provider's dealings run one at a time (each holds its material until sent), and so do a party's
    receiving steps (each holds what it expanded until stored); waited for off the turn, in turns per user
    (the session's authenticated user: one with K connections no longer puts another's step behind K of its
    own), each user's in arrival order."""
    if worker is None:
        return contextlib.nullcontext(lambda: None)
    with _SLOTS_LOCK:
        held = worker.__dict__.setdefault(f"_veil_{slot}_slot", cancellation.ArrivalSlot())
    current = getattr(worker, "current_session", None)
    session = current() if current is not None else None
    return cancellation.one_at_a_time(held, getattr(session, "user", None))


@contextlib.contextmanager
def _awaiting_replies(worker: Any, party_ids: list) -> Iterator[Callable[[int], None]]:
    """A provider's slots of a dealing's parties (:func:`veil.mpc.runtime.awaiting_replies`), keyed by the ids
    named (distinct: a dealing checks them), taken in turns per user as the dealing slot is."""
    if worker is None:
        yield lambda index: None
        return
    with _SLOTS_LOCK:
        slots = worker.__dict__.setdefault("_veil_party_slots", party_slots.PartySlots())
    current = getattr(worker, "current_session", None)
    session = current() if current is not None else None
    keys = [repr(pid) for pid in party_ids]
    with party_slots.awaiting(slots, keys, getattr(session, "user", None)) as answered:
        yield lambda index: answered(keys[index])


RUNTIME = WorkerRuntime()
register_runtime(RUNTIME, default=True)
# long dealing steps stop at the command's deadline and let other clients in meanwhile; a provider deals off its turn
set_step_check(cancellation.check, cancellation.checkpoint, _one_dealing_at_a_time, cancellation.outside_turn)
set_awaiting_replies(_awaiting_replies)


@register_handler(OpenMessage)
def _handle_open(worker: Any, msg: OpenMessage, sender: str) -> Any:
    check_openable(msg.name, msg.kwargs)
    with rows_held_by_reply():  # (its release is its reply: which waits for its allowed row, out of the turn)
        reply = m.ObjectsReply(worker.monitor.open_step(worker.principal(sender), msg.name, tuple(msg.args),
                                                        msg.kwargs, run_openable))
    reply.fresh = True  # masked outputs computed for this reply alone: a server may send them from their memory
    return reply
