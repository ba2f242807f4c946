"""Tracing: run a function once on real example tensors and record its torch ops.

Arguments and state are wrapped in :class:`TraceTensor` (a wrapper subclass
holding the real tensor). Every torch call that reaches ``__torch_function__``
runs for real on the unwrapped values — so autograd, ``backward()`` and
``.grad`` behave exactly as in eager mode — and is appended to the plan as an
allowlisted op over slots. Only allowlisted ops can be traced.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from veil.exceptions import OperationNotAllowedError
from veil.messaging.allowlist import ALLOWLIST
from veil.plans.ops import PlanOp, PlanSpec, SlotRef
from veil.tensors.tree import leaves, map_structure
from veil.workers.quiet_warnings import capturing

_T = torch.Tensor
#: metadata answered from the wrapper itself, not recorded
_LOCAL = {
    _T.shape.__get__, _T.dtype.__get__, _T.device.__get__, _T.requires_grad.__get__, _T.is_leaf.__get__,
    _T.ndim.__get__, _T.layout.__get__, _T.dim, _T.size, _T.numel, _T.is_floating_point, _T.__len__,
    _T.is_sparse.__get__, _T.is_quantized.__get__, _T.is_meta.__get__, _T.is_nested.__get__, _T.element_size,
    _T.is_contiguous, _T.stride, _T.is_complex,
}

#: metadata that may follow the batch size (a Python value the function computes from it is baked into the plan)
_SIZES = {_T.shape.__get__, _T.size, _T.numel, _T.__len__, _T.stride, _T.is_contiguous}


class TraceTensor(torch.Tensor):
    """A real tensor in disguise that records what is done to it."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor, slot: int, tracer: "Tracer") -> "TraceTensor":
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, dtype=elem.dtype, requires_grad=elem.requires_grad, device=elem.device
        )
        r.__dict__.update(elem=elem, slot=slot, tracer=tracer)
        return r

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        self.__dict__["tracer"].read_sizes = True  # (it shows the shape: a function may parse the rows from it)
        return f"TraceTensor(slot={self.__dict__['slot']}, shape={tuple(self.__dict__['elem'].shape)})"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tracer = leaves((args, kwargs), TraceTensor)[0].__dict__["tracer"]
        if func in _LOCAL:
            if func in _SIZES:
                tracer.read_sizes = True
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        return tracer.record(func, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:  # a Python number the plan could not replay
            raise OperationNotAllowedError(
                "cannot trace into a plan: a traced tensor's value is read as a Python number (t.item(), "
                "torch.full(size, t), torch.arange(t)); keep it a tensor: torch.full_like(x, t), "
                "torch.zeros(size) + t")
        raise RuntimeError(f"{func} reached TraceTensor below the torch-function layer")


#: op warnings kept from one trace to show after it
MAX_WARNINGS = 64


def show_warnings(caught: list) -> None:
    """Shows the ops' warnings of a finished trace, ``(text, category)`` each (each once), under the caller's
    filters, as raised where the build was called."""
    for text, category in dict.fromkeys(caught):
        warnings.warn(text, category, stacklevel=3)


class Tracer:
    def __init__(self) -> None:
        self.ops: list[PlanOp] = []
        self.n_slots = 0
        # whether the function saw anything that may follow the batch size: a size, a count, a Python value an
        # op returned, a list of tensors as long as some size (unbind, split); if not, its op list cannot differ
        # on another batch and a second trace (veil/plans/batch.py) would only run it again
        self.read_sizes = False
        # the warnings the ops raised, kept from the function (it could branch on them: a graph that follows
        # something a plan cannot replay) and shown once the trace is done (:func:`show_warnings`)
        self.warned: list = []

    def new_slot(self) -> int:
        self.n_slots += 1
        return self.n_slots - 1

    def wrap(self, t: torch.Tensor) -> TraceTensor:
        return TraceTensor(t, self.new_slot(), self)

    def record(self, func: Any, args: tuple, kwargs: dict) -> Any:
        try:
            op = ALLOWLIST.by_func(func)
        except OperationNotAllowedError as e:
            raise OperationNotAllowedError(f"cannot trace into a plan: {e}") from None
        if op.worker_function:
            raise OperationNotAllowedError(f"{op.name} cannot be part of a plan")
        to_slot = lambda t: SlotRef(t.__dict__["slot"]) if type(t) is TraceTensor else t.detach().clone()
        wire_args, wire_kwargs = map_structure(args, to_slot), map_structure(kwargs, to_slot)
        unwrap = lambda t: t.__dict__["elem"] if type(t) is TraceTensor else t
        real_args, real_kwargs = map_structure(args, unwrap), map_structure(kwargs, unwrap)
        caught: list = []
        try:
            # a warning is neither seen by the function (catch_warnings(record=True)) nor an exception it could
            # catch (simplefilter("error")), whatever filters it set: kept for after the build, this thread's only
            with capturing(caught):
                result = op.func(*real_args, **real_kwargs)
        except Exception:
            self.read_sizes = True  # (caught by the function, the error may have decided what it did next)
            raise
        if caught and len(self.warned) < MAX_WARNINGS:
            self.warned += caught[:MAX_WARNINGS - len(self.warned)]
        if not (result is None or isinstance(result, torch.Tensor)):  # (a number, a list as long as some size)
            self.read_sizes = True
        by_elem = {id(t.__dict__["elem"]): t for t in leaves((args, kwargs), TraceTensor)}
        out_slots: list[int] = []

        def rewrap(t: torch.Tensor) -> TraceTensor:
            existing = by_elem.get(id(t))
            if existing is not None:  # in-place op: same slot, same wrapper
                out_slots.append(existing.__dict__["slot"])
                return existing
            w = self.wrap(t)
            out_slots.append(w.__dict__["slot"])
            return w

        wrapped = map_structure(result, rewrap)
        self.ops.append(PlanOp(op.name, wire_args, wire_kwargs, out_slots, torch.is_grad_enabled()))
        return wrapped


def trace(fn: Callable[..., Any], example_args: tuple, state: list[torch.Tensor], name: str,
          bind_state: Callable[[list[TraceTensor]], Any] | None = None, seen: dict | None = None) -> PlanSpec:
    """Traces ``fn(*args)`` (with ``state`` bound through ``bind_state``) into a PlanSpec; ``seen["sizes"]``,
    if given: whether the function read anything that may follow the batch size (:attr:`Tracer.read_sizes`),
    and ``seen["warnings"]`` the warnings its ops raised (without ``seen``: shown when it returns)."""
    tracer = Tracer()
    if seen is not None:
        seen["sizes"] = True  # (until it returns: a trace that raises read them as far as anyone knows)
    inputs = [tracer.wrap(a) for a in example_args]
    state_wrapped = [tracer.wrap(s) for s in state]
    if bind_state is not None:
        out = bind_state(state_wrapped, *inputs)
    else:
        out = fn(*inputs)
    outputs = map_structure(out, lambda t: SlotRef(t.__dict__["slot"]), leaf=TraceTensor)
    if leaves(outputs, torch.Tensor):
        raise ValueError(f"plan {name!r} returns a tensor that does not come from its inputs or state")
    if seen is not None:
        seen["sizes"], seen["warnings"] = tracer.read_sizes, tracer.warned
    else:
        show_warnings(tracer.warned)
    return PlanSpec(name, len(inputs), len(state_wrapped), tracer.n_slots, tracer.ops, outputs)
