"""The arithmetic operators of a training step on pointers, without torch's dispatch.

``p + q`` reaches ``__torch_function__`` through torch's C++ argument parser and override lookup (~9 K
instructions per op, as much as the rest of building the command). For the operators of every
training step, between a pointer and a pointer or a Python number, PointerTensor's own operator
method calls :func:`veil.tensors.remote_ops.call` with exactly what torch would pass to
``__torch_function__``: the same op and arguments, found by asking torch once at import
(:func:`_probe_operator`: an operator whose answer is not the plain ``(func, (self, other))`` keeps
torch's path). Anything else (other operand types, a torch-function mode, torch functions disabled)
takes torch's own method, as before. Installed by ``remote_ops`` once it is complete.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from veil.messaging.allowlist import INFER, Op
from veil.tensors import remote_ops
from veil.tensors.pointer import PointerTensor

_T = torch.Tensor
_NUMBERS = frozenset((int, float, bool))
_tf_enabled = torch._C._is_torch_function_enabled
_tf_mode = torch._C._is_torch_function_mode_enabled
OPERATORS = ("__add__", "__radd__", "__sub__", "__mul__", "__rmul__", "__truediv__", "__matmul__")


def _probe_operator(name: str, numbers: bool) -> Any:
    """The allowlisted op torch passes to __torch_function__ for ``p <name> other``, asked on a probe tensor
    subclass with a tensor operand (and a number, if ``numbers``); None if torch passes anything but
    ``(func, (p, other))`` without keyword arguments, or func is not a plain allowlisted op."""
    seen = []

    class _Probe(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            seen.append((func, args, kwargs))
            return 0

        @classmethod
        def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            raise RuntimeError("probe")

    try:
        a = _T._make_wrapper_subclass(_Probe, (2,), dtype=torch.float32)
        b = _T._make_wrapper_subclass(_Probe, (2,), dtype=torch.float32)
        expected = [(a, b), (a, 2.0)] if numbers else [(a, b)]
        method = getattr(_T, name)
        for args in expected:
            method(*args)
    except Exception:
        return None
    if len(seen) != len(expected) or any(s[0] is not seen[0][0] or s[2] for s in seen) \
            or any(s[1][0] is not e[0] or s[1][1] is not e[1] or len(s[1]) != 2 for s, e in zip(seen, expected)):
        return None
    func = seen[0][0]
    try:
        op = remote_ops._OPS_BY_FUNC.get(func)
    except TypeError:
        return None
    if op is None or func in remote_ops.LOCAL_HANDLERS or op.worker_function or op.shapes != INFER:
        return None
    return op


def _operator(name: str, op: Op, numbers: bool) -> Callable[[Any, Any], Any]:
    slow = getattr(_T, name)
    fast_types = frozenset((PointerTensor, *_NUMBERS)) if numbers else frozenset((PointerTensor,))

    def method(self: PointerTensor, other: Any) -> Any:
        if type(other) in fast_types and _tf_enabled() and not _tf_mode():
            return remote_ops.call(op, (self, other), {})
        return slow(self, other)

    method.__name__ = method.__qualname__ = name
    return method


def install_operators() -> None:
    """PointerTensor's operators of :data:`OPERATORS` whose probe found a plain allowlisted op."""
    for name in OPERATORS:
        numbers = name != "__matmul__"
        op = _probe_operator(name, numbers)
        if op is not None:
            setattr(PointerTensor, name, _operator(name, op, numbers))
