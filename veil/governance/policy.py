"""The owner's per-dataset policy: ``open`` / ``review`` / ``dp-only`` (see :data:`state.POLICIES`).

A policy is set on a *source* (an object the owner loaded); everything derived from
that source inherits it through provenance (:mod:`veil.governance.provenance`).

Run-time changes (:func:`set_policy`: ``worker.set_policy``, the admin message, the console)
are stored in the worker's owner database (``kv`` namespace ``governance.policy``, shared by one
owner's replicas, keyed by the dataset's tags) and restored at the next start by :func:`apply_policy`, which
``worker.load(..., policy=)`` calls: a dataset gets the stricter of its load-time policy and
the stored decisions (strictness is the order of ``POLICIES``: open < review < dp-only).
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

from veil.exceptions import ObjectNotFoundError
from veil.governance.lock_order import governance_lock, held_outside_turn, turn_and_governance_lock
from veil.governance.moved_marks import (SCAN_SHARE, names_tightened, names_written, record_loaded, record_tightened, source_name,
                                         sync_moved_marks)
from veil.governance.state import (_STATE, DEFAULT_POLICY, POLICIES, audit, check_policy, governance,
                                   has_decisions_store, policy_of)
from veil.workers import cancellation
from veil.workers.principals import Principal

#: open < review < dp-only: dp-only lets nothing un-noised out, approved or not (its DP releases are capped
#: by the owner's budgets)
_STRICTNESS = {p: i for i, p in enumerate(POLICIES)}


def _namespace(worker: Any) -> str:
    # per owner database, not per worker id: one owner's replicas share a database (docs/scaling.md: one
    # owner per database) under different ids, and a decision taken on one must hold on all of them (at each
    # load, and while serving: sync_stored_policies)
    del worker
    return "governance.policy"


def _dataset_key(entry: Any) -> list[str]:
    """What names a loaded dataset across restarts (object ids are new at every start): its tags, else its
    description."""
    tags = sorted({str(t) for t in entry.tags})
    return tags or [f"description:{entry.description}"]


def stored_decisions(worker: Any) -> list[tuple[set, str]]:
    """Every stored run-time decision: (the tag set it was recorded for, its policy). An unreadable record
    raises ValueError (one line): a start stops on it rather than opening the data."""
    out = []
    for key, raw in governance(worker).db.kv_items(_namespace(worker)):
        tags = _json(key, list, key)
        if not all(type(t) is str for t in tags):
            raise ValueError(f"stored policy decision {key!r}: its key is not a list of tags")
        out.append((set(tags), check_policy(_json(raw, dict, key).get("policy"))))
    return out


def stored_policy(worker: Any, entry: Any, decisions: list | None = None) -> str | None:
    """The strictest run-time decision stored for this dataset: one recorded for a tag set it still carries
    all of (a tag added since keeps the decision). None when there is none."""
    mine = set(_dataset_key(entry))
    found = None
    for tags, policy in stored_decisions(worker) if decisions is None else decisions:
        if tags <= mine and (found is None or _STRICTNESS[policy] > _STRICTNESS[found]):
            found = policy
    return found


def sync_stored_policies(worker: Any, turn: Any = None) -> list[int]:
    """Puts in force every stored decision stricter than the one in force: one owner's replicas share the
    owner database, so what the owner tightened on one reaches the others while they serve (a network
    worker runs this every :data:`SYNC_SECONDS`, its ``turn`` given: the decisions are read before it is
    taken, the audit rows written after, and the governance lock is never waited for in it: lock_order.py).
    Only ever tightens. Then the values moved here from a source the owner tightened to dp-only on another of
    its workers get the DP guard's mark (moved_marks.py). Returns the ids of the sources it changed."""
    changed = _sync_decisions(worker, turn)
    sync_moved_marks(worker, turn)
    return changed


def _sync_decisions(worker: Any, turn: Any) -> list[int]:
    changed: list[int] = []
    made = _STATE.get(worker) is not None  # (none made: no query until a dataset is found)
    decisions = stored_decisions(worker) if made else []
    if made and not decisions:
        return changed
    key = _decisions_key(decisions) if made else None
    if _unchanged(worker, key):
        return changed
    started = time.monotonic()
    sources = owner_sources(worker)
    if sources and not made:
        decisions = stored_decisions(worker)
    if not sources or not decisions or not _tighter(worker, sources, decisions):  # (the usual case: no turn)
        _LAST_READ[worker] = (key, time.monotonic() + (time.monotonic() - started) / SCAN_SHARE)
        return changed
    notes = []
    with _one_decision(worker):  # (read again under it: an owner's loosening stored meanwhile is not undone)
        decisions = stored_decisions(worker)
        # (stored before they are put in force: a failure here leaves them for the next sync, not unrecorded)
        record_tightened(worker, [oid for oid, _, _, stored in _tighter(worker, sources, decisions)
                                  if stored == "dp-only"])
        with turn_and_governance_lock(worker, turn):
            for oid, entry, before, stored in _tighter(worker, sources, decisions):
                _set_policy(worker, oid, entry, stored)
                notes.append((oid, before, stored))
    for oid, before, stored in notes:
        audit(worker, "policy", "owner", "-", [oid], "allowed",
              f"{before} -> {stored} (the owner's stored decision, made on another replica)")
        changed.append(oid)
    return changed


def _tighter(worker: Any, sources: list, decisions: list) -> list[tuple[int, Any, str, str]]:
    """(id, entry, policy in force, stored policy) of each source whose stored decision is stricter."""
    out = []
    for oid, entry in sources:
        stored = stored_policy(worker, entry, decisions)
        before = policy_of(worker, oid)
        if stored is not None and _STRICTNESS[stored] > _STRICTNESS[before]:
            out.append((oid, entry, before, stored))
    return out


#: how often a serving network worker rereads the owner's stored decisions (sync_stored_policies)
SYNC_SECONDS = 1.0
#: worker -> (the stored decisions its last sync found nothing to tighten for, when it next reads its datasets):
#: finding them reads every held value (owner_sources), which a scientist holding 10^5 tiny values made 0.25 s of
#: each second, with the store's lock held; new decisions are read for at once, the same ones at most a
#: SCAN_SHARE of the time (a dataset the owner tags anew to match one waits that long: a load applies them itself)
_LAST_READ: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


def _decisions_key(decisions: list) -> frozenset:
    return frozenset((frozenset(tags), policy) for tags, policy in decisions)


def _unchanged(worker: Any, key: frozenset | None) -> bool:
    """Whether the last sync found nothing to tighten for these decisions (None: no governance state, no dataset
    found) and the bound says wait (_LAST_READ)."""
    last = _LAST_READ.get(worker)
    return last is not None and time.monotonic() < last[1] and last[0] == key


def _json(raw: Any, kind: type, key: str) -> Any:
    try:
        value = json.loads(raw)
    except (ValueError, TypeError):
        value = None
    if type(value) is not kind:
        raise ValueError(f"stored policy decision {key!r} is unreadable (not a JSON {kind.__name__})")
    return value


def restore_policy(worker: Any, oid: int) -> None:
    """For a dataset loaded without a policy: the owner's stored run-time decision, where it is stricter than
    the default (a restart of ``worker.load(x)`` must not reopen what the owner tightened)."""
    if not has_decisions_store(worker):  # (no decision could have been stored: no governance state made)
        return
    entry = _loaded(worker, oid)
    if entry is None:  # (set_policy stores decisions for protected datasets only)
        return
    record_loaded(worker, oid, _dataset_key(entry))
    stored = stored_policy(worker, entry)
    if stored is not None and _STRICTNESS[stored] > _STRICTNESS[DEFAULT_POLICY]:
        apply_policy(worker, oid, DEFAULT_POLICY)


def _store_policy(worker: Any, entry: Any, policy: str, by: str) -> None:
    """Records the owner's run-time decision (a loosening too: the last decision is what restarts apply)."""
    value = json.dumps({"policy": policy, "by": by, "ts": time.time()}).encode()
    try:
        governance(worker).db.kv_put(_namespace(worker), json.dumps(_dataset_key(entry)), value)
    finally:
        names_written()  # (the names a release keeps are read again: moved_marks._names_now)


def _owner_entry(worker: Any, oid: int) -> Any:
    entry = _loaded(worker, oid)
    if entry is None:
        raise ObjectNotFoundError(f"worker {worker.id!r} has no owner dataset {oid!r}")
    return entry


#: who the owner's actions read the store as: a session of its own, which holds nothing, so they read the owner's
#: loaded data (the shared objects) and none of the values the sessions hold (a scientist holding 10^5 of them made
#: every load, policy change and one-second sync read them all, each a dict of the whole store)
_OWNER_VIEW = Principal("owner", "owner", namespace="\x00veil-owner-view", isolated=True)


def owner_sources(worker: Any) -> list[tuple[int, Any]]:
    """(id, entry) of every object the owner loaded (the possible provenance sources)."""
    return [(oid, e) for oid, e in worker.monitor.owned_entries(_OWNER_VIEW) if e.protected]


def _loaded(worker: Any, oid: int) -> Any:
    """The entry of the dataset ``oid`` the owner loaded; None if there is none."""
    return next((e for i, e in worker.monitor.owned_entries(_OWNER_VIEW) if i == oid and e.protected), None)


def apply_policy(worker: Any, oid: int, policy: str) -> str:
    """The load-time policy of one loaded object (``worker.load(..., policy=)``, ``veil worker --policy``):
    the stricter of ``policy`` and the owner's stored run-time decision for the dataset, so a restart (after a
    crash or not) never reopens what the owner tightened. Returns the policy in force."""
    check_policy(policy)
    entry = _owner_entry(worker, oid)
    record_loaded(worker, oid, _dataset_key(entry))  # (its name for the copies that leave: moved_marks.py)
    stored = stored_policy(worker, entry)
    if stored is not None and _STRICTNESS[stored] > _STRICTNESS[policy]:
        audit(worker, "policy", "owner", "-", [oid], "allowed",
              f"{policy} -> {stored} (restored: the owner's stored run-time decision is stricter)")
        policy = stored
    with governance_lock(worker):  # (owner code a command runs loads in its turn: the lock waited for outside it)
        _set_policy(worker, oid, entry, policy)
    return policy


def _set_policy(worker: Any, oid: int, entry: Any, policy: str) -> int:
    """Puts ``policy`` in force on one loaded object (``dp-only`` also marks it for the DP guard). How many values
    derived from it a tightening to dp-only marked, or a loosening from it leaves marked (the owner's audit row)."""
    state = governance(worker)
    with state.lock:
        if policy == "review" and not state.tracking:
            _start_tracking(worker, oid)
            state.tracking = True
        # the DP guard's mark is set before the policy map changes and cleared after: a check that reads the
        # two without the turn (an in-process worker) sees the stricter of the old and the new policy, never
        # review gone and dp-only not yet marked
        marking = policy == "dp-only" and state.policies.get(oid) != "dp-only"
        loosening = policy != "dp-only" and state.policies.get(oid) == "dp-only"
        if marking:  # (odd until done: a command racing the marking checks its results again, provenance.stamp)
            state.moved_names[source_name(worker, oid)] = oid  # (before the count: a recheck knows the name)
            state.marking.add(oid)
            state.tightenings += 1
        marks = 0
        if policy == "dp-only":
            entry.meta["dp_only"] = True
            if marking:
                marks = _mark_derived_dp_only(worker, oid)
        elif loosening:  # (kept: fails closed; the scientist computes them again, under the new policy)
            marks = sum(1 for _, d in list(worker.monitor.owner_entries())
                        if not d.protected and oid in d.provenance and d.meta.get("dp_only"))
        state.policies[oid] = policy
        if marking:
            state.tightenings += 1
            state.marking.discard(oid)  # (after the policy map: one of the two names it at any time)
        if policy != "dp-only":
            entry.meta.pop("dp_only", None)
        entry.meta["policy"] = policy
        return marks


def _mark_derived_dp_only(worker: Any, source: int) -> None:
    """Values derived from ``source`` before it became dp-only get the DP guard's mark, as if computed after (the
    guard refuses computing them then): under review they waited for the owner's approval, and with the source
    no longer under review they were released to anyone asking. (A loosening leaves the marks: fails closed.)
    How many it marked."""
    marked = 0
    # (a copy moved out and back names it "worker:id": moved_marks.py; a set cut to its bound may hide the name)
    moved = frozenset({source_name(worker, source)})
    for _, derived in list(worker.monitor.owner_entries()):
        if not derived.protected and (source in derived.provenance or names_tightened(derived.provenance, moved)) \
                and not derived.meta.get("dp_only"):
            derived.meta["dp_only"] = True
            marked += 1
    return marked


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


def set_policy(worker: Any, name_or_tag: Any, policy: str, by: str = "owner", turn: Any = None) -> list[int]:
    """Changes the policy of the owner's objects named by id, by tag (``#boston``) or dataset name.

    ``turn``: the network worker's turn (``FairLock``) when the caller holds none (the console, the owner's own
    code): the change is put in force in it, so no command runs under a mix of the old and the new policy (a get
    of data going from review to dp-only passed the DP guard before the change and the review check after it,
    and released the value). A request's handler (the admin message) runs in its turn already: None.
    The decision is stored after the turn (and the governance lock) are handed back: a lost COMMIT's lookup
    (~10 s) held every session's command; one decision at a time is put in force and stored
    (:func:`_one_decision`), so the stored order stays the order in force.

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
        entry = _owner_entry(worker, oid)
        with _one_decision(worker):
            # (in a request's turn, the lock is waited for outside it: release decisions hold it across the
            # owner's database, lock_order.py)
            with turn_and_governance_lock(worker, turn) if turn is not None else governance_lock(worker):
                before = policy_of(worker, oid)
                marks = _set_policy(worker, oid, entry, policy)  # in force first: a tightening holds if storing fails
            with cancellation.outside_turn():
                _store_policy(worker, entry, policy, by)
                if policy == "dp-only":  # (its copies on the owner's other workers; again on a retry: idempotent)
                    record_tightened(worker, [oid])
                audit(worker, "policy", by, "-", [oid], "allowed", f"{before} -> {policy}{_marks_note(policy, marks)}")
    return targets


def _marks_note(policy: str, marks: int) -> str:
    """What the owner's audit row says of the derived values' dp-only marks (:func:`_set_policy`)."""
    if not marks:
        return ""
    if policy == "dp-only":
        return f" ({marks} values derived from it marked dp-only)"
    return (f" ({marks} values derived from it keep their dp-only mark: fails closed; computed again, they are "
            f"under {policy})")


#: worker -> the lock one policy decision holds from putting it in force to storing it (the owner's changes and
#: the sync of stored ones): never the turn nor the governance lock while storing
_DECISIONS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_DECISIONS_MADE = threading.Lock()


@contextmanager
def _one_decision(worker: Any) -> Iterator[None]:
    """The worker's decision lock, waited for outside a request's turn (another decision may be storing)."""
    with _DECISIONS_MADE:
        lock = _DECISIONS.setdefault(worker, threading.Lock())
    with held_outside_turn(lock):
        yield
