"""The worker's built-in handlers of requests that store objects: commands (their results) and ObjectMessage.

Each takes ``(worker, message, sender)`` and reaches stored objects only through the worker's reference monitor.
Requests about objects already stored (get, delete, search, list, move, remote_get): ``stored_object_handlers.py``.
``_run_command`` is one command's body: the batch runner (``BaseWorker._run_prelude``) calls it for deferred commands.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from veil.exceptions import PermissionDeniedError, RemoteExecutionError, SerializationError, VeilError
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST, NO_RESULT, register_worker_function
from veil.tensors.tree import leaves, map_structure
from veil.workers import (oblivious, output_bounds, output_pieces, owner_guard, review_gate, storage_overrun,
                          value_shapes)
from veil.workers.quiet_warnings import dropping_warnings
from veil.workers.accounts import END_ACCOUNT
from veil.workers.base import STORABLE_TYPES, STORE_VALIDATORS, BaseWorker, register_handler
from veil.workers.monitor import DEALER_OUTPUTS, PROTOCOL_PREFIXES, Principal, Purpose
from veil.workers.store import Entry, Kind


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
    return _run_resolved(worker, principal, sender, op, purpose, args, kwargs, found, ids, grad_enabled, wire_args,
                         wire_kwargs)


@dropping_warnings  # (the requester's op never reaches the owner's process through a warning)
def _run_resolved(worker: BaseWorker, principal: Principal, sender: str, op: Any, purpose: Purpose, args: list,
                  kwargs: dict, found: dict, ids: Any, grad_enabled: Any, wire_args: Any, wire_kwargs: Any) -> Any:
    """The rest of :func:`_run_command` once the monitor resolved the command's objects (``found``: id ->
    entry, in argument order; ``args``/``kwargs`` with the objects in place): the owner's checks, the
    op, the results stored through the monitor. ``wire_args``/``wire_kwargs`` (the command as sent) are
    read only for protocol steps (``PROTOCOL_PREFIXES``), which may be None otherwise (skeleton uses)."""
    monitor = worker.monitor
    entries = list(found.values())
    name = op.name
    # The usual command, a torch op computing on plain client tensors (none protected, revealable only
    # to some, dealt, or carrying owner metadata such as DP-only) on a worker that records no
    # provenance, skips the owner's checks: none of them applies (no write or oblivious guard, no
    # audit row, no lineage). Anything else takes them.
    plain = purpose is _COMPUTE and not op.worker_function
    if plain:
        for e in entries:
            if (e.protected or e.meta or type(e.obj) is not _PLAIN_TENSOR or e.reveal_to is not None
                    or e.kind == _DEALER):
                plain = False
                break
        else:
            plain = not _tracking(worker)
    protected = dealer = _EMPTY
    secret = False  # an input the requester may not learn: no value-dependent shape, failure or error text
    oblivious_guard = None
    written = None  # storages a torch op on owner-derived data writes (any argument: provenance taints them)
    arguments = args, kwargs  # as resolved: worker functions get copies of protected ones below
    if op.worker_function:
        output_bounds.hold_copies(0)  # (set by _owner_checks when it copies owner data for this one)
    reviewed = name in owner_guard.REVIEWED_INPUTS  # (its inputs' approvals are used up before it runs)
    if not plain:
        if (not op.worker_function and not reviewed and _tracking(worker)
                and any(e.provenance or e.protected for e in entries)):
            written = set()
        if reviewed:  # refusals whatever the values, before _owner_checks uses the approval up
            _check_return_ids(monitor, principal, name, ids, one=True)
            owner_guard.check_reviewed_room(monitor, principal, name, args, kwargs)
        protected, secret, oblivious_guard, dealer, args, kwargs = _owner_checks(
            worker, principal, op, purpose, args, kwargs, found, entries, wire_args, wire_kwargs)
        if written is not None or value_shapes.followed(name):  # reviewed inputs: no value-sized result, Python
            oblivious_guard = value_shapes.guard(  # value or free failure bit (value_shapes; beside a secret guard)
                worker, principal.user, name, found, arguments, (args, kwargs), oblivious_guard)
    if plain or not reviewed:  # (a reviewed step's were checked above, before its approval was used)
        _check_return_ids(monitor, principal, name, ids)
    if output_pieces.counted(name):  # (a tensor per piece or list entry: counted before it runs)
        pieces = output_pieces.check_pieces(name, args, kwargs, ids)
        if op.worker_function:  # (a torch op's are charged with its sizing below)
            output_pieces.check_piece_room(monitor, principal, name, pieces)
    if (monitor.max_session_bytes is not None or name in output_bounds.GRAPH_SIZED) and not op.worker_function:
        try:
            output_bounds.check(monitor, principal, name, op.func, args, kwargs, grad=bool(grad_enabled))
        except output_bounds.ArgumentError as e:  # the op's own error, as the except below would give it
            raise owner_guard.client_error(name, e.cause, protected or (
                {0} if secret else _reviewed_inputs(worker, entries)), worker.id) from None
    elif monitor.max_session_bytes is not None and op.worker_function and name not in output_bounds.SIZED_PER_OP:
        output_bounds.check_view_room(monitor, principal, name, args, kwargs)
    grad = bool(grad_enabled)
    grad_before = _is_grad_enabled()
    # under a quota, what a tracked op's graph keeps beside its inputs and results is charged to it
    saves = output_bounds.GraphSaves() if (grad and monitor.max_session_bytes is not None and principal.isolated
                                           and (not op.worker_function or name in output_bounds.KEEPS_GRAPH)) \
        else None
    graph_hooks = saves.hooks() if saves is not None else _NO_GUARD
    try:
        if grad is not grad_before:
            _set_grad_enabled(grad)
        if op.worker_function:  # it may store outputs itself (monitor.store_output): tell it who asked
            running = monitor.running(principal, entries, name)
            try:
                with running, oblivious_guard or _NO_GUARD, graph_hooks:
                    result = op.func(worker, *args, **kwargs)
            finally:
                output_bounds.hold_copies(0)
        elif oblivious_guard is not None:  # secret inputs: no value-dependent shape, failure or Python value
            with oblivious_guard, owner_guard.refuse_writes(name, protected, worker.id, written), graph_hooks:
                result = op.func(*args, **kwargs)
        elif protected or written is not None:  # schema-checked writes for torch ops (worker functions got copies)
            with owner_guard.refuse_writes(name, protected, worker.id, written), graph_hooks:
                result = op.func(*args, **kwargs)
        elif saves is not None:
            with graph_hooks:
                result = op.func(*args, **kwargs)
        else:
            result = op.func(*args, **kwargs)
    except Exception as e:  # errors on owner data carry no values
        if found:  # (a failed out= resize: torch kept the new shape of a storage that could not grow)
            storage_overrun.drop_overruns(monitor, principal, found)
        if oblivious_guard is not None:  # refusals audited; a failure on reviewed values counted (value_shapes)
            value_shapes.failed(worker, principal, purpose.value, oblivious_guard, list(found), e)
        if purpose is _DP_RELEASE:
            monitor.audit("dp_release", principal, list(found), "refused",
                          f"{name}: {e}" if isinstance(e, VeilError) else f"{name}: {type(e).__name__}")
        if written or (op.worker_function and entries and name not in owner_guard.REVIEWED_INPUTS
                       and _tracking(worker)):
            # what it wrote before failing derives from its inputs all the same (a worker function, such as a
            # plan cut at an op or by the deadline, may have written any of them: tainted as on success)
            _record_lineage(worker, op, arguments, args, kwargs, found, sender, written, principal)
        raise owner_guard.client_error(name, e, protected or ({0} if secret else _reviewed_inputs(worker, entries)),
                                       worker.id) from e
    finally:
        if grad is not grad_before:
            _set_grad_enabled(grad_before)
        if monitor.max_session_bytes is not None and found and principal.isolated:
            monitor.charge_growth(principal, found)  # inputs it resized in place (out=, a plan's state), failed too
    lineage = None
    # a reviewed input's result was released with the approval of its inputs (a masked value): no lineage,
    # and no sources (the monitor would otherwise give it its inputs' and ask for a second approval)
    if not plain:  # (a plain command: a compute purpose, no guarded input, no provenance recorded)
        if purpose is _DP_RELEASE:
            monitor.audit("dp_release", principal, list(found), "allowed", name)
        if dealer:
            monitor.spend_dealt(entries)
        if protected and not op.worker_function:
            result = owner_guard.copy_aliases(result, protected)
        elif dealer:  # a worker function that returned dealt material itself: a copy, not a writable alias
            result = owner_guard.copy_aliases(result, dealer)
        # Governance (#16): once a dataset is under review, results also carry the op graph the owner
        # reviews (entry.meta), and objects the op wrote in place gain its sources; the monitor's
        # Entry.provenance (the one set of source datasets) is recorded by monitor.store either way.
        if entries and not reviewed and _tracking(worker):
            lineage = _record_lineage(worker, op, arguments, args, kwargs, found, sender, written, principal)
            if op.worker_function and running.outputs:  # what it stored itself and gave no op graph: the command's
                from veil.governance.provenance import stamp_unrecorded

                stamp_unrecorded(running.outputs, lineage)
    # what its graph saved: its first new result carries it (none, or a plan: charged while the graph holds it)
    extra = 0 if saves is None else saves.settle(entries, args, kwargs, result, [] if op.worker_function or
                                                 op.shapes == NO_RESULT else ids, (monitor, principal))
    if op.shapes == NO_RESULT or ids == []:
        return _OK
    if ids is None:
        inputs = {id(e.obj): oid for oid, e in found.items()}
        return m.ResultReply(_describe_results(worker, principal, result, inputs, entries, name, lineage, reviewed,
                                               extra))
    results = [result] if type(result) is _PLAIN_TENSOR else leaves(result)
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in results):
        # a meta tensor has no data; a step's shape-inference branch given one operand on meta must never
        # hand back another's uninitialized memory (red team): none is stored
        raise RemoteExecutionError(f"{name} returned a meta tensor (shapes only, no data); nothing was stored")
    if type(ids) is not list or len(ids) != len(results):
        raise RemoteExecutionError(
            f"{name} returned {len(results)} tensors but the caller expected {len(ids) if isinstance(ids, list) else ids!r}"
        )
    store = monitor.store
    dealt = [] if name in DEALER_OUTPUTS else None
    graph = _graph_nbytes(lineage)
    for oid, tensor in zip(ids, results):
        if oid != 0:  # 0: the result is one of the inputs (in-place op), already stored
            stored = store(principal, oid, tensor, sources=entries, op_name=name, extra_nbytes=extra + graph)
            extra = 0
            if lineage is not None:  # governance (#16)
                from veil.governance.provenance import stamp

                stamp(stored, lineage, tensor)
            elif reviewed:
                stored.provenance = frozenset()
            if dealt is not None:
                dealt.append(stored)
    if dealt:  # a dealer's material: which fields are uniform, which belong together
        monitor.group_dealt(principal, op.name, args, dealt)
    return _OK


def _graph_nbytes(lineage: Any) -> int:
    """What each result's op graph holds (governance, #16), charged with it (a plan's listing: ~75 KB)."""
    if lineage is None:
        return 0
    from veil.governance.provenance import graph_nbytes

    return graph_nbytes(lineage)


def _record_lineage(worker: BaseWorker, op: Any, arguments: tuple, args: Any, kwargs: dict, found: dict,
                    sender: str, written: set | None, principal: Principal) -> Any:
    """Governance (#16): the command's lineage (None: nothing derives from owner data), after tainting what it
    wrote (the requester is charged what their op graphs grew by). ``arguments``: (args, kwargs) as resolved,
    before worker functions got copies of protected ones: the op line names the stored objects where they stand."""
    from veil.governance import provenance

    inputs = {id(e.obj): oid for oid, e in found.items()}
    lineage = provenance.lineage_of(op.name, tuple(arguments[0]), inputs, found, arguments[1])
    grown = provenance.taint_writes(worker, lineage, op, tuple(args), kwargs, found, sender, written)
    if grown and principal.isolated:
        worker.monitor.charge_growth(principal, grown)
    return lineage


def _check_return_ids(monitor: Any, principal: Principal, name: str, ids: Any, one: bool = False) -> None:
    """Refuses return ids that are malformed or taken, before the op runs: an in-place op must not write, then
    have its results refused, and a reviewed step must not use its approval up, then be refused for them.
    ``one``: a reviewed step (its one result, the masked value, is stored: ``[]`` would drop it, two ids are
    one too many; None stores it under a new id)."""
    if ids is None:
        return
    if type(ids) is not list:
        raise RemoteExecutionError(f"{name}: return ids must be a list of object ids, got {type(ids).__name__}")
    if one and len(ids) != 1:
        raise RemoteExecutionError(f"{name} returns one tensor, to be stored: give it one return id, not {len(ids)}")
    if ids:
        monitor.check_free(principal, ids)
        if len(ids) > 1 and owner_guard.writes_first_argument(name):  # an in-place op returns its input alone
            raise RemoteExecutionError(f"{name} returns one tensor but the caller expected {len(ids)}")


def _owner_checks(worker: BaseWorker, principal: Principal, op: Any, purpose: Purpose, args: list, kwargs: dict,
                  found: dict, entries: list, wire_args: Any, wire_kwargs: Any) -> tuple:
    """The owner's checks of :func:`_run_resolved` before the op runs (deputies, DP-only, review,
    write guards, secret inputs, dealt material): ``(protected, secret, oblivious_guard, dealer, args,
    kwargs)``; refusals are audited and raised here."""
    monitor = worker.monitor
    # one pass over the inputs decides which of the checks below apply
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
    if any_dp or any_protected and purpose is _DP_RELEASE:
        try:
            owner_guard.check_dp_only(op.name, entries, worker.id)
            if purpose is _DP_RELEASE:
                owner_guard.check_dp_data_args(op.name, wire_args, wire_kwargs, found, worker.id)
        except PermissionDeniedError as e:
            monitor.audit(purpose.value, principal, list(found), "refused", f"{op.name}: {e}")
            raise
    if entries and op.name in owner_guard.REVIEWED_INPUTS and _tracking(worker):
        with monitor.running(principal, entries, op.name):  # (refused whatever the values: the approval stands;
            owner_guard.run_value_free_checks(op.name, worker, args, kwargs, entries)  # it checks who asks)
        # used up before the step runs: after it, a use-up that a closed connection, the deadline or a second
        # session's concurrent step got in the way of left the approval for another try, and the step's
        # success or failure (a range refusal) was a free bit of the approved values (red team:
        # test_redteam_session63.py)
        review_gate.release(worker, list(found), entries, principal.user, op.name)
    protected = owner_guard.protected_storages(entries) if any_protected else _EMPTY
    secret = False
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
                # (another worker function's parameters are public but those it names: it reads them in Python)
                why = oblivious.worker_function_refusal(op, wire_args, wire_kwargs, set(hidden)) \
                    if op.worker_function else None
                if why is not None:
                    monitor.audit(purpose.value, principal, list(found), "refused", why)
                    raise PermissionDeniedError(why)
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
            # A DP release (veil's own, reading its data argument only, where check_dp_data_args allows it)
            # gets the data itself: a copy before its parameters are checked took time in proportion to the
            # data, a free oracle for a hidden record count on every refused query.
            if op.name not in owner_guard.DP_DATA_ARGS:
                # the copies are owner data held for the requester while it runs: charged to its quota first
                # (uncharged, a session under a 1 MiB quota had a dataset-sized copy made per request)
                copied, made = owner_guard.protected_copy_bytes((args, kwargs), protected), []
                if copied and monitor.max_session_bytes is not None and principal.isolated:
                    monitor.check_room(principal, copied, op.name)
                else:
                    copied = 0
                memo: dict = {}  # (each distinct tensor copied once, however many times args and kwargs name it)
                args = owner_guard.copy_protected_args(args, protected, made, memo)
                kwargs = owner_guard.copy_protected_args(kwargs, protected, made, memo)
                output_bounds.hold_copies(copied, made)  # (a plan step need not copy them again: step_undo)
        else:
            owner_guard.check_writes(op.name, op.func, args, kwargs, protected, worker.id)
    return protected, secret, oblivious_guard, dealer, args, kwargs


def run_use(worker: BaseWorker, principal: Principal, sender: str, skeleton: Any, ids: list, return_ids: list) -> Any:
    """A use of a prepared skeleton (:func:`~veil.workers.skeletons.prepare`: its allowlisted torch op
    and id order, decided once per definition): ``_run_command`` of the CommandMessage it stands for,
    without building it or an ObjectRef per id. The purpose is decided per use as for a command; the
    reference monitor resolves and checks every id of this use (``resolve_ids``: the same scoping,
    refusals and audit rows, in the same order, as for the expanded arguments); the rest is
    :func:`_run_resolved`. ``ids``/``return_ids``: lists, the ids ints (checked by the caller)."""
    op, order = skeleton.prepared
    purpose = _DP_RELEASE if op.name in owner_guard.DP_RELEASES else _COMPUTE  # _purpose_of of a torch op
    found: dict = {}
    worker.monitor.resolve_ids(principal, ids if order is None else [ids[s] for s in order], purpose, found)
    args = list(skeleton.args)
    for at, slot in zip(skeleton.positions, skeleton.slots):
        args[at] = found[ids[slot]].obj
    kwargs = skeleton.kwargs
    return _run_resolved(worker, principal, sender, op, purpose, args, dict(kwargs) if kwargs else kwargs, found,
                         return_ids, skeleton.grad, None, None)


_OK = m.OkReply()
_NO_GUARD = contextlib.nullcontext()
_is_grad_enabled = torch.is_grad_enabled
_COMPUTE, _DP_RELEASE = Purpose.COMPUTE, Purpose.DP_RELEASE


def _describe_results(worker: BaseWorker, principal: Principal, result: Any, inputs: dict[int, int],
                      entries: list, op_name: str, lineage: Any = None, reviewed: bool = False,
                      extra_nbytes: int = 0) -> Any:
    from veil.ids import new_id
    from veil.messaging.serde import DTYPE_NAMES

    graph = _graph_nbytes(lineage)

    def describe(t: torch.Tensor) -> m.Descriptor:
        nonlocal extra_nbytes
        oid = inputs.get(id(t))
        if oid is None:
            oid = new_id()
            stored = worker.monitor.store(principal, oid, t, sources=entries, op_name=op_name,
                                          extra_nbytes=extra_nbytes + graph)
            extra_nbytes = 0  # (the first result carries what the graph keeps)
            if lineage is not None:  # governance (#16)
                from veil.governance.provenance import stamp

                stamp(stored, lineage, t)
            elif reviewed:  # released with its inputs' approval (see _run_command)
                stored.provenance = frozenset()
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
    principal = worker.principal(sender)

    def record(stored: list) -> None:  # governance (#16); in the all-or-none scope: a failure keeps nothing stored
        if _tracking(worker) and any(caps["provenance"] for _, caps in stored):
            from veil.governance import received

            received.record_received(worker, principal, stored)

    worker.monitor.store_objects(principal, msg.objects, record)
    return m.OkReply()


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


def _end_account(worker: BaseWorker) -> None:
    """A peer's requester session ended there: free what the peer handed over for it that nobody claimed
    (veil/workers/accounts.py). The account is the one the request's sender names: a peer ends only its own."""
    worker.monitor.end_account(worker.principal(worker.requester()))


register_worker_function(END_ACCOUNT, _end_account, shapes=NO_RESULT)
