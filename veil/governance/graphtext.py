"""Readable op graphs (shared by ``veil requests show`` and the console)."""

from __future__ import annotations


def ordered_nodes(graph: dict, root: str) -> list[dict]:
    """The graph's nodes from the sources to ``root``, each with a short name (d1, d2, t1, ...).

    Nodes come in insertion order, which is topological (a node's inputs were recorded first).
    """
    names: dict[str, str] = {}
    counts = {"d": 0, "i": 0, "t": 0}
    out = []
    for nid, node in graph.items():
        kind = "d" if node.get("op") == "dataset" else "i" if node.get("op") == "input" else "t"
        counts[kind] += 1
        names[nid] = f"{kind}{counts[kind]}"
    for nid, node in graph.items():
        inputs = [names.get(i, "(earlier step)") for i in node.get("inputs", [])]
        out.append({**node, "name": names[nid], "input_names": inputs, "is_root": nid == root})
    return out


def render_graph(graph: dict, root: str) -> list[str]:
    """One line per node: ``t2 = Tensor.sum(t1, dim=0) -> [3] float32``."""
    lines = []
    for n in ordered_nodes(graph, root):
        shape = f"{n.get('shape', [])} {n.get('dtype', '')}".strip()
        if n["op"] in ("dataset", "input"):
            lines.append(f"{n['name']} = {n['op']}: {n.get('label', '')}  {shape}")
            continue
        args = n.get("args", "")
        for name in n["input_names"]:
            args = args.replace("\u00b7", name, 1) if "\u00b7" in args else args
        if not args:
            args = ", ".join(n["input_names"])
        mark = "   <- requested" if n["is_root"] else ""
        lines.append(f"{n['name']} = {n['op']}({args}) -> {shape}{mark}")
        for step in n.get("plan", []):
            lines.append(f"      | {step}")
    return lines
