"""Provenance: which owner datasets an object derives from, and the computation that produced it.

Minimal recording for the review policy (issue #16):

- the source set is the reference monitor's ``Entry.provenance`` (ids of the objects
  the owner loaded; a loaded object is its own source). The monitor fills it when it
  stores a result; this module adds what an op wrote in place (:func:`taint_writes`),
  so that the monitor's error and capability rules see those writes too.
- ``meta["graph"]``: a compact op graph (node id -> node) from the sources to the
  object, and ``meta["graph_root"]`` its own node. Only objects that derive from
  owner data carry one, so computation on the scientist's own tensors costs nothing.

Propagation rules (conservative: a value is never less tainted than what flowed in):
results of a command derive from all its inputs; an op that writes (in place,
``out=``, ``inplace=True``), every worker function (plans, DP, aggregation) and
``backward`` taint what they may have written, and every stored tensor that shares
storage with it.

:func:`sources_of` is the seam the release decision reads.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import torch

GRAPH = "graph"
ROOT = "graph_root"
#: a derived object's graph keeps its sources and this many most recent other nodes
MAX_NODES = 64


def sources_of(oid: int, entry: Any) -> frozenset:
    """The owner datasets ``entry`` derives from (moved objects may name ``"worker:id"`` sources)."""
    if entry.provenance:
        return entry.provenance
    if entry.protected:
        return frozenset({oid})
    return frozenset()


def _dtype_name(t: Any) -> str:
    return str(t.dtype).replace("torch.", "") if isinstance(t, torch.Tensor) else type(t).__name__


def _shape(t: Any) -> list:
    return list(t.shape) if isinstance(t, torch.Tensor) else []


def _input_node(oid: int, entry: Any) -> tuple[str, dict]:  # noqa: C901
    """(root node id, graph) of one command input."""
    graph = entry.meta.get(GRAPH)
    if graph is not None:
        return entry.meta[ROOT], graph
    if entry.protected:
        label = " ".join(entry.tags) or entry.description or "owner data"
        if entry.description and entry.tags:
            label = f"{' '.join(entry.tags)} ({entry.description})"
        nid = f"src-{oid:x}"
        return nid, {nid: {"op": "dataset", "label": label, "shape": _shape(entry.obj),
                           "dtype": _dtype_name(entry.obj), "inputs": [], "source": oid}}
    nid = f"in-{oid:x}"
    return nid, {nid: {"op": "input", "label": "scientist's tensor (not derived from owner data)",
                       "shape": _shape(entry.obj), "dtype": _dtype_name(entry.obj), "inputs": []}}


def _describe_arg(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if type(value).__name__ == "SlotRef":
        return f"s{value.slot}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_describe_arg(v) for v in list(value)[:6])
        return f"[{inner}{', ...' if len(value) > 6 else ''}]"
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


#: plan ops listed in a request's graph; a longer plan's listing says how many more there are
MAX_PLAN_STEPS = 200
#: characters of a plan's name kept in a request's graph (the name is the requester's string)
MAX_PLAN_NAME = 64


def plan_steps(spec: Any) -> list[str]:
    """A plan's ops, one readable line each (``s5 = torch.nn.functional.linear(s0, s1, s2)``), then what it
    returns. Of a plan longer than :data:`MAX_PLAN_STEPS`, its first and last ops, and a line saying how many
    are not shown between them (the owner must never take a part for the whole computation)."""
    ops = list(getattr(spec, "ops", []))

    def line(op: Any) -> str:
        outs = ", ".join(f"s{s}" for s in op.out_slots if s >= 0) or "_"
        args = ", ".join(_describe_arg(a) for a in op.args)
        kw = ", ".join(f"{k}={_describe_arg(v)}" for k, v in op.kwargs.items())
        return f"{outs} = {op.op}({', '.join(x for x in (args, kw) if x)})"

    if len(ops) <= MAX_PLAN_STEPS:
        lines = [line(op) for op in ops]
    else:  # the first and the last ops (those that make the result), and how many are left out between
        half = MAX_PLAN_STEPS // 2
        lines = [line(op) for op in ops[:half]]
        lines.append(f"... {len(ops) - 2 * half} ops not shown (the plan has {len(ops)}): review the plan "
                     "itself before approving, or deny")
        lines += [line(op) for op in ops[-half:]]
    lines.append(f"return {_describe_arg(getattr(spec, 'outputs', None))}")
    return lines


@dataclass
class Lineage:
    """What a command's results derive from (None-valued when nothing came from owner data)."""

    sources: frozenset
    graph: dict
    node: dict  # the command's node, without shape/dtype (filled per result)


def _args_text(args: tuple, kwargs: dict, inputs: dict) -> str:
    """The command's arguments, stored inputs shown as ``·`` (they are the graph's edges)."""
    def one(v: Any) -> str:
        if id(v) in inputs:
            return "\u00b7"
        if isinstance(v, (list, tuple)) and any(id(x) in inputs for x in v):
            return "[" + ", ".join(one(x) for x in list(v)[:6]) + "]"
        return _describe_arg(v)

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    text = ", ".join(parts)
    return text if len(text) <= 160 else text[:157] + "..."


def lineage_of(op_name: str, args: tuple, inputs: dict, entries: dict, kwargs: dict | None = None) -> Lineage | None:
    """The lineage of a command's results; None when no input derives from owner data.

    ``entries``: input object id -> store entry (what the command resolved).
    """
    sources: frozenset = frozenset()
    for oid, entry in entries.items():
        sources |= sources_of(oid, entry)
    if not sources:
        return None
    graph: dict = {}
    roots = []
    for oid, entry in entries.items():
        root, sub = _input_node(oid, entry)
        roots.append(root)
        for k, v in sub.items():
            graph.setdefault(k, v)
    node: dict = {"op": op_name, "inputs": roots, "args": _args_text(args, kwargs or {}, inputs)}
    if op_name in ("veil.plan.run", "veil.plan.fit") and args:
        spec = args[0]
        node["label"] = f"plan {str(getattr(spec, 'name', '?'))[:MAX_PLAN_NAME]!r}"
        node["plan"] = plan_steps(spec)
        node["plan_ops"] = len(getattr(spec, "ops", []))
    return Lineage(sources, graph, node)


def _trim(graph: dict) -> dict:
    if len(graph) <= MAX_NODES:
        return graph
    sources = {k: v for k, v in graph.items() if v["op"] == "dataset"}
    others = [(k, v) for k, v in graph.items() if v["op"] != "dataset"]
    kept = dict(others[-(MAX_NODES - len(sources)):])
    return {**sources, **kept}


def stamp(entry: Any, lineage: Lineage | None, tensor: Any, op_suffix: str = "") -> None:
    """Records on ``entry`` that it was computed by the lineage's command."""
    if lineage is None:
        return
    nid = f"n-{secrets.token_hex(4)}"
    node = dict(lineage.node, shape=_shape(tensor), dtype=_dtype_name(tensor))
    if op_suffix:
        node["op"] = node["op"] + op_suffix
    graph = dict(lineage.graph)
    if op_suffix and entry.meta.get(GRAPH) is not None:  # written in place: keep what it was before
        for k, v in entry.meta[GRAPH].items():
            graph.setdefault(k, v)
        node["inputs"] = list(dict.fromkeys([entry.meta[ROOT], *node["inputs"]]))
    graph[nid] = node
    if not lineage.sources <= entry.provenance:
        entry.provenance = entry.provenance | lineage.sources
    entry.meta[GRAPH] = _trim(graph)
    entry.meta[ROOT] = nid


def _storage(t: Any) -> int | None:
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):
        return None


def _tensors(value: Any) -> list:
    from veil.tensors.tree import leaves

    return [t for t in leaves(value) if isinstance(t, torch.Tensor)]


def taint_writes(worker: Any, lineage: Lineage | None, op: Any, args: tuple, kwargs: dict, entries: dict,
                 sender: str) -> None:
    """Taints every stored object the command may have written (and what aliases it)."""
    if lineage is None:
        return
    from veil.workers import owner_guard

    name = op.name
    written: list = []
    if op.worker_function:
        written = [e.obj for e in entries.values() if not e.protected]
    elif "backward" in name or name.endswith("autograd.grad"):
        # gradients accumulate into every leaf of the graph: all of the sender's tensors may change
        written = [e.obj for _, e in worker.monitor.owner_entries()
                   if e.created_by == sender and not e.protected and isinstance(e.obj, torch.Tensor)]
        written += [e.obj.grad for e in [e for _, e in worker.monitor.owner_entries()]
                    if isinstance(e.obj, torch.Tensor) and e.obj.is_leaf and e.obj.grad is not None
                    and e.created_by == sender]
    else:
        if args and (owner_guard.writes_first_argument(name) or owner_guard._inplace_flag(op.func, args, kwargs)):
            written.extend(_tensors(args[0]))
        if "out" in kwargs:
            written.extend(_tensors(kwargs["out"]))
    storages = {s for s in (_storage(t) for t in written) if s is not None}
    ids = {id(t) for t in written}
    if not storages and not ids:
        return
    for _, entry in list(worker.monitor.owner_entries()):
        if entry.protected or not isinstance(entry.obj, torch.Tensor):
            continue
        grad = entry.obj.grad if entry.obj.is_leaf else None
        if id(entry.obj) in ids or _storage(entry.obj) in storages or (grad is not None and _storage(grad) in storages):
            stamp(entry, lineage, entry.obj, op_suffix=" (in place)")
