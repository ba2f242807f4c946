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

Concurrency: with ``SMALL_ROUND_BYTES`` set (off by default), a small round
(replies and deferred steps under it per party, sized from the pointers' shapes)
to network workers is sent to every party and then read, all from the calling
thread (``send_request`` / ``receive_reply``), without thread hand-offs. Other
rounds go from a small thread pool, one whole request per party connection
(each connection keeps one request in flight, so replies stay in order), so
their transfers overlap. In-process workers (VirtualWorker) are served inline:
threads would only add hand-offs there. A round raises only
after every party answered or failed, so nothing is left in flight for the
next query; a lost connection raises :class:`PartyUnreachableError` (an
MPCError and a ConnectionLostError), an unexpected local failure
:class:`PartyFailedError`; an error a party reported (a refusal, a protocol
error) is raised as that party's own error class.

The worker side of an opening (:func:`_handle_open`) asks the reference
monitor first: only openable steps, on objects the requester may compute
on, with fresh dealer masks where a share is not the requester's.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from veil.exceptions import ConnectionLostError, VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc.errors import PartyFailedError, PartyUnreachableError
from veil.mpc.party import WIRE_PREFIX, OpenMessage, check_openable, run_openable
from veil.mpc.runtime import DEALER_TAG, PartyRuntime, register_runtime
from veil.tensors.pointer import PointerTensor
from veil.workers.base import register_handler
from veil.workers.monitor import DEALER_TAG as MONITOR_DEALER_TAG
from veil.workers.websocket_client import WebsocketClientWorker

assert DEALER_TAG == MONITOR_DEALER_TAG, "veil.mpc.runtime.DEALER_TAG must match the monitor's"

#: most requests in flight at once from one orchestrator (one per party connection)
MAX_CONCURRENT = 16
#: a round whose replies and deferred steps stay under this many bytes per party is sent and read
#: from the calling thread alone (see ``_split_round``); larger ones overlap on pool threads.
#: Off by default (0): A/B runs on the shared 2-core box showed no gain over the pool (bench/RESULTS.md,
#: "netround"); ``bench_net_rounds.py --split 262144`` measures it again.
SMALL_ROUND_BYTES = 0

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(MAX_CONCURRENT, thread_name_prefix="veil-mpc-round")
        return _POOL


def waits_on_network(worker: Any) -> bool:
    """True for a worker whose requests block in socket reads (worth sending concurrently).

    Network client workers, and any worker class that sets ``concurrent_requests = True``.
    """
    return isinstance(worker, WebsocketClientWorker) or bool(getattr(worker, "concurrent_requests", False))


def _splits(requests: Sequence[tuple[Any, Any, Any]], reply_bytes: int | None) -> bool:
    """Whether one thread can send every request before reading any reply: small rounds to distinct
    network connections that split a request in two (``_send_request`` / ``_receive_reply``)."""
    if reply_bytes is None or reply_bytes > SMALL_ROUND_BYTES or len(requests) < 2:
        return False
    seen = set()
    for owner, _, loc in requests:
        if not hasattr(loc, "_send_request") or not hasattr(owner, "send_request") or id(loc) in seen:
            return False
        if owner.queued_bytes(loc) > SMALL_ROUND_BYTES:  # large deferred steps (opened values) ride along
            return False
        seen.add(id(loc))
    return True


def _split_round(requests: Sequence[tuple[Any, Any, Any]], replies: list, errors: list) -> None:
    """Sends every request, then reads every reply, all on this thread (no hand-off to pool threads:
    on a small round the hand-offs and the GIL passing between threads cost more than the overlap
    of two small transfers gains). Connections are taken in one global order, so two threads
    running rounds at once cannot each hold a party the other waits for."""
    order = sorted(range(len(requests)), key=lambda k: id(requests[k][2]))
    pending: dict[int, tuple] = {}
    for k in order:
        owner, msg, loc = requests[k]
        try:
            pending[k] = owner.send_request(msg, loc)
        except BaseException as e:  # noqa: BLE001  (gathered: the other parties' replies are read first)
            errors.append((k, e))
    for k in order:
        if k in pending:
            try:
                replies[k] = requests[k][0].receive_reply(pending[k])
            except BaseException as e:  # noqa: BLE001
                errors.append((k, e))


def one_round(requests: Sequence[tuple[Any, Any, Any]], what: str, return_errors: bool = False,
              reply_bytes: int | None = None) -> list[Any]:
    """Sends every ``(owner, message, location)`` request and returns the replies, in order.

    Requests to network workers are all in flight at once; the round ends
    when every party answered or failed (see the module docstring for errors).
    With ``return_errors`` a failed request's exception takes its reply's place.
    ``reply_bytes``: the largest reply expected, when the caller knows it; rounds of small
    requests and replies are sent and read from this thread alone (:func:`_split_round`).
    """
    replies: list[Any] = [None] * len(requests)
    errors: list[tuple[int, BaseException]] = []
    if _splits(requests, reply_bytes):
        _split_round(requests, replies, errors)
    else:
        _pooled_round(requests, replies, errors)
    if errors and return_errors and all(isinstance(e, Exception) for _, e in errors):
        for k, e in errors:
            replies[k] = e
        return replies
    if errors:
        k, e = min(errors, key=lambda item: item[0])
        party = getattr(requests[k][2], "id", requests[k][2])
        if isinstance(e, ConnectionLostError):
            raise PartyUnreachableError(f"party {party!r} was lost during {what}: {e}") from e
        if isinstance(e, VeilError):
            raise e  # the party's own refusal or protocol error, as its own class
        raise PartyFailedError(f"party {party!r} failed during {what}: {type(e).__name__}: {e}") from e
    return replies


def _pooled_round(requests: Sequence[tuple[Any, Any, Any]], replies: list, errors: list) -> None:
    """Requests to network workers from pool threads, each a whole request/reply (large transfers
    to several parties overlap); the first runs on this thread, in-process workers inline."""
    calls: list[Callable[[], Any]] = [lambda o=o, msg=msg, loc=loc: o.send_msg(msg, loc) for o, msg, loc in requests]
    concurrent = [k for k, (_, _, loc) in enumerate(requests) if waits_on_network(loc)]
    futures = {}
    if len(concurrent) > 1:
        pool = _pool()
        futures = {k: pool.submit(calls[k]) for k in concurrent[1:]}  # the first runs on this thread
    for k in range(len(requests)):
        if k in futures:
            continue
        try:
            replies[k] = calls[k]()
        except BaseException as e:  # noqa: BLE001  (gathered: the other parties' requests finish first)
            errors.append((k, e))
    for k, fut in futures.items():
        try:
            replies[k] = fut.result()
        except BaseException as e:  # noqa: BLE001
            errors.append((k, e))


def _wire(value: Any) -> Any:
    return tree_map(lambda v: m.ObjectRef(v.id_at_location) if type(v) is PointerTensor else v, value)


def _pointer_bytes(values: Any) -> int:
    """Bytes of the remote tensors the pointers among ``values`` name (from their local shapes)."""
    total = 0
    with torch._C.DisableTorchFunctionSubclass():  # metadata only: skip the pointer's dispatch (~10 us a call)
        for leaf in tree_flatten(values)[0]:
            if type(leaf) is PointerTensor:
                total += leaf.numel() * leaf.element_size()
    return total


def _first_pointer(values: Any) -> PointerTensor:
    for leaf in tree_flatten(values)[0]:
        if type(leaf) is PointerTensor:
            return leaf
    raise PartyFailedError("a remote protocol step has no share on a worker")


class WorkerRuntime(PartyRuntime):
    """Protocol steps on veil workers (VirtualWorker, network workers), through pointers."""

    handle_types = (PointerTensor,)

    def location(self, handle: PointerTensor) -> Any:
        return handle.location

    def run_on_party(self, name: str, args: tuple, kwargs: dict, outputs: Any) -> Any:
        first = _first_pointer((args, kwargs))
        flat, spec = tree_flatten(outputs)
        ids = [new_id() for _ in flat]
        owner, location = first.owner, first.location
        msg = m.CommandMessage(WIRE_PREFIX + name, _wire(args), _wire(kwargs), ids, False)
        owner.defer_command(location, msg)  # rides on the next request to that party (its next opening)
        ptrs = [PointerTensor(location, oid, owner, t.shape, t.dtype) for oid, t in zip(ids, flat)]
        return tree_unflatten(ptrs, spec)

    def open_on_parties(self, name: str, per_party: Sequence[tuple], kwargs: dict) -> list[list[torch.Tensor]]:
        requests = []
        for args in per_party:
            first = _first_pointer(args)
            requests.append((first.owner, OpenMessage(name, _wire(tuple(args)), kwargs), first.location))
        # an opening's outputs are about as large as the shares it masks
        expect = max(_pointer_bytes(args) for args in per_party) if per_party else 0
        return [list(reply.objects) for reply in one_round(requests, f"opening {name!r}", reply_bytes=expect)]

    def fetch(self, handles: Sequence[PointerTensor]) -> list[torch.Tensor]:
        """One GetObjectsMessage per (owner, location) for all shares opened together."""
        groups: dict[tuple[int, int], list[int]] = {}
        for k, p in enumerate(handles):
            groups.setdefault((id(p.owner), id(p.location)), []).append(k)
        order = list(groups.values())
        requests = [(handles[idx[0]].owner, m.GetObjectsMessage([handles[k].id_at_location for k in idx]),
                     handles[idx[0]].location) for idx in order]
        out: list = [None] * len(handles)
        expect = max(sum(_pointer_bytes(handles[k]) for k in idx) for idx in order) if order else 0
        for idx, reply in zip(order, one_round(requests, "an opening", reply_bytes=expect)):
            for k, value in zip(idx, reply.objects):
                handles[k].mark_freed()
                out[k] = value
        return out

    def deliver(self, requests: Sequence[tuple[Any, Any, Any]]) -> list[Any]:
        return one_round(requests, "dealing")

    def handle(self, location: Any, object_id: int, owner: Any, shape: Sequence[int], dtype: torch.dtype) -> Any:
        return PointerTensor(location, object_id, owner, tuple(shape), dtype)


RUNTIME = WorkerRuntime()
register_runtime(RUNTIME, default=True)


@register_handler(OpenMessage)
def _handle_open(worker: Any, msg: OpenMessage, sender: str) -> Any:
    check_openable(msg.name, msg.kwargs)
    return m.ObjectsReply(worker.monitor.open_step(worker.principal(sender), msg.name, tuple(msg.args), msg.kwargs,
                                                   run_openable))
