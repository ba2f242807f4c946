"""Readable op graphs (shared by ``veil requests show`` and the console)."""

from __future__ import annotations

import re

#: the op of the node that stands for the steps a long graph leaves out (veil.governance.provenance)
NOT_SHOWN = "(steps not shown)"


def ordered_nodes(graph: dict, root: str) -> list[dict]:
    """The graph's nodes from the sources to ``root``, each with a short name (d1, d2, t1, ..., cut1 for the
    steps a long graph leaves out).

    Nodes come in insertion order, which is topological (a node's inputs were recorded first).
    """
    names: dict[str, str] = {}
    counts = {"d": 0, "i": 0, "t": 0, "cut": 0}
    out = []
    for nid, node in graph.items():
        kind = ("d" if node.get("op") == "dataset" else "i" if node.get("op") == "input"
                else "cut" if node.get("op") == NOT_SHOWN else "t")
        counts[kind] += 1
        names[nid] = f"{kind}{counts[kind]}"
    for nid, node in graph.items():
        inputs = [names.get(i, "(earlier step)") for i in node.get("inputs", [])]
        out.append({**node, "name": names[nid], "input_names": inputs, "is_root": nid == root})
    return out


_MARK = re.compile("\u00b7(\\d+)\u00b7")


def _fill_marks(args: str, names: list[str]) -> str:
    """Writes each input's name where its mark (``·position·``) stands; bare ``·`` marks (older records,
    HE ops) take the inputs not named yet, in order."""
    named = _MARK.sub(lambda mt: names[int(mt.group(1))] if int(mt.group(1)) < len(names) else "?", args)
    rest = [n for i, n in enumerate(names) if f"\u00b7{i}\u00b7" not in args]
    for name in rest:
        named = named.replace("\u00b7", name, 1) if "\u00b7" in named else named
    return named


def render_graph(graph: dict, root: str) -> list[str]:
    """One line per node: ``t2 = Tensor.sum(t1, dim=0) -> [3] float32``."""
    lines = []
    for n in ordered_nodes(graph, root):
        shape = f"{n.get('shape', [])} {n.get('dtype', '')}".strip()
        if n["op"] in ("dataset", "input"):
            lines.append(f"{n['name']} = {n['op']}: {n.get('label', '')}  {shape}")
            continue
        if n["op"] == NOT_SHOWN:
            lines.append(f"{n['name']} = {not_shown_text(n)}")
            continue
        args = _fill_marks(n.get("args", ""), n["input_names"])
        if not args:
            args = ", ".join(n["input_names"])
        mark = "   <- requested" if n["is_root"] else ""
        lines.append(f"{n['name']} = {n['op']}({args}) -> {shape}{mark}")
        for step in n.get("plan", []) + n.get("report", []):  # (report: a received object's, received.py)
            lines.append(f"      | {step}")
    return lines


def not_shown_text(node: dict) -> str:
    """What a cut graph's marker says: how many steps are left out, and which ops they ran."""
    ops = ", ".join(f"{op} x{count}" for op, count in node.get("ops", {}).items())
    more = node.get("count", 0) - sum(node.get("ops", {}).values())
    if more > 0:
        ops = f"{ops}, {more} more" if ops else f"{more} steps"
    return (f"{node.get('count', 0)} steps not shown ({ops}): the graph keeps its sources and the steps "
            "nearest them and the request; review how the value was computed with its requester, or deny")
