"""BaseWorker: the data owner's agent. Holds objects, executes allowlisted messages.

Two roles live in one class, as in PySyft: a worker *serves* requests
(``_recv_msg``: bytes in, bytes out, never raises) and *sends* requests on behalf
of the pointers it owns (``send_msg``). A VirtualWorker serves in-process; a
network client worker overrides ``_recv_msg`` to forward the bytes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable

import torch

from veil.exceptions import (
    ObjectNotFoundError,
    PermissionDeniedError,
    RemoteExecutionError,
    SerializationError,
    VeilError,
    WorkerNotFoundError,
    error_from_reply,
    error_reply_fields,
)
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST, NO_RESULT
from veil.messaging.serde import DecodeContext, deserialize, serialize
from veil.tensors.tree import leaves, map_structure
from veil.compat.workers import PySyftWorkerMethods
from veil.workers import cancellation, oblivious, owner_guard
from veil.workers.stats import TransportStats
from veil.workers.monitor import DEALER_OUTPUTS, PROTOCOL_PREFIXES, Principal, Purpose, ReferenceMonitor
from veil.workers.outbox import MAX_PRELUDE_ITEMS, Outbox
from veil.workers.store import Entry, Kind

if TYPE_CHECKING:
    from veil.hook import TorchHook

log = logging.getLogger(__name__)

Handler = Callable[["BaseWorker", Any, str], Any]
#: a batch hands the worker to other sessions' waiting requests every this many commands
YIELD_EVERY = 32
#: what an ObjectMessage may store besides tensors (plans register themselves)
STORABLE_TYPES: list[type] = [torch.Tensor]
#: checks run on an arriving object before it is stored (e.g. a plan's ops vs the allowlist)
STORE_VALIDATORS: dict[type, Callable[[Any], None]] = {}
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
        self._decode_ctx = DecodeContext(make_pointer=self._make_pointer)
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

        oid = new_id()
        tags = tuple(tags) or tuple(getattr(obj, "tags", ()) or ())
        description = description or getattr(obj, "description", "") or ""
        if allowed_users is None and not private:
            allowed_users = getattr(obj, "allowed_users", None)
        elif private and allowed_users is None:
            allowed_users = ()
        self.monitor.owner_load(oid, obj, tags, description, None if allowed_users is None else tuple(allowed_users),
                                owner=self.id)
        if policy is not None:
            from veil.governance.policy import apply_policy

            apply_policy(self, oid, policy)
        return oid

    def set_policy(self, name_or_tag: Any, policy: str) -> list[int]:
        """Owner: changes the data policy of loaded objects (by id, tag or dataset name) at run time."""
        from veil.governance.policy import set_policy

        return set_policy(self, name_or_tag, policy)

    @property
    def release_requests(self) -> Any:
        """Owner: the review queue (``.pending()``, ``.approve(id)``, ``.deny(id, message)``)."""
        from veil.governance.requests import ReviewQueue

        return ReviewQueue(self)

    def _review_release(self, principal: Principal, oid: int, entry: Entry, action: str) -> None:
        """The owner's review policy for releases the monitor decides alone (openings)."""
        _governance_release(self, [oid], [entry], principal.user, action)

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
        worker = self.hook.workers.get(worker_id)
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
        try:
            return serialize(reply, sender=self.id)
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
        failure = None
        position = total = 0
        discard, principal = self.monitor.discard, None
        # In-process (no server override of _handle, the stock command handler): each command goes
        # straight to _run_command, the body of that handler, with the batch's one principal.
        plain = type(self)._handle is BaseWorker._handle and HANDLERS.get(m.CommandMessage) is _handle_command
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
                try:
                    if token is not None:
                        if position % YIELD_EVERY == 0:
                            cancellation.checkpoint()  # other sessions' requests may run now
                        token.start()  # each command gets the whole per-command time limit ...
                        token.check()  # ... and none starts once the session is gone
                    if plain:
                        if principal is None:
                            principal = self.principal(sender)
                        _run_command(self, principal, sender, *item)  # deserialize checked: 5 fields
                    else:
                        handle(m.CommandMessage(*item), sender)
                except Exception as e:
                    failure = (position, item[0], e)
        finally:
            local.sender = previous
        if failure is not None:
            position, op, e = failure
            name, text = error_reply_fields(e)
            error = error_from_reply(name, f"deferred command {op!r} (#{position} of {total} in the batch) "
                                           f"failed: {text}")
            error.audited = True  # the handler wrote its own audit rows
            raise error from e

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


# ------------------------------------------------------------------ handlers


def _purpose_of(op: Any) -> Purpose:
    if op.name in owner_guard.DP_RELEASES:
        return Purpose.DP_RELEASE
    if op.worker_function and op.name.startswith("veil.mpc."):
        return Purpose.PROTOCOL_STEP
    return Purpose.COMPUTE


def _is_stored_pointer(obj: Any) -> bool:
    from veil.tensors.pointer import PointerTensor

    return isinstance(obj, PointerTensor)


def _refuse_deputy(worker: BaseWorker, principal: Principal, oid: int, action: str) -> None:
    """A stored pointer would act on another worker with this worker's (peer) rights: refused on network
    workers, where the requester's own rights there cannot be checked."""
    error = PermissionDeniedError(
        f"object {oid} on worker {worker.id!r} is a pointer to another worker; the worker will not act there "
        "for a client with its own rights (use a pointer to that worker directly)")
    worker.monitor.audit(action, principal, [oid], "refused", str(error))
    raise error


_REF = m.ObjectRef
_OPS_BY_NAME = ALLOWLIST._by_name  # by_name's table, read inline on every command
_PLAIN_TENSOR = torch.Tensor
_set_grad_enabled = torch._C._set_grad_enabled
_EMPTY: frozenset = frozenset()
_DEALER = Kind.DEALER


@register_handler(m.CommandMessage)
def _handle_command(worker: BaseWorker, msg: m.CommandMessage, sender: str) -> Any:
    return _run_command(worker, worker.principal(sender), sender, msg.op, msg.args, msg.kwargs, msg.return_ids,
                        msg.grad_enabled)


def _run_command(worker: BaseWorker, principal: Principal, sender: str, name: Any, wire_args: Any, kwargs: Any,
                 ids: Any, grad_enabled: Any) -> Any:
    """One command (a CommandMessage's fields; deferred commands come here straight from the batch)."""
    op = _OPS_BY_NAME.get(name) if type(name) is str else None
    if op is None:
        op = ALLOWLIST.by_name(name)  # raises the refusal
    if not isinstance(wire_args, (list, tuple)) or type(kwargs) is not dict:
        raise SerializationError("command args must be a tuple and kwargs a map")
    monitor, purpose = worker.monitor, _purpose_of(op)
    found: dict[int, Entry] = {}
    wire_kwargs = kwargs
    args = monitor.resolve_list(principal, wire_args, purpose, found)
    if kwargs:
        kwargs = monitor.resolve_args(principal, kwargs, purpose, found)
        for k in kwargs:
            if type(k) is not str:
                raise SerializationError("command keyword names must be strings")
    entries = list(found.values())
    # one pass over the inputs decides which of the checks below apply (most commands: none)
    any_protected = any_dp = any_wrapped = any_restricted = False
    for e in entries:
        if e.protected:
            any_protected = True
        if e.meta and e.meta.get("dp_only"):
            any_dp = True
        if type(e.obj) is not _PLAIN_TENSOR:
            any_wrapped = True
        if e.reveal_to is not None or e.kind == _DEALER:
            any_restricted = True
    if any_wrapped and principal.isolated:
        for oid, e in found.items():
            if _is_stored_pointer(e.obj):
                _refuse_deputy(worker, principal, oid, "compute")
    if any_dp:
        try:
            owner_guard.check_dp_only(op.name, entries, worker.id)
        except PermissionDeniedError as e:
            monitor.audit(purpose.value, principal, list(found), "refused", f"{op.name}: {e}")
            raise
    if entries and op.name in owner_guard.REVIEWED_INPUTS and _tracking(worker):
        _governance_release(worker, list(found), entries, principal.user, op.name)
    protected = owner_guard.protected_storages(entries) if any_protected else _EMPTY
    secret = False  # an input the requester may not learn: no value-dependent shape, failure or error text
    oblivious_guard = None
    dealer = _EMPTY
    if any_restricted:
        if any(e.kind == _DEALER for e in entries):
            monitor.bind_dealt(principal, entries)
            dealer = owner_guard.dealer_storages(entries)  # never written; results aliasing them are copies
        hidden = [oid for oid, e in found.items() if monitor.hides(principal, e)]
        if hidden:
            secret = True
            if not op.name.startswith(PROTOCOL_PREFIXES):  # plans and torch ops: requester-chosen ops
                oblivious_guard = oblivious.guard(op.name, [found[oid].obj for oid in hidden])
            else:  # protocol steps are veil's, trusted not to branch on shares: only not as public parameters
                why = oblivious.protocol_refusal(op.name, op.func, wire_args, wire_kwargs, set(hidden))
                if why is not None:
                    monitor.audit(purpose.value, principal, list(found), "refused", why)
                    raise PermissionDeniedError(why)
        # requester-chosen ops (torch ops, plans) may not write a restricted value into a more revealable input
        # (laundering) nor write dealt material; protocol steps are veil's own and read their inputs
        chosen = not op.name.startswith(PROTOCOL_PREFIXES)
        weaker = owner_guard.weaker_storages(entries) if len(entries) > 1 and chosen else _EMPTY
        if weaker:
            protected = protected | weaker
        if dealer and chosen:
            protected = protected | dealer  # worker functions (plans) get copies of them
    if protected:
        if op.worker_function:
            args = owner_guard.copy_protected_args(args, protected)
            kwargs = owner_guard.copy_protected_args(kwargs, protected)
        else:
            owner_guard.check_writes(op.name, op.func, args, kwargs, protected, worker.id)
    grad = bool(grad_enabled)
    grad_before = torch.is_grad_enabled()
    try:
        if grad is not grad_before:
            _set_grad_enabled(grad)
        if op.worker_function:  # it may store outputs itself (monitor.store_output): tell it who asked
            with monitor.running(principal, entries, op.name), oblivious_guard or _NO_GUARD:
                result = op.func(worker, *args, **kwargs)
        elif oblivious_guard is not None:  # secret inputs: no value-dependent shape, failure or Python value
            with oblivious_guard, owner_guard.refuse_writes(op.name, protected, worker.id):
                result = op.func(*args, **kwargs)
        elif protected:  # schema-checked writes for torch ops (worker functions got copies)
            with owner_guard.refuse_writes(op.name, protected, worker.id):
                result = op.func(*args, **kwargs)
        else:
            result = op.func(*args, **kwargs)
    except Exception as e:  # errors on owner data carry no values
        if isinstance(e, PermissionDeniedError) and oblivious_guard is not None:
            monitor.audit(purpose.value, principal, list(found), "refused", str(e))
        if purpose is Purpose.DP_RELEASE:
            monitor.audit("dp_release", principal, list(found), "refused",
                          f"{op.name}: {e}" if isinstance(e, VeilError) else f"{op.name}: {type(e).__name__}")
        raise owner_guard.client_error(op.name, e, protected or ({0} if secret else _reviewed_inputs(worker, entries)),
                                       worker.id) from e
    finally:
        if grad is not grad_before:
            _set_grad_enabled(grad_before)
    if purpose is Purpose.DP_RELEASE:
        monitor.audit("dp_release", principal, list(found), "allowed", op.name)
    if protected and not op.worker_function:
        result = owner_guard.copy_aliases(result, protected)
    elif dealer:  # a worker function that returned dealt material itself: a copy, not a writable alias
        result = owner_guard.copy_aliases(result, dealer)
    # Governance (#16): once a dataset is under review, results also carry the op graph the owner
    # reviews (entry.meta), and objects the op wrote are re-stamped; the monitor's Entry.provenance
    # (the set of source datasets) is recorded by monitor.store either way.
    lineage = None
    # a reviewed input's result was released with the approval of its inputs (a masked value): no lineage
    if entries and op.name not in owner_guard.REVIEWED_INPUTS and _tracking(worker):
        from veil.governance import provenance

        inputs = {id(e.obj): oid for oid, e in found.items()}
        lineage = provenance.lineage_of(op.name, tuple(args), inputs, found, kwargs)
        provenance.taint_writes(worker, lineage, op, tuple(args), kwargs, found, sender)
    if op.shapes == NO_RESULT or ids == []:
        return _OK
    if ids is None:
        inputs = {id(e.obj): oid for oid, e in found.items()}
        return m.ResultReply(_describe_results(worker, principal, result, inputs, entries, op.name, lineage))
    results = [result] if type(result) is _PLAIN_TENSOR else leaves(result)
    if type(ids) is not list or len(ids) != len(results):
        raise RemoteExecutionError(
            f"{op.name} returned {len(results)} tensors but the caller expected {len(ids) if isinstance(ids, list) else ids!r}"
        )
    store = monitor.store
    dealt = [] if op.name in DEALER_OUTPUTS else None
    for oid, tensor in zip(ids, results):
        if oid != 0:  # 0: the result is one of the inputs (in-place op), already stored
            stored = store(principal, oid, tensor, sources=entries, op_name=op.name)
            if lineage is not None:  # governance (#16)
                provenance.stamp(stored, lineage, tensor)
            if dealt is not None:
                dealt.append(stored)
    if dealt:  # a dealer's material: which fields are uniform, which belong together
        monitor.group_dealt(principal, op.name, args, dealt)
    return _OK


_OK = m.OkReply()
_NO_GUARD = contextlib.nullcontext()


def _describe_results(worker: BaseWorker, principal: Principal, result: Any, inputs: dict[int, int],
                      entries: list, op_name: str, lineage: Any = None) -> Any:
    from veil.ids import new_id
    from veil.messaging.serde import DTYPE_NAMES

    def describe(t: torch.Tensor) -> m.Descriptor:
        oid = inputs.get(id(t))
        if oid is None:
            oid = new_id()
            stored = worker.monitor.store(principal, oid, t, sources=entries, op_name=op_name)
            if lineage is not None:  # governance (#16)
                from veil.governance.provenance import stamp

                stamp(stored, lineage, t)
        return m.Descriptor(oid, tuple(t.shape), DTYPE_NAMES[t.dtype], bool(t.requires_grad))

    out = map_structure(result, describe)
    for leaf in leaves(out, object):
        if not isinstance(leaf, (m.Descriptor, type(None))) and not isinstance(leaf, (tuple, list, dict)):
            raise RemoteExecutionError("remote operations may only return tensors (use .get() to read values)")
    return out


@register_handler(m.ObjectMessage)
def _handle_objects(worker: BaseWorker, msg: m.ObjectMessage, sender: str) -> Any:
    if not isinstance(msg.objects, list) or not all(type(o) is m.StoredObject for o in msg.objects):
        raise SerializationError("ObjectMessage.objects must be a list of stored objects")
    for so in msg.objects:
        if not isinstance(so.obj, tuple(STORABLE_TYPES)):
            raise SerializationError(f"cannot store an object of type {type(so.obj).__name__}")
        validate = STORE_VALIDATORS.get(type(so.obj))
        if validate is not None:
            validate(so.obj)
    worker.monitor.store_objects(worker.principal(sender), msg.objects)
    return m.OkReply()


def _claimed_user(msg: Any, sender: str) -> str:
    return msg.user if isinstance(msg.user, str) and msg.user else sender


@register_handler(m.GetObjectsMessage)
def _handle_get(worker: BaseWorker, msg: m.GetObjectsMessage, sender: str) -> Any:
    from veil.tensors.pointer import PointerTensor, PointerWire

    if not isinstance(msg.ids, list):
        raise SerializationError("GetObjectsMessage.ids must be a list")
    principal = worker.principal(sender).acting_as(_claimed_user(msg, sender))
    entries = [worker.monitor.resolve(principal, oid, Purpose.REVEAL) for oid in msg.ids]
    _governance_release(worker, msg.ids, entries, principal.user, "get")
    out = []
    for oid, entry in zip(msg.ids, entries):
        obj = entry.obj
        taken = msg.delete and not entry.protected
        if isinstance(obj, PointerTensor):
            # the requester takes over the remote object only when we let go of it
            out.append(PointerWire.of(obj, garbage_collect_data=taken and obj.garbage_collect_data))
            if taken:
                obj.garbage_collect_data = False
        else:
            out.append(obj)
        if taken:
            worker.monitor.discard(principal, oid)
    return m.ObjectsReply(out)


def _reviewed_inputs(worker: BaseWorker, entries: list) -> set:
    """Non-empty when an input derives from owner data while a ``review`` policy is in force: an error
    text could quote its values, a release the owner has not approved (so it becomes value-free)."""
    if any(e.provenance for e in entries) and _tracking(worker):
        return {0}
    return set()


def _tracking(worker: BaseWorker) -> bool:
    """Governance (#16): whether the worker records provenance (bound on first use: import cycle)."""
    global _tracking
    from veil.governance.state import tracking

    _tracking = tracking
    return tracking(worker)


def _governance_release(worker: BaseWorker, ids: list, entries: list, user: str, purpose: str) -> None:
    """Governance (#16): objects derived from ``review`` data leave only with the owner's approval."""
    from veil.governance.release import enforce_all

    current = getattr(worker, "current_session", None)
    session = current() if current is not None else None
    enforce_all(worker, ids, entries, user, session.id if session is not None else "-", purpose)


@register_handler(m.DeleteMessage)
def _handle_delete(worker: BaseWorker, msg: m.DeleteMessage, sender: str) -> Any:
    if not isinstance(msg.ids, list):
        raise SerializationError("DeleteMessage.ids must be a list")
    principal = worker.principal(sender)
    for oid in msg.ids:
        worker.monitor.discard(principal, oid)
    return m.OkReply()


def _describe_entry(oid: int, entry: Entry) -> m.Descriptor:
    from veil.messaging.serde import DTYPE_NAMES

    t = entry.obj
    shape = tuple(t.shape)
    if entry.meta.get("hide_count") and shape:
        shape = (0, *shape[1:])  # record count kept private (enable_dp(hide_count=True)): reported as 0
    return m.Descriptor(oid, shape, DTYPE_NAMES[t.dtype], bool(t.requires_grad), entry.tags, entry.description)


@register_handler(m.SearchMessage)
def _handle_search(worker: BaseWorker, msg: m.SearchMessage, sender: str) -> Any:
    if not isinstance(msg.query, list) or not all(isinstance(q, str) for q in msg.query):
        raise SerializationError("search query must be a list of strings")
    found = []
    for oid, entry in worker.monitor.owned_entries(worker.principal(sender)):
        # PySyft 0.2: each term matches a tag, the object's id, or a substring of its description
        if isinstance(entry.obj, torch.Tensor) and all(
            q in entry.tags or q == str(oid) or (q and q in (entry.description or "")) for q in msg.query
        ):
            found.append(_describe_entry(oid, entry))
    return m.DescriptorsReply(found)


@register_handler(m.ListObjectsMessage)
def _handle_list(worker: BaseWorker, msg: m.ListObjectsMessage, sender: str) -> Any:
    # Only the sender's own objects: listing others' ids would hand out capabilities.
    principal = worker.principal(sender)
    mine = [_describe_entry(oid, e) for oid, e in worker.monitor.owned_entries(principal)
            if e.created_by == principal.session]
    return m.DescriptorsReply(mine)


@register_handler(m.MoveMessage)
def _handle_move(worker: BaseWorker, msg: m.MoveMessage, sender: str) -> Any:
    if not isinstance(msg.ids, list) or not isinstance(msg.new_ids, list) or len(msg.ids) != len(msg.new_ids):
        raise SerializationError("MoveMessage needs lists of ids and new ids of equal length")
    principal = worker.principal(sender).acting_as(_claimed_user(msg, sender))
    detail = f"to {msg.destination}" if isinstance(msg.destination, str) else ""
    entries = [worker.monitor.resolve(principal, oid, Purpose.MOVE, detail) for oid in msg.ids]
    for oid, entry in zip(msg.ids, entries):
        if not isinstance(entry.obj, tuple(STORABLE_TYPES)):
            raise SerializationError(f"object {oid} cannot be moved")
    _governance_release(worker, msg.ids, entries, principal.user, "move")
    # Refusals first: whether the destination is reachable must not matter to a refused move.
    destination = worker.resolve_worker(msg.destination)
    # capabilities travel (reveal_to, share kind, DP-only, provenance): moving never widens who may reveal it
    objects = [worker.monitor.outgoing(principal, new, e) for new, e in zip(msg.new_ids, entries)]
    worker.send_msg(m.ObjectMessage(objects), destination)
    for oid in msg.ids:
        worker.monitor.discard(principal, oid)  # owner-protected data is copied, never taken
    return m.OkReply()


@register_handler(m.RemoteGetMessage)
def _handle_remote_get(worker: BaseWorker, msg: m.RemoteGetMessage, sender: str) -> Any:
    from veil.tensors.pointer import PointerTensor

    principal = worker.principal(sender)
    entry = worker.monitor.resolve(principal, msg.id, Purpose.HAND_OFF)
    if not isinstance(entry.obj, PointerTensor):
        raise ObjectNotFoundError(f"object {msg.id} on worker {worker.id!r} is not a pointer; nothing to remote_get")
    if principal.isolated:
        _refuse_deputy(worker, principal, msg.id, "remote_get")
    worker.monitor.replace(principal, msg.id, entry.obj.get())
    return m.OkReply()
