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
``out=``, ``inplace=True``, or any argument its ATen schema writes: the owner guard's
table, batch norm's running statistics included), every worker function (plans, DP,
aggregation) and ``backward`` taint what they may have written, and every stored
tensor that shares storage with it.

:func:`sources_of` is the seam the release decision reads.
"""

from __future__ import annotations

import re
import secrets
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from veil.governance.computation_key import args_key, content_key, node_key
from veil.governance.graphtext import NOT_SHOWN
from veil.workers.source_sets import join_sources
from veil.workers.store import GRAPH_CHARGED, OWED

GRAPH = "graph"
ROOT = "graph_root"
#: nodes a derived object's graph keeps (:func:`_trim` says how many more there were, and which ops)
MAX_NODES = 64
#: datasets among them (a value may derive from any number of them: the request lists them all)
MAX_SOURCES = MAX_NODES // 2
#: distinct op names a cut graph counts by name (the rest only in its total)
MAX_NOT_SHOWN_OPS = 8


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
        node = {"op": "dataset", "label": label, "shape": _shape(entry.obj), "dtype": _dtype_name(entry.obj),
                "inputs": [], "source": oid}
        return nid, {nid: dict(node, key=node_key(node, {}))}
    nid = f"in-{oid:x}"
    # an object with sources but no recorded graph (a share stored by a protocol step) still derives from them
    label = ("derived from owner data (computation not recorded)" if entry.provenance
             else "scientist's tensor (not derived from owner data)")
    node = {"op": "input", "label": label, "shape": _shape(entry.obj), "dtype": _dtype_name(entry.obj),
            "inputs": [], "content": content_key(entry.obj)}  # (its values are not shown: its key has them)
    return nid, {nid: dict(node, key=node_key(node, {}))}


def _describe_arg(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if type(value).__name__ == "SlotRef":
        return f"s{value.slot}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_describe_arg(v) for v in list(value)[:6])
        return f"[{inner}{', ...' if len(value) > 6 else ''}]"
    text = repr(value).replace("\u00b7", "\\xb7")  # (a requester's string never reads as an input's mark)
    return text if len(text) <= 24 else text[:21] + "..."


#: plan ops listed in a request's graph; a longer plan's listing says how many more there are
MAX_PLAN_STEPS = 200
#: characters of a plan's name kept in a request's graph (the name is the requester's string)
MAX_PLAN_NAME = 64
#: characters of one listed plan op (an op may name any number of arguments: the line says it is cut)
MAX_PLAN_LINE = 300


def plan_steps(spec: Any) -> list[str]:
    """A plan's ops, one readable line each (``s5 = torch.nn.functional.linear(s0, s1, s2)``), then what it
    returns. Of a plan longer than :data:`MAX_PLAN_STEPS`, its first and last ops, and a line saying how many
    are not shown between them (the owner must never take a part for the whole computation)."""
    ops = list(getattr(spec, "ops", []))

    def line(op: Any) -> str:
        outs = ", ".join(f"s{s}" for s in op.out_slots if s >= 0) or "_"
        args = ", ".join(_describe_arg(a) for a in op.args)
        kw = ", ".join(f"{k}={_describe_arg(v)}" for k, v in op.kwargs.items())
        text = f"{outs} = {op.op}({', '.join(x for x in (args, kw) if x)})"
        return text if len(text) <= MAX_PLAN_LINE else text[:MAX_PLAN_LINE - 12] + "... (cut)"

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


class PlanListing(list):
    """A plan's :func:`plan_steps`, with the bytes it holds (``nbytes``): the quota charges it to every result
    whose graph lists it (:func:`graph_nbytes`), counted once when it is made."""

    nbytes = 0


def _listing(spec: Any) -> PlanListing:
    """The plan's listing, made once per stored plan and shared by the graphs of all its runs (each run made its
    own, ~75 KB for a long plan)."""
    cached = getattr(spec, "__dict__", {}).get("_listing")
    if cached is None:
        cached = PlanListing(plan_steps(spec))
        cached.nbytes = _strings_nbytes(cached)
        if hasattr(spec, "__dict__"):
            spec.__dict__["_listing"] = cached
    return cached


#: a node's own dict, its shape list and the fixed-size fields beside its strings (an estimate, rounded up)
NODE_BYTES = 800
#: a graph dict's bytes per node (its slot, and the node id's string)
GRAPH_SLOT_BYTES = 120


def _strings_nbytes(values: Any) -> int:
    # (what each string holds in memory, its list slot with it: a character may take 4 bytes, not one)
    return sum(max(len(v) + 80, sys.getsizeof(v) + 8) for v in values if isinstance(v, str))


def _listing_nbytes(node: dict, listed: set | None = None) -> int:
    """The bytes of a node's plan listing, unless its id is in ``listed`` (then added to it: the nodes of one
    stored plan's runs share its listing, held once); 0 without one."""
    plan = node.get("plan")
    if not isinstance(plan, list) or (listed is not None and id(plan) in listed):
        return 0
    if listed is not None:
        listed.add(id(plan))
    # (a listing from a peer's report is a plain list)
    return plan.nbytes if isinstance(plan, PlanListing) else _strings_nbytes(plan) + 8 * len(plan)


def _node_nbytes(node: dict, listed: set | None = None) -> int:
    """A node's bytes, its plan listing's with them (:func:`_listing_nbytes`)."""
    return NODE_BYTES + _strings_nbytes(node.values()) + _listing_nbytes(node, listed)


#: ``entry.meta`` key: what the entry's session was charged for its op graph so far
CHARGED = GRAPH_CHARGED  # (the store's growth check leaves it out of the storage's charge)


def _held_nbytes(graph: dict, whole: set, copies: set) -> int:
    """What an entry's (cut) ``graph`` holds: its slots, the nodes ``whole`` (its own, and those made for its
    command's inputs where no other object the command writes was charged them), the dicts and input lists of
    ``copies`` (made by the cut for this graph alone: their strings are the originals'), and every plan
    listing; any other node is held by the graph it came from, charged there."""
    listed: set = set()
    return GRAPH_SLOT_BYTES * len(graph) + sum(
        _node_nbytes(n, listed) if k in whole else _listing_nbytes(n, listed)
        + (NODE_BYTES + 8 * len(n.get("inputs", ())) if k in copies else 0) for k, n in graph.items())


def graph_nbytes(lineage: "Lineage | None") -> int:
    """What one result of ``lineage``'s command holds in ``meta["graph"]``, charged to the requester's quota
    with it: its own graph dict and node, the nodes made for its inputs (fresh: ~700 bytes each, up to 63) and
    every plan listing in the graph. A listing shared with other graphs is counted in each (an inherited listing
    outlives the result that first held it: freed results left their descendants holding uncharged ~75 KB
    listings); other inherited nodes only by their slot."""
    if lineage is None:
        return 0
    known = lineage.__dict__.get("_nbytes")  # (once per command, not per result)
    if known is not None:
        return known
    listed: set = set()
    own = _node_nbytes(lineage.node, listed)
    sizes = sorted((_node_nbytes(n, listed) for k, n in lineage.graph.items()
                    if k in lineage.fresh or isinstance(n.get("plan"), list)),
                   reverse=True)[:MAX_NODES - 1]  # (the graph is cut to MAX_NODES: at most so many stay)
    known = lineage.__dict__["_nbytes"] = own + GRAPH_SLOT_BYTES * min(len(lineage.graph) + 1, MAX_NODES + 1) \
        + sum(sizes)
    return known


@dataclass
class Lineage:
    """What a command's results derive from (None-valued when nothing came from owner data)."""

    sources: frozenset
    graph: dict
    node: dict  # the command's node, without shape/dtype (filled per result)
    fresh: frozenset = frozenset()  # ids of the graph's nodes made for this command (its inputs' own nodes)
    #: an input is dp-only now, though the DP guard let the command (not a DP release) run: the owner tightened a
    #: source while it ran (a fit hands the turn over between batches). What it computed or wrote is marked as
    #: the guard would have refused it: a source no longer under review lets the unmarked value out un-noised
    dp_only: bool = False
    #: the worker's governance state and its count of dp-only tightenings when the inputs' marks were read (odd:
    #: one was marking): a tightening on another thread (an in-process worker runs commands without a turn) that
    #: scanned the derived values before this command stored its results had missed them (:func:`stamp` checks)
    state: Any = field(default=None, compare=False, repr=False)
    tightenings: int = 0


#: characters of a command's argument text (stored inputs are always named, past this too)
MAX_ARGS_TEXT = 160
#: items of a list argument shown before the rest is elided (its stored inputs are always named)
MAX_LIST_ITEMS = 6


def input_mark(position: int) -> str:
    """Where a command's stored input stands in its argument text: its position among the node's inputs
    (:func:`~veil.governance.graphtext.render_graph` writes that input's name there)."""
    return f"\u00b7{position}\u00b7"


def _holds(value: Any, inputs: dict) -> bool:
    if id(value) in inputs:
        return True
    return isinstance(value, (list, tuple)) and any(_holds(v, inputs) for v in value)


def _args_text(args: tuple, kwargs: dict, inputs: dict) -> str:
    """The command's arguments, each stored input shown by :func:`input_mark` (they are the graph's edges).

    ``inputs``: object id -> position among the node's inputs. Lists are cut after :data:`MAX_LIST_ITEMS`
    and the whole text after :data:`MAX_ARGS_TEXT` characters with a "…", but a stored input is named
    wherever it stands: the owner must see which argument is the data."""
    def one(v: Any) -> str:
        if id(v) in inputs:
            return input_mark(inputs[id(v)])
        if isinstance(v, (list, tuple)) and _holds(v, inputs):
            items: list[str] = []
            for i, x in enumerate(v):
                if i < MAX_LIST_ITEMS or _holds(x, inputs):
                    items.append(one(x))
                elif items[-1] != "\u2026":
                    items.append("\u2026")
            return "[" + ", ".join(items) + "]"
        return _describe_arg(v)

    # (a keyword is the requester's string too: it never reads as an input's mark)
    parts = [one(a) for a in args] + [str(k).replace("\u00b7", "\\xb7") + f"={one(v)}" for k, v in kwargs.items()]
    text = ", ".join(parts)
    if len(text) <= MAX_ARGS_TEXT:
        return text
    kept: list[str] = []
    for part in parts:  # past the limit, only the stored inputs, in order, between elisions
        if len(", ".join([*kept, part])) <= MAX_ARGS_TEXT - 3:
            kept.append(part)
            continue
        marks = re.findall("\u00b7\\d+\u00b7", part)
        if marks:
            kept.append("\u2026" + ", ".join(marks) + "\u2026")
        elif not kept or kept[-1] != "\u2026":
            kept.append("\u2026")
    return ", ".join(kept)


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
    fresh = set()
    for oid, entry in entries.items():
        root, sub = _input_node(oid, entry)
        roots.append(root)
        if entry.meta.get(GRAPH) is None:  # (a node made here, not one an older graph holds already)
            fresh.add(root)
        for k, v in sub.items():
            graph.setdefault(k, v)
    position = {oid: i for i, oid in enumerate(entries)}
    at = {obj: position[oid] for obj, oid in inputs.items() if oid in position}
    node: dict = {"op": op_name, "inputs": roots, "args": _args_text(args, kwargs or {}, at),
                  "args_key": args_key(args, kwargs or {}, at)}
    if op_name in ("veil.plan.run", "veil.plan.fit") and args:
        spec = args[0]
        node["label"] = f"plan {str(getattr(spec, 'name', '?'))[:MAX_PLAN_NAME]!r}"
        node["plan"] = _listing(spec)
        node["plan_ops"] = len(getattr(spec, "ops", []))
    from veil.workers.owner_guard import DP_RELEASES

    dp_only = op_name not in DP_RELEASES and any(e.meta.get("dp_only") for e in entries.values())
    return Lineage(sources, graph, node, frozenset(fresh), dp_only)


def _trim(graph: dict, root: str) -> dict:
    """``graph`` cut to :data:`MAX_NODES` nodes, saying what it leaves out: its datasets (at most
    :data:`MAX_SOURCES`), a shortest path from each of them to ``root`` when it fits (else the steps nearest
    the data: where records are selected), the most recent steps, and one :data:`NOT_SHOWN` node counting the
    rest by op (it takes their place as an input)."""
    if len(graph) <= MAX_NODES:
        return graph
    datasets = [k for k, v in graph.items() if v["op"] == "dataset"]
    markers = [k for k, v in graph.items() if v["op"] == NOT_SHOWN]
    steps = [k for k, v in graph.items() if v["op"] not in ("dataset", NOT_SHOWN)]
    sources = datasets[:MAX_SOURCES]
    room = MAX_NODES - 1 - len(sources)  # (one node says what is not shown)
    parent: dict = {root: None}
    queue = [root]
    for nid in queue:  # breadth first from the root
        for i in graph[nid].get("inputs", []):
            if i in graph and i not in parent:
                parent[i] = nid
                queue.append(i)
    path: set = set()
    for src in sources:
        nid = parent.get(src)
        while nid is not None and nid not in path:
            path.add(nid)
            nid = parent[nid]
    on_path = [k for k in steps if k in path]
    chosen = set(on_path) if len(on_path) <= room * 3 // 4 else set(on_path[:room // 2])
    chosen.add(root)
    for k in reversed(steps):  # then the most recent steps
        if len(chosen) >= room:
            break
        chosen.add(k)
    dropped = [k for k in steps if k not in chosen] + datasets[MAX_SOURCES:]
    ops: dict = {}
    count = len(dropped)
    for k in markers:
        count += graph[k].get("count", 0)
        for op, n in graph[k].get("ops", {}).items():
            ops[op] = ops.get(op, 0) + n
    for k in dropped:
        ops[graph[k]["op"]] = ops.get(graph[k]["op"], 0) + 1
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:MAX_NOT_SHOWN_OPS])
    cut = f"cut-{secrets.token_hex(4)}"
    gone = set(dropped) | set(markers)
    staying = set(sources) | chosen
    # what the left-out steps read, so that the paths from the data to the root still pass through the marker
    fed = list(dict.fromkeys(i for k in gone for i in graph[k].get("inputs", []) if i in staying))
    marker = {"op": NOT_SHOWN, "count": count, "ops": top, "inputs": fed}
    kept: dict = {}
    last_input = max((list(graph).index(i) for i in fed), default=-1)
    if last_input < 0:
        kept[cut] = marker
    for at, (k, node) in enumerate(graph.items()):
        if k in staying:
            if any(i in gone for i in node.get("inputs", [])):  # (a copy: nodes are shared between graphs)
                node = {**node, "inputs": [cut if i in gone else i for i in node["inputs"]]}
            kept[k] = node
        if at == last_input:  # (after what it reads: insertion order stays topological)
            kept[cut] = marker
    return kept


def stamp(entry: Any, lineage: Lineage | None, tensor: Any, op_suffix: str = "") -> int:
    """Records on ``entry`` that it was computed by the lineage's command. Returns by how many bytes its graph
    grew past what its session was charged for it (a result is charged :func:`graph_nbytes` when stored; an
    object written in place gains the command's node, and with a plan's, its listing)."""
    if lineage is None:
        return 0
    nid = f"n-{secrets.token_hex(4)}"
    node = dict(lineage.node, shape=_shape(tensor), dtype=_dtype_name(tensor))
    if op_suffix:
        node["op"] = node["op"] + op_suffix
    graph = dict(lineage.graph)
    if op_suffix and entry.meta.get(GRAPH) is not None:  # written in place: keep what it was before
        for k, v in entry.meta[GRAPH].items():
            graph.setdefault(k, v)
        if entry.meta[ROOT] not in node["inputs"]:  # (appended: the argument text names inputs by position)
            node["inputs"] = [*node["inputs"], entry.meta[ROOT]]
    node["key"] = node_key(node, graph)  # (the whole computation, values included: computation_key.py)
    graph[nid] = node
    if not lineage.sources <= entry.provenance:
        entry.provenance = join_sources(entry.provenance, lineage.sources)
    _marks(entry, lineage)
    kept = entry.meta[GRAPH] = _trim(graph, nid)
    entry.meta[ROOT] = nid
    if not op_suffix:  # (a new result: the handler charged it this when it was stored)
        entry.meta[CHARGED] = graph_nbytes(lineage)
        return 0
    # held alone: its node, and what the cut made for it (the marker, copies of nodes); the nodes made for the
    # command's inputs are shared by every object it writes: charged once, to the first that keeps each
    paid = lineage.__dict__.setdefault("_fresh_charged", set())
    made = {k for k, n in kept.items() if n is not graph.get(k)}
    whole = {nid, *(k for k in made if k not in graph), *(k for k in lineage.fresh if k in kept and k not in paid)}
    held = _held_nbytes(kept, whole, made)
    paid.update(k for k in lineage.fresh if k in kept)
    charged = entry.meta.get(CHARGED, 0)
    if held <= charged:
        return 0
    entry.meta[CHARGED] = held
    return held - charged


def _marks(entry: Any, lineage: Lineage) -> None:
    """The DP guard's mark of a result: its inputs' (read after the count), or, where a tightening to dp-only ran
    meanwhile, its sources'."""
    if lineage.dp_only:
        entry.meta["dp_only"] = True
    elif lineage.state is not None and (lineage.tightenings % 2 or lineage.state.tightenings != lineage.tightenings):
        _marked_if_dp_only(lineage.state, entry)


def _marked_if_dp_only(state: Any, entry: Any) -> None:
    """A tightening to dp-only ran while the command did (stored, the entry is seen by any tightening after this):
    marks the entry if one of its sources is dp-only or being made so. Without the governance lock (a network
    worker's command never waits for it in its turn: lock_order.py): from its start to its end a tightening names
    its source in ``state.marking`` or in the policy map. A copy moved out and back names a source ``"worker:id"``
    (``state.moved_names``), and a source set cut to its bound may have lost the name (moved_marks.names_tightened)."""
    from veil.governance.moved_marks import names_tightened

    tightened = set(state.marking) | {s for s, p in list(state.policies.items()) if p == "dp-only"}
    names = frozenset(tightened) | frozenset(n for n, s in list(state.moved_names.items()) if s in tightened)
    if names and names_tightened(frozenset(entry.provenance), names):
        entry.meta["dp_only"] = True


def stamp_unrecorded(outputs: list, lineage: Lineage | None) -> None:
    """A worker function's own outputs (``monitor.store_output``) that it gave no op graph: the command's node,
    saying the function computed them opaquely (each function records its own graph; this is the net for one
    that does not, so the owner never reads a derived value as the scientist's own or as "not recorded")."""
    if lineage is None:
        return
    for entry in outputs:
        if entry.provenance and entry.meta.get(GRAPH) is not None:
            # (its own graph, made from its inputs' marks read without the count: an encrypted product racing a
            # tightening, which listed the values to mark before it was stored and marked its input after that
            # read, stored Enc(y) unmarked; the command's marks are read after the count, veil/he/remote.py)
            _marks(entry, lineage)
        elif entry.provenance:
            opaque = Lineage(lineage.sources, lineage.graph,
                             dict(lineage.node, op=f"opaque: {lineage.node['op']}",
                                  label=f"stored by worker function {lineage.node['op']}, its steps not recorded"),
                             dp_only=lineage.dp_only, state=lineage.state, tightenings=lineage.tightenings)
            stamp(entry, opaque, entry.obj)


def _watch_tightenings(worker: Any, lineage: Lineage, op_name: str, entries: dict) -> None:
    """Before any result is stored: the count of dp-only tightenings, then the inputs' marks read again after it
    (:attr:`Lineage.tightenings`; a tightening that ended before the count was read is in the marks)."""
    from veil.governance.state import _STATE
    from veil.workers.owner_guard import DP_RELEASES

    state = _STATE.get(worker)
    if state is None:
        return
    lineage.state, lineage.tightenings = state, state.tightenings
    if not lineage.dp_only and op_name not in DP_RELEASES:
        lineage.dp_only = any(e.meta.get("dp_only") for e in entries.values())


def tightening_count(worker: Any) -> tuple:
    """The worker's governance state and its count of dp-only tightenings now: read by a worker function that stores
    results itself before it reads its inputs' marks (compat ``share_own``), for :func:`marked_if_tightened`."""
    from veil.governance.state import _STATE

    state = _STATE.get(worker)
    return state, 0 if state is None else state.tightenings


def marked_if_tightened(worker: Any, count: tuple, entry: Any) -> bool:
    """Marks ``entry`` if a dp-only tightening ran, or runs, since :func:`tightening_count` gave ``count`` and makes
    one of its sources dp-only (as :func:`stamp` marks a racing command's results): its scan may have listed the
    values before ``entry`` was stored, or marked an input after it was read. Whether ``entry`` is marked."""
    from veil.governance.state import _STATE

    state, seen = count
    now = _STATE.get(worker)
    if now is not None and (now is not state or seen % 2 or now.tightenings != seen):
        _marked_if_dp_only(now, entry)
    return bool(entry.meta.get("dp_only"))


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
                 sender: str, written_storages: set | None = None) -> dict:
    """Taints every stored object the command may have written (and what aliases it). Returns those whose op
    graph grew past their charge (id -> entry; the growth is owed in ``meta[OWED]``: the handler charges it).

    ``written_storages``: the storages a torch op wrote, whatever the argument (the owner guard's schema
    rules recorded them while it ran: batch norm's running statistics, ``embedding(max_norm=)``'s weight).
    """
    written_entries: dict = {}
    if lineage is None:
        return written_entries
    _watch_tightenings(worker, lineage, op.name, entries)
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
    storages = {s for s in (_storage(t) for t in written) if s is not None} | (written_storages or set())
    ids = {id(t) for t in written}
    if not storages and not ids:
        return written_entries
    for oid, entry in list(worker.monitor.owner_entries()):
        if entry.protected or not isinstance(entry.obj, torch.Tensor):
            continue
        grad = entry.obj.grad if entry.obj.is_leaf else None
        if id(entry.obj) in ids or _storage(entry.obj) in storages or (grad is not None and _storage(grad) in storages):
            grown = stamp(entry, lineage, entry.obj, op_suffix=" (in place)")
            if grown:  # (its graph now lists the command, a plan's listing with it: charged to its session)
                entry.meta[OWED] = entry.meta.get(OWED, 0) + grown
                written_entries[oid] = entry
    return written_entries
