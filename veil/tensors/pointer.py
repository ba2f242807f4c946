"""PointerTensor: a local stand-in for a tensor that lives on another worker.

It is a ``torch.Tensor`` wrapper subclass with no data: shape, dtype and
requires_grad are real (so ``p.shape`` needs no round trip), and every torch
operation reaching ``__torch_function__`` becomes one command message to the
worker. The worker keeps the autograd graph, so ``loss.backward()`` is one
command and ``p.grad`` is a pointer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import torch

from veil.exceptions import RevealError, SerializationError, escaped
from veil.ids import new_id
from veil.messaging import serde
from veil.tensors.handle import RemoteHandle

if TYPE_CHECKING:
    from veil.workers.base import BaseWorker


_make_wrapper = torch.Tensor._make_wrapper_subclass
_CPU = torch.device("cpu")  # a device object: the string form is parsed on every pointer (~1 K instructions)


def pointer_meta(ptr: "PointerTensor") -> tuple:
    """``(shape as a tuple, dtype, requires_grad)`` of ``ptr`` as plain values, for code outside this
    package's hot paths: the tensor properties would re-enter ``__torch_function__`` (a dispatch each).
    (``remote_ops`` and ``shape_inference``, the pointer's own per-op paths, read the same slot inline.)"""
    return ptr.__dict__["_meta"]


class PointerTensor(RemoteHandle, torch.Tensor):
    """Pointer to ``id_at_location`` on ``location``, owned by ``owner``.

    A :class:`~veil.tensors.handle.RemoteHandle` (garbage collection, tags and
    descriptions come from there); the attributes are set inline here because
    pointers are created on every remote op.

    Attributes:
        location: the worker holding the data.
        id_at_location: the (unguessable) id of the object there.
        owner: the worker this pointer belongs to (the local worker, or another
            worker for pointer-to-pointer chains); it sends the commands.
        id: this pointer's own id (for display).
        garbage_collect_data: free the remote object when this pointer dies.
        mine: the client created the remote object (see ``remote_ops._may_pipeline``).
    """

    location: "BaseWorker"
    id_at_location: int
    owner: "BaseWorker"
    HANDLE_KIND = "tensor"

    @staticmethod
    def __new__(
        cls,
        location: "BaseWorker",
        id_at_location: int,
        owner: "BaseWorker",
        shape: tuple | torch.Size,
        dtype: torch.dtype,
        requires_grad: bool = False,
        garbage_collect_data: bool = True,
        tags: tuple = (),
        description: str = "",
        mine: bool = False,
    ) -> "PointerTensor":
        r = _make_wrapper(cls, shape, dtype=dtype, requires_grad=requires_grad, device=_CPU)
        d = r.__dict__
        d["location"] = location
        d["id_at_location"] = id_at_location
        d["owner"] = owner
        d["garbage_collect_data"] = garbage_collect_data
        d["tags"] = tuple(tags)
        d["description"] = description
        d["_freed"] = False
        # the remote object is this client's own (sent, or a result of its command): commands on
        # it may be pipelined. Anything else (owner data from search, shares, pointer chains) is not.
        d["_mine"] = mine
        if mine and requires_grad:  # a fresh object of ours has no gradient until the next backward there
            d["_grad_cache"] = (owner.grad_epoch(location), None)
        # (shape, dtype, requires_grad) as plain Python values: reading them through
        # the tensor properties would re-enter __torch_function__ on every op.
        d["_meta"] = (tuple(shape), dtype, requires_grad)
        return r

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # everything happens in __new__
        pass

    @property
    def id(self) -> int:
        """This pointer's own id (for display), drawn when first read: most result pointers never show it."""
        d = self.__dict__
        pid = d.get("_pid")
        if pid is None:
            pid = d["_pid"] = new_id()
        return pid

    @id.setter
    def id(self, value: int) -> None:
        self.__dict__["_pid"] = value

    # ----------------------------------------------------------- interception

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # replaced by remote_ops._torch_function once remote_ops is imported (the same call, one frame less)
        return _handle(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        raise RevealError(
            f"{func} reached a PointerTensor below the torch-function layer: a pointer has no local data"
        )

    # ----------------------------------------------------------- lifecycle (__del__: RemoteHandle)

    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        # what a worker chose (tags, description, ids) is printed with its control characters escaped: a newline
        # or an ANSI escape in a description printed a fake pointer line, or cleared the scientist's screen
        d = self.__dict__
        head = escaped(f"[PointerTensor | {d['owner'].id}:{self.id} -> {d['location'].id}:{d['id_at_location']}]")
        if not d["tags"] and not d["description"]:
            return head
        lines = [head]  # PySyft 0.2's layout for tagged/described pointers
        if d["tags"]:
            lines.append("\tTags: " + " ".join(escaped(t) for t in d["tags"]))
        lines.append(f"\tShape: {torch.Size(d['_meta'][0])}")
        if d["description"]:
            lines.append(f"\tDescription: {escaped(d['description'])}")
        return "\n".join(lines)

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce_ex__(self, proto: Any) -> Any:
        raise TypeError("PointerTensor cannot be pickled; veil serializes pointers in its own wire format")

    def __deepcopy__(self, memo: dict) -> "PointerTensor":
        return self.copy()

    # ----------------------------------------------------------- user API

    def get(self, user: str | None = None, delete: bool = True, wait: float | None = None) -> Any:
        """Brings the value back (and frees it remotely unless the owner protects it).

        ``wait``: for data under the owner's review policy, wait up to this many seconds
        for the owner's decision instead of raising ReviewPendingError at once.
        """
        from veil.messaging.messages import GetObjectsMessage

        if self.owner._lost.get(self.location.id):  # a failed deferred command never stored it
            self.owner.check_lost(self.location, [self.id_at_location])
        # PySyft's ``x.get().grad``: point at the remote grad first (nothing is released yet) ...
        grad_ptr = self.grad if self.__dict__["_meta"][2] else None

        def fetch() -> Any:
            return self.owner.send_msg(GetObjectsMessage([self.id_at_location], delete, user), self.location)

        if wait:
            from veil.governance.client import get_waiting

            reply = get_waiting(fetch, wait)
        else:
            reply = fetch()
        if delete:
            self.__dict__["_freed"] = True
        value = reply.objects[0]
        # ... and fetch it only once the value itself was released to us (same get rules apply).
        if type(grad_ptr) is PointerTensor and type(value) in (torch.Tensor, torch.nn.Parameter) and value.is_leaf:
            value.grad = grad_ptr.get(user=user)
            self.__dict__.pop("_grad_cache", None)  # that grad pointer is spent
        return value

    def request(self, reason: str = "") -> dict:
        """Asks the data owner to release this (review-policy) object; returns the request's state."""
        from veil.governance.client import request

        return request(self, reason)

    def copy(self) -> "PointerTensor":
        """A new pointer to a remote copy (same worker, no autograd history)."""
        from veil.messaging.allowlist import ALLOWLIST
        from veil.tensors import remote_ops

        return remote_ops.call(ALLOWLIST.by_name("veil.copy"), (self,), {})

    def move(self, destination: "BaseWorker", user: str | None = None) -> "PointerTensor":
        """Moves the data straight from its worker to ``destination`` (not through here)."""
        from veil.messaging.messages import MoveMessage

        new = new_id()
        self.owner.send_msg(MoveMessage([self.id_at_location], destination.id, [new], user), self.location)
        self.__dict__["_freed"] = True
        return PointerTensor(
            location=destination, id_at_location=new, owner=self.owner, shape=self.shape, dtype=self.dtype,
            requires_grad=self.requires_grad, garbage_collect_data=self.garbage_collect_data,
            tags=self.tags, description=self.description, mine=self.__dict__["_mine"],
        )

    def remote_get(self) -> "PointerTensor":
        """For a pointer to a pointer: the middle worker fetches the value (one level up)."""
        from veil.messaging.messages import RemoteGetMessage

        self.owner.send_msg(RemoteGetMessage(self.id_at_location), self.location)
        return self

    def send(self, *workers: "BaseWorker", **kwargs: Any) -> "PointerTensor":
        """Sends the pointer itself: the result is a pointer to a pointer."""
        from veil.api import send

        return send(self, *workers, **kwargs)

    def fix_precision(self, *args: Any, **kwargs: Any) -> Any:
        """PySyft's ``ptr.fix_precision()``: the worker encodes its own values (nothing comes back)."""
        from veil.compat.remote_fixed_precision import fix_precision_remote

        return fix_precision_remote(self, *args, **kwargs)

    fix_prec = fix_precision

    def share(self, *parties: Any, crypto_provider: Any = None, **kwargs: Any) -> Any:
        """PySyft's ``ptr.share(bob, alice)`` for integer values: the worker shares its own values."""
        from veil.compat.remote_fixed_precision import SharedPointer, share_remote

        return SharedPointer(share_remote(self, parties, crypto_provider))

    # ``p.grad`` (an optimizer reads it several times per parameter and step, and sets it to None in
    # zero_grad) and ``p.is_sparse`` as Python attributes: torch's C++ getters and setter would first
    # dispatch to __torch_function__, which then runs the same handlers (remote_ops.LOCAL_HANDLERS)
    @property
    def grad(self) -> Any:
        return _handle(_GRAD_GET, (self,), {})

    @grad.setter
    def grad(self, value: Any) -> None:
        _handle(_GRAD_SET, (self, value), {})

    @grad.deleter
    def grad(self) -> None:  # torch: ``del t.grad`` is ``t.grad = None``
        _handle(_GRAD_SET, (self, None), {})

    @property
    def is_sparse(self) -> bool:
        return False  # a pointer's wrapper has _make_wrapper_subclass's default layout, strided

    @property
    def child(self) -> "PointerTensor":
        """PySyft 0.2's ``x.child`` (wrapper -> pointer): in veil the pointer is its own wrapper."""
        return self


_GRAD_GET, _GRAD_SET = torch.Tensor.grad.__get__, torch.Tensor.grad.__set__  # the keys torch itself would pass


def _handle(func: Any, args: tuple, kwargs: dict) -> Any:
    # Bound on first use: remote_ops imports this module.
    global _handle
    from veil.tensors.remote_ops import handle

    _handle = handle
    return handle(func, args, kwargs)


@dataclass
class PointerWire:
    """A pointer as it travels: the receiver builds a PointerTensor it owns."""

    location_id: str
    id_at_location: int
    shape: tuple
    dtype: torch.dtype
    requires_grad: bool
    garbage_collect_data: bool

    @staticmethod
    def of(ptr: PointerTensor, garbage_collect_data: bool | None = None) -> "PointerWire":
        gc = ptr.garbage_collect_data if garbage_collect_data is None else garbage_collect_data
        return PointerWire(ptr.location.id, ptr.id_at_location, tuple(ptr.shape), ptr.dtype, ptr.requires_grad, gc)


def _encode_pointer(p: Any) -> bytes:
    w = p if isinstance(p, PointerWire) else PointerWire.of(p)
    return msgpack.packb(
        [w.location_id, w.id_at_location, list(w.shape), serde.DTYPE_NAMES[w.dtype], w.requires_grad,
         w.garbage_collect_data]
    )


def _decode_pointer(data: bytes, ctx: serde.DecodeContext) -> PointerTensor:
    fields_ = msgpack.unpackb(data, raw=False)
    if not isinstance(fields_, list) or len(fields_) != 6:
        raise SerializationError("malformed pointer")
    location_id, oid, shape, dtype_name, rg, gc = fields_
    dtype, shape = serde.tensor_spec(dtype_name, shape)
    if not isinstance(location_id, str) or type(oid) is not int or not isinstance(rg, bool) or not isinstance(gc, bool):
        raise SerializationError("malformed pointer fields")
    if ctx.make_pointer is None:
        raise SerializationError("a pointer arrived where no worker can own it")
    return ctx.make_pointer(location_id, oid, shape, dtype, rg, gc)


serde.register_ext(serde.EXT_CODES.POINTER, (PointerTensor, PointerWire), _encode_pointer, _decode_pointer)
