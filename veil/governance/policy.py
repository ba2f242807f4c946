"""The owner's per-dataset policy: ``open`` / ``review`` / ``dp-only`` (see :data:`state.POLICIES`).

A policy is set on a *source* (an object the owner loaded); everything derived from
that source inherits it through provenance (:mod:`veil.governance.provenance`).
"""

from __future__ import annotations

from typing import Any

from veil.exceptions import ObjectNotFoundError
from veil.governance.state import audit, check_policy, governance, policy_of


def owner_sources(worker: Any) -> list[tuple[int, Any]]:
    """(id, entry) of every object the owner loaded (the possible provenance sources)."""
    return [(oid, e) for oid, e in worker.monitor.owner_entries() if e.protected]


def apply_policy(worker: Any, oid: int, policy: str) -> None:
    """Sets the policy of one loaded object (``dp-only`` also marks it for the DP guard)."""
    check_policy(policy)
    entry = dict(worker.monitor.owner_entries()).get(oid)
    if entry is None or not entry.protected:
        raise ObjectNotFoundError(f"worker {worker.id!r} has no owner dataset {oid!r}")
    state = governance(worker)
    with state.lock:
        if policy == "review" and not state.tracking:
            _start_tracking(worker, oid)
            state.tracking = True
        state.policies[oid] = policy
        if policy == "dp-only":
            entry.meta["dp_only"] = True
        else:
            entry.meta.pop("dp_only", None)
        entry.meta["policy"] = policy


def _start_tracking(worker: Any, source: int) -> None:
    """Provenance was not recorded until now: whatever clients already hold may derive from ``source``.

    Conservative: every client tensor that exists at this moment is treated as derived from it.
    """
    import torch

    from veil.governance.provenance import GRAPH, ROOT

    for oid, entry in list(worker.monitor.owner_entries()):
        if entry.protected or not isinstance(entry.obj, torch.Tensor):
            continue
        nid = f"pre-{oid:x}"
        entry.provenance = entry.provenance | {source}
        entry.meta[GRAPH] = {nid: {"op": "input", "label": "computed before review was enabled",
                                   "shape": list(entry.obj.shape), "dtype": str(entry.obj.dtype).replace("torch.", ""),
                                   "inputs": []}}
        entry.meta[ROOT] = nid


def set_policy(worker: Any, name_or_tag: Any, policy: str, by: str = "owner") -> list[int]:
    """Changes the policy of the owner's objects named by id, by tag (``#boston``) or dataset name.

    Returns the ids changed; raises ObjectNotFoundError when nothing matches.
    """
    check_policy(policy)
    if type(name_or_tag) is int:
        targets = [name_or_tag]
    else:
        name = str(name_or_tag)
        tag = name if name.startswith("#") else f"#{name}"
        targets = [oid for oid, e in owner_sources(worker) if tag in e.tags or name in e.tags]
    if not targets:
        raise ObjectNotFoundError(f"worker {worker.id!r} has no dataset tagged {name_or_tag!r}")
    for oid in targets:
        before = policy_of(worker, oid)
        apply_policy(worker, oid, policy)
        audit(worker, "policy", by, "-", [oid], "allowed", f"{before} -> {policy}")
    return targets
