"""The sending side of a worker: requests, and what rides on the next message to each destination.

Pointer finalizers queue deletions, pipelined commands queue themselves (their results
are named by the caller), and both travel in front of the next request to that worker
(serde's "prelude", one frame). A failed deferred command is raised at that request,
naming the op; the ids it and the commands after it would have made are remembered as
lost, so using one fails here instead of on the worker. Requests may also be *posted* (written,
their replies read later: full batches of deferred commands, SMPC peer rounds); ``_in_flight``
keeps them per destination, oldest first.
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch

from veil.exceptions import ConnectionLostError, ObjectNotFoundError, PermissionDeniedError, error_from_reply
from veil.messaging import messages as m
from veil.messaging.frames import FrameParts, HandedParts, frame_nbytes
from veil.messaging.serde import deserialize, serialize
from veil.messaging.skeleton_frames import SkeletonFramer, serialize_skeleton
from veil.workers.posted_requests import PostedRequests

if TYPE_CHECKING:
    from veil.workers.base import BaseWorker

_OK = m.OkReply()  # OkReply has no fields: one instance serves every caller
_OK_MAX = 128  # an encoded OkReply is its envelope and the replying worker's id

#: deferred commands queued for one worker before they are sent without waiting for more
PRELUDE_LIMIT = 512
#: most items (deferred commands and deletions) a worker accepts in front of one request
MAX_PRELUDE_ITEMS = 65536
#: tensor bytes of deferred commands queued for one worker before they are sent (a message must
#: stay well under a worker's message limit, 256 MB by default)
PRELUDE_BYTES_LIMIT = 32 << 20


class Outbox(PostedRequests):
    """Mixin of BaseWorker: ``send_msg`` and the per-destination queues (needs ``id``, ``hook``,
    ``stats`` and ``_decode_ctx`` from the worker)."""

    #: as a destination: requests longer than this reach its ``_recv_msg`` as serde ``FrameParts``
    #: (tensor bytes not joined into one buffer; network transports write them themselves)
    frame_parts_over: int | None = None
    #: as a destination: the skeleton table of its open connection (network clients; None: none)
    _skeletons: Any = None

    def _init_outbox(self) -> None:
        # Per destination object (keyed by identity: a new worker may reuse an old one's name; the
        # entry holds the worker, so its id() stays unique): [worker, what rides on the next message
        # there in order (ids to free, deferred commands), tensor bytes of the deferred commands].
        # The lock: SMPC rounds send from several threads at once, and a command queued while
        # another thread takes the queue must not be lost.
        self._pending_deletes: dict[int, list] = {}
        # per destination (id): the requests posted there whose replies are unread, oldest first: a batch of
        # deferred commands (at most one) and posted SMPC peer rounds, each [worker, prelude, bytes sent,
        # ticket, what] (``what``: None for a batch, the round's description for a round)
        self._in_flight: dict[int, list[list]] = {}
        # reply bytes known to decode to an OkReply (they differ only by the replying worker's id)
        self._ok_replies: set[bytes] = set()
        self._queue_lock = threading.RLock()  # re-entrant: pointer finalizers may run inside it
        # per destination worker, by id: (weak reference to it, its lock); a closed worker takes its lock along
        self._send_locks: dict[int, tuple[weakref.ref, threading.RLock]] = {}
        self._grad_epochs: dict[str, int] = {}
        # per destination (id): the frames of its skeleton uses (used under its send lock; holds no state
        # between calls, so a destination that reuses a dead one's id may take it over)
        self._framers: dict[int, SkeletonFramer] = {}
        # per destination: ids a failed deferred command (or the commands after it) never stored
        self._lost: dict[str, dict[int, str]] = {}

    def _frame_sender(self, location: "BaseWorker") -> str:
        """The sender field of a request to ``location`` (a network worker names a peer the requester
        account it sends for: veil/workers/accounts.py)."""
        return self.id

    def send_msg(self, msg: Any, location: "BaseWorker") -> Any:
        """Sends a request to ``location`` and returns its reply, raising remote errors here.

        Deferred commands and deletions queued for ``location`` ride in front of it
        (the prelude, one frame). If a deferred command failed, its error is raised
        here, naming the op; its results and those of every later deferred command
        are remembered as lost (see :meth:`check_lost`), and ``msg`` itself did not run.
        """
        # Taking the queue and sending it is one step per destination: otherwise a thread could
        # send a request that uses a deferred result before the thread that took the deferred
        # command has sent it (concurrent SMPC rounds; red-team R3). Other destinations proceed.
        with self._send_lock(location):
            return self._exchange(msg, location, self._take_prelude(location))

    def _take_prelude(self, location: "BaseWorker", collect: bool = True) -> list | None:
        """What rides on the next request to ``location`` (under its send lock): the replies of requests
        posted there are read first (a failure raised, the queue left queued) unless ``collect`` is False
        (a round's own request: :meth:`send_round` reads them after writing it); a queue longer than a
        worker accepts in front of one request sends its excess first, in requests of their own,
        answered at once."""
        if collect and self._in_flight:
            self._collect(location)
        with self._queue_lock:
            pending = self._pending_deletes.pop(id(location), None)
        prelude = pending[1] if pending else None
        while prelude and len(prelude) > MAX_PRELUDE_ITEMS:  # never more than a worker accepts at once
            head, prelude = prelude[:MAX_PRELUDE_ITEMS], prelude[MAX_PRELUDE_ITEMS:]
            try:
                self._exchange(m.DeleteMessage([]), location, head)
            except Exception:
                self._note_lost(location, prelude, 0, "an earlier part of the batch failed")
                raise
        return prelude

    def send_round(self, requests: list, post: str | None = None) -> tuple[list, list]:
        """Sends every ``(msg, location)`` request before reading any reply, all from this thread, and
        returns ``(replies, errors)``: the decoded replies in order (None where one failed) and
        ``(position, exception)`` for each failure. For destinations that take a request without
        waiting (``post``/``collect``: network workers), each at most once: a round to several parties
        costs one serialization and one socket write after another and then the reads, instead of
        a thread per further party and its hand-offs. Each request is what :meth:`send_msg` sends
        (its destination's queued prelude in front); the destinations' send locks are held for the
        whole round, taken in one order (two rounds from two threads never wait on each other).

        Rounds posted to a destination earlier have their replies read after this round's request went
        out (behind them: a worker answers a connection's requests in order), so a worker that finishes
        one round finds the next one waiting; an earlier round's failure is that destination's error,
        listed first (this round's replies are then all read, and its own error at that destination
        dropped: it may follow from the earlier one). A posted batch of deferred commands is read before
        this round's request is written, as by :meth:`send_msg`: if it failed, the commands queued after
        it never run (noted lost) and that destination's error is the batch's. ``errors`` are in order of
        precedence: earlier failures, then this round's by position. ``post`` (the round's description):
        the replies are not read now but left in flight, read by the next request to each destination
        (a round whose replies carry nothing: SMPC peer openings); replies are then all None.
        """
        locks = [self._send_lock(loc) for loc in sorted((loc for _, loc in requests), key=id)]
        replies: list = [None] * len(requests)
        errors: list = []
        earlier: list = []  # failures of requests posted before this round
        posted = []
        held = []
        try:
            for lock in locks:
                lock.acquire()
                held.append(lock)
            framed = []  # every request serialized first, then written one after another: the last party's
            for k, (msg, location) in enumerate(requests):  # request leaves one serialization earlier
                prelude = None
                try:
                    if any(flight[4] is None for flight in self._in_flight.get(id(location), ())):
                        # a posted batch first: a failed one's later commands must not ride on this request
                        self._collect(location)
                    # (a queue's excess goes first, answered at once: never this round's request, which
                    # may wait on the other parties' requests, not sent yet)
                    prelude = self._take_prelude(location, collect=False)
                    framed.append((k, location, prelude, serialize(msg, sender=self._frame_sender(location),
                                                                   prelude=prelude,
                                                                   parts_over=location.frame_parts_over)))
                except BaseException as e:  # noqa: BLE001  (the requests already posted are read first)
                    if prelude:
                        self._note_lost(location, prelude, 0, f"{type(e).__name__}: {e}")
                    errors.append((k, e))
            for k, location, prelude, data in framed:
                try:
                    ticket = location.post(data)
                except BaseException as e:  # noqa: BLE001
                    if prelude:
                        self._note_lost(location, prelude, 0, f"{type(e).__name__}: {e}")
                    errors.append((k, e))
                    continue
                posted.append((k, location, prelude, frame_nbytes(data), ticket))
            for k, (_, location) in enumerate(requests):
                if id(location) in self._in_flight:
                    try:
                        self._collect(location)
                    except BaseException as e:  # noqa: BLE001
                        earlier.append((k, e))
            for k, location, prelude, sent, ticket in posted:
                if post is not None and not earlier:
                    self._in_flight.setdefault(id(location), []).append([location, prelude, sent, ticket, post])
                    continue
                try:
                    replies[k] = self._collect_one([location, prelude, sent, ticket, None])
                except BaseException as e:  # noqa: BLE001
                    errors.append((k, e))
        finally:
            for lock in reversed(held):
                lock.release()
        errors.sort(key=lambda item: item[0])
        if earlier:  # an earlier round's failure comes first (this round may have used its results); returned,
            failed = {k for k, _ in earlier}  # not raised: a caller taking every party's outcome gets each one
            errors = earlier + [item for item in errors if item[0] not in failed]
        return replies, errors

    def send_skeleton(self, location: "BaseWorker", signature: Any, ids: list, return_ids: list,
                      define: Any) -> bool:
        """Sends a synchronous command as a skeleton command (``veil/workers/skeletons.py``) and reads its
        reply, raising remote errors as :meth:`send_msg`; False (nothing sent) when ``location`` has no
        skeleton table for its open connection, the table is full, or the queue is too long for one frame.

        ``signature``: what makes two commands the same skeleton: the shape-inference Template of the
        command, one object per (op, grad mode, argument kinds, values and shapes); ``define()``: its definition, built only for the first use on a connection. A number
        is kept only once the worker answered its definition without error (a failed first use
        leaves the signature undefined: the next use defines it under a fresh number)."""
        found = self._send_locks.get(id(location))  # (_send_lock's first test, inline)
        lock = found[1] if found is not None and found[0]() is location else self._send_lock(location)
        # (locks taken and released explicitly in this hot path: a ``with`` block costs ~1 K instructions more)
        lock.acquire()  # numbering and sending are one step: definitions precede uses
        try:
            table = location._skeletons
            if table is None or table.conn is not location._conn:
                return False
            found = table.numbers.get(id(signature))  # (table.number's first test, inline)
            if found is not None and found[0] is signature:
                k, defined = found[1], True
            else:
                k, defined = table.number(signature)
                if k is None:
                    return False
            definition = None
            if not defined:
                definition = define()
                if definition is None:  # not a skeleton a worker accepts
                    return False
            if self._in_flight:
                self._collect(location)  # a posted batch's error comes first (the queue stays queued)
            queue_lock = self._queue_lock
            queue_lock.acquire()
            try:
                pending = self._pending_deletes.pop(id(location), None)
            finally:
                queue_lock.release()
            prelude = pending[1] if pending else None
            if prelude and (len(prelude) > MAX_PRELUDE_ITEMS or pending[2]):  # (tensor bytes: send_msg's frames)
                with self._queue_lock:
                    self._requeue(location, pending)
                return False
            if not defined:
                table.taken()
            try:
                if definition is None and type(self.id) is str:
                    framer = self._framers.get(id(location))
                    if framer is None or framer.sender != self.id:
                        framer = self._framers[id(location)] = SkeletonFramer(self.id)
                    data = framer.use(prelude, k, ids, return_ids)
                else:
                    data = serialize_skeleton(self.id, prelude, k, ids, return_ids, definition)
                reply_bytes = location._recv_msg(data)
            except Exception as e:
                if prelude:
                    self._note_lost(location, prelude, 0, f"{type(e).__name__}: {e}")
                raise
            self.stats.record(len(data), len(reply_bytes))
            # the usual reply, an OkReply seen before, recognized here (_read_reply's first test, inline)
            if len(reply_bytes) > _OK_MAX or bytes(reply_bytes) not in self._ok_replies:
                self._read_reply(reply_bytes, location, prelude)
            if not defined:
                table.keep(signature, k)
            return True
        finally:
            lock.release()

    def link_idle(self, location: "BaseWorker") -> bool:
        """Nothing queued for ``location`` and no posted batch of it unread (under its send lock): a request
        posted there now is the next one it answers."""
        with self._queue_lock:
            return id(location) not in self._in_flight and not self._pending_deletes.get(id(location))

    def _send_lock(self, location: "BaseWorker") -> threading.RLock:
        found = self._send_locks.get(id(location))
        if found is not None and found[0]() is location:
            return found[1]
        with self._queue_lock:
            found = self._send_locks.get(id(location))
            if found is None or found[0]() is not location:
                key, locks = id(location), self._send_locks

                def forget(ref: Any) -> None:  # the worker is gone: its lock goes too (unless replaced)
                    entry = locks.get(key)
                    if entry is not None and entry[0] is ref:
                        del locks[key]
                found = locks[key] = (weakref.ref(location, forget), threading.RLock())
            return found[1]

    def _post_batch(self, location: "BaseWorker") -> None:
        """A full batch of deferred commands goes to a destination that can take a request without
        waiting for its reply (``post``/``collect``: network workers), so this side builds the next
        batch while the worker runs this one. At most one batch is in flight per destination: its reply
        is read (and a failure raised, naming the op) before the next batch or request goes there."""
        with self._send_lock(location):
            if id(location) in self._in_flight:
                self._collect(location)
            with self._queue_lock:
                pending = self._pending_deletes.pop(id(location), None)
            prelude = pending[1] if pending else None
            if not prelude:
                return
            if len(prelude) > MAX_PRELUDE_ITEMS:  # (many deletions besides the commands) the split path
                with self._queue_lock:
                    self._requeue(location, pending)
                self.send_msg(m.DeleteMessage([]), location)
                return
            try:
                data = serialize(m.DeleteMessage([]), sender=self.id, prelude=prelude,
                                 parts_over=location.frame_parts_over)
                ticket = location.post(data)
            except Exception as e:
                self._note_lost(location, prelude, 0, f"{type(e).__name__}: {e}")
                raise
            self._in_flight.setdefault(id(location), []).append([location, prelude, frame_nbytes(data), ticket, None])

    def _requeue(self, location: "BaseWorker", pending: list) -> None:
        """Puts a taken queue back in front of what was queued since (under the queue lock)."""
        entry = self._pending_deletes.get(id(location))
        if entry is None:
            self._pending_deletes[id(location)] = pending
        else:
            entry[1][:0] = pending[1]
            entry[2] += pending[2]

    def _exchange(self, msg: Any, location: "BaseWorker", prelude: list | None) -> Any:
        try:
            data = serialize(msg, sender=self._frame_sender(location), prelude=prelude,
                             parts_over=location.frame_parts_over)
            if type(data) is FrameParts and getattr(msg, "fresh", False) and getattr(location, "in_this_process", False) \
                    and all(type(item) is int for item in prelude or ()):
                # a request whose tensors nothing else holds (a dealer's corrections, made for that party alone)
                # is handed over in process with their memory, as a fresh reply is: the party keeps them with no
                # copy (a mul 1e6's dealing copied 24 MB, ~4 ms of ~40). Only in-process code sets ``fresh``; and
                # only with nothing but deletions in front of it: deferred commands riding on it carry the caller's
                # tensors (a dealer that is the orchestrator's own worker; red team 95b62c7)
                data = HandedParts.of(data)
            reply_bytes = location._recv_msg(data)
        except Exception as e:
            if prelude:
                self._note_lost(location, prelude, 0, f"{type(e).__name__}: {e}")
            raise
        self.stats.record(frame_nbytes(data), frame_nbytes(reply_bytes))
        return self._read_reply(reply_bytes, location, prelude)

    def _read_reply(self, reply_bytes: Any, location: "BaseWorker", prelude: list | None) -> Any:
        """The decoded reply; an ErrorReply is raised (a failed deferred command's results noted lost)."""
        ok = self._ok_replies
        small = not isinstance(reply_bytes, FrameParts) and len(reply_bytes) <= _OK_MAX
        if small and bytes(reply_bytes) in ok:  # an OkReply seen before: the same message
            return _OK
        reply, _, _ = deserialize(reply_bytes, self._decode_ctx)
        if type(reply) is m.OkReply:
            if small and len(ok) < 64:  # one per worker this one talks to
                ok.add(bytes(reply_bytes))
            return reply
        if type(reply) is m.ErrorReply:
            error = error_from_reply(reply.error, reply.message)
            error.from_reply = True  # what the other side said (class and text its own claim), not a local failure
            if prelude:
                failed = _failed_position(reply.message)
                if failed is not None:
                    self._note_lost(location, prelude, failed, reply.message)
            raise error
        return reply

    def schedule_delete(self, location: "BaseWorker", oid: int) -> None:
        """Queues a remote deletion; it rides on the next message to that worker.

        Called from pointer finalizers, which must never send (they can run in the
        middle of another message).
        """
        lock = self._queue_lock
        lock.acquire()  # (explicitly: this runs for every pointer that dies)
        try:
            entry = self._pending_deletes.get(id(location))
            if entry is None:
                entry = self._pending_deletes.setdefault(id(location), [location, [], 0])
            entry[1].append(oid)
        finally:
            lock.release()
        lost = self._lost.get(location.id)
        if lost:
            lost.pop(oid, None)

    def defer_command(self, location: "BaseWorker", msg: m.CommandMessage) -> None:
        """Pipelining: the command rides on the next message to ``location``.

        Only for commands that need no reply (results under ids the caller chose).
        An error surfaces at the next synchronous call to that worker.
        """
        self.defer(location, [msg.op, list(msg.args), msg.kwargs, msg.return_ids, msg.grad_enabled])

    def defer(self, location: "BaseWorker", item: list, payload_bytes: int | None = None) -> None:
        """:meth:`defer_command` for a command already in wire form ``[op, args, kwargs, return_ids, grad]``.

        ``payload_bytes``: its tensor bytes when the caller knows them (0: only pointers among its
        tensors); None counts them here."""
        if payload_bytes is None:
            payload_bytes = _payload_bytes(item[1], item[2])
        with self._queue_lock:
            entry = self._pending_deletes.get(id(location))
            if entry is None:
                entry = self._pending_deletes.setdefault(id(location), [location, [], 0])
            entry[1].append(item)
            entry[2] += payload_bytes
            full = len(entry[1]) >= PRELUDE_LIMIT or entry[2] >= PRELUDE_BYTES_LIMIT
        if full:  # a full batch goes now: posted where the destination allows it, else sent (raising its error)
            if getattr(location, "post", None) is not None:
                self._post_batch(location)
            else:
                self.send_msg(m.DeleteMessage([]), location)

    def defer_skeleton(self, location: "BaseWorker", signature: Any, ids: list, return_ids: list,
                       define: Any) -> bool:
        """:meth:`defer` of a plain torch op as a skeleton use ``[k, ids, return_ids]`` (the first use on
        a connection carries the definition, ``[k, ids, return_ids, definition]``; see
        ``veil/workers/skeletons.py``); the worker expands it into the command's fields, which run exactly
        as a deferred command. False (nothing queued) when ``location`` has no skeleton table for its open
        connection, the table is full, or ``define()`` declines (no tensor bytes ride on a use)."""
        table = location._skeletons
        if table is None or table.conn is not location._conn:
            return False
        with self._queue_lock:  # numbering and queueing are one step: a definition precedes its uses
            k, definition = table.defer(signature, define)
            if k is None:
                return False
            entry = self._pending_deletes.get(id(location))
            if entry is None:
                entry = self._pending_deletes.setdefault(id(location), [location, [], 0])
            entry[1].append([k, ids, return_ids] if definition is None else [k, ids, return_ids, definition])
            full = len(entry[1]) >= PRELUDE_LIMIT
        if full:  # as in defer
            if getattr(location, "post", None) is not None:
                self._post_batch(location)
            else:
                self.send_msg(m.DeleteMessage([]), location)
        return True

    def queued_largest(self, location: "BaseWorker", discount: Any = None) -> int:
        """Elements of the largest tensor among the deferred commands that ride on the next request to
        ``location`` (the parties' runtime sizes a round's work by it: a deferred Beaver step's operands);
        ``discount(op)``: what a command's count is divided by (the runtime's lighter steps)."""
        with self._queue_lock:
            entry = self._pending_deletes.get(id(location))
            items = list(entry[1]) if entry else []
        # deferred commands only: deletions are ints, skeleton uses ([k, ids, ...]) carry no tensors
        return max((t.numel() // (discount(item[0]) if discount is not None else 1)
                    for item in items if type(item) is list and type(item[0]) is not int
                    for t in _tensors(item[1], item[2])), default=0)

    def flush(self, location: "BaseWorker | None" = None) -> None:
        """Synchronizes: sends what is queued (for ``location``, or for every worker) and raises the
        error of a failed deferred command. ``alice.flush()`` flushes the local worker's queue for alice."""
        local = self.hook.local_worker
        if local is not self and location is None:
            location = self
        if location is None:
            local.flush_deletes()
            return
        pending = local._pending_deletes.get(id(location))
        if pending and pending[1]:
            local.send_msg(m.DeleteMessage([]), location)  # (reads a posted batch's reply first)
        elif id(location) in local._in_flight:
            with local._send_lock(location):
                local._collect(location)

    def _note_lost(self, location: "BaseWorker", prelude: list, first: int, reason: str) -> None:
        """Results of deferred commands from position ``first`` on were never stored on ``location``."""
        lost = self._lost.setdefault(location.id, {})
        table = location._skeletons
        k = 0
        for item in prelude:
            if type(item) is int:
                continue
            if k >= first:
                if len(item) == 5:
                    name, ids = item[0], item[3]
                else:  # a skeleton use [k, ids, return_ids(, definition)]
                    name, ids = table.names.get(item[0], "?") if table is not None else "?", item[2]
                    if len(item) == 4 and table is not None:
                        table.forget(item[0])  # its definition never ran: define it afresh
                if isinstance(ids, list):
                    for oid in ids:
                        if oid:
                            lost[oid] = f"deferred command {name!r} did not run ({reason})"
            k += 1
        if len(lost) > 65536:  # pointers usually die (and are forgotten) long before this
            for oid in list(lost)[:32768]:
                del lost[oid]

    def check_lost(self, location: "BaseWorker", ids: Any) -> None:
        """Raises if one of ``ids`` names a result a failed deferred command never stored."""
        lost = self._lost.get(location.id)
        if lost:
            for oid in ids:
                reason = lost.get(oid)
                if reason is not None:
                    raise ObjectNotFoundError(
                        f"object {oid} on worker {location.id!r} was never created: {reason}")

    def grad_epoch(self, location: "BaseWorker") -> int:
        """Changes whenever remote ``.grad`` attributes on ``location`` may have changed."""
        return self._grad_epochs.get(location.id, 0)

    def bump_grad_epoch(self, location: "BaseWorker") -> None:
        self._grad_epochs[location.id] = self._grad_epochs.get(location.id, 0) + 1

    def flush_deletes(self) -> None:
        """Sends queued deletions and deferred commands now (raises a deferred command's error
        after every worker got its queue). A worker that cannot be reached (lost, or its link refused: a
        revoked token) and was owed deletions only raises nothing: its objects are beyond reach either way,
        and the caller (flushing for other workers, or for none in particular) would otherwise hear of a
        worker it no longer uses."""
        first_error = None
        try:  # posted requests: their replies (errors) first
            self.wait_posted()
        except Exception as e:
            first_error = e
        for key in list(self._pending_deletes):
            pending = self._pending_deletes.get(key)
            if pending and self.hook.workers.get(pending[0].id) is not pending[0]:
                del self._pending_deletes[key]  # a worker since replaced under its name: nothing to run there
                continue
            if pending and pending[1]:
                deletions_only = all(type(item) is int for item in pending[1])
                # an empty DeleteMessage carries the prelude (send_msg takes it from the queue)
                try:
                    self.send_msg(m.DeleteMessage([]), pending[0])
                except (ConnectionLostError, PermissionDeniedError) as e:  # lost, or its link refused/closed
                    if not deletions_only:
                        first_error = first_error or e
                except Exception as e:
                    first_error = first_error or e
        if first_error is not None:
            raise first_error


def _tensors(args: Any, kwargs: Any):
    """The tensors among a deferred command's arguments (top level and one list deep: where protocol
    steps put them)."""
    for value in (*args, *kwargs.values()) if isinstance(kwargs, dict) else args:
        if isinstance(value, torch.Tensor):
            yield value
        elif type(value) in (list, tuple):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def _payload_bytes(args: Any, kwargs: Any) -> int:
    """Tensor bytes among a deferred command's arguments; bounds a queued batch well under a worker's
    message limit."""
    return sum(t.numel() * t.element_size() for t in _tensors(args, kwargs))


_FAILED_AT = re.compile(r"deferred command '[^']*' \(#(\d+) of \d+ in the batch\) failed")


def _failed_position(message: str) -> int | None:
    """0-based position of the failed deferred command named by an error text (None: no such failure)."""
    found = _FAILED_AT.search(message) if message.startswith("deferred command") else None
    return int(found.group(1)) - 1 if found else None
