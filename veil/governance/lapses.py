"""Requests that stop releasing anything without being used: state ``lapsed``, the reason in their message.

An open request (pending or approved) lapses when

- an approval releases the same value under the same id to the same user (same bytes and computation): a get
  racing a move filed a second request for it while the move held the approval, which the destination's
  refusal gave back; used, the approval answered that request too, which otherwise waited on the owner's list,
  counted against the user's pending cap, and, approved later, released the same bytes again
  (:func:`use_approval`, in the release's own transaction);
- the owner denies a request for the same value: an earlier approval of it is void
  (``ReviewQueue.approved_for`` already refused it) and is shown so (:func:`after_denial`);
- the owner revokes the user (PySyft's request model: revocation voids outstanding approvals): after
  readmission, the same value recomputed under the same id matched an approval given before the revocation
  (:func:`after_revocation`); an approval a move held through a revocation made in any process of the owner,
  given back once before or not, lapses when the refused move would give it back (:func:`give_back`);
- a twin request released the same value while a move held the approval: the refused move does not give it back
  (give_backs.py);
- an older version left an approval ``approved`` after the owner denied the same value: it lapses when a process
  first opens the database (lapse_migration.py: a bounded number per opening, going on from the last checked),
  or when it would be used (:func:`use_approval`: nothing released); so does a request open when an older
  version stored a revocation of its user (lapse_migration.py, once per database).

A lapsed request releases nothing; the same value asked for again files a new request. The owner's own message
on an approval is kept, the reason appended.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from typing import Any, Callable

from veil.exceptions import PermissionDeniedError
from veil.governance.give_backs import (
    RESTORED, REVOKED_MEANWHILE, TWIN_RELEASED, RevocationMark, restore_unless_voided, revocation_mark, user_lock,
)
from veil.governance.requests import MAX_PENDING_PER_USER, ReleaseRequest, ReviewQueue
from veil.governance.revocation import REVOKE_HANDLERS
from veil.governance.state import governance, has_decisions_store
from veil.workers.persistence import db_update, serialized_write

log = logging.getLogger(__name__)
LAPSED = "lapsed"
_OPEN = ("pending", "approved")
#: the change a lapse makes (the owner's message on an approval kept, the reason appended; a pending request gets
#: the time it lapsed as its decision time)
_SET = ("UPDATE release_requests SET state = ?, message = CASE WHEN message = '' THEN ? ELSE message || ? END, "
        "decided_ts = COALESCE(decided_ts, ?) ")


def _params(note: str) -> tuple:
    return LAPSED, note, f" ({note})", time.time()


def _after_the_decision(fn: Callable) -> Callable:
    """A lapse that follows a decision already recorded (a denial made, an approval given back): a failure of
    it (the database) is logged in one line and answers None, never failing that decision. (A release's lapses
    share its transaction instead, :func:`use_approval`: logged after it, a failure left a twin approval.)"""

    @functools.wraps(fn)
    def run(queue: ReviewQueue, *args: Any) -> Any:
        try:
            return fn(queue, *args)
        except Exception as error:  # noqa: BLE001 - housekeeping after the decision: logged, not raised
            log.error("worker %s: release requests did not lapse after %s (%s: %s)", queue.worker.id,
                      fn.__name__, type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
            return None

    return run


def lapse(queue: ReviewQueue, request_id: str, from_state: str, reason: str) -> bool:
    """``request_id`` lapses if it is still ``from_state`` (another process may have decided it since);
    whether it did."""
    return db_update(queue.db, _SET + "WHERE id = ? AND state = ?",
                     (*_params(f"lapsed: {reason}"), request_id, from_state)) > 0


#: requests of one user, id and bytes a lapse reads (their graphs one at a time): the user's pending cap and room
#: for approvals; the 50 newest (graphs and all) let 50 newer requests of the same bytes by other computations,
#: which the scientist files at will, hide a twin from the lapse
SAME_BYTES_READ = MAX_PENDING_PER_USER + 100


def _same_value(queue: ReviewQueue, req: ReleaseRequest, states: tuple, key: Callable[[Any], Any]) -> list:
    """The user's other requests in ``states`` for ``req``'s id, bytes and computation (``key(request)``:
    ``release.request_computation``)."""
    marks = ", ".join("?" * len(states))
    found = queue._rows(f"WHERE object_id = ? AND principal = ? AND digest = ? AND state IN ({marks})",
                        (str(req.object_id), req.principal, req.digest, *states), SAME_BYTES_READ, graphs=False)
    mine = key(req)
    same = (queue.get(r.id) for r in found if r.id != req.id)  # (one graph in memory at a time)
    return [r for r in same if key(r) == mine]


def use_approval(queue: ReviewQueue, used: ReleaseRequest, key: Callable[[Any], Any]) -> list[str]:
    """Uses ``used``'s approval up and lapses the user's other open requests for its value, in one transaction
    (a lapse logged as failed after the release left an approved twin that released the value again), which the
    user's give-backs and revocation lapses serialize with (``give_backs.user_lock``: a twin read before another
    process gave it back stayed approved). Raises PermissionDeniedError if the approval was no longer
    ``approved`` (another process of the owner released it first), or if the owner denied a request for the same
    value since it was approved: it lapses instead, nothing released (one left ``approved`` by an older version,
    past the migration's batch or by a lapse that failed was used when it was the newest request of its id: the
    decision reads it without ``approved_for``'s denial check); a failure (the database) raises with nothing used
    and nothing lapsed. The ids lapsed."""
    with serialized_write(queue.db, user_lock(used.principal)) as tx:
        denial = _denied_since(queue, used, key)
        if denial is None:
            twins = [r.id for r in _same_value(queue, used, _OPEN, key)]
            if not tx.execute("UPDATE release_requests SET state = 'released' WHERE id = ? AND state = 'approved'",
                              (used.id,)).rowcount:
                raise PermissionDeniedError(f"request {used.id} is already {queue.get(used.id).state}")
            if twins:
                tx.execute(_SET + f"WHERE id IN ({', '.join('?' * len(twins))}) AND state IN ('pending', 'approved')",
                           (*_params(f"lapsed: the same value was released under request {used.id}"), *twins))
            return twins
        tx.execute(_SET + "WHERE id = ? AND state = 'approved'",
                   (*_params(f"lapsed: the data owner denied request {denial} for the same value"), used.id))
    raise PermissionDeniedError(f"release request {used.id} is no longer approved: nothing was released (ask again: "
                                "a new request is filed)")


def _denied_since(queue: ReviewQueue, req: ReleaseRequest, key: Callable[[Any], Any]) -> str | None:
    """The id of the owner's denial of a request for ``req``'s value (id, user, bytes, computation) decided at or
    after ``req``'s approval, if any (as ``ReviewQueue.approved_for`` reads it: such an approval is void)."""
    since = req.decided_ts or 0.0
    return next((r.id for r in _same_value(queue, req, ("denied",), key) if (r.decided_ts or 0.0) >= since), None)


@_after_the_decision
def after_denial(queue: ReviewQueue, denied: ReleaseRequest, key: Callable[[Any], Any]) -> list[str]:
    """The owner denied ``denied``: the user's earlier approvals of the same value lapse. Their ids."""
    return [r.id for r in _same_value(queue, denied, ("approved",), key)
            if lapse(queue, r.id, "approved", f"the data owner denied request {denied.id} for the same value")]


@_after_the_decision
def after_given_back(queue: ReviewQueue, request_id: str, key: Callable[[Any], Any]) -> str:
    """A refused move gave ``request_id``'s approval back: it lapses if the owner denied a request for the same
    value since it was approved. The denial's id if it did, else ""."""
    req = queue.get(request_id)
    if req.state != "approved":
        return ""
    denial = _denied_since(queue, req, key)
    if denial is None or not lapse(queue, req.id, "approved", f"the data owner denied request {denial} for the "
                                                              "same value"):
        return ""
    return denial


#: worker -> name -> how many times this process put a revocation of the name in force (weak: a worker's go
#: with it)
_REVOCATIONS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_REVOKED_NOTE = "lapsed: the data owner revoked this user's access"
_REVOKED_WHY = "the data owner revoked the user's access"


def revocations(worker: Any, name: str) -> RevocationMark:
    """What a move reads of ``name``'s revocations before it takes its approvals: how many times this process
    revoked it, and its stored revocation record, which any process of the owner rewrites when it revokes or
    readmits it (the count alone missed a revoke + readmit made by another process). A move gives no approval back
    if either changed (:func:`give_back`)."""
    return revocation_mark(worker, name, _REVOCATIONS.get(worker, {}).get(name, 0))


def _count_revocation(worker: Any, name: str) -> None:
    counts = _REVOCATIONS.setdefault(worker, {})
    counts[name] = counts.get(name, 0) + 1


REVOKE_HANDLERS.append(_count_revocation)


def give_back(queue: ReviewQueue, request_id: str, user: str, revoked_before: RevocationMark,
              key: Callable[[Any], Any]) -> str | None:
    """A move the destination refused gives ``request_id``'s approval back, unless the owner revoked ``user``
    while the move held it (in any process: readmitted since too; the revocation found the approval used, not
    open), a twin request released the same value meanwhile (give_backs.py), or the owner denied the same value
    since it was approved (:func:`after_given_back`). Fails closed: a revocation in this process is known without
    the database (the approval stays used, shown lapsed where the database allows), and a denial check that fails
    takes the approval back. None when it stands again, else why it stays used (the owner's audit row says it).
    """
    worker = queue.worker
    with governance(worker).lock:
        if _REVOCATIONS.get(worker, {}).get(user, 0) != revoked_before.count \
                or user in getattr(getattr(worker, "tokens", None), "revoked", ()):
            _lapse_used(queue, request_id, _REVOKED_NOTE)
            return _REVOKED_WHY
        outcome, detail = restore_unless_voided(queue, request_id, user, revoked_before, key)
        if outcome == REVOKED_MEANWHILE:
            _lapse_used(queue, request_id, _REVOKED_NOTE)
            return _REVOKED_WHY
        if outcome == TWIN_RELEASED:
            _lapse_used(queue, request_id, f"lapsed: the same value was released under request {detail}")
            return f"the same value was released under request {detail} while the move held it"
        if outcome != RESTORED:
            return detail
        denial = after_given_back(queue, request_id, key)
        if denial is None:  # (the check failed, logged: an approval the owner may have voided does not stand)
            _take_back(queue, request_id)
            return "the check for a later denial of the same value failed"
        return f"the data owner denied request {denial} for the same value" if denial else None


@_after_the_decision
def _lapse_used(queue: ReviewQueue, request_id: str, note: str) -> bool:
    """The approval a move used, not given back because something voided it meanwhile (``note`` says what),
    shows ``lapsed``, given back once before or not (it showed "released" then: the revocation voided it all the
    same); the sends made under it stay in the audit log, a ``release`` row each."""
    return db_update(queue.db, _SET + "WHERE id = ? AND state = 'released'", (*_params(note), request_id)) > 0


@_after_the_decision
def _take_back(queue: ReviewQueue, request_id: str) -> None:
    queue.mark_released(request_id)


def after_revocation(worker: Any, name: str) -> int:
    """The owner revoked ``name``: its open requests lapse. How many (0 where no review queue is kept)."""
    if not has_decisions_store(worker):
        return 0
    queue = ReviewQueue(worker)
    # (no release decision of this process in between; the user's give-backs and uses in other processes
    # serialize with it: give_backs.py)
    with governance(worker).lock, serialized_write(queue.db, user_lock(name)) as tx:
        return tx.execute(_SET + "WHERE principal = ? AND state IN ('pending', 'approved')",
                          (*_params(_REVOKED_NOTE), name)).rowcount
