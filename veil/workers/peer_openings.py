"""Peer openings: the parties of an SMPC opening send their masked shares to each other.

In the star opening (:class:`veil.mpc.party.OpenMessage`) every party returns its share of the
opened values to the orchestrator, which sums them. In a *peer opening* the orchestrator sends each
party a :class:`PeerOpenMessage` naming the step, the parties (worker ids, as the parties know each
other: ``veil worker --peer``), a round id it drew at random, and the ids the opened values are
stored under. Each party then

1. runs the step under the reference monitor's opening rules (``monitor.open_step``: only openable
   steps, the session's compute rights, fresh dealer masks consumed once where a value is protected
   for someone else), exactly as for a star opening;
2. *publishes* its outputs to the other parties the message names: the round, registered under its
   id, holds them for exactly those readers, each of which may take them once;
3. *fetches* every other party's outputs of the same round with a :class:`PeerFetchMessage` over its
   authenticated peer connection to that party (``--peer``; never from a worker it has no peer link
   to; sent as soon as the monitor passed step 1's arguments, before the step runs, where the link is
   idle: the last party to publish then needs no request of its own; otherwise from all of them at once
   after publishing, one thread per further peer; a fetch waits at the peer one slice,
   ``FETCH_SLICE_SECONDS``, and is asked again while nothing is published, so the link, which carries
   one request at a time, is free for other sessions' rounds in between), checks that each reply has the count,
   shapes and dtypes of its own outputs, and, with the worker lock handed back
   (:func:`veil.workers.cancellation.outside_turn`), waits until every reader took its outputs;
4. sums the shares (XORs the outputs that are XOR shares: ``XOR_OPENABLE`` steps, the leading
   ``XOR_LEADING`` outputs) into the received tensors (a published tensor is never written again: the
   server sends it from its memory) and stores the opened values in the requesting session's
   namespace under the given ids (plain client objects: the values the star would have sent it as
   public arguments). The reply carries no tensor.

Why a pull: websocket clients must mask every frame they send (RFC 6455) and servers unmask it,
while a server's reply goes unmasked; the party that fetches reads the reply straight into one
buffer (the client transport's direct read), where a pushed request went through the server's
asyncio stream buffer, a frame slice and a reassembly copy. A share moves once, in a reply, with
no XOR pass on either side and one copy fewer.

**Top bits only** (``reveal="top_bits"``, the steps in :data:`TOP_BITS_STEPS`: truncation's
``trunc_mask``): only the first named party needs the opened value itself; the others need only its
top bits (:mod:`veil.mpc.truncation`). Then the other parties publish their shares to the first party
only, which fetches them, sums them, keeps the opened value and publishes to each of them the value's
top bits packed 8 to a byte (:func:`veil.mpc.truncation.pack_top_bits`), which they fetch and store instead: 1/64 of the bytes
back, and a party other than the first learns exactly what the star opening would show it.

The serving side (:class:`veil.workers.peer_rounds.PeerRounds`, one per worker) hands a round's outputs only to a peer
session (``--accept-peer``) whose name the round lists as a reader, once per reader, for a round id
this worker's session registered with the same step. A round is consumed once: when it ends (opened,
failed, abandoned, its session gone) its id is remembered as closed and later fetches for it are
refused. Fetches that arrive before their round is registered or published wait (outside the worker
lock, bounded in number and time), so a flood of them holds no more memory than the requests the
server already has in flight. A network worker serves a peer's well-formed fetch on its event loop
(:func:`serve_fetch_on_loop`): no handler thread and no worker lock, a waiting fetch parked as a
future (:meth:`PeerRounds.take_on_loop`); whatever that path does not serve goes to the handler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from veil.exceptions import ConnectionLostError, PermissionDeniedError, SerializationError, VeilError
from veil.messaging import messages as m
from veil.messaging.frames import frame_nbytes
from veil.messaging.serde import serialize
from veil.mpc.output_buffers import outputs_into
from veil.mpc.party import XOR_LEADING, XOR_OPENABLE, check_openable, run_openable
from veil.mpc.truncation import pack_top_bits
from veil.shapes import numel
from veil.workers import cancellation
from veil.workers.audit_writer import rows_held_by_reply
from veil.workers.base import register_handler
from veil.workers.leaving_rows import on_record_before_leaving, session_still_open
from veil.workers.peer_rounds import WAIT_SECONDS, PeerOpeningError, PeerRounds, rounds_of
from veil.workers.peer_slot_outputs import into_peer_slot
from veil.workers.share_slots import PeerSlotReply
from veil.workers.store import Kind
from veil.workers.websocket_auth import SESSION_END_HANDLERS, register_peer_message
from veil.workers.websocket_transport import expect_reply

log = logging.getLogger(__name__)

#: most parties of one peer opening
MAX_PARTIES = 16
#: longest a peer fetch waits at the publishing party in one request: a fetch for a round that is not
#: there yet is answered "not yet" after this and asked again, so the peer link (one request at a time)
#: is free between slices for other sessions' rounds (a round one session never completes cannot hold it)
FETCH_SLICE_SECONDS = 0.25
#: openable steps of one output a peer opening may reveal to its first party only (the others get the
#: packed top bits of the opened value): truncation, whose other parties need only c's top bits
TOP_BITS_STEPS = frozenset({"trunc_mask"})
REVEALS = ("", "top_bits")


@m.register_message
@dataclass
class PeerOpenMessage:
    """Run an openable step, exchange its outputs with the other parties, store the sums here."""

    TYPE: ClassVar[int] = 41
    name: str = ""
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    round: str = ""
    parties: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    #: "" every party keeps the opened values; "top_bits" only the first party does, the others keep
    #: the packed top bits of the (one) opened value
    reveal: str = ""

    def __post_init__(self) -> None:
        if type(self.args) is list:
            self.args = tuple(self.args)


@m.register_message
@dataclass
class PeerFetchMessage:
    """A party asks a peer for what the peer published to it in a peer opening round both run (step
    ``name``); the reply is an ObjectsReply of those tensors. Only peer sessions may send it."""

    TYPE: ClassVar[int] = 42
    round: str = ""
    name: str = ""
    #: the fetching party can take a share slot reply (a same-host Unix link: ``share_slots.py``)
    slots: bool = False
    #: the slots of this connection it finished reading since its last fetch (the publisher may reuse them)
    done: list = field(default_factory=list)


def _check_message(worker: Any, msg: PeerOpenMessage) -> frozenset:
    """The other parties (the only workers this party exchanges its outputs with), after checking the fields."""
    check_openable(msg.name, msg.kwargs)
    if not isinstance(msg.round, str) or not 16 <= len(msg.round) <= 64 \
            or not (msg.round.isascii() and msg.round.isalnum()):
        raise PeerOpeningError("a peer opening needs a round id of 16-64 letters or digits")
    parties = msg.parties
    if not isinstance(parties, list) or not 2 <= len(parties) <= MAX_PARTIES \
            or not all(isinstance(p, str) for p in parties) or len(set(parties)) != len(parties):
        raise PeerOpeningError(f"a peer opening names 2-{MAX_PARTIES} distinct party ids")
    if worker.id not in parties:
        raise PeerOpeningError(f"worker {worker.id!r} is not among the parties {parties}")
    if not isinstance(msg.ids, list) or not all(type(i) is int and i > 0 for i in msg.ids) \
            or len(set(msg.ids)) != len(msg.ids):
        raise PeerOpeningError("a peer opening needs distinct positive integer ids for the opened values")
    if msg.reveal not in REVEALS or (msg.reveal == "top_bits" and msg.name not in TOP_BITS_STEPS):
        raise PeerOpeningError(f"a peer opening of {msg.name!r} cannot reveal {msg.reveal!r}")
    return frozenset(p for p in parties if p != worker.id)


@register_handler(PeerOpenMessage)
def _handle_peer_open(worker: Any, msg: PeerOpenMessage, sender: str) -> Any:
    left: deque = deque()  # the ids the round's allowed row names (once handed) that hold no opened value yet
    try:
        return _peer_open(worker, msg, sender, left)
    except BaseException as e:
        if left:  # (its one row claims them: the log must say they hold nothing)
            _failed_round(worker, msg, sender, left, e)
        raise


def _failed_round(worker: Any, msg: PeerOpenMessage, sender: str, left: deque, error: BaseException) -> None:
    """The row of a round that failed once its allowed row was handed (a refused step, a wrong id count, a peer's
    error, a session revoked, a store refused): the ids it named that hold no opened value. A refusal row: as
    many as a requester can cause are bounded like any other (refusal_rows.py)."""
    others = sorted(p for p in msg.parties if p != worker.id)
    try:
        worker.monitor.audit("open", worker.principal(sender), list(left), "refused",
                             f"{msg.name} with {others} failed after its allowed row: no opened value stored as "
                             f"{list(left)} ({type(error).__name__}: {_cut(str(error))})")
    except Exception:  # noqa: BLE001  (the round's own error is what its requester gets)
        log.exception("worker %s: could not audit a failed peer opening", worker.id)
        return
    if isinstance(error, PermissionDeniedError):
        error.audited = True  # (the server does not write a second row)


def _peer_open(worker: Any, msg: PeerOpenMessage, sender: str, left: deque) -> Any:
    others = _check_message(worker, msg)
    principal = worker.principal(sender)
    rounds = rounds_of(worker)
    rounds.check_fresh(msg.round)
    # ids taken are refused before the round's allowed row names them and before anything leaves (the store
    # after the round refused them: its row claimed the ids, its outputs were published)
    worker.monitor.check_free(principal, msg.ids)
    posted: dict = {}
    reserved: list = []  # (pool, reservation) of the share slot the outputs are computed in, if any

    def run(name: str, args: tuple, kwargs: dict) -> list:  # the monitor passed the step's arguments
        left.extend(msg.ids)  # (its allowed row, naming them, is handed: a failure from here on is recorded)
        _post_fetches(worker, msg, _sources(worker, msg, others), posted)
        found = into_peer_slot(worker, msg, others, name, args, kwargs)
        if found is None:
            return run_openable(name, args, kwargs)
        reserved.append(found)
        with outputs_into(found[1].views):
            return run_openable(name, args, kwargs)

    rnd = None
    try:
        # its allowed row (one for the round, naming the ids the opened values are stored under): on record
        # before its outputs are published, below
        with rows_held_by_reply():
            outputs = worker.monitor.open_step(principal, msg.name, tuple(msg.args), msg.kwargs, run,
                                               peer_round=(others, msg.ids))
        on_record_before_leaving(worker)
        if len(msg.ids) != len(outputs):
            raise PeerOpeningError(f"{msg.name} opens {len(outputs)} values; {len(msg.ids)} ids were given")
        if msg.reveal == "top_bits":
            rnd, opened = _open_top_bits(worker, msg, principal, rounds, others, outputs, posted)
        else:
            rnd = rounds.open(principal.namespace, msg.round, msg.name, others)
            session_still_open(worker)
            rounds.publish(rnd, outputs)
            with cancellation.outside_turn():  # the other parties' fetches are served meanwhile
                held: list = []
                try:
                    opened = _combine(msg.name, outputs, _fetch_all(worker, msg, others, _layout(outputs), posted,
                                                                    held))
                finally:
                    _slots_read(held)
                rounds.wait_taken(msg.round, rnd)
    finally:
        try:
            if posted:  # the round failed between the post and its fetches: replies read (in a slice), dropped
                links = {peer: location for peer, (location, _, _) in posted.items()}
                with cancellation.outside_turn():
                    for peer, reply in _collect_posted(worker, posted, 0).items():
                        _slot_unread(links[peer], reply)
        finally:
            rounds.close(msg.round, rnd)
            for pool, found in reserved:
                pool.unreserve(found)
    for oid, value in zip(msg.ids, opened):
        # the opened values, as the orchestrator would have sent them in a star opening: public to it (the
        # round's allowed row, on record before anything left, names them)
        worker.monitor.store(principal, oid, value, kind=Kind.CLIENT)
        left.popleft()
    return m.OkReply()


def _open_top_bits(worker: Any, msg: PeerOpenMessage, principal: Any, rounds: PeerRounds, others: frozenset,
                   outputs: list, posted: dict) -> tuple:
    """A top-bits round: the first party fetches the others' shares and keeps the opened value; it publishes
    to each other party only the packed top bits, which that party fetches and keeps. (round, kept values)."""
    if len(outputs) != 1:
        raise PeerOpeningError(f"{msg.name} opens {len(outputs)} values; a top-bits opening opens one")
    first = msg.parties[0]
    if worker.id == first:
        rnd = rounds.open(principal.namespace, msg.round, msg.name, others)
        with cancellation.outside_turn():
            held: list = []
            try:
                opened = _combine(msg.name, outputs, _fetch_all(worker, msg, others, _layout(outputs), posted, held))
            finally:
                _slots_read(held)
            session_still_open(worker, "while the other parties' shares came")
            rounds.publish(rnd, [pack_top_bits(opened[0])])
            rounds.wait_taken(msg.round, rnd)
        return rnd, opened
    rnd = rounds.open(principal.namespace, msg.round, msg.name, frozenset({first}))
    session_still_open(worker)
    rounds.publish(rnd, outputs)
    with cancellation.outside_turn():
        # (no slot: the bits are kept, and a slot's bytes are the peer's to change)
        (bits,) = _fetch_all(worker, msg, {first}, [(((outputs[0].numel() + 7) // 8,), torch.uint8)], posted, None)
        rounds.wait_taken(msg.round, rnd)
    return rnd, bits


def _layout(tensors: list) -> list:
    return [(tuple(t.shape), t.dtype) for t in tensors]


def _combine(name: str, outputs: list, received: list) -> list:
    """The opened values: this party's outputs plus (XOR for XOR shares) every other party's, summed into
    fresh tensors (this party's outputs are published: never written; received ones may be slot views)."""
    if not received:
        return outputs
    n_xor = len(outputs) if name in XOR_OPENABLE else XOR_LEADING.get(name, 0)  # outputs combined by ^
    # into fresh tensors: a received tensor may be a view of a peer's share slot (read once, never written)
    totals = [torch.bitwise_xor(v, r) if j < n_xor else torch.add(v, r)
              for j, (v, r) in enumerate(zip(outputs, received[0]))]
    for values in received[1:]:
        for j, (total, v) in enumerate(zip(totals, values)):
            if j < n_xor:
                total.bitwise_xor_(v)
            else:
                total.add_(v)  # int64 wraps: the sum mod 2^64
    return totals


_FETCH_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _sources(worker: Any, msg: PeerOpenMessage, others: frozenset) -> frozenset:
    """The parties this one fetches from: all others, but in a top-bits round the first party only (which
    itself fetches from all others)."""
    return frozenset({msg.parties[0]}) if msg.reveal == "top_bits" and worker.id != msg.parties[0] else others


def _post_fetches(worker: Any, msg: PeerOpenMessage, peers: frozenset, posted: dict) -> None:
    """Sends the round's fetches once the monitor passed the step's arguments and before the step runs,
    where that cannot block: each waits at its peer (parked, one slice at most) and is answered the moment
    the peer publishes, so the party that publishes last needs no request of its own afterwards (one
    message less on each round's path: on a LAN, one network latency). Only over a peer link that is
    connected and idle (its send lock free, nothing queued there), each entered in ``posted`` the moment it
    is sent (peer -> (link, the post's ticket, bytes sent)), so the caller collects whatever was posted
    whatever fails next. The link's send lock is held only while posting: the reply is collected by its
    ticket (``WebsocketClientWorker.collect``), so another session's request over the same link goes out
    during the step and waits at most for this fetch's slice at the peer, not for the step. Whatever is not
    posted here is fetched after the step as before. A step that fails after this reads the posted replies
    and drops them (a share a peer published to this party goes nowhere else; the failure reaches the
    orchestrator up to one slice later)."""
    data = None
    slots = _takes_slots(worker, msg)
    # every source resolved before anything is posted: an unknown one raises here (as the fetch would) with no
    # send lock held and no reply owed
    for peer, location in [(p, worker.resolve_worker(p)) for p in sorted(peers)]:
        if not callable(getattr(location, "try_post", None)):
            continue
        lock = worker._send_lock(location)
        if not lock.acquire(blocking=False):
            continue
        ticket = 0
        try:
            if worker.link_idle(location):
                data = serialize(_fetch_message(msg, location, slots), sender=worker.id)
                ticket = location.try_post(data)
        except ConnectionLostError:  # (the link dropped: the fetch after the step reconnects or reports it)
            pass
        finally:
            if ticket:
                posted[peer] = (location, ticket, len(data))
            lock.release()


def _collect_posted(worker: Any, posted: dict, size: int) -> dict:
    """The reply to each posted fetch (or the exception reading or decoding it raised); ``posted`` is emptied."""
    replies = {}
    for peer, (location, ticket, sent) in list(posted.items()):
        try:
            with expect_reply(size):
                reply_bytes = location.collect(ticket)
            worker.stats.record(sent, frame_nbytes(reply_bytes))
            replies[peer] = worker._read_reply(reply_bytes, location, None)
        except Exception as e:  # noqa: BLE001  (raised where that peer's fetch would have raised it)
            replies[peer] = e
        finally:
            del posted[peer]
    return replies


def _fetch_all(worker: Any, msg: PeerOpenMessage, peers: Any, expected: list,
               posted: dict, held: list | None = None) -> list[list[torch.Tensor]]:
    """Every peer's published tensors of the round (in peer id order), each checked against ``expected``
    (count, shapes, dtypes, dense); from all peers at once when there are several (each peer link has its
    own connection and send lock), the first reply of a fetch posted before the step (``posted``,
    :func:`_post_fetches`) read first. Raises the first failure after every fetch finished. ``held``: a
    list to which each share slot read from is added (``share_slots.py``: its views are read once, then
    :func:`_slots_read`), or None where the values are kept (no slot is asked for)."""
    global _FETCH_POOL
    names = sorted(peers)
    locations = [worker.resolve_worker(p) for p in names]  # configured peers only
    size = _reply_bytes(expected)
    early = _collect_posted(worker, posted, size)
    first = [early.get(p) for p in names]
    # the command's token, checked by every fetch thread (a pool thread has none of its own): a command
    # cancelled (its session revoked or gone, its time up) stops asking all its peers, not only the first
    token = cancellation.current_token()

    def one(k: int) -> list:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                if first[k] is not None:  # the reply to the fetch posted before the step
                    reply, first[k] = first[k], None
                    if isinstance(reply, Exception):
                        raise reply
                else:
                    fetch = _fetch_message(msg, locations[k], held is not None)
                    with expect_reply(size):  # received into one buffer of this size (its own expectation)
                        reply = worker.send_msg(fetch, locations[k])  # the link is free for others between slices
            except VeilError as e:
                if getattr(e, "from_reply", False):  # the peer's ErrorReply: its claim, reported as the peer's
                    raise PeerOpeningError(f"peer {names[k]!r} refused round {msg.round!r}: {type(e).__name__}: "
                                           f"{_cut(str(e))}") from e
                if not isinstance(e, SerializationError) or names[k] in str(e):
                    raise
                # bytes that are no veil reply: say whose they were
                raise PeerOpeningError(f"peer {names[k]!r} answered round {msg.round!r} with a reply that does "
                                       f"not decode: {e}") from e
            if type(reply) is PeerSlotReply and held is not None:
                return _slot_views(names[k], msg.round, locations[k], reply, expected, held)
            if type(reply) is not m.OkReply:
                return _checked(names[k], msg.round, reply, expected)
            if time.monotonic() >= deadline:
                raise PeerOpeningError(f"peer {names[k]!r} published nothing for round {msg.round!r} in time")
            if token is not None:
                token.check()  # the orchestrator hung up or was revoked, or the command ran out of time
            time.sleep(0.001)  # (a waiting sender on this link takes the lock first)

    if len(names) == 1:
        return [one(0)]
    if _FETCH_POOL is None:
        with _POOL_LOCK:
            if _FETCH_POOL is None:
                _FETCH_POOL = ThreadPoolExecutor(MAX_PARTIES, thread_name_prefix="veil-peer-fetch")
    futures = [_FETCH_POOL.submit(one, k) for k in range(1, len(names))]
    results: list = [None] * len(names)
    errors: list[BaseException] = []
    try:
        results[0] = one(0)
    except BaseException as e:  # noqa: BLE001  (the other fetches finish first)
        errors.append(e)
    for k, fut in enumerate(futures, 1):
        try:
            results[k] = fut.result()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    if errors:
        raise errors[0]
    return results


def _takes_slots(worker: Any, msg: PeerOpenMessage) -> bool:
    """Whether this party's fetches of the round may be answered in share slots: not where it keeps what it
    fetches (a top-bits round's other parties keep the bits; a slot's bytes stay the peer's to change)."""
    return not (msg.reveal == "top_bits" and worker.id != msg.parties[0])


def _fetch_message(msg: PeerOpenMessage, location: Any, slots: bool) -> PeerFetchMessage:
    """The round's fetch to one peer: asking for a slot reply where its link maps slots (with the slots read
    since the last fetch over it)."""
    maps = location.share_slots() if slots and callable(getattr(location, "share_slots", None)) else None
    if maps is None:
        return PeerFetchMessage(msg.round, msg.name)
    return PeerFetchMessage(msg.round, msg.name, True, maps.take_done())


def _slot_views(peer: str, round_id: str, location: Any, reply: PeerSlotReply, expected: list, held: list) -> list:
    """The tensors a peer placed in one of its share slots, as views (read once by :func:`_combine`)."""
    maps = location.share_slots() if callable(getattr(location, "share_slots", None)) else None
    if maps is None:
        raise PeerOpeningError(f"peer {peer!r} answered round {round_id!r} with a share slot over a link that "
                               "maps none")
    try:
        views = maps.views(reply, expected)
    except SerializationError as e:
        raise PeerOpeningError(f"peer {peer!r} answered round {round_id!r} with a share slot that does not fit: "
                               f"{e}") from e
    held.append((maps, reply.slot))
    return views


def _slot_unread(location: Any, reply: Any) -> None:
    """A posted fetch's reply dropped unread: a share slot's is reported done (the peer reuses the slot) and the
    slots it retired are unmapped."""
    maps = location.share_slots() if type(reply) is PeerSlotReply and callable(
        getattr(location, "share_slots", None)) else None
    if maps is not None:
        maps.unread(reply)


def _slots_read(held: list) -> None:
    """Tells each link which of its peer's slots this round read (in the next fetch over it)."""
    for maps, number in held:
        maps.done(number)
    held.clear()


#: most characters of a peer's error text passed on (a hostile peer's could be a whole frame long)
PEER_ERROR_CHARS = 300


def _cut(text: str) -> str:
    return text if len(text) <= PEER_ERROR_CHARS else text[:PEER_ERROR_CHARS] + "..."


#: room for a fetch reply's message header besides its tensors' bytes (a few dozen bytes per tensor)
_REPLY_HEADER_ROOM = 4096


def _reply_bytes(expected: list) -> int:
    """About how long a reply holding exactly ``expected`` tensors is (a buffer size, not a check)."""
    return _REPLY_HEADER_ROOM + sum(numel(shape) * dtype.itemsize for shape, dtype in expected)


def _checked(peer: str, round_id: str, reply: Any, expected: list) -> list:
    """A peer's reply to a fetch, refused unless it holds exactly the expected dense tensors."""
    objects = reply.objects if type(reply) is m.ObjectsReply else None
    if type(objects) is not list or len(objects) != len(expected):
        raise PeerOpeningError(f"peer {peer!r} answered round {round_id!r} with {type(reply).__name__}, not "
                               f"{len(expected)} values")
    out = []
    for t, (shape, dtype) in zip(objects, expected):
        if type(t) is not torch.Tensor or tuple(t.shape) != shape or t.dtype != dtype \
                or t.layout != torch.strided or t.requires_grad:
            raise PeerOpeningError(f"peer {peer!r}'s values for round {round_id!r} must be dense tensors of "
                                   f"shapes and dtypes {expected}")
        out.append(t if t.is_contiguous() else t.contiguous())  # (decoded tensors are fresh and writable)
    return out


def _peer_session(principal: Any) -> bool:
    """Only a peer worker's own connection fetches shares (not a scientist, client or admin session)."""
    return principal is not None and principal.isolated and principal.roles == frozenset({"peer"})


def _well_formed(msg: PeerFetchMessage) -> bool:
    """A round id of 16-64 letters or digits and a step name: any other fetch is refused at once (no round
    has such an id, _check_message), it must not wait holding a slot."""
    return isinstance(msg.round, str) and isinstance(msg.name, str) and 16 <= len(msg.round) <= 64 \
        and msg.round.isascii() and msg.round.isalnum() and len(msg.name) <= 64


def _fetched(tensors: list) -> m.ObjectsReply:
    reply = m.ObjectsReply(list(tensors))
    reply.fresh = True  # published for this round alone and never written again: sent from their memory
    return reply


@register_handler(PeerFetchMessage)
def _handle_peer_fetch(worker: Any, msg: PeerFetchMessage, sender: str) -> Any:
    """Runs on the publishing party: hands a peer what a round of this worker's sessions published to it."""
    monitor = worker.monitor
    principal = worker.principal(sender)
    if not _peer_session(principal):
        if principal is not None:
            monitor.audit("peer_fetch", principal, [], "refused", "not a peer connection")
        raise PermissionDeniedError("peer shares go only to peer workers")
    if not _well_formed(msg):
        raise PeerOpeningError("a peer fetch names a round id of 16-64 letters or digits and a step")
    try:
        with cancellation.outside_turn():  # the round's own request registers and publishes it under the lock
            tensors = rounds_of(worker).take(msg.round, principal.user, msg.name, FETCH_SLICE_SECONDS)
    except PeerOpeningError as e:
        monitor.audit("peer_fetch", principal, [], "refused", str(e))
        raise
    return _NOT_YET if tensors is None else _fetched(tensors)


async def serve_fetch_on_loop(worker: Any, principal: Any, msg: PeerFetchMessage, closed: Any) -> Any:
    """A peer's well-formed fetch served on the network server's event loop: taken at once when its round
    is published, else parked (no thread) until its round is published or ends, for at most one slice
    (``FETCH_SLICE_SECONDS``, then "not yet", as on a handler thread). The reply, or None when this path
    does not serve it: a fetch from a session other than a peer's, a malformed one, or one ``take`` refuses
    goes to its handler thread, which refuses and audits it as before (nothing was taken here).
    :data:`HUNG_UP` when the connection closed while it was parked (``closed``: its future)."""
    if not _peer_session(principal) or not _well_formed(msg):
        return None
    try:
        tensors = await rounds_of(worker).take_on_loop(msg.round, principal.user, msg.name, FETCH_SLICE_SECONDS,
                                                       closed)
    except PeerOpeningError:
        return None
    except ConnectionError:
        return HUNG_UP
    return _NOT_YET if tensors is None else _fetched(tensors)


#: :func:`serve_fetch_on_loop`'s answer when the fetching peer hung up while its fetch was parked (nothing to
#: reply, nothing was taken): only then does the server stop reading that connection without the handler
#: thread (a refusal goes there, to be audited, even if the connection closed meanwhile)
HUNG_UP = object()




_NOT_YET = m.OkReply()  # a fetch's "nothing published for you yet": ask again


def _end_session(worker: Any, session_id: str) -> None:
    rounds = getattr(worker, "_peer_rounds", None)
    if rounds is not None:
        rounds.end_session(session_id)


register_peer_message(PeerFetchMessage)
SESSION_END_HANDLERS.append(_end_session)
