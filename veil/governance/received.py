"""The op graph of an object another worker sent here (a share a worker cut from its data, a moved value).

Its sources travel with it as a capability tag (``"worker:id"``), but the computation that made it stayed on
the sender: a value computed here from it showed the owner "derived from owner data (computation not
recorded)". The receiver now records what it knows itself (who sent it, as a share or not, the sources the
sender named) as the object's own node, and, from a peer worker (never from a client, who could write
anything), the sender's computation as that worker's owner reviewed it: the lines of its graph, shown under
the node as that worker's report.
"""

from __future__ import annotations

from typing import Any

#: lines of a sender's graph that travel with an object (a longer one keeps its first and last lines)
MAX_REPORTED_LINES = 80
#: characters of each line
MAX_LINE = 300
#: sources named in a received node's line (the request lists them all)
MAX_NAMED_SOURCES = 8


def reported_lines(entry: Any) -> list[str]:
    """The computation of ``entry`` as this worker's owner reads it, bounded for a capability tag."""
    from veil.governance.graphtext import render_graph
    from veil.governance.provenance import GRAPH, ROOT

    graph = entry.meta.get(GRAPH)
    if not graph:
        return []
    lines = render_graph(graph, entry.meta.get(ROOT, ""))
    return bounded([line.removesuffix("   <- requested") for line in lines])


def bounded(lines: list) -> list[str]:
    """At most :data:`MAX_REPORTED_LINES` lines of at most :data:`MAX_LINE` characters, saying what is cut;
    controls, bidi and line separators escaped (another worker's text reaches the owner's terminal and console)."""
    from veil.governance.cli import shown

    lines = [shown(line) for line in lines]
    lines = [line if len(line) <= MAX_LINE else line[:MAX_LINE - 3] + "..." for line in lines]
    if len(lines) <= MAX_REPORTED_LINES:
        return lines
    half = (MAX_REPORTED_LINES - 1) // 2
    return [*lines[:half], f"... {len(lines) - 2 * half} lines not shown", *lines[-half:]]


def record_received(worker: Any, principal: Any, stored: list) -> None:
    """Gives each received object derived from owner data its node (``stored``: (entry, capabilities) pairs
    as :meth:`ReferenceMonitor.store_objects` applied them)."""
    from veil.governance import provenance
    from veil.governance.cli import shown
    from veil.governance.computation_key import content_key
    from veil.governance.state import tracking

    if not tracking(worker):
        return
    trusted = principal.is_peer or not principal.isolated  # (a peer worker, or in process)
    sender = f"worker {principal.user!r}" if trusted else f"client {principal.user!r}"
    for entry, caps in stored:
        sources = sorted(caps["provenance"])
        if not sources:
            continue
        named = ", ".join(shown(s if len(s) <= 64 else s[:61] + "...") for s in sources[:MAX_NAMED_SOURCES]) + (f" and {len(sources) - MAX_NAMED_SOURCES} more"
                                                          if len(sources) > MAX_NAMED_SOURCES else "")
        # (the sender's strings never read as an input's mark: render_graph fills those)
        text = f"from {sender}, derived from owner data {named}".replace("\u00b7", "\\xb7")
        node = {"op": "veil.received", "inputs": [], "args": text, "content": content_key(entry.obj)}
        report = caps.get("graph")
        if report and trusted:
            # (each line names its sender: the report's d1, t1 are that worker's nodes, not this graph's)
            node["report"] = [f"as computed on {sender} (its report, its names):",
                              *(f"{principal.user}: {line}" for line in bounded(report))]
        else:
            node["report"] = ["how it was computed there is not known here: ask that worker's owner, or deny"]
        provenance.stamp(entry, provenance.Lineage(frozenset(), {}, node), entry.obj)
