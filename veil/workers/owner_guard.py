"""Keeps clients from writing to the data the owner loaded (``worker.load``, datasets).

Clients may compute on owner data but must never change it. Three rules, applied
only to commands that touch protected tensors:
1. writes are refused: in-place methods (``add_``, ``__setitem__``, ``__iadd__``...),
   ``out=`` arguments and ``inplace=True`` functional calls whose target shares
   storage with owner data;
2. results that alias owner storage (views: slices, ``detach``, ``view``...) are
   stored as copies, so later writes to them cannot reach the owner's tensor;
3. worker functions (plans, DP, aggregation) receive copies of owner tensors.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Callable

import torch

from veil.exceptions import PermissionDeniedError
from veil.tensors.tree import leaves, map_structure

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


def check_dp_only(op_name: str, entries: list, worker_id: str) -> None:
    """Data the owner put under DP answers only DP releases (no raw arithmetic through pointers)."""
    if op_name not in DP_RELEASES and any(e.meta.get("dp_only") for e in entries):
        raise PermissionDeniedError(
            f"{op_name} refused: this data on worker {worker_id!r} is under the owner's differential-privacy "
            f"policy and answers only {sorted(DP_RELEASES)}"
        )


def protected_storages(entries: list) -> set[int]:
    """Storage addresses of the protected tensors among a command's inputs."""
    out = set()
    for entry in entries:
        if entry.protected:
            key = _storage(entry.obj)
            if key is not None:
                out.add(key)
    return out


def _writes_first_argument(op_name: str) -> bool:
    method = op_name.rsplit(".", 1)[-1]
    if op_name.endswith(".__set__"):  # property setters (grad, requires_grad)
        return True
    return method in _IN_PLACE_DUNDERS or (method.endswith("_") and not method.endswith("__"))


@lru_cache(maxsize=512)
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


def check_writes(op_name: str, func: Callable, args: tuple, kwargs: dict, protected: set[int], worker_id: str) -> None:
    """Raises if the op would write into owner storage."""
    targets: list = []
    if args and (_writes_first_argument(op_name) or _inplace_flag(func, args, kwargs)):
        targets.append(args[0])
    if "out" in kwargs:
        targets.extend(leaves(kwargs["out"]))
    for t in targets:
        if _storage(t) in protected:
            raise PermissionDeniedError(
                f"{op_name} would modify data the owner of worker {worker_id!r} loaded; "
                f"compute on a copy instead (e.g. ptr.copy())"
            )


def copy_aliases(result: Any, protected: set[int]) -> Any:
    """Results sharing storage with owner data become independent copies."""
    return map_structure(result, lambda t: t.clone() if _storage(t) in protected else t)


def copy_protected_args(value: Any, protected: set[int]) -> Any:
    """Worker functions get copies of owner tensors (they only need to read them)."""
    return map_structure(value, lambda t: t.detach().clone() if _storage(t) in protected else t)
