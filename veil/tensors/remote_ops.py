"""What happens when torch calls ``PointerTensor.__torch_function__``.

Three outcomes, decided by tables rather than op-specific code:
- metadata the wrapper already knows (shape, dtype, dim, ...) is answered locally;
- ops that would need the remote value locally (``bool(p)``, ``p.item()``) raise;
- everything else must be allowlisted and becomes one CommandMessage. Result
  shapes come from running the op on meta tensors; when that is impossible
  (data-dependent shapes) the worker chooses the ids and describes the results.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import torch

from veil.exceptions import RevealError, WorkerMismatchError
from veil.ids import new_id
from veil.messaging.allowlist import ALLOWLIST, INFER, NO_RESULT, Op
from veil.messaging.messages import CommandMessage, Descriptor, ObjectRef, ResultReply
from veil.messaging.serde import DTYPES
from veil.tensors import shape_inference
from veil.tensors.pointer import PointerTensor
from veil.tensors.tree import leaves, map_structure
from veil.workers import skeletons

_T = torch.Tensor
_make_wrapper = torch.Tensor._make_wrapper_subclass
_CPU = torch.device("cpu")


def _local(func: Any, args: tuple, kwargs: dict) -> Any:
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _reveal(func: Any, args: tuple, kwargs: dict) -> Any:
    name = getattr(func, "__name__", str(func))
    raise RevealError(f"{name} needs the value of a remote tensor; call .get() first (if the owner allows it)")


def _identity_if_real(func: Any, args: tuple, kwargs: dict) -> Any:
    """``conj()`` of a real tensor is the tensor itself (optimizers call it on every step)."""
    if args[0].dtype.is_complex:
        raise TypeError("complex remote tensors are not supported")
    return args[0]


def _none(func: Any, args: tuple, kwargs: dict) -> Any:
    return None


def _len(func: Any, args: tuple, kwargs: dict) -> int:
    shape = args[0].shape
    if not shape:
        raise TypeError("len() of a 0-d tensor")
    return shape[0]


def _iter(func: Any, args: tuple, kwargs: dict) -> Any:
    return iter(args[0].unbind(0))


def _requires_grad_(func: Any, args: tuple, kwargs: dict) -> Any:
    ptr = args[0]
    flag = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
    call(ALLOWLIST.by_name("Tensor.requires_grad_"), (ptr, flag), {})
    _local(_T.requires_grad_, (ptr, flag), {})
    shape, dtype, _ = ptr.__dict__["_meta"]
    ptr.__dict__["_meta"] = (shape, dtype, bool(flag))
    return ptr


def _set_requires_grad(func: Any, args: tuple, kwargs: dict) -> None:
    _requires_grad_(func, (args[0], bool(args[1])), {})


def _get_grad(func: Any, args: tuple, kwargs: dict) -> Any:
    """``p.grad``: once per backward (predicted without a round trip when pipelining), then cached."""
    ptr = args[0]
    d = ptr.__dict__
    epoch = d["owner"].grad_epoch(d["location"])
    cached = d.get("_grad_cache")
    if cached is not None and cached[0] == epoch:
        return cached[1]
    grad = _predicted_grad(ptr, epoch)
    if grad is None:
        grad = call(ALLOWLIST.by_name("Tensor.grad.__get__"), (ptr,), {})
    d["_grad_cache"] = (epoch, grad)
    return grad


def _set_grad(func: Any, args: tuple, kwargs: dict) -> None:
    ptr, value = args
    d = ptr.__dict__
    owner, location = d["owner"], d["location"]
    if value is None and location._skeletons is not None and _may_pipeline(owner, location, [ptr]):
        # ``p.grad = None`` (zero_grad, every step): the skeleton use call() would defer, without its
        # generic steps (argument walk, shape key, wire form)
        if owner._lost.get(location.id):
            owner.check_lost(location, [d["id_at_location"]])
        enabled = _is_grad_enabled()
        if not owner.defer_skeleton(location, _GRAD_SET_NONE_SIGNATURES[enabled], [d["id_at_location"]], [],
                                    lambda: ["Tensor.grad.__set__", [_encode_ref(0), None], {}, enabled]):
            call(ALLOWLIST.by_name("Tensor.grad.__set__"), (ptr, value), {})
    else:
        call(ALLOWLIST.by_name("Tensor.grad.__set__"), (ptr, value), {})
    if value is None or type(value) is PointerTensor:
        ptr.__dict__["_grad_cache"] = (ptr.owner.grad_epoch(ptr.location), value)


#: ops answered without contacting the worker
LOCAL_HANDLERS: dict[Any, Callable[[Any, tuple, dict], Any]] = {
    _T.shape.__get__: _local,
    _T.dtype.__get__: _local,
    _T.device.__get__: _local,
    _T.requires_grad.__get__: _local,
    _T.is_leaf.__get__: _local,
    _T.ndim.__get__: _local,
    _T.layout.__get__: _local,
    _T.is_sparse.__get__: _local,
    _T.is_quantized.__get__: _local,
    _T.is_meta.__get__: _local,
    _T.is_cuda.__get__: _local,
    _T.is_nested.__get__: _local,
    _T.dim: _local,
    _T.size: _local,
    _T.numel: _local,
    _T.nelement: _local,
    _T.element_size: _local,
    _T.is_floating_point: _local,
    _T.is_complex: _local,
    _T.is_contiguous: _local,
    # function forms of the same metadata (torch.optim's Adam, RMSprop... ask torch.is_complex(p))
    torch.is_complex: _local,
    torch.is_floating_point: _local,
    torch.is_nonzero: _reveal,
    _T.is_conj: _local,
    _T.is_neg: _local,
    _T.conj: _identity_if_real,
    torch.conj: _identity_if_real,
    _T.stride: _local,
    _T.grad_fn.__get__: _none,
    _T.grad.__get__: _get_grad,
    _T.grad.__set__: _set_grad,
    _T.__len__: _len,
    _T.__iter__: _iter,
    _T.requires_grad_: _requires_grad_,
    _T.requires_grad.__set__: _set_requires_grad,
    _T.__bool__: _reveal,
    _T.item: _reveal,
    _T.tolist: _reveal,
    _T.numpy: _reveal,
    _T.__int__: _reveal,
    _T.__float__: _reveal,
    _T.__index__: _reveal,
    _T.__array__: _reveal,
    _T.data_ptr: _reveal,
}


_OPS_BY_FUNC = ALLOWLIST._by_func  # by_func's table, read inline on every op (by_func raises the refusal)


def handle(func: Any, args: tuple, kwargs: dict) -> Any:
    return _torch_function(PointerTensor, func, (), args, kwargs)


def _torch_function(cls: type, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
    """``PointerTensor.__torch_function__``: :func:`handle` itself (torch calls it on every op on a
    pointer; one Python frame less than a method that calls handle)."""
    local = LOCAL_HANDLERS.get(func)
    if local is not None:
        return local(func, args, kwargs or {})
    try:
        op = _OPS_BY_FUNC.get(func)
    except TypeError:  # unhashable callables are reachable by name only
        op = None
    return call(op if op is not None else ALLOWLIST.by_func(func), args, kwargs or {})


PointerTensor.__torch_function__ = classmethod(_torch_function)  # (pointer.py cannot import this module)



def _location_of(tensors: list[torch.Tensor]) -> tuple[PointerTensor, bool]:
    """The first pointer (every other pointer must live on the same worker), and whether
    ``tensors`` holds local tensors besides the pointers (bytes that travel with the command)."""
    first = None
    local = False
    for t in tensors:
        if type(t) is PointerTensor:
            if first is None:
                first = t
            elif t.location is not first.location:
                raise WorkerMismatchError(
                    f"operation mixes objects on different workers: {first.id_at_location} on "
                    f"{first.location.id!r} and {t.id_at_location} on {t.location.id!r}; .move() one of them first"
                )
        else:
            local = True
    if first is None:
        raise TypeError("no PointerTensor among the arguments")
    return first, local


def _ref_encoder() -> Callable[[int], Any]:
    """How a pointer names its object on the wire: an ObjectRef, or (faster) that ObjectRef
    already encoded by serde's own registered encoder, which msgpack then copies as is
    (saves an encoder call per argument per command). The pre-encoded form is used only if
    it decodes back to the same ObjectRef through serde (so a change of the wire format
    falls back to plain ObjectRefs instead of breaking)."""
    try:
        import msgpack

        from veil.messaging import serde

        encode = serde._ENCODERS[ObjectRef]

        def pre_encoded(oid: int) -> Any:
            return msgpack.ExtType(*encode(ObjectRef(oid)))

        probe = 2**64 - 12345
        if serde.decode_value(serde.encode_value([pre_encoded(probe), (pre_encoded(7),)])) \
                == [ObjectRef(probe), (ObjectRef(7),)]:
            return pre_encoded
    except Exception:  # a wire format without this registry: plain ObjectRefs
        pass
    return ObjectRef


_encode_ref = _ref_encoder()


def _ref(ptr: PointerTensor) -> Any:
    """``ptr``'s wire reference, made once per pointer."""
    d = ptr.__dict__
    ref = d.get("_ref")
    if ref is None or d.get("_ref_id") != d["id_at_location"]:
        ref = d["_ref"] = _encode_ref(d["id_at_location"])
        d["_ref_id"] = d["id_at_location"]
    return ref


def _to_wire(value: Any) -> Any:
    tp = type(value)
    if tp is PointerTensor:
        return _ref(value)
    if tp is tuple or tp is list:
        return tp([_to_wire(v) for v in value])
    if tp is dict:
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _args_to_wire(args: tuple) -> list:
    """Top-level arguments as a list (what the wire carries), pointers as ObjectRefs."""
    out = []
    for v in args:
        tp = type(v)
        if tp is PointerTensor:
            d = v.__dict__  # _ref inlined (two pointer arguments per op on average)
            ref = d.get("_ref")
            out.append(ref if ref is not None and d.get("_ref_id") == d["id_at_location"] else _ref(v))
        elif tp is tuple or tp is list or tp is dict:
            out.append(_to_wire(v))
        else:
            out.append(v)
    return out


#: ops after which cached ``.grad`` pointers of that worker may be stale
_GRAD_CHANGING = frozenset({"Tensor.backward"})  # a grad set updates only its own cache
_NEW = shape_inference.NEW
_is_grad_enabled = torch.is_grad_enabled


def _may_pipeline(owner: Any, location: Any, tensors: list) -> bool:
    """Whether a command may be deferred (its errors then surface at the next synchronization).

    Only the client's own commands on the client's own objects (``PointerTensor._mine``: sent
    by it, or results of its commands): a pointer to anything else (the owner's datasets found
    by search, protocol shares and hand-offs, pointer chains) makes the command synchronous, so
    the owner's refusals (write guard, DP-only, errors on protected data, deputy refusals) are
    raised at the op that caused them and hand-offs are claimed when first used. A worker that forwards
    commands while serving a request (pointer chains) never defers them. Commands with
    unusual argument types (no shape-cache key) are synchronous too, so a wire error surfaces
    at the call.
    """
    if not getattr(location, "pipelining", False) or owner.hook.local_worker is not owner:
        return False
    for t in tensors:
        if type(t) is PointerTensor and not t.__dict__["_mine"]:
            return False
    return True


class _Deferring(threading.local):
    on = False  # the per-thread default, read without a getattr default (which raises and catches)


_DEFERRING = _Deferring()


@contextlib.contextmanager
def deferring() -> Iterator[None]:
    """Inside: commands whose results this side names ride on the next request to their
    worker, as with ``pipelining`` (the SMPC dispatch uses it for share-local ops; an
    error is raised by that next request, the next opening or ``.get()``)."""
    previous = _DEFERRING.on
    _DEFERRING.on = True
    try:
        yield
    finally:
        _DEFERRING.on = previous


def call(op: Op, args: tuple, kwargs: dict, location: Any = None) -> Any:
    """Runs an allowlisted op on the worker holding the pointers among ``args``.

    ``location`` names the worker explicitly, for worker functions whose
    arguments hold no pointer; the local worker then sends the command.

    With ``location.pipelining`` (the default), a command whose result shapes are
    known here (local shape inference) and whose result ids this side chooses is
    queued and rides, batched in order, on the next message that needs a reply.
    """
    if kwargs and kwargs.get("memory_format") is torch.preserve_format:  # the default of every *_like op
        kwargs = {k: v for k, v in kwargs.items() if k != "memory_format"}
    tensors, key = _collect(args, kwargs)
    if location is None:
        first = tensors[0] if tensors else None
        if type(first) is PointerTensor and (len(tensors) == 1 or (
                len(tensors) == 2 and type(tensors[1]) is PointerTensor
                and tensors[1].__dict__["location"] is first.__dict__["location"])):
            local_tensors = False  # (_location_of's answer for one or two pointers on one worker)
        else:
            first, local_tensors = _location_of(tensors)
        d = first.__dict__
        owner, location = d["owner"], d["location"]
    else:
        owner = location.hook.local_worker
        local_tensors = any(type(t) is not PointerTensor for t in tensors)
    # tensor bytes riding with a deferred command: none when its only tensors are pointers
    payload = None if local_tensors else 0
    if owner._lost.get(location.id):  # a failed deferred command left some ids empty: say so here
        owner.check_lost(location, [t.id_at_location for t in tensors if type(t) is PointerTensor])
    wire_kwargs = _to_wire(kwargs) if kwargs else {}
    grad = _is_grad_enabled()
    name = op.name
    if op.worker_function or name in _GRAD_CHANGING:
        owner.bump_grad_epoch(location)
    pipelined = not op.worker_function and (
        (key is not None and _may_pipeline(owner, location, tensors))
        # SMPC dispatch (``deferring``): share-local ops ride on the parties' next requests
        or (_DEFERRING.on and owner.hook.local_worker is owner))
    # a skeleton use (ids only, no op name or refs) where the destination keeps a table (network workers)
    skeletal = location._skeletons is not None and payload == 0 and key is not None and key[0] is _FLAT
    if op.shapes == NO_RESULT:
        if name == "Tensor.backward":
            owner._grad_leaves[location.id] = (owner.grad_epoch(location), _backward_leaves(args, kwargs))
        if pipelined:
            if not (skeletal and owner.defer_skeleton(location, _no_result_signature(name, grad, key),
                                                      _ids_of(tensors), [],
                                                      lambda: _definition(name, args, tensors, wire_kwargs, grad))):
                owner.defer(location, [name, _args_to_wire(args), wire_kwargs, [], grad], payload)
        else:
            owner.send_msg(CommandMessage(name, _args_to_wire(args), wire_kwargs, [], grad), location)
        return None
    template = shape_inference.infer(op, args, kwargs, tensors, key, grad) if op.shapes == INFER else None
    if template is None:
        reply = owner.send_msg(CommandMessage(name, _args_to_wire(args), wire_kwargs, None, grad), location)
        return _from_descriptors(reply, args, kwargs, owner, location)
    one = template.one
    if one is not None:  # the usual op: one new tensor (the loop below, for its one spec)
        oid = new_id()
        return_ids = [oid]
        ptr = _result_pointer(location, oid, owner, one)
        if one[3]:  # a non-leaf of the remote autograd graph: remember its leaves
            ptr.__dict__["_leafs"] = _graph_leaves(tensors)
        made = None
    else:
        return_ids, made = _results(template, tensors, location, owner, grad)
    if pipelined:
        if not (skeletal and owner.defer_skeleton(location, template, _ids_of(tensors), return_ids,
                                                  lambda: _definition(name, args, tensors, wire_kwargs, grad))):
            owner.defer(location, [name, _args_to_wire(args), wire_kwargs, return_ids, grad], payload)
    elif not (skeletal and owner.hook._local_worker is owner  # (hook.local_worker, without its property call)
              and owner.send_skeleton(location, template, _ids_of(tensors), return_ids,
                                      lambda: _definition(name, args, tensors, wire_kwargs, grad))):
        owner.send_msg(CommandMessage(name, _args_to_wire(args), wire_kwargs, return_ids, grad), location)
    if made is None:
        return ptr
    if len(made) == 1 and isinstance(template.structure, torch.Tensor):
        return made[0]
    it = iter(made)
    return map_structure(template.structure, lambda _: next(it))


def _ids_of(tensors: list) -> list:
    """The remote ids of a command's pointers (one or two in most commands: no list comprehension frame)."""
    if len(tensors) == 1:
        return [tensors[0].__dict__["id_at_location"]]
    if len(tensors) == 2:
        return [tensors[0].__dict__["id_at_location"], tensors[1].__dict__["id_at_location"]]
    return [t.__dict__["id_at_location"] for t in tensors]


def _result_pointer(location: Any, oid: int, owner: Any, one: tuple) -> PointerTensor:
    """A new result pointer (what ``PointerTensor.__new__`` makes for a result of this side's command:
    ``mine``, garbage-collected, no tags), its constant fields copied from the template's ``one``."""
    shape, dtype, requires_grad, _, fields = one
    ptr = _make_wrapper(PointerTensor, shape, dtype=dtype, requires_grad=requires_grad, device=_CPU)
    d = fields.copy()
    d["location"] = location
    d["id_at_location"] = oid
    d["owner"] = owner
    if requires_grad:  # a fresh object of ours has no gradient until the next backward there
        d["_grad_cache"] = (owner.grad_epoch(location), None)
    ptr.__dict__ = d
    return ptr


def _results(template: Any, tensors: list, location: Any, owner: Any, grad: bool) -> tuple[list, list]:
    """``(return_ids, result pointers)`` of a template with several results or in-place results."""
    return_ids: list[int] = []
    made: list[Any] = []
    graph = _UNSET
    for spec in template.specs:
        if spec[0] == _NEW:
            oid = new_id()
            return_ids.append(oid)
            # __new__ straight, positional: type() would also run the no-op __init__ with these arguments
            ptr = _new_pointer(PointerTensor, location, oid, owner, spec[1], spec[2], spec[3], True, (), "", True)
            if spec[3] and not spec[4]:  # a non-leaf of the remote autograd graph: remember its leaves
                if graph is _UNSET:
                    graph = _graph_leaves(tensors)
                ptr.__dict__["_leafs"] = graph
            made.append(ptr)
        else:  # in-place op: the result is an input
            return_ids.append(0)
            ptr = tensors[spec[1]]
            made.append(ptr)
            if grad and type(ptr) is PointerTensor and "_leafs" in ptr.__dict__:
                ptr.__dict__["_leafs"] = None  # its graph changed in place: stop predicting through it
    return return_ids, made


_FLAT = shape_inference.FLAT
_collect = shape_inference.collect
_new_pointer = PointerTensor.__new__
#: skeleton signatures of ops without results (no shape-inference Template stands for them): one object
#: per (op, grad mode, flat argument key), as the Template is for ops with results
_NO_RESULT_SIGNATURES: dict = {}


def _no_result_signature(name: str, grad: bool, key: tuple) -> Any:
    full = (name, grad, key)
    found = _NO_RESULT_SIGNATURES.get(full)
    if found is None:
        if len(_NO_RESULT_SIGNATURES) >= shape_inference.CACHE_LIMIT:
            _NO_RESULT_SIGNATURES.clear()
        found = _NO_RESULT_SIGNATURES[full] = object()
    return found


def _definition(name: str, args: tuple, tensors: list, wire_kwargs: dict, grad: bool) -> list | None:
    """A skeleton's definition (``veil/workers/skeletons.py``): the command with each pointer argument
    replaced by the placeholder ``ObjectRef(slot)``, its slot the pointer's index in ``tensors`` (None:
    arguments a worker would not keep as a skeleton)."""
    if not skeletons.definable(args, wire_kwargs):
        return None
    slots = {id(t): k for k, t in enumerate(tensors)}
    wire = [_encode_ref(slots[id(v)]) if type(v) is PointerTensor else v for v in args]
    return [name, wire, wire_kwargs, grad]


# ------------------------------------------------------------------ gradient prediction
#
# ``p.grad`` after ``loss.backward()`` would need a reply per parameter (6 round trips
# per step for a 3-layer MLP). Each pointer that is a non-leaf of the remote autograd
# graph records the ids of the leaf pointers it depends on (``_leafs``; None: unknown).
# ``backward`` records that set for its worker; until the next grad-changing op, ``.grad``
# of a leaf in the set is a new pointer under an id chosen here, filled by a deferred
# command. Anything unsure (worker-described results, in-place ops on graph tensors,
# ``inputs=``/``create_graph``) turns prediction off, and ``.grad`` asks the worker.

_UNSET = object()
_EMPTY_LEAVES: frozenset = frozenset()


def _own_leaf(d: dict) -> frozenset:
    leaf = d.get("_as_leaf")
    if leaf is None:
        leaf = d["_as_leaf"] = frozenset((d["id_at_location"],))
    return leaf


def _graph_leaves(tensors: list) -> frozenset | None:
    """Leaf pointer ids that the inputs' remote autograd graphs reach (None: unknown)."""
    acc = None
    for t in tensors:
        if type(t) is not PointerTensor:
            continue
        d = t.__dict__
        if not d["_meta"][2]:
            continue
        leaves_ = d.get("_leafs", _UNSET)
        if leaves_ is _UNSET:
            leaves_ = _own_leaf(d)
        elif leaves_ is None:
            return None
        acc = leaves_ if acc is None or acc is leaves_ else acc | leaves_
    return _EMPTY_LEAVES if acc is None else acc


def _backward_leaves(args: tuple, kwargs: dict) -> frozenset | None:
    """The leaves ``args[0].backward(...)`` will give a gradient (None: unknown)."""
    loss = args[0] if args else None
    if type(loss) is not PointerTensor or len(args) > 3 or kwargs.get("inputs") is not None \
            or kwargs.get("create_graph"):
        return None
    d = loss.__dict__
    leaves_ = d.get("_leafs", _UNSET)
    if leaves_ is _UNSET:
        return _own_leaf(d) if d["_meta"][2] else None
    return leaves_


def _predicted_grad(ptr: PointerTensor, epoch: int) -> PointerTensor | None:
    """A pointer for ``ptr.grad`` when the last backward surely gave it one (else None: ask)."""
    d = ptr.__dict__
    owner, location = d["owner"], d["location"]
    predicted = owner._grad_leaves.get(location.id)
    if (predicted is None or predicted[0] != epoch or predicted[1] is None or "_leafs" in d
            or not d["_meta"][2] or d["id_at_location"] not in predicted[1]
            or not _may_pipeline(owner, location, [ptr])):
        return None
    if owner._lost.get(location.id):
        owner.check_lost(location, [d["id_at_location"]])
    shape, dtype, _ = d["_meta"]
    gid = new_id()
    grad = _new_pointer(PointerTensor, location, gid, owner, shape, dtype, False, True, (), "", True)  # (mine)
    enabled = _is_grad_enabled()
    if location._skeletons is None or not owner.defer_skeleton(
            location, _GRAD_GET_SIGNATURES[enabled], [d["id_at_location"]], [gid],
            lambda: ["Tensor.grad.__get__", [_encode_ref(0)], {}, enabled]):
        owner.defer(location, ["Tensor.grad.__get__", [_ref(ptr)], {}, [gid], enabled], 0)
    return grad


_GRAD_GET_SIGNATURES = {True: object(), False: object()}  # skeleton signatures of ``p.grad``, per grad mode
_GRAD_SET_NONE_SIGNATURES = {True: object(), False: object()}  # and of ``p.grad = None``


def _from_descriptors(reply: Any, args: tuple, kwargs: dict, owner: Any, location: Any) -> Any:
    assert isinstance(reply, ResultReply)
    inputs = {p.id_at_location: p for p in leaves((args, kwargs), PointerTensor)}

    def build(d: Descriptor) -> Any:
        if d.id in inputs:
            return inputs[d.id]
        ptr = PointerTensor(location, d.id, owner, d.shape, DTYPES[d.dtype], d.requires_grad, mine=True)
        if d.requires_grad:
            ptr.__dict__["_leafs"] = None  # leaf or not, its graph is unknown here: no gradient prediction
        return ptr

    return map_structure(reply.result, build, leaf=Descriptor)


# ``p + q`` and the other operators of a training step skip torch's dispatch (their own module; it
# calls :func:`call`, so it is installed once this module is complete)
from veil.tensors.pointer_operators import install_operators  # noqa: E402

install_operators()
