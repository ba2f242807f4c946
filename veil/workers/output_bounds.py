"""Sizes a command's results before its op runs, so that a session quota refuses a huge one unallocated.

The monitor charges a result once it exists (``ReferenceMonitor.store``): a request for ``torch.zeros(n)``,
``x.expand(...).clone()``, ``outer`` or a broadcast of two long vectors was allocated in full, for the moment
of one request, before the quota said no. With a quota set (``--max-session-mb``), :func:`check` first runs
the op on PyTorch's ``meta`` device (shapes and dtypes only, no data: the same for every value, so it says
nothing about a secret input) and refuses the command when the new storage it would allocate does not fit
what the session has left. The meta run costs tens of microseconds, so its answer is kept per op and
argument signature (shapes, dtypes, plain values): a training loop pays it once per shape.

Best effort by design: an op without a meta kernel, or one whose output shape depends on values
(``nonzero``, ``unique``), is let through and charged afterwards as before; the process cap
(``--max-memory-mb``) stays the backstop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

import torch

from veil.tensors.tree import leaves

#: signatures whose sizes are remembered (least recently used first out)
CACHE_SIZE = 4096
#: a signature longer than this (arguments, nested items) is not cached: sized each time
MAX_KEY_ITEMS = 64

_UNKNOWN = -1  # the op could not be sized on meta: charged afterwards only
_cache: OrderedDict = OrderedDict()
_lock = threading.Lock()


class _Unkeyable(Exception):
    """An argument that does not fit a signature (an object, a long list): sized without the cache."""


def _key_of(value: Any, out: list) -> None:
    tp = type(value)
    if tp is torch.Tensor or tp is torch.nn.Parameter:
        out.append((value.dtype, value.shape, value.stride()))
    elif tp in (int, float, bool, str, type(None)) or isinstance(value, (torch.dtype, torch.Size)):
        out.append((tp, value))
    elif tp in (list, tuple):
        out.append((tp, len(value)))
        for v in value:
            _key_of(v, out)
    elif tp is slice:
        out.append((tp, value.start, value.stop, value.step))
    else:
        raise _Unkeyable
    if len(out) > MAX_KEY_ITEMS:
        raise _Unkeyable


def _signature(name: str, args: Any, kwargs: dict) -> tuple | None:
    out: list = [name]
    try:
        _key_of(args, out)
        for k in sorted(kwargs):
            out.append(k)
            _key_of(kwargs[k], out)
    except _Unkeyable:
        return None
    return tuple(out)


def _on_meta(value: Any, inputs: list) -> Any:
    tp = type(value)
    if tp is torch.Tensor or tp is torch.nn.Parameter:
        t = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        inputs.append(t)
        return t
    if tp in (list, tuple):
        return tp(_on_meta(v, inputs) for v in value)
    return value


def new_bytes(func: Callable, args: Any, kwargs: dict) -> int:
    """Bytes of new storage ``func(*args, **kwargs)`` returns (views and inputs returned as they are: 0),
    from a run on the meta device; ``_UNKNOWN`` when it cannot run there."""
    inputs: list = []
    meta_args = [_on_meta(a, inputs) for a in args]
    meta_kwargs = {k: _on_meta(v, inputs) for k, v in kwargs.items()}
    if not inputs:  # a creation op (zeros, arange, randn...): made on meta
        meta_kwargs["device"] = "meta"
    try:
        with torch.no_grad():
            result = func(*meta_args, **meta_kwargs)
    except Exception:  # noqa: BLE001  (no meta kernel, a data-dependent shape, bad arguments: the op itself says)
        return _UNKNOWN
    total = 0
    bases = set()
    for t in leaves(result, torch.Tensor):
        if t.device.type != "meta":  # (an op that ignored the device: not a size we know)
            return _UNKNOWN
        base = t._base if t._base is not None else t
        if any(base is i for i in inputs) or id(base) in bases:
            continue
        bases.add(id(base))
        total += base.untyped_storage().nbytes()
    return total


def predicted_bytes(name: str, func: Callable, args: Any, kwargs: dict) -> int:
    """:func:`new_bytes`, remembered per signature."""
    key = _signature(name, args, kwargs)
    if key is not None:
        with _lock:
            known = _cache.get(key)
            if known is not None:
                _cache.move_to_end(key)
                return known
    size = new_bytes(func, args, kwargs)
    if key is not None:
        with _lock:
            _cache[key] = size
            if len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return size


def check(monitor: Any, principal: Any, name: str, func: Callable, args: Any, kwargs: dict) -> None:
    """Refuses (QuotaExceededError, as the store would afterwards) a command whose results would not fit
    the session's quota, before its op allocates them. No quota, or an in-process caller: nothing to do."""
    quota = monitor.max_session_bytes
    if quota is None or not principal.isolated:
        return
    size = predicted_bytes(name, func, args, kwargs)
    if size > 0:
        monitor.check_room(principal, size, name)
