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

_T = torch.Tensor


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
    """``p.grad``: asks the worker once per backward, then answers from a cache."""
    ptr = args[0]
    epoch = ptr.owner.grad_epoch(ptr.location)
    cached = ptr.__dict__.get("_grad_cache")
    if cached is not None and cached[0] == epoch:
        return cached[1]
    grad = call(ALLOWLIST.by_name("Tensor.grad.__get__"), (ptr,), {})
    ptr.__dict__["_grad_cache"] = (epoch, grad)
    return grad


def _set_grad(func: Any, args: tuple, kwargs: dict) -> None:
    ptr, value = args
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


def handle(func: Any, args: tuple, kwargs: dict) -> Any:
    local = LOCAL_HANDLERS.get(func)
    if local is not None:
        return local(func, args, kwargs)
    return call(ALLOWLIST.by_func(func), args, kwargs)


def _location_of(tensors: list[torch.Tensor]) -> PointerTensor:
    """The first pointer; every other pointer must live on the same worker."""
    first = None
    for t in tensors:
        if type(t) is PointerTensor:
            if first is None:
                first = t
            elif t.location is not first.location:
                raise WorkerMismatchError(
                    f"operation mixes objects on different workers: {first.id_at_location} on "
                    f"{first.location.id!r} and {t.id_at_location} on {t.location.id!r}; .move() one of them first"
                )
    if first is None:
        raise TypeError("no PointerTensor among the arguments")
    return first


def _to_wire(value: Any) -> Any:
    tp = type(value)
    if tp is PointerTensor:
        return ObjectRef(value.id_at_location)
    if tp is tuple or tp is list:
        return tp(_to_wire(v) for v in value)
    if tp is dict:
        return {k: _to_wire(v) for k, v in value.items()}
    return value


#: ops after which cached ``.grad`` pointers of that worker may be stale
_GRAD_CHANGING = frozenset({"Tensor.backward"})  # a grad set updates only its own cache

_DEFERRING = threading.local()


@contextlib.contextmanager
def deferring() -> Iterator[None]:
    """Inside: commands whose results this side names ride on the next request to their
    worker, as with ``pipelining`` (the SMPC dispatch uses it for share-local ops; an
    error is raised by that next request, the next opening or ``.get()``)."""
    previous = getattr(_DEFERRING, "on", False)
    _DEFERRING.on = True
    try:
        yield
    finally:
        _DEFERRING.on = previous


def call(op: Op, args: tuple, kwargs: dict, location: Any = None) -> Any:
    """Runs an allowlisted op on the worker holding the pointers among ``args``.

    ``location`` names the worker explicitly, for worker functions whose
    arguments hold no pointer; the local worker then sends the command.
    """
    if kwargs.get("memory_format") is torch.preserve_format:  # the default of every *_like op and clone
        kwargs = {k: v for k, v in kwargs.items() if k != "memory_format"}
    tensors, key = shape_inference.collect(args, kwargs)
    if location is None:
        first = _location_of(tensors)
        owner, location = first.owner, first.location
    else:
        owner = location.hook.local_worker
    wire_args, wire_kwargs = _to_wire(args), _to_wire(kwargs)
    grad = torch.is_grad_enabled()
    if op.worker_function or op.name in _GRAD_CHANGING:
        owner.bump_grad_epoch(location)
    pipelined = (getattr(location, "pipelining", False) or getattr(_DEFERRING, "on", False)) and not op.worker_function
    if op.shapes == NO_RESULT:
        msg = CommandMessage(op.name, wire_args, wire_kwargs, [], grad)
        owner.defer_command(location, msg) if pipelined else owner.send_msg(msg, location)
        return None
    template = shape_inference.infer(op, args, kwargs, tensors, key) if op.shapes == INFER else None
    if template is None:
        reply = owner.send_msg(CommandMessage(op.name, wire_args, wire_kwargs, None, grad), location)
        return _from_descriptors(reply, args, kwargs, owner, location)
    return_ids: list[int] = []
    made: list[Any] = []
    for spec in template.specs:
        if spec[0] == shape_inference.ALIAS:  # in-place op: the result is an input
            return_ids.append(0)
            made.append(tensors[spec[1]])
        else:
            oid = new_id()
            return_ids.append(oid)
            made.append(PointerTensor(location, oid, owner, spec[1], spec[2], spec[3]))
    msg = CommandMessage(op.name, wire_args, wire_kwargs, return_ids, grad)
    owner.defer_command(location, msg) if pipelined else owner.send_msg(msg, location)
    if isinstance(template.structure, torch.Tensor):
        return made[0]
    it = iter(made)
    return map_structure(template.structure, lambda _: next(it))


def _from_descriptors(reply: Any, args: tuple, kwargs: dict, owner: Any, location: Any) -> Any:
    assert isinstance(reply, ResultReply)
    inputs = {p.id_at_location: p for p in leaves((args, kwargs), PointerTensor)}

    def build(d: Descriptor) -> Any:
        if d.id in inputs:
            return inputs[d.id]
        return PointerTensor(location, d.id, owner, d.shape, DTYPES[d.dtype], d.requires_grad)

    return map_structure(reply.result, build, leaf=Descriptor)
