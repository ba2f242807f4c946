"""A refused move's approval comes back only if nothing voided it while the move held it, checked in the
give-back's own transaction (``lapses.give_back`` calls :func:`restore_unless_voided`).

Two things void it and can happen in any process of the owner sharing the database (replicas, a second ``veil
worker`` on the same data dir), where this process's lock and revocation count see nothing:

- the user was revoked (readmitted since or not): the stored revocation record (``governance.revoked``, rewritten
  by every revocation and readmission, revocation.py) is no longer what the move read before it took the
  approval (:func:`revocation_mark`), or says revoked (:func:`says_revoked`);
- a twin request for the same value (id, user, bytes, computation), filed while the move held the approval, was
  approved and used: the value went out under it, and its use found this approval used, not open, so it did
  not lapse it.

The checks and the restore run in one :func:`serialized_write` per user, which a release's use of an approval
and a revocation's lapse take too (lapses.py): a revocation stored or a twin used after the check finds the
approval open again and lapses it; one before it is seen.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable

from veil.governance.requests import GIVEN_BACK, ReviewQueue
from veil.governance.revocation import NAMESPACE as REVOKED
from veil.governance.state import _STATE
from veil.workers.persistence import serialized_write

RESTORED, USED, REVOKED_MEANWHILE, TWIN_RELEASED = "restored", "used", "revoked", "twin released"


@dataclass(frozen=True)
class RevocationMark:
    """What a move reads of the user's revocations before it takes approvals.

    Attributes:
        count: revocations of the user put in force by this process (one whose store failed is known here only).
        stored: the user's stored revocation record, or None when there is none.
        read: whether ``stored`` was read (no dataset under review then: none was, and nothing taken after that
            comes back).
    """

    count: int
    stored: bytes | None = None
    read: bool = False


def revocation_mark(worker: Any, name: str, count: int) -> RevocationMark:
    state = _STATE.get(worker)
    if state is None or "review" not in state.policies.values():  # (a move takes no approval: nothing to read)
        return RevocationMark(count)
    return RevocationMark(count, state.db.kv_get(REVOKED, name), True)


def says_revoked(record: bytes | None) -> bool:
    """Whether a stored revocation record keeps the user out (an unreadable one does: fails closed). The
    record alone, unchanged since the move read it, missed a revocation stored before that read whose lapse ran
    after the move took the approval (the lapse waits for the user's transaction, or failed and is retried):
    it found the approval used, not open, and this process had not synced the revocation yet."""
    if record is None:
        return False
    try:
        value = json.loads(record)
    except ValueError:
        return True
    return type(value) is not dict or value.get("revoked") is not False


def user_lock(name: str) -> str:
    """The name one user's uses, give-backs and lapses of approvals serialize on (``serialized_write``)."""
    return f"veil.release_requests.user:{name}"


def restore_unless_voided(queue: ReviewQueue, request_id: str, user: str, mark: RevocationMark,
                          key: Callable[[Any], Any]) -> tuple[str, str]:
    """Gives ``request_id``'s approval back (``approved`` again, marked given back once) unless it is no longer
    ``released`` or was given back before (USED, detail: which, for the owner's audit row), the user's revocation
    record changed since ``mark`` (REVOKED_MEANWHILE), or a twin released the value meanwhile (TWIN_RELEASED,
    detail: the twin's id). (outcome, detail)."""
    if not mark.read:
        return USED, "no dataset was under review when the move began"
    with serialized_write(queue.db, user_lock(user)) as tx:
        req = queue.get(request_id)
        if req.state != "released":
            return USED, f"it is {req.state} now"
        if queue.db.kv_get(GIVEN_BACK, request_id) is not None:
            return USED, "given back once already"
        record = queue.db.kv_get(REVOKED, user)
        if record != mark.stored or says_revoked(record):  # (see says_revoked)
            return REVOKED_MEANWHILE, ""
        twin = _released_twin(queue, req, key)
        if twin == _TOO_MANY:
            return USED, (f"over {TWIN_READ} releases of the same value followed its approval: too many to check "
                          "for a twin")
        if twin is not None:
            return TWIN_RELEASED, twin
        tx.execute("UPDATE release_requests SET state = 'approved' WHERE id = ? AND state = 'released'",
                   (request_id,))
        tx.execute("INSERT INTO kv (namespace, key, value, updated) VALUES (?, ?, ?, ?)",
                   (GIVEN_BACK, request_id, b"1", time.time()))
        return RESTORED, ""


def _released_twin(queue: ReviewQueue, req: Any, key: Callable[[Any], Any]) -> str | None:
    """The id of a request of the same value filed after ``req`` was approved and released since (one filed while
    a move held ``req``: while ``req`` stood approved, a get of the value used it instead of filing), if any.
    Both times are read from one clock (``persistence.db_clock``: the PostgreSQL server's); one filed at the very
    time of the approval counts (filed before it, while ``req`` was pending, its release lapsed ``req``)."""
    found = queue._rows("WHERE object_id = ? AND principal = ? AND digest = ? AND state = 'released' AND id != ? "
                        "AND ts >= ?", (str(req.object_id), req.principal, req.digest, req.id,
                                       req.decided_ts or 0.0), TWIN_READ + 1, graphs=False)
    mine = key(req)
    twin = next((r.id for r in found[:TWIN_READ] if key(queue.get(r.id)) == mine), None)  # (one graph at a time)
    return _TOO_MANY if twin is None and len(found) > TWIN_READ else twin


#: released requests of the same bytes a give-back reads for a twin (one graph at a time); past them it fails
#: closed: the 50 newest (graphs and all) let 50 releases of the same bytes by other computations hide the twin
TWIN_READ = 200
_TOO_MANY = "\x00too many"
