"""Result shapes of remote ops, computed locally on meta tensors and cached.

Running an op on meta tensors goes through torch's Python decompositions and
costs tens of microseconds; training loops repeat the same ops on the same
shapes, so results are cached by a signature of the call (op, grad mode, and
for each argument its shape/dtype/requires_grad or value). The cached template
says, for each tensor result, either "new tensor of this shape" or "alias of
input k" (in-place ops). Failures are cached too: data-dependent ops then go
straight to the worker-describes path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from veil.exceptions import SerializationError
from veil.messaging.allowlist import Op
from veil.messaging.tensor_payload import DTYPE_NAMES, DTYPES
from veil.tensors.pointer import PointerTensor
from veil.tensors.tree import leaves

CACHE_LIMIT = 8192
NEW, ALIAS = 0, 1


@dataclass(frozen=True)
class Template:
    structure: Any  # the meta result: its containers give the result's structure
    specs: tuple  # per tensor leaf: (ALIAS, k) or (NEW, shape, dtype, requires_grad, is_autograd_leaf)
    #: the usual op's result, one new tensor, ready for ``remote_ops._result_pointer``: (shape, dtype,
    #: requires_grad, non-leaf of the autograd graph, the pointer's constant fields); else None
    one: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.specs) == 1 and self.specs[0][0] == NEW and isinstance(self.structure, torch.Tensor):
            _, shape, dtype, requires_grad, is_leaf = self.specs[0]
            shape = tuple(shape)
            # PointerTensor.__new__'s fields of a result of this side's command; its _meta tuple is
            # shared by every such pointer (a tuple: replaced, never changed in place)
            fields = {"garbage_collect_data": True, "tags": (), "description": "", "_freed": False,
                      "_mine": True, "_meta": (shape, dtype, requires_grad)}
            object.__setattr__(self, "one", (shape, dtype, requires_grad, requires_grad and not is_leaf, fields))


_cache: dict[Any, Template | None] = {}
_MISSING = object()


class _Unhashable(Exception):
    pass


def _sig(value: Any, tensors: list, seen: dict[int, int]) -> Any:
    tp = type(value)
    if tp is PointerTensor:
        k = seen.get(id(value))
        if k is None:
            k = seen[id(value)] = len(tensors)
            tensors.append(value)
        return ("P", k, value.__dict__["_meta"])
    if isinstance(value, torch.Tensor):
        k = seen.get(id(value))
        if k is None:
            k = seen[id(value)] = len(tensors)
            tensors.append(value)
        return ("T", k, tuple(value.shape), value.dtype, value.requires_grad)
    if tp is tuple or tp is list:
        return (tp is tuple, tuple(_sig(v, tensors, seen) for v in value))
    if tp is dict:
        return ("D", tuple((k, _sig(v, tensors, seen)) for k, v in value.items()))
    if tp is slice:
        return ("S", _sig(value.start, tensors, seen), _sig(value.stop, tensors, seen), _sig(value.step, tensors, seen))
    if tp in (int, float, bool, str, type(None), type(Ellipsis), torch.dtype, torch.Size, torch.device):
        return (tp, value)  # the type matters: 1, 1.0 and True promote differently
    raise _Unhashable


#: argument types whose value is part of the cache key as is (flat fast path of :func:`collect`)
_PLAIN = frozenset({int, float, bool, str, type(None), torch.dtype})
FLAT = _FLAT = "flat"  # first element of fast-path keys: they never equal a nested key


def collect(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], Any]:
    """All distinct tensors in the call (pointers and local ones) and a cache key (or None).

    Training loops mostly call ops on pointers and plain scalars: those get a flat key
    without the recursion of the general signature.
    """
    if not kwargs and len(args) == 2:  # the usual op (p + q, p * 2): the loop below, unrolled
        a, b = args
        if type(a) is PointerTensor:
            tb = type(b)
            if tb is PointerTensor:
                if b is a:
                    meta = a.__dict__["_meta"]
                    return [a], (_FLAT, 0, meta, 0, meta)
                return [a, b], (_FLAT, 0, a.__dict__["_meta"], 1, b.__dict__["_meta"])
            if tb in _PLAIN:
                return [a], (_FLAT, 0, a.__dict__["_meta"], tb, b)
    tensors: list = []
    key: list = [_FLAT]
    for value in args:
        tp = type(value)
        if tp is PointerTensor:
            for k, t in enumerate(tensors):
                if t is value:
                    break
            else:
                k = len(tensors)
                tensors.append(value)
            key.append(k)
            key.append(value.__dict__["_meta"])
        elif tp in _PLAIN:
            key.append(tp)
            key.append(value)
        elif tp is slice and type(value.start) in _PLAIN and type(value.stop) in _PLAIN \
                and type(value.step) in _PLAIN:  # x[i:i + batch] in every training step
            key.append(slice)  # a type that is not in _PLAIN: keys stay unambiguous
            key.append((type(value.start), value.start, type(value.stop), value.stop, type(value.step), value.step))
        else:
            return _collect_nested(args, kwargs)
    if kwargs:
        for name, value in kwargs.items():
            tp = type(value)
            if tp not in _PLAIN:
                return _collect_nested(args, kwargs)
            key.append(name)  # a str, never a type or an index: keys stay unambiguous
            key.append(tp)
            key.append(value)
    return tensors, tuple(key)


def _collect_nested(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], Any]:
    tensors: list[torch.Tensor] = []
    seen: dict[int, int] = {}
    try:
        key = (_sig(args, tensors, seen), _sig(kwargs, tensors, seen))
    except _Unhashable:
        tensors = _distinct(leaves((args, kwargs)))
        key = None
    return tensors, key


def _distinct(items: list) -> list:
    out, seen = [], set()
    for t in items:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _meta_of(t: torch.Tensor) -> torch.Tensor:
    if type(t) is PointerTensor:
        shape, dtype, requires_grad = t.__dict__["_meta"]
        return torch.empty(shape, dtype=dtype, device="meta", requires_grad=requires_grad)
    return t.detach().to("meta").requires_grad_(t.requires_grad)


def _replace(value: Any, metas: dict[int, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return metas[id(value)]
    tp = type(value)
    if tp is tuple or tp is list:
        return tp(_replace(v, metas) for v in value)
    if tp is dict:
        return {k: _replace(v, metas) for k, v in value.items()}
    return value


def infer(op: Op, args: tuple, kwargs: dict, tensors: list[torch.Tensor], key: Any,
          grad: bool | None = None) -> Template | None:
    """The result template of ``op(*args, **kwargs)``, or None when meta tensors can't tell
    (``grad``: ``torch.is_grad_enabled()``, when the caller has read it already)."""
    full_key = None
    if key is not None:
        full_key = (op.name, torch.is_grad_enabled() if grad is None else grad, key)
        found = _cache.get(full_key, _MISSING)  # one hash of the nested key (``in`` then ``[]`` hashed twice)
        if found is not _MISSING:
            return found
    template = _run_meta(op, args, kwargs, tensors)
    if full_key is not None:
        if len(_cache) >= CACHE_LIMIT:
            _cache.clear()
        _cache[full_key] = template
    return template


def _run_meta(op: Op, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> Template | None:
    metas = {id(t): _meta_of(t) for t in tensors}
    index_of_meta = {id(metas[id(t)]): k for k, t in enumerate(tensors)}
    try:
        result = op.func(*_replace(args, metas), **_replace(kwargs, metas))
    except Exception:
        return None
    specs = []
    for leaf in leaves(result):
        k = index_of_meta.get(id(leaf))
        if k is not None:
            specs.append((ALIAS, k))
        else:
            if leaf.dtype not in DTYPE_NAMES:  # refused here, not at the flush of a later command
                raise SerializationError(f"{op.name} would make a {leaf.dtype} tensor, which the wire "
                                         f"does not carry ({', '.join(sorted(DTYPES))})")
            specs.append((NEW, tuple(leaf.shape), leaf.dtype, leaf.requires_grad, leaf.grad_fn is None))
    return Template(result, tuple(specs))


def clear_cache() -> None:
    _cache.clear()
