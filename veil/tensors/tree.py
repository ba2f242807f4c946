"""Flatten/map nested results (tuples, lists, dicts, torch.return_types, namedtuples)."""

from __future__ import annotations

from typing import Any, Callable

import torch


def _rebuild(container: Any, items: list) -> Any:
    tp = type(container)
    if tp is tuple or tp is list:
        return tp(items)
    if hasattr(container, "n_fields"):  # torch.return_types.* are structseqs
        return tp(items)
    if hasattr(container, "_fields"):  # namedtuple
        return tp(*items)
    return tuple(items) if isinstance(container, tuple) else list(items)


def map_structure(obj: Any, fn: Callable[[Any], Any], leaf: type | tuple = torch.Tensor) -> Any:
    """Applies ``fn`` to every leaf instance of ``leaf`` inside tuples, lists and dicts."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return _rebuild(obj, [map_structure(o, fn, leaf) for o in obj])
    if isinstance(obj, dict):
        return {k: map_structure(v, fn, leaf) for k, v in obj.items()}
    return obj


def leaves(obj: Any, leaf: type | tuple = torch.Tensor) -> list:
    """Every leaf instance of ``leaf``, depth first, in the order map_structure visits them."""
    out: list = []
    _collect(obj, leaf, out)
    return out


def _collect(obj: Any, leaf: type | tuple, out: list) -> None:
    # A module-level function, not a recursive closure: closures that refer to
    # themselves form reference cycles, which would keep pointers (and so
    # remote objects) alive until the cyclic garbage collector runs.
    if isinstance(obj, leaf):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _collect(x, leaf, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _collect(x, leaf, out)
