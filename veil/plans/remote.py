"""Plans on workers: storage, validation on arrival, and the worker functions that run them.

Worker functions (allowlisted, run with the worker as first argument):
- ``veil.plan.run(plan, inputs, state)``: one execution.
- ``veil.plan.fit(plan, data, target, state, batch_size, epochs, shuffle, drop_last, extra)``:
  whole local epochs in one message; returns the per-batch losses.
- ``veil.plan.load_state(state, values)``: overwrite the state in place (FedAvg rounds).
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import torch

from veil.compat.encoding_guards import ResultOverQuotaError, check_room
from veil.exceptions import OperationNotAllowedError, RemoteExecutionError
from veil.ids import new_id
from veil.messaging.allowlist import ALLOWLIST, register_worker_function
from veil.messaging.messages import GetObjectsMessage, ObjectMessage, ObjectRef, StoredObject
from veil.plans import aliasing, interpreter, step_undo
from veil.plans.interpreter import PlanArgumentError
from veil.plans.ops import PlanSpec
from veil.tensors import remote_ops
from veil.tensors.handle import RemoteHandle, fetch_all
from veil.tensors.pointer import PointerTensor
from veil.workers import base, cancellation, grad_cycles, output_bounds
from veil.workers.monitor import register_size_estimator
from veil.workers.quiet_warnings import DROPPED
from veil.workers.quota import QuotaExceededError


def _compiled(spec: PlanSpec) -> interpreter.CompiledPlan:
    """The compiled plan, checked once: a stored plan when it arrives, a plan sent inline in a command's
    arguments (never stored) before its first run, by the same checks."""
    compiled = spec.__dict__.get("_compiled")
    if compiled is None:
        compiled = interpreter.compile_plan(spec)  # raises OperationNotAllowedError / SerializationError
        _check_constants(spec)
        spec.__dict__["_compiled"] = compiled
    return compiled


def _validate(spec: PlanSpec) -> None:
    _compiled(spec)  # before storing


def _check_constants(spec: PlanSpec) -> None:
    # A constant is kept with the stored plan and read by every run: written in place on a run over the owner's
    # data, it would hold the owner's values, unmarked, for the next run on the scientist's own tensor.
    # The same for a result that may be a constant or a view of one: an in-place write into the stored result
    # (owner data added to it) would reach the constant.
    groups = spec.__dict__["_alias_groups"] = aliasing.alias_groups(spec)  # (step_undo reads them too)
    op = aliasing.shared_write(spec, groups, state=False)
    if op is not None:
        raise OperationNotAllowedError(f"plan {spec.name!r} writes in place into one of its constants ({op}, or "
                                       f"a view of one); create the tensor in the plan or pass it as state")
    if aliasing.reads_constant_grad(spec, groups):
        raise OperationNotAllowedError(f"plan {spec.name!r} reads the gradient of one of its constants (or of a view "
                                       f"of one), which one run leaves for the next; pass the tensor as state")
    if aliasing.returns_constant(spec, groups):
        raise OperationNotAllowedError(f"plan {spec.name!r} returns one of its constants or a view of one; "
                                       f"return a copy (t.clone())")


base.STORABLE_TYPES.append(PlanSpec)
base.STORE_VALIDATORS[PlanSpec] = _validate


def _plan_nbytes(spec: PlanSpec) -> int:
    """Quota charge of a stored plan: its encoded op list (constants included), twice (the compiled
    form the worker keeps beside it holds the same ops and constants)."""
    from veil.messaging import serde

    return 2 * len(serde.encode_value(spec))


register_size_estimator(PlanSpec, _plan_nbytes)


_HELD = re.compile(r"would hold [0-9.]+ MiB, more than")
#: batches one fit call may run (its losses are kept: 8 bytes each, at most 80 MB)
MAX_FIT_BATCHES = 10_000_000
#: rows a shuffled fit may order (the order of all rows is drawn at once each epoch: 8 bytes a row, 128 MiB,
#: ~2 s without a deadline check; rows of nothing cost no bytes to send)
MAX_SHUFFLED_ROWS = 1 << 24


class _PlanBudget(output_bounds.Budget):
    """A plan's running size check whose refusal is value-free: it reaches the requester as the quota error it
    is (one line, no amount held: with a value-sized op earlier in the plan, that would follow the values),
    not as a ProtectedDataError when the plan reads owner data."""

    def __call__(self, name: str, func: Any, args: Any, kwargs: dict) -> None:
        try:
            super().__call__(name, func, args, kwargs)
        except QuotaExceededError as e:
            error = ResultOverQuotaError("in a plan: " + _HELD.sub("would hold more than", str(e)))
            raise interpreter.Refusal(error) from None

    def reserve(self, nbytes: int) -> None:
        """Holds ``nbytes`` the worker allocates for the run beside its ops (step_undo's copy of what a step may
        write), refused as an op that would not fit is, before they are allocated."""
        if nbytes and self.principal.isolated:
            try:
                self.monitor.check_room(self.principal, self.held + nbytes, "a plan step's copy of what it writes")
            except QuotaExceededError as e:
                raise ResultOverQuotaError("in a plan: " + _HELD.sub("would hold more than", str(e))) from None
        self.held += nbytes


def session_budget(worker: Any) -> Any:
    """With a session quota, a run's ops are sized before they run, against one running total
    (veil/workers/output_bounds.py); None without one."""
    monitor = worker.monitor
    if monitor.max_session_bytes is None:
        return None
    return _PlanBudget(monitor, worker.principal(worker.requester()))


def _quiet_run(compiled: interpreter.CompiledPlan, inputs: list, state: list, budget: Any) -> Any:
    """``interpreter.run`` with its ops' warnings dropped, on this thread only (:mod:`veil.workers.quiet_warnings`):
    a requester's plan never reaches the owner's process through them."""
    with DROPPED:
        return interpreter.run(compiled, inputs, state, budget)


def _cycle_notes(worker: Any, spec: PlanSpec) -> Any:
    """Without a quota, a run's size check only remembers the leaves of its ``create_graph`` backward, for its
    session's end (veil/workers/grad_cycles.py); None when it has none to remember."""
    principal = worker.principal(worker.requester())
    if not principal.isolated:
        return None
    return grad_cycles.plan_notes(principal.namespace, spec.ops, output_bounds.MAX_GRAPH_NODES)


def _undo_slots(tensors: list) -> list:
    """What a step may write and must put back if cut: not the owner data copied for this command (its own
    copies, seen by no one after a failed run: copied once, by the handler, not again by step_undo)."""
    copies = output_bounds.own_copies()
    return [None if id(t) in copies else t for t in tensors] if copies else tensors


def _run(worker: Any, spec: PlanSpec, inputs: list, state: list) -> Any:
    compiled, inputs, state = _compiled(spec), list(inputs), list(state)
    budget = session_budget(worker)
    notes = _cycle_notes(worker, spec) if budget is None else None
    # (a run cut part-way leaves what it writes, state and inputs, as before it, not half-written)
    undo = step_undo.undo_plan(spec) if (len(inputs), len(state)) == (spec.n_inputs, spec.n_state) else None
    return step_undo.run_step(lambda: _quiet_run(compiled, inputs, state, budget if notes is None else notes),
                              _undo_slots([*inputs, *state]), undo, budget)


def _fit(worker: Any, spec: PlanSpec, data: torch.Tensor, target: torch.Tensor, state: list, batch_size: int,
         epochs: int = 1, shuffle: bool = True, drop_last: bool = False, extra: list | None = None,
         max_batches: int | None = None, seed: int | None = None) -> torch.Tensor:
    # (errors in the requester's own arguments, shapes included, say what is wrong, on owner data too)
    if type(batch_size) is not int or batch_size < 1 or type(epochs) is not int or not 0 < epochs <= 10_000:
        raise PlanArgumentError("fit needs a positive integer batch_size and 1..10000 epochs")
    if not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in (data, target)):
        raise PlanArgumentError("fit: data and target must be tensors with rows (at least one dimension)")
    if len(data) != len(target):
        # (the counts are not quoted: one of them may be the owner's)
        raise PlanArgumentError("fit: data and target have different numbers of rows")
    if not isinstance(state, (list, tuple)) or not isinstance(extra, (list, tuple, type(None))):
        raise PlanArgumentError("fit: state and extra must be lists")
    compiled = _compiled(spec)
    sized_shapes: set = set()
    state, extra = list(state), list(extra or [])
    if max_batches is not None and (type(max_batches) is not int or max_batches < 1):
        raise PlanArgumentError("fit: max_batches must be a positive integer")
    gen = torch.Generator().manual_seed(seed if type(seed) is int else secrets.randbits(63))
    n = len(data)
    # Every batch's loss is kept until the end: their count is known before the first batch, so it is bounded
    # (and charged to a quota) up front, one number each, rather than found as a list of tensors grown at
    # ~1 KB a batch by a requester's many tiny batches for as long as the command runs.
    total = epochs * (n // batch_size if drop_last else -(-n // batch_size))
    total = total if max_batches is None else min(total, max_batches)
    if total > MAX_FIT_BATCHES:
        raise OperationNotAllowedError(f"fit would run more than {MAX_FIT_BATCHES:,} batches in one call: use "
                                       f"larger batches, fewer epochs or max_batches")
    if shuffle and n > MAX_SHUFFLED_ROWS:
        raise OperationNotAllowedError(f"fit cannot shuffle more than {MAX_SHUFFLED_ROWS:,} rows (their order is "
                                       f"drawn at once): pass shuffle=False or fit on parts of the data")
    # a step cut part-way (deadline, quota, an op's error) leaves the state and extra inputs (momentum) as the
    # last whole step left them (their copy, held one step at a time, is sized with the step's ops)
    undo = step_undo.undo_plan(spec) if (2 + len(extra), len(state)) == (spec.n_inputs, spec.n_state) else None
    check_room(worker, total + (n if shuffle else 0), 8, "veil.plan.fit")  # the losses and the rows' order
    losses, count = None, 0
    kept = [t for t in [*state, *extra] if isinstance(t, torch.Tensor)]  # (kept from one batch to the next)
    kept_bytes = _storage_bytes(kept)
    if any(t.grad_fn is not None for t in kept):
        raise PlanArgumentError("fit: state and extra tensors must be leaves (not results of ops autograd "
                                "tracks): a graph they carry grows from one batch to the next")
    # a view (no grad) a batch writes with grad on keeps the batch's graph, which detach_ cannot drop from a view:
    # the batches write it through an alias of its memory that autograd does not see as a view (dropped after)
    state, extra = [_unviewed(t) for t in state], [_unviewed(t) for t in extra]
    aliases = [t for t in [*state, *extra] if isinstance(t, torch.Tensor)]
    kept_views = [t for t, a in zip(kept, aliases) if a is not t]
    undo_slots = [None, None, *_undo_slots([*extra, *state])]
    notes = _cycle_notes(worker, spec) if worker.monitor.max_session_bytes is None else None
    for _ in range(epochs):
        if count >= total:  # (max_batches reached: no further epoch starts)
            break
        order = torch.randperm(n, generator=gen) if shuffle else None
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if drop_last and stop - start < batch_size:
                break
            if order is None:
                xb, yb = data[start:stop], target[start:stop]
            else:
                idx = order[start:stop]
                # index_select: the rows of data[idx] without advanced indexing's argument parsing
                xb = data.index_select(0, idx) if type(data) is torch.Tensor else data[idx]
                yb = target.index_select(0, idx) if type(target) is torch.Tensor else target[idx]
            cancellation.checkpoint()  # deadline, disconnect, and other sessions' turn between batches
            # a plan's sizes follow its inputs' shapes: each batch shape is sized once, its state's and extra
            # inputs' shapes included (a plan may grow them in place, by out=, from one batch to the next)
            shapes = (xb.shape, yb.shape, *[t.shape for t in kept])
            sized = None
            if shapes not in sized_shapes:
                if len(sized_shapes) >= 256:  # (shapes changed every batch: sized again, not remembered)
                    sized_shapes.clear()
                sized_shapes.add(shapes)
                sized = session_budget(worker)
                if sized is not None and kept:  # what they grew by in earlier batches stays, uncharged
                    sized.held += max(0, _storage_bytes(kept) - kept_bytes)
            inputs = [xb, yb, *extra]
            # (the batch's rows are left out of the undo: written in place, a view writes the data, which would be
            # copied whole before every batch)
            loss = step_undo.run_step(lambda: _quiet_run(compiled, inputs, state, sized if notes is None else notes),
                                      undo_slots, undo, sized)
            for t in kept_views:  # (written through an alias: what saved it must see it changed, as torch would)
                torch.autograd.graph.increment_version(t)
            if any(t.grad_fn is not None for t in aliases):  # (it would carry every batch's graph, all they saved)
                for t in aliases:
                    if t.grad_fn is not None:
                        t.detach_()  # (a leaf again, as it was: the batch's graph goes; no view is kept)
                raise PlanArgumentError("fit: a batch wrote a state or extra tensor with grad tracking on (an "
                                        "in-place op outside no_grad): each batch's graph would stay with it")
            if sized is not None and kept:  # (and with this batch's growth, the losses must still fit)
                check_room(worker, max(0, _storage_bytes(kept) - kept_bytes) + 8 * total, 1, "veil.plan.fit")
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise RemoteExecutionError(f"fit: plan {spec.name!r} must return its batch loss as one number")
            if losses is None:
                if loss.element_size() > 8:  # (charged at 8 bytes each above: complex losses hold more)
                    check_room(worker, total, loss.element_size(), "veil.plan.fit")
                losses = torch.empty(total, dtype=loss.dtype)
            # copied at once, without its graph: that would keep every batch's saved inputs alive (and no
            # .item(): a loss of values hidden from the requester must not become a Python number)
            losses[count] = loss.detach().reshape(())
            count += 1
            if count >= total:
                break
    return torch.zeros(0) if losses is None else losses[:count]


def _unviewed(t: Any) -> Any:
    """``t``, or for a view without grad an alias of its memory that autograd does not see as a view (a batch's
    graph on it goes with it; ``detach_`` cannot take one from a view)."""
    if not isinstance(t, torch.Tensor) or t._base is None or t.requires_grad or t.layout is not torch.strided:
        return t
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(),
                                                               t.stride())


def _storage_bytes(tensors: list) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if t.layout is torch.strided}  # (a sparse tensor has no one storage; out= cannot resize it)
    return sum(storages.values())


def _load_state(worker: Any, state: list, values: list) -> None:
    """Copies ``values`` into the plan's ``state`` tensors, one value each. Each state storage is named once: the
    work is then at most what the session's own tensors hold, and a checkpoint before each copy keeps the command's
    deadline and other sessions' turns (one 4 MB tensor named 20000 times, or 20000 views of it, held the worker's
    turn ~80 s past a 1 s deadline; red team: test_redteam_session66_worker_lists.py). A load cut by its deadline
    may have loaded some of the state."""
    if type(state) not in (list, tuple) or type(values) not in (list, tuple) \
            or not all(isinstance(t, torch.Tensor) for t in (*state, *values)):
        raise RemoteExecutionError("load_state: lists of state tensors and of values expected")
    if len(state) != len(values):
        raise RemoteExecutionError(f"load_state: {len(values)} values for {len(state)} state tensors")
    storages: set = set()
    for s, v in zip(state, values):  # every shape first: a refused call must leave the state as it was
        if s.shape != v.shape:
            raise RemoteExecutionError(f"load_state: shape {tuple(v.shape)} does not fit {tuple(s.shape)}")
        key = _storage_key(s)
        if key in storages:
            raise RemoteExecutionError("load_state: a state tensor (or a view of its storage) is named twice")
        storages.add(key)
    with torch.no_grad():
        for s, v in zip(state, values):
            cancellation.checkpoint()
            s.copy_(v)


def _storage_key(t: torch.Tensor) -> Any:
    """What identifies ``t``'s storage (its data pointer; the tensor itself for one without data)."""
    try:
        return t.untyped_storage().data_ptr() or id(t)
    except (RuntimeError, NotImplementedError):
        return id(t)


# (a plan's tensors may be values the requester may not learn: its ops run under veil/workers/oblivious.py's guard)
register_worker_function("veil.plan.run", _run, secret_parameters=("inputs", "state"))
output_bounds.KEEPS_GRAPH.add("veil.plan.run")  # its result's graph keeps the plan's intermediates
register_worker_function("veil.plan.fit", _fit, secret_parameters=("data", "target", "state", "extra"))
register_worker_function("veil.plan.load_state", _load_state, shapes="none", secret_parameters=("state", "values"))
_LOAD, _FIT = ALLOWLIST.by_name("veil.plan.load_state").name, ALLOWLIST.by_name("veil.plan.fit").name
_MEAN = ALLOWLIST.by_func(torch.Tensor.mean).name


class PlanPointer(RemoteHandle):
    """A plan stored on a worker, with pointers to its state (parameters).

    A :class:`~veil.tensors.handle.RemoteHandle` for the plan object. Its pointer-shaped stand-in
    (``_handle``, a command argument) frees the plan, so a stand-in kept alone stays valid; the state
    pointers free themselves.
    """

    HANDLE_KIND = "plan"

    def __init__(self, location: Any, owner: Any, plan_id: int, state: list[PointerTensor], name: str):
        self._init_handle(location, plan_id, owner, garbage_collect_data=False)
        self.state = state
        self.name = name
        # A pointer-shaped stand-in for the plan object, so it can be a command argument.
        self._handle = PointerTensor(location, plan_id, owner, (), torch.float32)

    def __call__(self, *args: Any) -> Any:
        return remote_ops.call(ALLOWLIST.by_name("veil.plan.run"), (self._handle, list(args), self.state), {})

    def fit(self, data: PointerTensor, target: PointerTensor, batch_size: int, epochs: int = 1,
            shuffle: bool = True, drop_last: bool = False, extra: list | None = None,
            max_batches: int | None = None, seed: int | None = None) -> PointerTensor:
        """Runs whole epochs of the (training) plan over remote data in one message; returns batch losses.

        ``max_batches`` stops early (partial-epoch rounds); ``seed`` makes the shuffling reproducible.
        """
        return remote_ops.call(
            ALLOWLIST.by_name("veil.plan.fit"),
            (self._handle, data, target, self.state, batch_size, epochs, shuffle, drop_last, list(extra or []),
             max_batches, seed),
            {},
        )

    def train_round(self, values: list[torch.Tensor], data: PointerTensor, target: PointerTensor, batch_size: int,
                    epochs: int = 1, shuffle: bool = True, drop_last: bool = False, extra: list | None = None,
                    max_batches: int | None = None, seed: int | None = None) -> tuple[torch.Tensor, list]:
        """``load_state(values)``, ``fit(...)``, then the mean batch loss and the new state, in one request.

        A federated round in one round trip instead of four: the load, the fit and the mean ride as
        deferred commands in front of one ``GetObjectsMessage([mean, *state])`` (the worker runs each
        through the same handler and reference monitor as when sent alone; a refusal or failure is raised
        here, naming the op). Only the mean loss leaves the worker, as with ``losses.mean().get()``.
        """
        d = self._handle.__dict__
        owner, location = d["owner"], d["location"]
        state_ids = [p.__dict__["id_at_location"] for p in self.state]
        pointers = [p for p in (data, target) if type(p) is PointerTensor]
        if owner._lost.get(location.id):  # a failed deferred command left some ids empty: say so here
            owner.check_lost(location, [d["id_at_location"], *state_ids,
                                        *(p.__dict__["id_at_location"] for p in pointers)])
        grad = torch.is_grad_enabled()
        loss_id, mean_id = new_id(), new_id()
        state = remote_ops._to_wire(list(self.state))
        fit_args = remote_ops._to_wire([self._handle, data, target, list(self.state), batch_size, epochs, shuffle,
                                        drop_last, list(extra or []), max_batches, seed])
        owner.bump_grad_epoch(location)  # the plan's steps change the worker's gradients
        owner.defer(location, [_LOAD, [state, list(values)], {}, [], grad])
        owner.defer(location, [_FIT, fit_args, {}, [loss_id], grad], None if extra else 0)
        owner.defer(location, [_MEAN, [ObjectRef(loss_id)], {}, [mean_id], grad], 0)
        owner.schedule_delete(location, loss_id)  # freed right after its mean, in the same batch
        try:
            reply = owner.send_msg(GetObjectsMessage([mean_id, *state_ids], False, None), location)
        finally:
            owner.schedule_delete(location, mean_id)  # rides on the next request
        objects = getattr(reply, "objects", None)
        if not isinstance(objects, list) or len(objects) != 1 + len(state_ids) \
                or not all(isinstance(t, torch.Tensor) for t in objects):
            raise RemoteExecutionError(f"the worker's reply is not the {1 + len(state_ids)} tensors asked for")
        return objects[0].detach(), [t.detach() for t in objects[1:]]

    def load_state(self, values: list[torch.Tensor]) -> None:
        remote_ops.call(ALLOWLIST.by_name("veil.plan.load_state"), (self.state, list(values)), {},
                        location=self.location)

    def get(self) -> Any:
        """Brings the plan back (its op list and state values) and frees it on the worker."""
        from veil.plans.plan import Plan

        spec, *state = self.fetch(delete=True, also=self.state)
        self._handle.mark_freed()
        return Plan.from_spec(spec, [t.detach() for t in state], self.name)

    def get_state(self) -> list[torch.Tensor]:
        """Copies of the state tensors (they stay on the worker)."""
        if not self.state:
            return []
        return [t.detach() for t in fetch_all(self.state, delete=False)]

    def __repr__(self) -> str:
        return self.handle_head("PlanPointer", self.name)


def send_plan(plan: Any, worker: Any) -> PlanPointer:
    owner = worker.hook.local_worker
    plan_id = new_id()
    state = plan.state_tensors()
    state_ids = [new_id() for _ in state]
    objects = [StoredObject(plan_id, plan.spec)] + [
        StoredObject(i, t.detach().clone().requires_grad_(t.requires_grad)) for i, t in zip(state_ids, state)
    ]
    owner.send_msg(ObjectMessage(objects), worker)
    pointers = [PointerTensor(worker, i, owner, t.shape, t.dtype, t.requires_grad) for i, t in zip(state_ids, state)]
    return PlanPointer(worker, owner, plan_id, pointers, plan.name)
