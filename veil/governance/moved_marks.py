"""A tightening to dp-only reaches the copies that left the worker: values moved to another worker of the owner.

A value derived from a dataset under review leaves its worker with the owner's approval (a move) and names its
source as ``"worker:id"`` there (capabilities.py). The owner's later tightening of that dataset to dp-only marks
what is still on the dataset's worker (policy._mark_derived_dp_only), but the copy on the other worker kept no
mark: it stayed releasable there, un-noised. A copy on a worker of another owner is the scientist's (the move was
a release, as a get is); a copy on a worker of the same owner is still the owner's to hold back.

The tightening stores its source's name (``"worker:id"``) in the owner database (``kv`` namespace
:data:`NAMESPACE`), which the owner's workers share (docs/scaling.md: one owner per database); every serving
network worker rereads it with the stored policy decisions (every ``policy.SYNC_SECONDS``) and gives the DP
guard's mark to each value it holds that names one of them (derived values included: sources travel and
propagate). A loosening keeps the stored names, as it keeps the marks (fails closed).
"""

from __future__ import annotations

import json
import time
from typing import Any

from veil.governance.lock_order import governance_lock, turn_and_governance_lock
from veil.governance.state import _STATE, audit, governance
from veil.workers.persistence import OwnerDB

#: owner database ``kv`` namespace: key ``"worker:id"`` of a source the owner tightened to dp-only
NAMESPACE = "governance.dp_only_sources"


def source_name(worker: Any, oid: int) -> str:
    """How a value moved out of ``worker`` names the source ``oid`` (capabilities.export_tags)."""
    return f"{worker.id}:{oid}"


def record_tightened(worker: Any, oids: list) -> None:
    """Stores that the owner made ``oids`` (sources of ``worker``) dp-only, for the owner's other workers.
    Outside the turn (a database write)."""
    db = governance(worker).db
    value = json.dumps({"ts": time.time()}).encode()
    for oid in oids:
        db.kv_put(NAMESPACE, source_name(worker, oid), value)


def _stored_names(worker: Any) -> frozenset:
    """The stored names (none read where no owner database is kept: an in-process worker without one has
    only its own governance state's)."""
    db = getattr(worker, "db", None)
    if not isinstance(db, OwnerDB):
        state = _STATE.get(worker)
        if state is None:
            return frozenset()
        db = state.db
    return frozenset(key for key, _ in db.kv_items(NAMESPACE))


def _unmarked(worker: Any, names: frozenset) -> list:
    """(id, entry) of each value held here that names a tightened source and lacks the DP guard's mark."""
    # (isdisjoint walks the smaller set: a value naming many sources costs the few stored names, every second)
    return [(oid, e) for oid, e in list(worker.monitor.owner_entries())
            if e.provenance and not e.protected and not e.meta.get("dp_only")
            and not frozenset(e.provenance).isdisjoint(names)]


def sync_moved_marks(worker: Any, turn: Any = None) -> list[int]:
    """Marks every value here derived from a source the owner tightened to dp-only on another of its workers
    (read before the turn is taken; marked in it, with the governance lock: the order of lock_order.py). The ids
    marked (audited)."""
    names = _stored_names(worker)
    if not names or not _unmarked(worker, names):  # (the usual case: no turn taken)
        return []
    with turn_and_governance_lock(worker, turn) if turn is not None else governance_lock(worker):
        found = _unmarked(worker, names)
        for _, entry in found:
            entry.meta["dp_only"] = True
    marked = [oid for oid, _ in found]
    if marked:
        audit(worker, "policy", "owner", "-", marked, "allowed",
              "dp-only mark: derived from a dataset the owner tightened to dp-only on another worker")
    return marked
