"""The worker side of model serving: a request queue per service, one message type.

Each party worker of a cluster holds, per service name, a small queue:

* a client *submits* its share of an input under a request id it chose
  (random, 64 bits), the same id on every party; the worker keeps it under
  (submitting session, id), so a session's ids are its own: whether another
  session holds the same id never changes an answer (an "id in use" reply for
  another client's id told a guesser which ids were live);
* the model owner lists *pending* ids, *claims* a batch of them (the worker
  concatenates the shares and stores them as an object of the owner's
  session, which the owner then computes on through pointers), and
  *responds* with its share of the outputs (split back per request); the
  owner names requests by id alone, so of two sessions' requests with one id
  the worker lists the older one and the other waits behind it, unseen; a
  batch another party could not claim (a request left it: its client
  disconnected there) is *requeued* where it was claimed, unchanged;
* the submitting session, and only it, *fetches* its output share.

A request has at most the service's ``max_rows`` rows (the owner's setting, in
the service's public info): larger ones are refused at submit, and the owner
batches requests up to that many rows.

Fairness and bounds: one session may hold at most :data:`MAX_PER_SESSION`
requests (queued, being computed or waiting to be fetched) and :data:`MAX_SESSION_BYTES`
of queued input shares, a client with its own issued token an eighth of the service's bytes over all its
sessions, the service at most :data:`MAX_PENDING` queued ones (:data:`MAX_PENDING_BYTES` in all), and a session's requests and results are
dropped when its connection closes (:func:`drop_session`), so an attacker who
leaves leaves nothing behind. A request is described to the owner with its
batch size, so a request whose shares disagree between parties fails alone.

Neither side ever receives another party's share: the owner only names
objects (ids), the client only gets shares of its own outputs, and each
worker sees one uniformly random share of inputs and weights.

All actions travel as one :class:`ServingMessage`; :data:`ACTIONS` is the
explicit table of what a worker will do; :data:`CLIENT_ACTIONS` are the only
ones a ``client`` token may send (``websocket_auth.CLIENT_REQUESTS``).
A service's state and the look-ups each action starts with (who asks, which service):
:mod:`veil.serving.service_state`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from veil.governance.revocation import REVOKE_HANDLERS
from veil.messaging import messages as m
from veil.serving import names
from veil.serving.errors import RequestFailedError, RequestGoneError, ServiceClosedError, ServingError
from veil.serving.service_state import (_Service, _client_service, _group, _issuer_of, _listed, _owned,
                                     _request_ids, _user_of, _who, checked_open, checked_reason)
from veil.workers import cancellation
from veil.workers.base import register_handler
from veil.workers.websocket_auth import CLIENT_REQUESTS, SESSION_END_HANDLERS
from veil.workers.monitor import Kind
from veil.workers.value_shapes import refuse_reviewed_output

#: most requests a service queues before refusing new ones (memory bound per worker)
MAX_PENDING = 1024  # (service_state.MAX_REQUEST_IDS: an owner action may name as many request ids)
#: most requests one session may have in a service (queued, computing or unfetched)
MAX_PER_SESSION = 32
#: most bytes of input shares one session may have queued in a service, and the service in all: a request's
#: batch dimension is the client's choice (32 requests of a 256 MiB message each were 8 GiB per connection)
MAX_SESSION_BYTES = 64 * 2**20
MAX_PENDING_BYTES = 1 * 2**30
#: most seconds a ``pending`` or ``fetch`` may wait on a network worker for something to arrive
MAX_WAIT = 1.0
#: the actions that take a wait (their last argument, seconds) and the index it is at
WAITABLE = {"pending": 0, "fetch": 1}
#: rows of one request, and of one batch, unless the owner opens the service with another ``max_rows``
DEFAULT_MAX_ROWS = 64
#: most services one user may hold on a worker (closed ones with results left to fetch included): each open
#: of a new name kept its state for ever, so a scientist opening names in a loop grew the worker's memory
MAX_SERVICES_PER_USER = 64


@dataclass
class ServingMessage:
    """One serving action (see :data:`ACTIONS`) on service ``service``."""

    TYPE: ClassVar[int] = 70
    action: str = ""
    service: str = ""
    args: list = field(default_factory=list)


m.register_message(ServingMessage)


#: worker -> (owner user, service name) -> state: each user's names are its own (veil/serving/names.py)
_SERVICES = names.SERVICES
_LOCK = threading.Lock()
#: wakes waiting ``pending``/``fetch`` requests: taken after _LOCK (never the other way round), bumped on every change
_CHANGED = threading.Condition(threading.Lock())
_generation = 0


def _changed() -> None:
    """Something a waiting request may wait for happened (a submit, a respond, a fail, a close)."""
    global _generation
    with _CHANGED:
        _generation += 1
        _CHANGED.notify_all()


def _wait_for_change(seen: int, deadline: float) -> None:
    """Waits, holding neither the serving lock nor the worker's, until a change after ``seen`` or ``deadline``.

    Without the worker lock the owner's protocol requests and other clients' actions run meanwhile;
    the wait is in short slices so a cancelled request (its client disconnected) ends promptly."""
    with cancellation.outside_turn():
        with _CHANGED:
            while _generation == seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                _CHANGED.wait(min(left, 0.05))
                if time.monotonic() >= deadline:  # the wait is over: answer (a deadline is no failure)
                    return
                cancellation.check()


def _known_ids(action: str, args: list) -> "frozenset | None":
    """For ``pending [wait, known]``: the ids the owner already saw and set aside (partial requests),
    which a waiting ``pending`` does not count as news; None for any other action."""
    if action != "pending" or len(args) < 1:
        return None
    known = args[0]
    if (not isinstance(known, (list, tuple)) or len(known) > MAX_PENDING
            or not all(type(r) is int for r in known)):
        raise ServingError(f"pending's known ids are a list of at most {MAX_PENDING} integers")
    return frozenset(known)


def _news(reply: list, known: "frozenset | None") -> bool:
    """Whether a reply is worth answering before the wait ends (anything, or a pending id not known)."""
    if known is None:
        return bool(reply)
    return any(r not in known for r, *_ in reply)


# ----------------------------------------------------------------- owner actions


def _open(worker: Any, name: str, user: str, session: str, args: list) -> list:
    clients, info = checked_open(name, *args)  # (bounded and plain: kept outside the quota, beyond the session)
    names.check_own_name(name)  # (clients' way of naming the owner too, "@OWNER/NAME": see names.py)
    services = names.table(worker)
    old = services.get((user, name))  # (another user's service of this name is neither seen nor touched)
    if old is None:
        _make_room(worker, services, user)
    shape = info.get("input_shape", [])  # (each submit reads it: a malformed one failed them as bare TypeErrors)
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise ServingError("a service's input_shape is a list of sizes (integers, 0 or more)")
    max_rows = info.get("max_rows", DEFAULT_MAX_ROWS)
    if type(max_rows) is not int or max_rows < 1:
        raise ServingError("a service's max_rows is a positive integer")
    svc = services[(user, name)] = _Service(owner=user, clients=clients, opened_by=session,
                                            info={**info, "max_rows": max_rows})
    if old is not None:  # reopened (a model shared again): its clients hear of their
        _shut(old, "the model owner opened the service again; submit again", claimed_too=True)  # requests,
        svc.outputs.update(old.outputs)  # and results already computed stay theirs to fetch
        _changed()
    return [user]  # (whom the parties know the opener as: the owner's cluster file names it, names.qualified)


def _make_room(worker: Any, services: dict, user: str) -> None:
    """Room for one more service of ``user``: its closed services nobody has anything left to fetch from go
    first; refused (one line) when it still holds :data:`MAX_SERVICES_PER_USER`."""
    mine = list(names.of_user(worker, user))
    if len(mine) < MAX_SERVICES_PER_USER:
        return
    for key, svc in mine:
        if svc.closed and not svc.outputs and not svc.claimed:
            del services[key]
    if sum(1 for _ in names.of_user(worker, user)) >= MAX_SERVICES_PER_USER:
        raise ServingError(f"user {user!r} already has {MAX_SERVICES_PER_USER} services on worker {worker.id!r}; "
                           "close one (and let its clients fetch their results) first")


def _claims_left(worker: Any, user: str) -> bool:
    """Whether a service of ``user`` on this worker still computes a claimed batch (its session stays tainted
    until none does: one service's respond must not lift what another's batch needs)."""
    return any(svc.claimed for _, svc in names.of_user(worker, user))


def _pending(worker: Any, name: str, user: str, session: str, args: list) -> list:
    """[[request id, batch size, batch group], ...]: the owner computes only requests whose parties agree,
    and batches together only requests of one group (one client session: :func:`_claim`).

    ``args`` (after the wait) may name the ids the owner already knows are incomplete: a waiting
    pending answers early only for others (see :func:`_known_ids`), so a request submitted to some
    parties only does not turn the owner's wait into a poll."""
    svc = _owned(worker, name, user)
    return [[r, int(share.shape[0]), _group(svc, sub)] for r, (sub, share) in _listed(svc).items()]


def _claim(worker: Any, name: str, user: str, session: str, args: list) -> list:
    rids, oid = _request_ids(args[0]), args[1]
    svc = _owned(worker, name, user)
    listed = _listed(svc)
    missing = [r for r in rids if r not in listed]
    if not rids or len(set(rids)) != len(rids):
        raise ServingError("claim expects distinct request ids")
    if missing:
        raise RequestGoneError(f"worker {worker.id!r} has no pending request {missing[:1]}")
    taken = [listed[r] for r in rids]
    if len({sub for sub, _ in taken}) > 1:
        # the owner computes any function of a batch and splits it as it likes: with requests of two clients in
        # one batch, a client session of its own could be handed another client's input
        raise ServingError("claim: a batch holds the requests of one client session (see the group pending shows)")
    # One object for the whole batch: the owner's model runs once for all of them. Stored first: a batch the
    # owner's session cannot hold (an id in use, its quota) leaves the requests queued, not claimed for nothing
    clients = tuple(sorted({sub for sub, _ in taken}))  # only they may reveal the inputs and what derives from them
    worker.monitor.store(worker.principal(session), oid, torch.cat([share for _, share in taken]), kind=Kind.SHARE,
                         reveal_to=clients)
    worker.monitor.taint(worker.principal(session), clients)
    for r, (sub, share) in zip(rids, taken):
        del svc.pending[(sub, r)]
        svc.claimed[r] = sub
        svc.held[r] = share
    return [int(share.shape[0]) for _, share in taken]


def _respond(worker: Any, name: str, user: str, session: str, args: list) -> list:
    rids, sizes, ref = _request_ids(args[0]), args[1], args[2]
    svc = _owned(worker, name, user)
    if type(ref) is not m.ObjectRef:
        raise ServingError("respond expects an object reference to the output share")
    if (not isinstance(sizes, (list, tuple)) or len(sizes) != len(rids)
            or not all(type(n) is int and n >= 0 for n in sizes)):  # (zip cut extras: a request stayed claimed)
        raise ServingError("respond expects one row count (an integer, 0 or more) per request id")
    if not rids:  # (audited as a release of the share to nobody: a release row that released nothing)
        raise ServingError("respond names no request: there is nothing to answer")
    recipients = [svc.claimed.get(r) for r in rids]
    if any(recipients):  # (none: every client left meanwhile, drop_session; nothing goes out, no release row)
        refuse_reviewed_output(worker, worker.principal(session), ref)  # (no output of data under review)
        out = worker.monitor.release_output(worker.principal(session), ref, recipients).obj
        if not isinstance(out, torch.Tensor) or out.dtype != torch.int64 or sum(sizes) != out.shape[0]:
            raise ServingError("the output share does not match the claimed requests")
        for r, piece in zip(rids, torch.split(out, sizes)):
            sub = svc.claimed.pop(r, None)
            svc.held.pop(r, None)
            if sub is not None:
                svc.outputs[(sub, r)] = piece.clone()
    worker.monitor.discard(worker.principal(session), ref.id)  # the owner keeps no handle on output shares
    if not _claims_left(worker, user):
        worker.monitor.untaint(worker.principal(session))
    _changed()
    return []


def _fail(worker: Any, name: str, user: str, session: str, args: list) -> list:
    rids, message = _request_ids(args[0]), checked_reason(args[1])
    svc = _owned(worker, name, user)
    listed = _listed(svc)
    for r in rids:  # the request the owner sees under r: in computation, else the one listed
        sub = svc.claimed.pop(r, None)
        svc.held.pop(r, None)
        if sub is None and r in listed:
            sub = listed.pop(r)[0]
            del svc.pending[(sub, r)]
        if sub is not None:
            svc.outputs[(sub, r)] = message
    if not _claims_left(worker, user):
        worker.monitor.untaint(worker.principal(session))
    _changed()
    return []


def _requeue(worker: Any, name: str, user: str, session: str, args: list) -> list:
    """Puts claimed requests back at the front of the queue, unchanged: another party could not claim
    the same batch (one of its requests left that party meanwhile: a disconnect), and the others of the
    batch must not fail for it. The owner deletes the batch object it had stored."""
    rids = _request_ids(args[0])
    svc = _owned(worker, name, user)
    back = [(r, svc.claimed.pop(r, None), svc.held.pop(r, None)) for r in rids]
    for r, sub, share in reversed(back):
        if sub is not None and share is not None:
            svc.pending[(sub, r)] = share
            svc.pending.move_to_end((sub, r), last=False)
    if not _claims_left(worker, user):
        worker.monitor.untaint(worker.principal(session))
    _changed()
    return []


def drop_session(worker: Any, session: str) -> None:
    """A closed connection: its queued requests, requests in flight and unfetched results go; the services
    it opened as the model owner close (their model shares went with it: a client would wait in vain)."""
    with _LOCK:
        for svc in names.every(worker):
            for table in (svc.pending, svc.outputs):
                for key in [key for key in table if key[0] == session]:
                    del table[key]
            for r in [r for r, sub in svc.claimed.items() if sub == session]:
                del svc.claimed[r]  # its output share is discarded when the owner responds
                svc.held.pop(r, None)
            if svc.opened_by == session and not svc.closed:  # the model owner's connection (its model shares)
                _shut(svc, "the model owner's connection closed", claimed_too=True)  # clients hear it now
    _changed()


SESSION_END_HANDLERS.append(drop_session)


def _close(worker: Any, name: str, user: str, session: str, args: list) -> list:
    svc = _owned(worker, name, user)
    _shut(svc, checked_reason(args[0]) if args and type(args[0]) is str else svc.reason)
    _changed()
    return []


def _shut(svc: _Service, reason: str, claimed_too: bool = False) -> None:
    """Closes ``svc``: requests queued (and, for an owner who can no longer respond, claimed) are answered
    with ``reason``. Under _LOCK."""
    svc.closed, svc.reason = True, reason
    for key in list(svc.pending):  # queued but never computed: tell their clients
        del svc.pending[key]
        svc.outputs[key] = reason
    for r, sub in list(svc.claimed.items()) if claimed_too else ():
        del svc.claimed[r]
        svc.held.pop(r, None)
        svc.outputs[(sub, r)] = reason


def close_services_of(worker: Any, name: str) -> None:
    """The data owner revoked user ``name`` (veil/governance/revocation.py): its services close and their
    clients are told at once (a client's name then finds another user's open service of that name)."""
    with _LOCK:
        for svc in names.every(worker):
            if svc.owner == name and not svc.closed:
                _shut(svc, "the model owner's access was revoked", claimed_too=True)
    _changed()


REVOKE_HANDLERS.append(close_services_of)


def _unfetched(worker: Any, name: str, user: str, session: str, args: list) -> list:
    """How many computed outputs wait for their client (the owner waits for 0 before shutting down)."""
    return [sum(1 for out in _owned(worker, name, user).outputs.values() if isinstance(out, torch.Tensor))]


# ----------------------------------------------------------------- client actions


def _info(worker: Any, name: str, user: str, session: str, args: list) -> list:
    svc = _client_service(worker, name, user)
    return [{**svc.info, "owner": svc.owner}]  # (the client checks it is the owner it pinned: names.qualified)


def _submit(worker: Any, name: str, user: str, session: str, args: list) -> list:
    rid, share = args
    svc = _client_service(worker, name, user)
    if svc.closed:
        raise ServiceClosedError(f"the model {name!r} is no longer served: {svc.reason}")
    shape = svc.info.get("input_shape", [])
    if (type(rid) is not int or not isinstance(share, torch.Tensor) or share.dtype != torch.int64
            or list(share.shape[1:]) != list(shape[1:]) or share.dim() == 0):
        raise ServingError(f"a request needs an int64 share of shape [batch, {', '.join(map(str, shape[1:]))}]")
    max_rows = svc.info["max_rows"]
    if share.shape[0] > max_rows:
        raise ServingError(f"a request may have at most {max_rows} rows in service {name!r} (the owner's "
                           f"max_rows), not {share.shape[0]}: split the input into several queries")
    key = (session, rid)  # ids are per session: another session's ids never change this answer
    if key in svc.pending or key in svc.outputs or svc.claimed.get(rid) == session:
        raise ServingError("request id already in use by this connection")
    mine = (sum(1 for sub, _ in svc.pending if sub == session)
            + sum(1 for sub in svc.claimed.values() if sub == session)
            + sum(1 for sub, _ in svc.outputs if sub == session))
    if mine >= MAX_PER_SESSION:
        raise ServingError(f"this connection already has {MAX_PER_SESSION} requests in service {name!r}; "
                           f"fetch their results first")
    if len(svc.pending) >= MAX_PENDING:
        raise ServingError(f"service {name!r} is busy ({MAX_PENDING} requests queued); retry later")
    nbytes = share.numel() * share.element_size()
    queued = [(sub, t.numel() * t.element_size()) for (sub, _), t in svc.pending.items()]
    if nbytes + sum(b for sub, b in queued if sub == session) > MAX_SESSION_BYTES:
        raise ServingError(f"this connection's queued requests in service {name!r} would hold more than "
                           f"{MAX_SESSION_BYTES >> 20} MiB; send fewer rows per request, or wait for results")
    if _issuer_of(worker, user) is not None and nbytes + sum(b for sub, b in queued
                                                           if _user_of(worker, sub) == user) > _issued_user_bytes():
        raise ServingError(f"client {user!r} has {_issued_user_bytes() >> 20} MiB of requests queued in service "
                           f"{name!r}; wait for results")
    if nbytes + sum(b for _, b in queued) > MAX_PENDING_BYTES:
        raise ServingError(f"service {name!r} is busy ({MAX_PENDING_BYTES >> 20} MiB of requests queued); retry later")
    svc.pending[key] = share
    _changed()
    return []


def _fetch(worker: Any, name: str, user: str, session: str, args: list) -> list:
    rid = args[0] if args else None
    if type(rid) is not int:  # (an unhashable id failed as a bare TypeError)
        raise ServingError("fetch expects a request id (an integer)")
    key = (session, rid)  # (of several services of this name it may query: the one that holds this request)
    svc = _client_service(worker, name, user, lambda s: key in s.outputs or key in s.pending
                          or s.claimed.get(rid) == session)
    out = svc.outputs.pop((session, rid), None)  # only this session's own request
    if out is None:  # not ready, or another session's: the same answer
        # once closed, another session's request in computation reads as unknown too (not "still
        # computing": that told a guesser which ids were in a batch)
        if svc.closed and svc.claimed.get(rid) != session:
            raise ServiceClosedError(f"the model {name!r} is no longer served: {svc.reason}")
        return []
    if isinstance(out, str):
        raise RequestFailedError(f"request failed on worker {worker.id!r}: {out}")
    return [out]


def _issued_user_bytes() -> int:
    """Most bytes of queued input shares one client with its own issued token may have in a service, over all
    its sessions: an eighth of the service's, so a few clients cannot fill it for every other."""
    return max(MAX_SESSION_BYTES, MAX_PENDING_BYTES // 8)


#: action -> handler(worker, service, user, session, args) -> reply objects
ACTIONS: dict[str, Callable[..., list]] = {
    "open": _open,
    "pending": _pending,
    "claim": _claim,
    "respond": _respond,
    "fail": _fail,
    "requeue": _requeue,
    "close": _close,
    "unfetched": _unfetched,
    "info": _info,
    "submit": _submit,
    "fetch": _fetch,
}
#: action -> (fewest, most) arguments, waits included: checked before anything else (the count of a
#: malformed request tells nothing about which services exist, and extras are refused, not ignored)
ARGUMENTS: dict[str, tuple[int, int]] = {
    "open": (2, 2), "pending": (0, 2), "claim": (2, 2), "respond": (3, 3), "fail": (2, 2), "requeue": (1, 1),
    "close": (0, 1), "unfetched": (0, 0), "info": (0, 0), "submit": (2, 2), "fetch": (1, 2),
}
#: the actions a ``client`` token may send (everything else needs the owner's token)
CLIENT_ACTIONS = frozenset({"info", "submit", "fetch"})
CLIENT_REQUESTS[ServingMessage] = lambda msg: isinstance(msg.action, str) and msg.action in CLIENT_ACTIONS


@register_handler(ServingMessage)
def _handle_serving(worker: Any, msg: ServingMessage, sender: str) -> Any:
    handler = ACTIONS.get(msg.action) if isinstance(msg.action, str) else None
    if handler is None or not isinstance(msg.service, str) or not isinstance(msg.args, (list, tuple)):
        raise ServingError(f"unknown serving action {msg.action!r}")
    args = list(msg.args)
    fewest, most = ARGUMENTS[msg.action]
    if not fewest <= len(args) <= most:
        counts = str(fewest) if fewest == most else f"{fewest} to {most}"
        raise ServingError(f"serving action {msg.action!r} takes {counts} arguments, not {len(args)}")
    user, session = _who(worker, sender)
    wait = _wait_of(msg.action, args)
    known = _known_ids(msg.action, args)
    deadline = time.monotonic() + wait
    token = cancellation.current_token()
    if wait and token is not None and token.deadline is not None:  # a wait never outlasts the command's limit
        deadline = min(deadline, token.deadline)
    while True:
        with _LOCK:  # servers handle one request at a time today; the lock keeps that assumption local
            seen = _generation
            reply = handler(worker, msg.service, user, session, args)
        # an empty reply is "nothing yet" for pending and fetch (so is a pending listing only known
        # ids): wait for a change, then look again
        if _news(reply, known) or wait <= 0 or time.monotonic() >= deadline:
            return m.ObjectsReply(reply)
        _wait_for_change(seen, deadline)


def _wait_of(action: str, args: list) -> float:
    """Seconds a ``pending``/``fetch`` may wait (taken off ``args``; 0 without one, or in-process).

    Only a network worker's request waits: it hands the worker lock back meanwhile
    (``cancellation.outside_turn``); an in-process call would block its only thread."""
    at = WAITABLE.get(action)
    if at is None or len(args) <= at:
        return 0.0
    wait = args.pop(at)
    if type(wait) not in (int, float) or not 0 <= wait <= MAX_WAIT:
        raise ServingError(f"a {action} wait is a number of seconds from 0 to {MAX_WAIT}")
    return float(wait) if cancellation.current_token() is not None else 0.0


def call(local: Any, worker: Any, action: str, service: str, *args: Any) -> list:
    """Sends one serving action from ``local`` to ``worker``; returns the reply's objects."""
    reply = local.send_msg(ServingMessage(action, service, list(args)), worker)
    return list(reply.objects)


def call_all(local: Any, workers: list, action: str, service: str, per_worker_args: list,
             return_errors: bool = False) -> list:
    """Sends one serving action to every worker at once (one round); the replies' objects, in order.

    Args:
        per_worker_args: For each worker, the action's arguments (a list).
        return_errors: A failed worker's exception takes its reply's place instead of raising.
    """
    from veil.tensors.mpc_glue.runtime import one_round

    requests = [(local, ServingMessage(action, service, list(args)), w) for w, args in zip(workers, per_worker_args)]
    replies = one_round(requests, f"serving action {action!r}", return_errors=return_errors)
    return [r if isinstance(r, BaseException) else list(r.objects) for r in replies]
