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
  (:func:`after_revocation`).

A lapsed request releases nothing; the same value asked for again files a new request. The owner's own message
on an approval is kept, the reason appended.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from typing import Any, Callable

from veil.governance.requests import GIVEN_BACK, ReleaseRequest, ReviewQueue
from veil.governance.revocation import REVOKE_HANDLERS
from veil.governance.state import governance, has_decisions_store
from veil.workers.persistence import db_update, db_update_then

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


def _same_value(queue: ReviewQueue, req: ReleaseRequest, states: tuple, key: Callable[[Any], Any]) -> list:
    """The user's other requests in ``states`` for ``req``'s id, bytes and computation (``key(request)``:
    ``release.request_computation``)."""
    marks = ", ".join("?" * len(states))
    found = queue._rows(f"WHERE object_id = ? AND principal = ? AND digest = ? AND state IN ({marks})",
                        (str(req.object_id), req.principal, req.digest, *states), 50)
    mine = key(req)
    return [r for r in found if r.id != req.id and key(r) == mine]


def use_approval(queue: ReviewQueue, used: ReleaseRequest, key: Callable[[Any], Any]) -> list[str]:
    """Uses ``used``'s approval up (``mark_released``) and lapses the user's other open requests for its value,
    in one transaction: a lapse logged as failed after the release left an approved twin that released the value
    again. A failure (the database) raises with nothing used: the approval stands, nothing lapsed. The ids
    lapsed."""
    twins = [r.id for r in _same_value(queue, used, _OPEN, key)]
    if not twins:
        queue.mark_released(used.id)
        return []
    marks = ", ".join("?" * len(twins))
    changed = db_update_then(queue.db, "UPDATE release_requests SET state = 'released' WHERE id = ? AND "
                                       "state = 'approved'", (used.id,),
                             _SET + f"WHERE id IN ({marks}) AND state IN ('pending', 'approved')",
                             (*_params(f"lapsed: the same value was released under request {used.id}"), *twins))
    if not changed:  # (mark_released's refusal: another process of the owner released it first)
        queue.mark_released(used.id)
    return twins


@_after_the_decision
def after_denial(queue: ReviewQueue, denied: ReleaseRequest, key: Callable[[Any], Any]) -> list[str]:
    """The owner denied ``denied``: the user's earlier approvals of the same value lapse. Their ids."""
    return [r.id for r in _same_value(queue, denied, ("approved",), key)
            if lapse(queue, r.id, "approved", f"the data owner denied request {denied.id} for the same value")]


@_after_the_decision
def after_given_back(queue: ReviewQueue, request_id: str, key: Callable[[Any], Any]) -> bool:
    """A refused move gave ``request_id``'s approval back: it lapses if the owner denied a request for the same
    value since it was approved. Whether it did."""
    req = queue.get(request_id)
    if req.state != "approved":
        return False
    since = req.decided_ts or 0.0
    denials = [r for r in _same_value(queue, req, ("denied",), key) if (r.decided_ts or 0.0) >= since]
    return bool(denials) and lapse(queue, req.id, "approved",
                                   f"the data owner denied request {denials[0].id} for the same value")


#: worker -> name -> how many times this process put a revocation of the name in force (weak: a worker's go
#: with it)
_REVOCATIONS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def revocations(worker: Any, name: str) -> int:
    """How many times ``name`` was revoked on ``worker`` (in this process): a move reads it before it takes its
    approvals, and gives none back if it changed (:func:`give_back`)."""
    return _REVOCATIONS.get(worker, {}).get(name, 0)


def _count_revocation(worker: Any, name: str) -> None:
    counts = _REVOCATIONS.setdefault(worker, {})
    counts[name] = counts.get(name, 0) + 1


REVOKE_HANDLERS.append(_count_revocation)


def give_back(queue: ReviewQueue, request_id: str, user: str, revoked_before: int,
              key: Callable[[Any], Any]) -> bool:
    """A move the destination refused gives ``request_id``'s approval back (``restore_approval``), unless the
    owner revoked ``user`` while the move held it (``revocations`` is no longer ``revoked_before``: readmitted
    since too; the revocation found the approval used, not open) or denied the same value since it was approved
    (:func:`after_given_back`). Fails closed: a revocation is known without the database (the approval stays
    used, shown lapsed where the database allows), and a denial check that fails takes the approval back. Whether
    it stands again."""
    worker = queue.worker
    with governance(worker).lock:
        if revocations(worker, user) != revoked_before or user in getattr(getattr(worker, "tokens", None),
                                                                           "revoked", ()):
            _lapse_used(queue, request_id)
            return False
        if not queue.restore_approval(request_id):
            return False
        lapsed = after_given_back(queue, request_id, key)
        if lapsed is None:  # (the check failed, logged: an approval the owner may have voided does not stand)
            _take_back(queue, request_id)
            return False
        return not lapsed


@_after_the_decision
def _lapse_used(queue: ReviewQueue, request_id: str) -> bool:
    """The approval a move used, not given back because the user was revoked meanwhile, shows ``lapsed`` (unless
    it was given back once before: then it released twice and stays ``released``)."""
    return db_update(queue.db, _SET + "WHERE id = ? AND state = 'released' AND NOT EXISTS "
                                      "(SELECT 1 FROM kv WHERE namespace = ? AND key = ?)",
                     (*_params("lapsed: the data owner revoked this user's access"), request_id, GIVEN_BACK,
                      request_id)) > 0


@_after_the_decision
def _take_back(queue: ReviewQueue, request_id: str) -> None:
    queue.mark_released(request_id)


def after_revocation(worker: Any, name: str) -> int:
    """The owner revoked ``name``: its open requests lapse. How many (0 where no review queue is kept)."""
    if not has_decisions_store(worker):
        return 0
    queue = ReviewQueue(worker)
    with governance(worker).lock:  # (no release decision of this process in between)
        return db_update(queue.db, _SET + "WHERE principal = ? AND state IN ('pending', 'approved')",
                         (*_params("lapsed: the data owner revoked this user's access"), name))
