"""Keeps clients from writing to the data the owner loaded (``worker.load``, datasets).

Clients may compute on owner data but must never change it. Four rules, applied
only to commands that touch protected tensors:
1. writes are refused by the operator's own schema: the op runs under
   :func:`refuse_writes`, a TorchDispatchMode that sees every ATen op the call
   decomposes into and refuses any whose schema marks an argument as written
   (``Tensor(a!)``) when that argument shares storage with owner data, whatever
   position the argument came in (``F.embedding(..., weight=owner, max_norm=1)``,
   ``out=``, in-place methods, ``inplace=True``). A few ATen ops write without
   saying so in their schema (batch norm's running statistics); they are listed
   in :data:`UNDECLARED_WRITES`. ``set_`` with an owner source is refused too (it
   would make a client tensor alias owner storage);
2. property setters (``.grad``, ``.data``, ``requires_grad``) are refused when the
   owner's tensor is the target *or* the value (``own.grad = owner`` would give
   the client a writable alias); cheap name rules (:func:`check_writes`) refuse
   the obvious in-place calls before anything runs;
3. results that alias owner storage (views: slices, ``detach``, ``view``...) are
   stored as copies, so later writes to them cannot reach the owner's tensor;
4. worker functions (plans, DP, aggregation) receive copies of owner tensors.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from functools import lru_cache
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from veil.exceptions import (
    CommandTimeoutError,
    ObjectNotFoundError,
    OperationNotAllowedError,
    PermissionDeniedError,
    ProtectedDataError,
    RemoteExecutionError,
    SerializationError,
    VeilError,
    WorkerMismatchError,
    WorkerNotFoundError,
)
from veil.tensors.tree import leaves, map_structure
from veil.workers import dealt
from veil.workers.store import Kind

#: the data owner's log: full text of errors clients only see as ProtectedDataError
owner_log = logging.getLogger("veil.owner")

_IN_PLACE_DUNDERS = frozenset(
    {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
     "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"}
)


def _storage(t: torch.Tensor) -> int | None:
    if not isinstance(t, torch.Tensor) or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return ptr or None


#: worker functions that release only differentially private results (DP registers them)
DP_RELEASES: set[str] = set()
#: the one argument (position, keyword) through which such a release takes the owner's data, if any: the
#: privacy accounting holds for that input only. Anywhere else (a plan's state, nested in a list) owner
#: data would enter every record's computation, or the plan's dry run, uncharged: refused
DP_DATA_ARGS: dict[str, tuple[int, str]] = {}
#: worker functions whose result, once the protocol combines it, gives the requester a function of
#: their inputs (secure aggregation's masked input: the coordinator recovers the sum): the owner's
#: review policy applies to those inputs as to a .get() (filled by the modules that register them). Each
#: returns one tensor (handlers._check_return_ids refuses another count before the approval is used)
REVIEWED_INPUTS: set[str] = set()
#: such a step's checks that read no value of its inputs (``(worker, *args, **kwargs)``, raising its refusal): run
#: before the approval is used up (:func:`run_value_free_checks`), so that a request refused whatever the values (a
#: round that does not exist) leaves it standing; a failure after them, of any kind, has used it
REVIEWED_INPUT_CHECKS: dict[str, Any] = {}
#: such a step's bytes made, from its arguments' shapes alone (``(*args, **kwargs) -> int``): checked against the
#: session's room before the approval is used up (handlers._run_resolved), so that a refusal by the quota leaves
#: it standing and a step cannot make many times what the session holds before its result is refused
REVIEWED_INPUT_BYTES: dict[str, Any] = {}


def run_value_free_checks(name: str, worker: Any, args: list, kwargs: dict, entries: list) -> None:
    """Runs ``REVIEWED_INPUT_CHECKS[name]`` (if any) on stand-ins: every tensor, and every stored object the command
    named, replaced by an empty tensor, so that the checks cannot read, print or size a value whatever they do (they
    run before any review, secret or scrubbing: an owner tensor passed as a round's tag came back printed in the
    refusal, red team test_redteam_session63.py). A refusal that is not veil's own is one line naming its class."""
    checks = REVIEWED_INPUT_CHECKS.get(name)
    if checks is None:
        return
    stored = {id(e.obj) for e in entries}
    try:
        checks(worker, *_stand_ins(list(args), stored), **_stand_ins(dict(kwargs), stored))
    except VeilError:
        raise
    except Exception as e:  # (arguments it cannot take)
        raise RemoteExecutionError(f"{name}: refused ({type(e).__name__} on its arguments)") from None


def check_reviewed_room(monitor: Any, principal: Any, name: str, args: list, kwargs: dict) -> None:
    """Refuses, under a quota, a reviewed step whose ``REVIEWED_INPUT_BYTES`` (from its arguments' shapes) do not
    fit the session's room, before its approval is used up."""
    sized = REVIEWED_INPUT_BYTES.get(name)
    if sized is None or monitor.max_session_bytes is None:
        return
    try:
        nbytes = int(sized(*args, **kwargs))
    except Exception:  # (arguments it cannot take: the step refuses them itself, in one line)
        nbytes = 0
    monitor.check_room(principal, nbytes, name)


def _stand_ins(value: Any, stored: set) -> Any:
    if isinstance(value, torch.Tensor) or id(value) in stored:
        return torch.empty(0)
    if type(value) in (list, tuple):
        return type(value)(_stand_ins(v, stored) for v in value)
    if type(value) is dict:
        return {k: _stand_ins(v, stored) for k, v in value.items()}
    return value


def check_dp_only(op_name: str, entries: list, worker_id: str) -> None:
    """Data the owner put under DP answers only DP releases (no raw arithmetic through pointers)."""
    if op_name not in DP_RELEASES and any(e.meta.get("dp_only") for e in entries):
        raise PermissionDeniedError(
            f"{op_name} refused: this data on worker {worker_id!r} is under the owner's differential-privacy "
            f"policy and answers only {sorted(DP_RELEASES)}"
        )


def check_dp_data_args(op_name: str, wire_args: Any, wire_kwargs: Any, found: dict, worker_id: str) -> None:
    """A DP release takes protected (owner or DP-only) data only as its data argument (:data:`DP_DATA_ARGS`),
    named there directly; ``wire_args``/``wire_kwargs``: the command as sent (None: nothing to place it by)."""
    from veil.messaging.messages import ObjectRef, arg_leaves

    # a DP release's noise is for one row being one record: DP-only data enters it only as the owner's stored
    # entry, whose rows are the records; a value carrying the dp-only mark without being that entry (derived
    # under review before a tightening: x[[0] * n], an expand, a sum over rows; a moved copy) may repeat or mix
    # records, so one record moves many rows (red team: test_redteam_session67_dp_derived.py)
    if any(e.kind != Kind.OWNER and e.meta and e.meta.get("dp_only") for e in found.values()):
        raise PermissionDeniedError(
            f"{op_name} refused: a DP release on worker {worker_id!r} reads DP-only data only as the owner's stored "
            "data itself, never a value derived from it or a copy of it (its rows need not be the owner's records)")
    at, keyword = DP_DATA_ARGS.get(op_name, (-1, ""))

    def protected(value: Any) -> bool:
        return any(type(v) is ObjectRef and v.id in found and found[v.id].protected for v in arg_leaves(value))

    if wire_args is None:  # (a skeleton use: a torch op, never a release; refused should one name data)
        refused = any(e.protected for e in found.values())
    else:
        places = [(i == at and type(a) is ObjectRef, a) for i, a in enumerate(wire_args)]
        if isinstance(wire_kwargs, dict):
            places += [(k == keyword and type(v) is ObjectRef, v) for k, v in wire_kwargs.items()]
        refused = any(not allowed and protected(value) for allowed, value in places)
    if refused:
        where = f"its data argument {keyword!r}" if keyword else "none of its arguments"
        raise PermissionDeniedError(
            f"{op_name} refused: the owner's data on worker {worker_id!r} may enter this release only as "
            f"{where} (a plan's state or other parameters are the requester's own)")


def protected_storages(entries: list) -> set[int]:
    """Storage addresses of the protected tensors among a command's inputs."""
    out: set[int] = set()
    for entry in entries:
        if entry.protected:
            _add_storages(out, entry)
    return out


def _add_storages(out: set[int], entry: Any) -> None:
    """Adds the storages of ``entry``'s tensor and of its gradient (``obj.grad`` must not be a writable alias)."""
    for t in (entry.obj, getattr(entry.obj, "grad", None) if isinstance(entry.obj, torch.Tensor) else None):
        key = _storage(t)
        if key is not None:
            out.add(key)


def weaker_storages(entries: list) -> set[int]:
    """Storages of a command's inputs that are more revealable than its most restricted input.

    An op that wrote a restricted value (a share revealable only to a serving client,
    dealt material) into such an input would launder it: ``mine.add_(client_share)``
    then ``mine.get()``. They are write-protected for that command like owner data.
    """
    strictest = dealt.strictest((e.reveal_to for e in entries), None)
    join = None if strictest is None else set(strictest)
    dealer = any(e.kind == Kind.DEALER for e in entries)
    out: set[int] = set()
    for e in entries:
        if (dealer and e.kind != Kind.DEALER) or (
                join is not None and (e.reveal_to is None or not set(e.reveal_to) <= join)):
            _add_storages(out, e)
    return out


def dealer_storages(entries: list) -> set[int]:
    """Storages of dealt material among a command's inputs: no requester-chosen op writes them (``r.zero_()``
    would leave a field that still passes as a fresh uniform mask, and the opening ``x + r`` would be ``x``)."""
    out: set[int] = set()
    for e in entries:
        if e.kind == Kind.DEALER:
            key = _storage(e.obj)
            if key is not None:
                out.add(key)
    return out


def writes_first_argument(op_name: str) -> bool:
    method = op_name.rsplit(".", 1)[-1]
    if op_name.endswith(".__set__"):  # property setters (grad, requires_grad)
        return True
    return method in _IN_PLACE_DUNDERS or (method.endswith("_") and not method.endswith("__"))


#: (every session's: keyed by allowlisted functions, ~530 today, so room for all of them: at 512 one user's
#: commands evicted another's entries, a probe of who used which op; what stays visible is only that some
#: user called a function since the worker started, tens of microseconds once)
@lru_cache(maxsize=4096)
def _signature(func: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def _inplace_flag(func: Callable, args: tuple, kwargs: dict) -> bool:
    if "inplace" in kwargs:
        return bool(kwargs["inplace"])
    sig = _signature(func)
    if sig is None or "inplace" not in sig.parameters:
        return False
    try:
        return bool(sig.bind_partial(*args, **kwargs).arguments.get("inplace", False))
    except TypeError:
        return False


def _refuse(op_name: str, worker_id: str) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"{op_name} would modify data the owner of worker {worker_id!r} loaded, or write a restricted value "
        f"into a more revealable object; compute on a copy instead (e.g. ptr.copy())"
    )


def check_writes(op_name: str, func: Callable, args: tuple, kwargs: dict, protected: set[int], worker_id: str) -> None:
    """Raises if the op would write into owner storage (name rules, before the op runs).

    The schema rules of :func:`refuse_writes` apply while it runs; these catch
    what no ATen schema describes (property setters, ``requires_grad_``).
    """
    targets: list = []
    if op_name.endswith(".__set__"):
        # target or value: ``own.grad = owner`` would hand out a writable alias of owner data
        targets.extend(leaves((args, kwargs)))
    elif args and (writes_first_argument(op_name) or _inplace_flag(func, args, kwargs)):
        targets.append(args[0])
    if "out" in kwargs:
        targets.extend(leaves(kwargs["out"]))
    for t in targets:
        if _storage(t) in protected:
            raise _refuse(op_name, worker_id)


#: ATen ops that write arguments their schema does not mark as written, and the flag
#: argument that makes them write (``native_batch_norm`` updates ``running_mean`` and
#: ``running_var`` in training mode only).
UNDECLARED_WRITES: dict[str, tuple[tuple[str, ...], str]] = {
    "aten::native_batch_norm": (("running_mean", "running_var"), "training"),
    "aten::_batch_norm_impl_index": (("running_mean", "running_var"), "training"),
    "aten::batch_norm": (("running_mean", "running_var"), "training"),
    "aten::cudnn_batch_norm": (("running_mean", "running_var"), "training"),
    "aten::miopen_batch_norm": (("running_mean", "running_var"), "training"),
    "aten::instance_norm": (("running_mean", "running_var"), "use_input_stats"),
    "aten::rrelu_with_noise": (("noise",), "training"),
}
#: ATen ops that make their first argument alias another argument's storage
ALIASING_SETTERS = frozenset({"aten::set_", "aten::set"})


@lru_cache(maxsize=4096)  # (torch's ATen overloads, ~2,100: never evicted; first use since start costs microseconds)
def _written_positions(func: Any) -> tuple[tuple[int, str, int], ...]:
    """(position, name, flag position or -1) of every argument the op may write, from its schema.

    A flag position >= 0 means the write happens only when that argument is true
    (the undeclared writes above); -1: the schema says the argument is written.
    """
    schema = func._schema
    names = [a.name for a in schema.arguments]
    undeclared, flag = UNDECLARED_WRITES.get(schema.name, ((), ""))
    flag_pos = names.index(flag) if flag in names else -1
    every = schema.name in ALIASING_SETTERS
    out = []
    for i, a in enumerate(schema.arguments):
        if every or (a.alias_info is not None and a.alias_info.is_write):
            out.append((i, a.name, -1))
        elif a.name in undeclared:
            out.append((i, a.name, flag_pos))
    return tuple(out)


def _storage_key(value: Any) -> int | None:
    if isinstance(value, torch.Tensor):
        return _storage(value)
    if isinstance(value, torch.UntypedStorage):
        return value.data_ptr() or None
    if isinstance(value, torch.TypedStorage):
        return value.data_ptr() or None
    return None


def written_values(func: Any, args: tuple, kwargs: dict) -> Iterator[tuple[str, Any]]:
    """(argument name, value) of every tensor (or storage) the ATen op ``func`` writes in this call."""
    for pos, name, flag_pos in _written_positions(func):
        value = args[pos] if pos < len(args) else kwargs.get(name)
        if value is None:
            continue
        if flag_pos >= 0:
            flag_name = func._schema.arguments[flag_pos].name
            flag = args[flag_pos] if flag_pos < len(args) else kwargs.get(flag_name, True)
            if flag is False:
                continue
        for leaf in value if isinstance(value, (list, tuple)) else (value,):
            yield name, leaf


class _WriteRefusal(TorchDispatchMode):
    """Refuses every ATen op whose schema writes an argument stored in ``protected``; adds the storage of
    every argument written to ``written`` when given (what provenance taints)."""

    def __init__(self, op_name: str, protected: set[int], worker_id: str, written: set[int] | None) -> None:
        super().__init__()
        self.op_name, self.protected, self.worker_id, self.written = op_name, protected, worker_id, written

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        for name, leaf in written_values(func, args, kwargs):
            key = _storage_key(leaf)
            if key in self.protected:
                raise _refuse(f"{self.op_name} ({func._schema.name} writes {name!r})", self.worker_id)
            if self.written is not None and key is not None:
                self.written.add(key)
        return func(*args, **kwargs)


_NO_GUARD = contextlib.nullcontext()


def refuse_writes(op_name: str, protected: set[int], worker_id: str,
                  written: set[int] | None = None) -> contextlib.AbstractContextManager:
    """A context in which writes into ``protected`` storage are refused and the storages written are added to
    ``written`` (a shared no-op when both are absent: commands on the client's own data pay nothing)."""
    if not protected and written is None:
        return _NO_GUARD
    return _WriteRefusal(op_name, protected, worker_id, written)


def copy_aliases(result: Any, protected: set[int]) -> Any:
    """Results sharing storage with owner data become independent copies."""
    return map_structure(result, lambda t: t.clone() if _storage(t) in protected else t)


def protected_copy_bytes(value: Any, protected: set[int]) -> int:
    """Bytes :func:`copy_protected_args` allocates for ``value`` (each distinct protected tensor leaf once,
    contiguous)."""
    seen: set[int] = set()
    total = 0
    for t in leaves(value):
        if id(t) not in seen and _storage(t) in protected:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def copy_protected_args(value: Any, protected: set[int], made: list | None = None,
                        memo: dict | None = None) -> Any:
    """Worker functions get copies of owner tensors (they only need to read them); ``made`` gets the copies.
    Each distinct tensor is copied once per request (``memo``: id -> copy, shared by a command's args and
    kwargs), however many times the arguments name it: a 1 MB dataset named 2000 times in one argument list was
    copied 2000 times (2 GB, ~12 s holding the worker's turn, past the command's deadline) before the function
    ran (red team: test_redteam_session66_worker_lists.py)."""
    memo = {} if memo is None else memo

    def copy(t: Any) -> Any:
        if _storage(t) not in protected:
            return t
        done = memo.get(id(t))
        if done is not None and done[0] is t:
            return done[1]
        c = t.detach().clone()
        memo[id(t)] = (t, c)  # (the source kept beside its copy: its id is not reused while the memo lives)
        if made is not None:
            made.append(c)
        return c
    return map_structure(value, copy)


#: errors about the request itself (policy, names, limits): their text is veil's own, never data
_POLICY_ERRORS = (PermissionDeniedError, OperationNotAllowedError, SerializationError, ObjectNotFoundError,
                  WorkerNotFoundError, WorkerMismatchError, CommandTimeoutError)


def _quotes_a_tensor(text: str) -> bool:
    # A value-free error may still echo an argument it refused; owner data arrives only as
    # stored objects (tensors), so a tensor repr in the text means it quoted one.
    return "tensor(" in text or "Parameter containing" in text


def client_error(op_name: str, error: BaseException, protected: set[int], worker_id: str) -> VeilError:
    """The error a client gets for a failed op: no values from protected data ever.

    Without protected inputs: the error as before (veil errors unchanged, others
    wrapped in RemoteExecutionError with their text). With protected inputs,
    anything but a policy error becomes a :class:`ProtectedDataError` naming only
    the op; the full text goes to the owner's log (``veil.owner``).
    """
    if isinstance(error, _POLICY_ERRORS) or (isinstance(error, VeilError) and error.value_free
                                             and not _quotes_a_tensor(str(error))):
        return error
    if not protected:
        if isinstance(error, VeilError):
            return error
        return RemoteExecutionError(f"{op_name} failed on worker {worker_id!r}: {type(error).__name__}: {error}")
    owner_log.info("worker %s: %s failed on protected data: %s: %s", worker_id, op_name,
                      type(error).__name__, error)
    return ProtectedDataError(
        f"operation {op_name} failed on protected data of worker {worker_id!r} (details are in the owner's log)"
    )
