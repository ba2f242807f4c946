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

Second pass: each load stores the dataset's name with its tags (:data:`LOADED`), so a dp-only decision reaches
copies moved out under a name from before their worker restarted; a source set cut to its bound (a scientist's
claims of 256 sources sorting first push the real name out) is marked whenever anything was tightened; and the
scan, which reads every held value, takes at most :data:`SCAN_SHARE` of the worker's time (a new name at once).
Only the owner adds names (its loads and tightenings); a scientist's claimed sources mark only its own values.
"""

from __future__ import annotations

import json
import time
import weakref
from typing import Any

from veil.governance.lock_order import governance_lock, turn_and_governance_lock
from veil.governance.state import _STATE, audit, governance
from veil.workers.persistence import OwnerDB
from veil.workers.source_sets import MAX_FOREIGN_SOURCES, SUMMARY

#: owner database ``kv`` namespace: key ``"worker:id"`` of a source the owner tightened to dp-only
NAMESPACE = "governance.dp_only_sources"


#: owner database ``kv`` namespace: ``"worker:id"`` of each dataset a worker of the owner loaded -> the dataset's
#: key (its tags, as the stored decisions name it). Ids are new at every start: a copy moved out before its
#: worker restarted names the old id, which no tightening after the restart stored (it stayed releasable); a
#: stored dp-only decision for the dataset's tags reaches every name it was loaded under
LOADED = "governance.source_names"
#: where the owner's decisions are stored (policy._namespace)
_DECISIONS = "governance.policy"


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


def record_loaded(worker: Any, oid: int, key: list) -> None:
    """Stores the name of a dataset ``worker`` loaded with its key (:data:`LOADED`; a worker with an owner
    database only: an in-process one has no other worker to reach)."""
    db = getattr(worker, "db", None)
    if isinstance(db, OwnerDB):
        db.kv_put(LOADED, source_name(worker, oid), json.dumps(key).encode())


def _stored_names(worker: Any) -> frozenset:
    """The stored names, and those of the loaded datasets a stored decision makes dp-only (none read where no
    owner database is kept: an in-process worker without one has only its own governance state's)."""
    db = getattr(worker, "db", None)
    if not isinstance(db, OwnerDB):
        state = _STATE.get(worker)
        if state is None:
            return frozenset()
        db = state.db
    return frozenset(key for key, _ in db.kv_items(NAMESPACE)) | _loaded_dp_only(db)


def _loaded_dp_only(db: Any) -> frozenset:
    """Names of loaded datasets (:data:`LOADED`) that a stored dp-only decision covers (its tags all among the
    dataset's, as policy.stored_policy reads them); unreadable rows are skipped (the decisions' sync names them)."""
    dp_only = [set(tags) for tags, policy in (_parsed(k, v) for k, v in db.kv_items(_DECISIONS))
               if policy == "dp-only"]
    if not dp_only:
        return frozenset()
    names = []
    for name, raw in db.kv_items(LOADED):
        key, _ = _parsed(raw.decode("utf-8", "replace"), b"{}")
        if any(tags <= set(key) for tags in dp_only):
            names.append(name)
    return frozenset(names)


def _parsed(key: str, raw: bytes) -> tuple[list, Any]:
    """(tags, policy) of a stored decision row (``([], None)``: unreadable)."""
    try:
        tags, value = json.loads(key), json.loads(raw)
    except (ValueError, TypeError):
        return [], None
    if not isinstance(tags, list) or not all(type(t) is str for t in tags) or not isinstance(value, dict):
        return [], None
    return tags, value.get("policy")


def names_tightened(provenance: frozenset, names: frozenset) -> bool:
    """Whether a value's sources name one of ``names``, or may (fails closed): a source set past its bound keeps
    the first strings in sorted order and a summary of the rest (source_sets.py), so a value joined with one
    claiming 256 sources that sort first (a scientist sends such a value: any strings) had the tightened name
    cut out of it and stayed releasable; a summarized set is marked whenever any source was tightened."""
    if not provenance.isdisjoint(names):
        return True
    return len(provenance) >= MAX_FOREIGN_SOURCES and any(
        type(s) is str and s.startswith(SUMMARY) for s in provenance)


def _unmarked(worker: Any, names: frozenset) -> list:
    """(id, entry) of each value held here that names a tightened source and lacks the DP guard's mark."""
    # (isdisjoint walks the smaller set: a value naming many sources costs the few stored names, every second)
    return [(oid, e) for oid, e in list(worker.monitor.owner_entries())
            if e.provenance and not e.protected and not e.meta.get("dp_only")
            and names_tightened(frozenset(e.provenance), names)]


#: the most of its time a worker spends in this scan: the next one waits this many times as long as the last
#: took (every held value is read: a scientist holding 10^5 tiny values made it 0.2 s of each 1 s sync on a
#: handler thread, and 10^6 never let it rest); a new name stored is scanned for at the next sync regardless
SCAN_SHARE = 0.1
#: worker -> (names of its last scan, when the next may start)
_LAST_SCAN: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


def sync_moved_marks(worker: Any, turn: Any = None) -> list[int]:
    """Marks every value here derived from a source the owner tightened to dp-only on another of its workers
    (read before the turn is taken; marked in it, with the governance lock: the order of lock_order.py). The ids
    marked (audited)."""
    names = _stored_names(worker)
    if not names:  # (the usual case: no turn taken)
        return []
    last = _LAST_SCAN.get(worker)
    if last is not None and last[0] == names and time.monotonic() < last[1]:
        return []  # (bounded: SCAN_SHARE)
    started = time.monotonic()
    found = _unmarked(worker, names)
    spent = time.monotonic() - started
    if found:
        with turn_and_governance_lock(worker, turn) if turn is not None else governance_lock(worker):
            started = time.monotonic()  # (the wait for the turn is not the scan's cost)
            found = _unmarked(worker, names)
            for _, entry in found:
                entry.meta["dp_only"] = True
            spent += time.monotonic() - started
    _LAST_SCAN[worker] = (names, time.monotonic() + spent / SCAN_SHARE)
    marked = [oid for oid, _ in found]
    if marked:
        audit(worker, "policy", "owner", "-", marked, "allowed",
              "dp-only mark: derived from a dataset the owner tightened to dp-only on another worker")
    return marked
