"""The leaves a session's ``backward(create_graph=True)`` reached, whose gradients are dropped when it ends.

torch keeps such a leaf and the graph of its gradient in a reference cycle Python's collector cannot break (the
leaf holds its ``.grad``, whose graph holds the leaf's AccumulateGrad node, which holds the leaf): on a worker
without a session quota (under one, ``create_graph`` is refused: veil/workers/output_bounds.py) every session's
leaves, their gradients and what those graphs saved stayed in the worker's memory after the session ended. The
leaves are remembered, weakly, per session (commands and plan steps alike) and, when it ends, a gradient that has
a graph is dropped: the cycle is gone, and what nothing else holds is freed.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Iterator

import torch

from veil.tensors.tree import leaves

#: leaves remembered per session before the dead ones are swept
SWEEP_AT = 4096

_lock = threading.Lock()
_leaves: dict[str, dict[int, weakref.ref]] = {}  # session namespace -> id(leaf) -> the leaf (weakly)
_registered = False  # (end_session among the session-end handlers, at the first note)


def wants_graph(args: Any, kwargs: dict) -> bool:
    """Whether ``backward(*args, **kwargs)`` builds a graph of its gradients: torch reads any truthy
    ``create_graph`` as True (``1``, a ``tensor(True)``), so only None and False say it does not."""
    value = kwargs.get("create_graph", args[3] if len(args) > 3 else None)
    return value is not None and value is not False


def graph_nodes(first: Any, max_nodes: int, past_bound: Callable[[], None] | None = None) -> Iterator[Any]:
    """The nodes of an autograd graph from ``first`` (its root's ``grad_fn``; None: none), each once, depth
    first. ``past_bound()`` (it raises) is called before a node past ``max_nodes`` would be added; without it
    the walk ends once more than ``max_nodes`` nodes were seen."""
    seen, todo = {first}, [first] if first is not None else []
    while todo and (past_bound is not None or len(seen) <= max_nodes):
        node = todo.pop()
        yield node
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                if past_bound is not None and len(seen) >= max_nodes:
                    past_bound()
                seen.add(child)
                todo.append(child)


def note(namespace: str, args: Any, kwargs: dict, max_nodes: int) -> None:
    """Before ``Tensor.backward(*args, **kwargs)`` runs for session ``namespace``: with ``create_graph``, the
    leaves it may give a gradient (its root, ``inputs=``, and those its graph reaches, ``max_nodes`` nodes at
    most) are remembered for :func:`end_session`."""
    if not args or not wants_graph(args, kwargs):
        return
    root = args[0]
    found = [t for t in leaves((root, kwargs.get("inputs"), args[4:]), torch.Tensor) if t.grad_fn is None]
    # (a deeper graph: torch refuses nothing, the rest is not remembered)
    for node in graph_nodes(root.grad_fn if isinstance(root, torch.Tensor) else None, max_nodes):
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found.append(variable)
    global _registered
    with _lock:
        if not _registered:
            _register()
            _registered = True
        held = _leaves.setdefault(namespace, {})
        for t in found:
            held[id(t)] = weakref.ref(t)
        if len(held) > SWEEP_AT:
            for key in [k for k, ref in held.items() if ref() is None]:
                del held[key]


def plan_notes(namespace: str, ops: list, max_nodes: int) -> Callable | None:
    """A plan's size check that only remembers its ``create_graph`` leaves (a worker without a quota runs no
    other): None when the plan has no ``backward``."""
    if not any(getattr(op, "op", None) == "Tensor.backward" for op in ops):
        return None

    def check(name: str, func: Any, args: Any, kwargs: dict) -> None:
        if name == "Tensor.backward":
            note(namespace, args, kwargs, max_nodes)
    return check


def end_session(worker: Any, session_id: str) -> None:
    """The session ended: its leaves' gradients that have a graph are dropped (the cycle broken)."""
    with _lock:
        held = _leaves.pop(session_id, None)
    for ref in (held or {}).values():
        t = ref()
        if t is not None and t.grad is not None and t.grad.grad_fn is not None:
            t.grad = None


def _register() -> None:
    from veil.workers.websocket_auth import SESSION_END_HANDLERS  # (not at load: it imports this package)

    if end_session not in SESSION_END_HANDLERS:
        SESSION_END_HANDLERS.append(end_session)
