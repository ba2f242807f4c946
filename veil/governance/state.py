"""Per-worker governance state: dataset policies and the review queue, in an explicit registry.

Kept outside the worker classes (as the DP settings are), keyed weakly by worker,
so a worker that never uses governance carries nothing.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from veil.workers.persistence import OwnerDB

#: ``open``: derived results may be fetched (as before); ``review``: every release of an object
#: derived from the dataset becomes a request the owner decides; ``dp-only``: only DP releases.
POLICIES = ("open", "review", "dp-only")
DEFAULT_POLICY = "open"


@dataclass
class Governance:
    """What the owner decided for one worker.

    Attributes:
        db: where requests and audit rows go (the worker's own database when it has one).
        policies: source object id -> policy name (sources not listed are ``open``).
    """

    db: OwnerDB
    policies: dict[int, str] = field(default_factory=dict)
    #: provenance is recorded once any dataset has been under review (never switched off again)
    tracking: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: +1 when a tightening to dp-only starts marking derived values, +1 when it is done (odd: marking; read by
    #: commands racing it on an in-process worker: provenance.stamp)
    tightenings: int = 0
    #: sources a tightening to dp-only is marking the derived values of (until the policy map says dp-only)
    marking: set = field(default_factory=set)
    #: ``"worker:id"`` -> id of each source made dp-only here: how a copy moved out and back names it (the race's
    #: recheck, provenance.stamp, matches it as the id; moved_marks.source_name)
    moved_names: dict = field(default_factory=dict)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "tracking" and value:  # every way tracking turns on passes here
            global _ANY_TRACKING
            _ANY_TRACKING = True
        object.__setattr__(self, name, value)


_STATE: "weakref.WeakKeyDictionary[Any, Governance]" = weakref.WeakKeyDictionary()
#: whether any worker of this process has ever tracked provenance (until then, tracking() needs
#: no weak-dictionary lookup: it is asked on every command)
_ANY_TRACKING = False
_CREATE = threading.Lock()


def governance(worker: Any) -> Governance:
    """The worker's governance state (created on first use, with its requests table)."""
    state = _STATE.get(worker)
    if state is None:
        opened = False
        with _CREATE:
            state = _STATE.get(worker)
            if state is None:
                from veil.workers.persistence import add_release_requests_table

                db = getattr(worker, "db", None)
                opened = isinstance(db, OwnerDB)
                if not opened:
                    db = OwnerDB(":memory:")
                add_release_requests_table(db)
                state = _STATE[worker] = Governance(db)
        if opened:  # a database an older version may have written (outside _CREATE: it reads the review queue)
            from veil.governance.lapse_migration import lapse_revoked_requests, lapse_voided_approvals

            lapse_voided_approvals(worker)
            lapse_revoked_requests(worker)
    return state


def has_decisions_store(worker: Any) -> bool:
    """Whether the worker may hold stored governance decisions: a persistent owner database, or governance
    state already made in memory (an in-process worker's run-time ``set_policy`` stores there)."""
    return isinstance(getattr(worker, "db", None), OwnerDB) or _STATE.get(worker) is not None


def check_policy(policy: object) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown data policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return policy  # type: ignore[return-value]


def tracking(worker: Any) -> bool:
    """Whether the worker records provenance (cheap check on every command)."""
    if not _ANY_TRACKING:
        return False
    state = _STATE.get(worker)
    return state is not None and state.tracking


def policy_of(worker: Any, source_id: int) -> str:
    state = _STATE.get(worker)
    return DEFAULT_POLICY if state is None else state.policies.get(source_id, DEFAULT_POLICY)


def audit(worker: Any, action: str, principal: str, session: str, ids: list | tuple = (), outcome: str = "allowed",
          detail: str = "") -> None:
    """One audit row in the worker's database (governance decisions, filed requests, policy changes)."""
    governance(worker).db.audit(worker.id, action, principal, session, list(ids), outcome, detail)
