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

Third pass: every release (get, move, share, an opening) checks again, after the monitor's checks, the marks of the
values it lets out, and those that name another worker's source against the stored names (:func:`refuse_tightened`):
a copy that arrived after the last scan, whose next one the bound put off, and a worker no serving loop syncs,
released such a copy un-noised; in process, a tightening between the monitor's check and the review check let an
unapproved value out. The names of
one dataset one worker keeps are bounded (:data:`MAX_NAMES_PER_DATASET`, then a wildcard row: fails closed).

Fourth pass: the names a release reads stand :data:`NAMES_FRESH_S`, as a sync's do, unless this process stored a
name or a decision since (a worker no serving loop syncs read the database at every release of a value claiming a
string source); the marks are read again after the review check and under the lock a tightening holds
(:func:`refuse_marked`: a tightening between the re-check and the review check, or while a network worker decides
out of its turn, made the review check read dp-only and the value went out unapproved); a value written while the
names were read out of the turn is not released.
"""

from __future__ import annotations

import json
import time
import weakref
from typing import Any

from veil.exceptions import PermissionDeniedError
from veil.governance.lock_order import governance_lock, turn_and_governance_lock
from veil.governance.state import _STATE, audit, governance
from veil.workers import cancellation
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
    try:
        for oid in oids:
            db.kv_put(NAMESPACE, source_name(worker, oid), value)
    finally:
        names_written()


#: names of one dataset (its key) one worker keeps in :data:`LOADED`: a load stores one, and every start loads anew
#: (a worker restarted in a loop added a row per dataset each time, which every worker of the owner read every
#: second, for ever). Past it the older ones give way to one wildcard row (:data:`WILDCARD`), which stands for every
#: name of that worker no row lists any more: a copy moved out under a forgotten name is still marked (fails
#: closed; other old copies of that worker, of other datasets, may be marked with it). Only the owner's loads add
#: rows: no scientist can push a name out
MAX_NAMES_PER_DATASET = 64
#: what follows ``"worker:"`` in a wildcard row's name (then the dataset's key)
WILDCARD = "*"


class Names(frozenset):
    """The stored names a scan matches (a frozenset), with the workers some of whose names of a dp-only dataset a
    wildcard row stands for (``wild``) and every name the rows of :data:`LOADED` still list (``listed``)."""

    wild: frozenset = frozenset()
    listed: frozenset = frozenset()


def _own_names(worker: Any, rows: list) -> tuple[list, list]:
    """(names, wildcard names) among ``rows`` that are ``worker``'s (``"worker:id"``: exactly its id before the
    last colon, an id after it)."""
    prefix = f"{worker.id}:"
    names, wild = [], []
    for name, raw in rows:
        rest = name[len(prefix):] if name.startswith(prefix) else None
        if rest is not None and rest.startswith(WILDCARD):
            wild.append((name, raw))
        elif rest is not None and rest.isdigit():
            names.append((name, raw))
    return names, wild


def record_loaded(worker: Any, oid: int, key: list) -> None:
    """Stores the name of a dataset ``worker`` loaded with its key (:data:`LOADED`; a worker with an owner
    database only: an in-process one has no other worker to reach); past :data:`MAX_NAMES_PER_DATASET` names of
    the dataset here, the others give way to its wildcard row (written first: a failure between keeps them)."""
    db = getattr(worker, "db", None)
    if not isinstance(db, OwnerDB):
        return
    value = json.dumps(key).encode()
    name = source_name(worker, oid)
    rows = _OWN_ROWS.get(worker)
    if rows is None:  # (read once per worker: every load reading every row made 10^4 loads 10^8 row reads)
        rows = {}
        for known, raw in _own_names(worker, db.kv_items(LOADED))[0]:
            rows.setdefault(raw, []).append(known)
        _OWN_ROWS[worker] = rows
    try:
        db.kv_put(LOADED, name, value)
        older = [n for n in rows.setdefault(value, []) if n != name]
        rows[value] = [*older, name]
        if len(older) < MAX_NAMES_PER_DATASET:
            return
        db.kv_put(LOADED, f"{worker.id}:{WILDCARD}{value.decode()}", value)
        for gone in older:
            db.kv_delete(LOADED, gone)
        rows[value] = [name]
    finally:
        names_written()


#: worker -> {dataset key (as stored): its names in :data:`LOADED`}, read from the database at its first load
_OWN_ROWS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _stored_names(worker: Any) -> Names:
    """The stored names, and those of the loaded datasets a stored decision makes dp-only (none read where no
    owner database is kept: an in-process worker without one has only its own governance state's)."""
    db = getattr(worker, "db", None)
    if not isinstance(db, OwnerDB):
        state = _STATE.get(worker)
        if state is None:
            return Names()
        db = state.db
    return _loaded_dp_only(db, frozenset(key for key, _ in db.kv_items(NAMESPACE)))


def _loaded_dp_only(db: Any, stored: frozenset) -> Names:
    """``stored`` and the names of loaded datasets (:data:`LOADED`) that a stored dp-only decision covers (its tags
    all among the dataset's, as policy.stored_policy reads them); unreadable rows are skipped (the decisions' sync
    names them). A covered wildcard row puts its worker in ``wild``."""
    dp_only = [set(tags) for tags, policy in (_parsed(k, v) for k, v in db.kv_items(_DECISIONS))
               if policy == "dp-only"]
    if not dp_only:
        return Names(stored)
    names, wild, listed = [], set(), []
    for name, raw in db.kv_items(LOADED):
        worker, _, rest = name.partition(f":{WILDCARD}")
        if not rest:
            listed.append(name)
        key, _ = _parsed(raw.decode("utf-8", "replace"), b"{}")
        if any(tags <= set(key) for tags in dp_only):
            names.append(name)
            if rest:
                wild.add(worker)
    out = Names(stored | frozenset(names))
    out.wild, out.listed = frozenset(wild), frozenset(listed)
    return out


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
    wild = getattr(names, "wild", None)
    if wild and any(type(s) is str and s.rpartition(":")[0] in wild and s.rpartition(":")[2].isdigit()
                    and s not in names.listed for s in provenance):
        return True  # (a name a wildcard row stands for: record_loaded)
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
#: worker -> (the stored names its last sync or release read, when, :data:`_WRITES` then): a release reads them
#: again past NAMES_FRESH_S or after a write of this process (a worker no serving loop syncs, or one whose sync is
#: stuck, read the database at every release of a value naming a string source, which any scientist can claim:
#: 8 ms a get where the owner has 500 datasets, each holding the lock audit rows and the ledger wait for)
_KNOWN: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()
#: how long names read by a sync or a release stand for a release (two sync periods, policy.SYNC_SECONDS: what
#: another process of the owner stores is in force here as soon as a serving worker's sync makes it)
NAMES_FRESH_S = 2.0
#: writes of stored names or decisions by this process (names_written): one makes every worker's names stale at
#: once (an owner's tightening on one in-process worker reaches its copies on the others at their next release)
_WRITES = [0]


def names_written() -> None:
    """After this process stores a name or a decision: the names a release keeps are read again at the next."""
    _WRITES[0] += 1


def _names_now(worker: Any) -> tuple[Names, bool]:
    """The stored names as :func:`_stored_names` reads them (at most :data:`NAMES_FRESH_S` old, none of this
    process's writes since), read outside the turn when they must be read again; and whether they were."""
    known = _KNOWN.get(worker)
    if known is not None and known[2] == _WRITES[0] and time.monotonic() - known[1] < NAMES_FRESH_S:
        return known[0], False
    seen, at = _WRITES[0], time.monotonic()  # (before the read: a write during it makes them stale)
    with cancellation.outside_turn():
        names = _stored_names(worker)
    _KNOWN[worker] = (names, at, seen)
    return names, True


def sync_moved_marks(worker: Any, turn: Any = None) -> list[int]:
    """Marks every value here derived from a source the owner tightened to dp-only on another of its workers
    (read before the turn is taken; marked in it, with the governance lock: the order of lock_order.py). The ids
    marked (audited)."""
    seen, at = _WRITES[0], time.monotonic()
    names = _stored_names(worker)
    _KNOWN[worker] = (names, at, seen)
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


def refuse_tightened(worker: Any, ids: list, entries: list, purpose: str, user: str = "-", session: str = "-") -> None:
    """At every release (get, move, share, an opening: release.enforce_all), after the reference monitor's checks:

    - a value marked since them, or derived from a source a tightening to dp-only is marking now, is refused: on an
      in-process worker (no turn) the owner's tightening on another thread ran between the monitor's check of the
      mark and the review check, which then read dp-only, not review, and the value went out unapproved;
    - a value naming a source of another worker (``"worker:id"``) that the owner tightened to dp-only is marked and
      refused now, not at the next scan: a copy that arrived after this worker's last scan (moved on from a worker
      that had not synced yet) waited for the next one, which the scan's bound puts off ten times as long as it
      took (a scientist holding many values made that seconds), and a worker that does not serve has no sync at
      all. The stored names are read outside the turn (a database read) unless a sync or a release read them
      within :data:`NAMES_FRESH_S` (:func:`_names_now`), and only for values that name a string source; a value
      written meanwhile (the turn was free) is refused, not released as written."""
    refuse_marked(worker, ids, entries, purpose, user, session)
    named = [(oid, e) for oid, e in zip(ids, entries) if e.provenance and any(type(s) is str for s in e.provenance)]
    if not named:
        return
    from veil.governance.release import write_mark

    marks = [write_mark(e.obj) for e in entries]
    names, read = _names_now(worker)
    if read:  # (out of the turn meanwhile: another request may have written one in place since the monitor's checks)
        for oid, e, (obj, version) in zip(ids, entries, marks):
            now = write_mark(e.obj)
            if now[0] is not obj or now[1] != version:
                raise PermissionDeniedError(
                    f"object {oid} on worker {worker.id!r} changed while its release was being checked: nothing "
                    "was released (ask for it again)")
    hit = [(oid, e) for oid, e in named if names and names_tightened(frozenset(e.provenance), names)]
    if not hit:
        return
    for _, entry in hit:
        entry.meta["dp_only"] = True
    _refuse(worker, [oid for oid, _ in hit], purpose, user, session,
            "derived from a dataset the owner tightened to dp-only on another worker (marked)")


def refuse_marked(worker: Any, ids: list, entries: list, purpose: str, user: str = "-", session: str = "-") -> None:
    """Refuses the release if one of ``entries`` has the DP guard's mark, or derives from a source a tightening to
    dp-only is marking now (then it is marked). A tightening marks before it puts dp-only in force, so a release
    reads this after the policies it went by (release.enforce_all: after its review check, and again under the
    governance lock before deciding), never only before them: a tightening between the two made the review check
    read dp-only, not review, and the value went out unapproved, un-noised."""
    state = _STATE.get(worker)
    marking = frozenset(state.marking) if state is not None else frozenset()
    if marking:
        marking |= frozenset(n for n, s in list(state.moved_names.items()) if s in marking)
    raced = [oid for oid, e in zip(ids, entries) if e.meta.get("dp_only") or (
        marking and names_tightened(frozenset(e.provenance or ({oid} if e.protected else ())), marking))]
    if raced:
        for oid, e in zip(ids, entries):
            if oid in raced:
                e.meta["dp_only"] = True
        _refuse(worker, raced, purpose, user, session, "a tightening to dp-only ran since the monitor's check")


def _refuse(worker: Any, ids: list, purpose: str, user: str, session: str, why: str) -> None:
    """The DP guard's refusal of a release (the monitor's words), audited outside the turn (a database write)."""
    with cancellation.outside_turn():
        audit(worker, purpose, user, session, ids, "refused", f"dp-only: {why}")
    raise PermissionDeniedError(
        f"{purpose} refused: this data on worker {worker.id!r} is under the owner's differential-privacy policy "
        "and answers only differentially private releases")
