"""BaseWorker: the data owner's agent. Holds objects, executes allowlisted messages.

Two roles live in one class, as in PySyft: a worker *serves* requests
(``_recv_msg``: bytes in, bytes out, never raises) and *sends* requests on behalf
of the pointers it owns (``send_msg``). A VirtualWorker serves in-process; a
network client worker overrides ``_recv_msg`` to forward the bytes.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable

import torch

from veil.exceptions import SerializationError, WorkerNotFoundError, error_from_reply, error_reply_fields
from veil.messaging import messages as m
from veil.messaging.serde import DecodeContext, deserialize, serialize
from veil.compat.workers import PySyftWorkerMethods
from veil.workers import cancellation, review_gate
from veil.workers.stats import TransportStats
from veil.workers.monitor import Principal, ReferenceMonitor
from veil.workers.outbox import MAX_PRELUDE_ITEMS, Outbox
from veil.workers.skeletons import prepared_use

if TYPE_CHECKING:
    from veil.hook import TorchHook

log = logging.getLogger(__name__)

Handler = Callable[["BaseWorker", Any, str], Any]
#: a batch hands the worker to other sessions' waiting requests every this many commands
YIELD_EVERY = 32
_UNSET = object()  # "not decided yet" (a batch runner may be None)
_COMMAND_FIELDS = 5  # a deferred command [op, args, kwargs, return_ids, grad]; skeleton uses are shorter
#: what an ObjectMessage may store besides tensors (plans register themselves)
STORABLE_TYPES: list[type] = [torch.Tensor]
#: checks run on an arriving object before it is stored (e.g. a plan's ops vs the allowlist)
STORE_VALIDATORS: dict[type, Callable[[Any], None]] = {}
#: while a worker sends a move's objects to a peer: what encoders keep for that send (``veil.he`` sends each CKKS
#: tensor's context then, once per context)
_moving_to_peer: contextvars.ContextVar[dict | None] = contextvars.ContextVar("veil_moving_to_peer", default=None)


@contextlib.contextmanager
def moving_to_peer():
    """Marks what is encoded meanwhile as a move's objects on their way to a peer worker."""
    token = _moving_to_peer.set({})
    try:
        yield
    finally:
        _moving_to_peer.reset(token)


def peer_move_memo() -> dict | None:
    """What encoders keep for the move being sent to a peer now (None: none is)."""
    return _moving_to_peer.get()
#: message type -> handler; extensions add theirs with register_handler
HANDLERS: dict[type, Handler] = {}


def register_handler(msg_type: type) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        if msg_type in HANDLERS:
            raise ValueError(f"{msg_type.__name__} already has a handler")
        HANDLERS[msg_type] = fn
        return fn

    return deco


class BaseWorker(Outbox, PySyftWorkerMethods):  # list_objects, objects_count, add_worker, request_search
    """Object store + message execution + the client side of the pointers it owns.

    Args:
        hook: the TorchHook whose worker registry this worker joins (None: the default one).
        id: the worker's name (``"alice"``).
        data: tensors the data owner loads at start (tagged through ``x.tag(...)``).
    """

    def __init__(self, hook: "TorchHook | None" = None, id: str | None = None, data: tuple = (),
                 pipelining: bool = True, max_session_bytes: int | None = None, **_ignored: Any):
        from veil.workers.registry import default_hook_context

        self.hook = hook if hook is not None else default_hook_context()
        if id is None:
            from veil.ids import new_id

            id = f"worker-{new_id():x}"
        if type(id) is int:  # PySyft allowed integer worker ids
            id = str(id)
        if not isinstance(id, str):
            raise TypeError(f"worker id must be a string, got {type(id).__name__}")
        self.id = id
        #: the only door to this worker's objects (see veil/workers/monitor.py)
        self.monitor = ReferenceMonitor(id, max_session_bytes=max_session_bytes)
        self.monitor.release_hook = self._review_release
        self._principals: dict[str, Principal] = {}
        # the sender of the request being handled, per thread (threads may handle requests at once)
        self._request = threading.local()
        self.stats = TransportStats()
        self._init_outbox()
        #: as a destination: callers may defer commands whose results they name themselves
        self.pipelining = pipelining
        # per destination: (grad epoch, ids of leaf tensors the last backward gave a gradient)
        self._grad_leaves: dict[str, tuple[int, frozenset | None]] = {}
        self._decode_ctx = DecodeContext(make_pointer=self._make_pointer,
                                         session=getattr(self, "current_session", None))  # (network workers)
        self.hook.register_worker(self)
        for tensor in data:
            self.load(tensor)

    # ------------------------------------------------------------ owner API

    def load(
        self,
        obj: Any,
        tags: tuple | list = (),
        description: str = "",
        private: bool = False,
        allowed_users: tuple | list | None = None,
        policy: str | None = None,
    ) -> int:
        """Stores the data owner's own object (never deletable by clients); returns its id.

        ``policy``: ``"open"`` (derived results may be fetched), ``"review"`` (each release of a
        derived object waits for the owner's approval) or ``"dp-only"``; see :mod:`veil.governance`.
        """
        from veil.ids import new_id

        if policy == "dp-only":  # (past a hidden count's public bound: refused here, before it is stored)
            from veil.dp.padding import check_owner_load

            check_owner_load(self, obj)
        oid = new_id()
        tags = tuple(tags) or tuple(getattr(obj, "tags", ()) or ())
        description = description or getattr(obj, "description", "") or ""
        if allowed_users is None and not private:
            allowed_users = getattr(obj, "allowed_users", None)
        elif private and allowed_users is None:
            allowed_users = ()
        if isinstance(allowed_users, str):  # one user, as ``sy.private_tensor`` reads it (``tuple("alice")`` named
            allowed_users = (allowed_users,)  # the users "a", "l", "i", "c" and "e")
        self.monitor.owner_load(oid, obj, tags, description, None if allowed_users is None else tuple(allowed_users),
                                owner=self.id)
        from veil.governance.policy import apply_policy, restore_policy

        if policy is not None:
            apply_policy(self, oid, policy)
        else:
            restore_policy(self, oid)
        return oid

    def set_policy(self, name_or_tag: Any, policy: str) -> list[int]:
        """Owner: changes the data policy of loaded objects (by id, tag or dataset name) at run time."""
        from veil.dp.bound_note import warn_past_bound
        from veil.governance.policy import set_policy

        # (the owner's code holds no turn: the change is put in force in a network worker's, veil/governance/policy.py)
        changed = set_policy(self, name_or_tag, policy, turn=getattr(self, "_turn", None))
        warn_past_bound(self, changed, policy)  # (data past a hidden count's bound: read over its first N only)
        return changed

    @property
    def release_requests(self) -> Any:
        """Owner: the review queue (``.pending()``, ``.approve(id)``, ``.deny(id, message)``)."""
        from veil.governance.requests import ReviewQueue

        return ReviewQueue(self)

    def _review_release(self, principal: Principal, ids: list, entries: list, action: str, consume: bool) -> None:
        """The owner's review policy for releases the monitor decides alone (openings; ``consume=False``: the
        refusals only, the approvals used up by a second call once the values go)."""
        review_gate.release(self, ids, entries, principal.user, action, consume)

    @property
    def _objects(self) -> dict[int, Any]:
        """What the worker holds, id -> object (read-only snapshot, PySyft's ``_objects``).

        In-process, the local worker's commands still queued for this worker run first
        (the snapshot is a synchronization point, and may raise a deferred command's error)."""
        local = self.hook.local_worker
        if local is not self and local._pending_deletes.get(id(self)):
            local.flush(self)
        return self.monitor.owner_objects()

    def search(self, query: list[str] | str) -> list:
        """Pointers (owned by the local worker) to objects tagged with every query term."""
        from veil.api import search

        return search(self, query)

    def enable_dp(self, datasets: Any = (), **settings: Any) -> Any:
        """Owner-side differential privacy on this worker; see :func:`veil.dp.enable_dp`."""
        from veil.dp.worker_owner import enable_dp

        return enable_dp(self, datasets, **settings)

    def clear_objects(self) -> "BaseWorker":
        """Frees every client object; the owner's loaded data stays."""
        self.monitor.owner_clear()
        return self

    def resolve_worker(self, worker_id: str) -> "BaseWorker":
        worker = self.hook.find_worker(worker_id)
        if worker is None:
            raise WorkerNotFoundError(f"worker {self.id!r} does not know how to reach worker {worker_id!r}")
        return worker

    def _make_pointer(self, location_id: str, id_at_location: int, shape: list, dtype: torch.dtype,
                      requires_grad: bool, garbage_collect_data: bool) -> Any:
        from veil.tensors.pointer import PointerTensor

        owner = self
        current = getattr(self, "current_session", None)
        if current is not None and current() is not None:
            from veil.workers.monitor import NO_DEPUTY

            owner = NO_DEPUTY  # a network client's pointer never acts with this worker's (peer) rights
        return PointerTensor(
            location=self.resolve_worker(location_id), id_at_location=id_at_location, owner=owner,
            shape=shape, dtype=dtype, requires_grad=requires_grad, garbage_collect_data=garbage_collect_data,
        )

    # ------------------------------------------------------- serving side

    #: replies marked ``fresh`` longer than this come back from :meth:`_recv_msg` as serde FrameParts
    #: (network servers, which write them to the socket themselves; None: always one buffer)
    reply_parts_over: int | None = None

    #: (worker id, OkReply encoded with that sender): the reply most requests get
    _ok_reply: tuple = (None, b"")

    def _recv_msg(self, data: bytes) -> bytes:
        """Handles one serialized request; always answers, never raises."""
        try:
            msg, sender, prelude = deserialize(data, self._decode_ctx)
        except Exception as e:
            return self._error_bytes(e)
        return self._serve_decoded(msg, sender, prelude)

    def _error_bytes(self, error: Exception) -> bytes:
        return serialize(m.ErrorReply(*error_reply_fields(error)), sender=self.id)

    def _serve_decoded(self, msg: Any, sender: str, prelude: list) -> bytes:
        """:meth:`_recv_msg` after decoding (a network server decodes once, then decides where it runs)."""
        try:
            self._run_prelude(prelude, sender)
            reply = self._handle(msg, sender)
        except Exception as e:  # a failing torch op must not take the worker down
            reply = m.ErrorReply(*error_reply_fields(e))
        return self._reply_bytes(reply)

    def _reply_bytes(self, reply: Any) -> bytes:
        """A handler's reply, encoded (never raises)."""
        if type(reply) is m.OkReply:  # the most frequent reply, the same bytes every time
            ok = self._ok_reply
            if ok[0] is not self.id:
                ok = self._ok_reply = (self.id, serialize(reply, sender=self.id))
            return ok[1]
        try:
            # A reply of fresh tensors (an opening step's outputs, which nothing else holds) may leave
            # as FrameParts: a network server sends the tensor bytes from their memory (no encode copy).
            parts_over = self.reply_parts_over if getattr(reply, "fresh", False) else None
            return serialize(reply, sender=self.id, parts_over=parts_over)
        except Exception as e:  # a result that cannot be encoded is an error reply, not a dropped connection
            return serialize(m.ErrorReply(*error_reply_fields(e)), sender=self.id)

    def _run_prelude(self, prelude: list, sender: str) -> None:
        """Runs a batch in order: deletions, and deferred commands each through :meth:`_handle`.

        Each command is handled exactly as if it came alone (roles, the monitor, the
        write guard, quotas, DP); each gets its own time limit, and on network workers
        the batch gives way to other sessions every few commands. After a command fails,
        later commands are skipped (they may use its results), deletions still run, and
        the failure is raised naming the op and its position, so the request itself does
        not run and the client learns which results were never stored.
        """
        if len(prelude) > MAX_PRELUDE_ITEMS:
            raise SerializationError(
                f"a batch of {len(prelude)} deferred items exceeds worker {self.id!r}'s limit of {MAX_PRELUDE_ITEMS}")
        if not prelude:
            return
        if len(prelude) == 1 and type(prelude[0]) is int:  # a synchronous client's dropped result pointer
            self.monitor.discard(self.principal(sender), prelude[0])
            return
        failure = None
        position = total = 0
        discard, principal = self.monitor.discard, None
        run = _UNSET  # how each deferred command runs (see _batch_runner), decided at the first one
        uses = _UNSET  # how a prepared skeleton use runs straight from its ids (see _skeleton_runner), likewise
        expand = None  # how any other skeleton use becomes its command's fields (see _skeleton_expander)
        use = None  # the prepared skeleton of the item being run, if any (names its op in a failure)
        handle = self._handle
        token = cancellation.current_token()  # network workers: this request's limits (None in-process)
        local = self._request  # the requester, per thread (a dealer's background thread may run here too)
        previous, local.sender = getattr(local, "sender", None), sender
        try:
            for item in prelude:
                if type(item) is int:
                    if principal is None:
                        principal = self.principal(sender)
                    discard(principal, item)
                    continue
                total += 1
                if failure is not None:
                    continue
                position += 1
                use = None
                try:
                    if token is not None:
                        if position % YIELD_EVERY == 0:
                            cancellation.checkpoint()  # other sessions' requests may run now
                        token.restart()  # each command gets the whole time limit; none starts once the session is gone
                    if len(item) != _COMMAND_FIELDS:  # a skeleton use (deserialize checked: [k, ids, rids(, define)])
                        if uses is _UNSET:
                            uses = self._skeleton_runner(sender)
                        use = prepared_use(uses[0], item) if uses is not None else None
                        if use is not None:
                            uses[1](use, item[1], item[2])
                            continue
                        if expand is None:
                            expand = self._skeleton_expander(sender)
                        item = expand(item)
                    if run is _UNSET:
                        run = self._batch_runner(sender)
                    if run is not None:
                        run(item)  # deserialize checked: 5 fields
                    else:
                        handle(m.CommandMessage(*item), sender)
                except Exception as e:
                    failure = (position, use.op if use is not None else item[0] if len(item) == _COMMAND_FIELDS
                               else f"skeleton {item[0]}", e)
        finally:
            local.sender = previous
        if failure is not None:
            position, op, e = failure
            name, text = error_reply_fields(e)
            error = error_from_reply(name, f"deferred command {op!r} (#{position} of {total} in the batch) "
                                           f"failed: {text}")
            error.audited = True  # the handler wrote its own audit rows
            raise error from e

    def _skeleton_expander(self, sender: str) -> Callable[[list], Any]:
        """How a batch's skeleton uses become their commands' fields; only network sessions keep
        skeleton tables (``WebsocketServerWorker``): elsewhere each use is refused."""
        def refuse(item: list) -> Any:
            raise SerializationError(f"worker {self.id!r} does not accept skeleton commands")
        return refuse

    def _skeleton_runner(self, sender: str) -> tuple | None:
        """``(table, run)``: a session's skeleton table and how a prepared use of it runs straight from its
        ids (``run(skeleton, ids, return_ids)``, see ``handlers.run_use``), or None: every use is expanded
        (:meth:`_skeleton_expander`). Only network sessions keep skeleton tables (``WebsocketServerWorker``)."""
        return None

    def _batch_runner(self, sender: str) -> Callable[[list], Any] | None:
        """How a batch's deferred commands run: straight through ``_run_command`` (the body of the
        stock command handler) with the batch's one principal, or None: each as a CommandMessage
        through :meth:`_handle`. Straight only where that is exactly what ``_handle`` would do:
        in-process workers (no override of ``_handle``) with the stock handler; a network server
        decides for its session (``WebsocketServerWorker._batch_runner``)."""
        if type(self)._handle is not BaseWorker._handle or HANDLERS.get(m.CommandMessage) is not _handlers._handle_command:
            return None
        principal, run_command = self.principal(sender), _handlers._run_command
        return lambda item: run_command(self, principal, sender, *item)

    def _handle(self, msg: Any, sender: str) -> Any:
        handler = HANDLERS.get(type(msg))
        if handler is None:
            raise SerializationError(f"worker {self.id!r} does not accept {type(msg).__name__} requests")
        local = self._request
        previous, local.sender = getattr(local, "sender", None), sender
        try:
            return handler(self, msg, sender)
        finally:
            local.sender = previous

    def requesting_user(self) -> str | None:
        """Who sent the request being handled (for worker functions: budgets, audit).

        On an in-process worker this is the sender's claimed id; a network
        server overrides it with the authenticated user.
        """
        return self.requester()

    def requester(self) -> str | None:
        """The sender of the message this thread is handling (None outside a request).

        Per thread: a dealer's background thread may run a request on this worker while
        another thread runs an opening here, each with its own requester."""
        return getattr(self._request, "sender", None)

    def principal(self, sender: str) -> Principal:
        """Who sent the request being handled, for the monitor (network servers: the session)."""
        principal = self._principals.get(sender)
        if principal is None:
            if len(self._principals) > 1024:  # claimed names are unbounded: keep the cache small
                self._principals.clear()
            principal = self._principals[sender] = Principal(sender, sender)
        return principal

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id:{self.id} #objects:{len(self.monitor)}>"


# the built-in handlers register themselves (they import this module, hence last)
from veil.workers import handlers as _handlers, stored_object_handlers as _stored_object_handlers  # noqa: E402

#: the built-in handlers' modules: requests that store objects (commands, ObjectMessage), then requests about
#: objects already stored (get, delete, search, list, move, remote_get)
_BUILT_IN_HANDLER_MODULES = (_handlers, _stored_object_handlers)
