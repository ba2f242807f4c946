"""Migrations run when a process first opens an owner database an older version may have written: requests that
version left open although something since voided them show ``lapsed`` (lapses.py). Only what they show
changes: a use already refuses them (``ReviewQueue.approved_for``, ``lapses.use_approval``). Failures are logged,
never raised (the worker starts).

- approvals the owner's later denial of the same value voided (:func:`lapse_voided_approvals`): checked in id
  order a page at a time, at most :data:`CHECK_AT_MOST` per opening, the next opening going on from the last id
  checked (kept in the database). A fixed ``LIMIT`` re-read the same rows at every opening: an approval whose
  same-bytes denial came from another computation never lapses, and 1,000 of them hid every voided one after;
- requests open when a revocation was stored by a version without revocation lapses
  (:func:`lapse_revoked_requests`): decided from the stored revocation records, once per database.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from veil.governance.give_backs import user_lock
from veil.governance.lapses import _SET, _params, after_given_back
from veil.governance.requests import ReviewQueue
from veil.governance.revocation import NAMESPACE as REVOKED
from veil.workers.persistence import db_execute, serialized_write

log = logging.getLogger(__name__)
#: where a migration keeps its progress in the owner database (``kv``)
_PROGRESS = "governance.migration"
_CURSOR, _REVOCATIONS_DONE = "voided_approvals_after", "revocation_lapses"
#: candidates read per page (ids only) and checked per opening (each a graph read and maybe one write)
PAGE = 500
CHECK_AT_MOST = 5000
_VOIDED = ("SELECT a.id FROM release_requests a WHERE a.state = 'approved' AND a.id > ? AND EXISTS "
           "(SELECT 1 FROM release_requests d WHERE d.state = 'denied' AND d.principal = a.principal AND d.digest = "
           "a.digest AND d.object_id = a.object_id AND COALESCE(d.decided_ts, 0) >= COALESCE(a.decided_ts, 0)) "
           "ORDER BY a.id LIMIT ?")


def lapse_voided_approvals(worker: Any) -> int:
    """Approvals a later denial of the same value (id, user, bytes, computation) voided lapse, as
    ``lapses.after_given_back`` lapses them now. How many lapsed."""
    from veil.governance.release import request_computation

    queue = ReviewQueue(worker)
    lapsed = checked = 0
    try:
        after = (queue.db.kv_get(_PROGRESS, _CURSOR) or b"").decode()
        while checked < CHECK_AT_MOST:
            page = [rid for (rid,) in db_execute(queue.db, _VOIDED, (after, min(PAGE, CHECK_AT_MOST - checked)))]
            # (an approval whose denial was of another computation stays approved: the next page goes past it)
            lapsed += sum(bool(after_given_back(queue, rid, request_computation)) for rid in page)
            checked += len(page)
            if len(page) < PAGE:
                after = ""  # (the end: the next opening starts over, finding only what was voided since)
                break
            after = page[-1]
        if after:
            queue.db.kv_put(_PROGRESS, _CURSOR, after.encode())
        else:
            queue.db.kv_delete(_PROGRESS, _CURSOR)
    except Exception as error:  # noqa: BLE001 - a migration that cannot run leaves the rows as they are
        log.error("worker %s: approvals voided by a denial were not checked (%s)", worker.id, type(error).__name__)
    if lapsed:
        log.info("worker %s: %d approval(s) voided by a later denial now show lapsed", worker.id, lapsed)
    return lapsed


def lapse_revoked_requests(worker: Any) -> int:
    """Requests open when the owner revoked their user under a version without revocation lapses lapse, as a
    revocation lapses them now (``lapses.after_revocation``; a readmission lapses them too): a user whose record
    says revoked has every open request lapse, one readmitted since, those filed or approved before the record's
    time. Once per database (a later approval of a readmitted user stands: its record's time is of another
    process's clock). How many lapsed."""
    from veil.governance.lapses import _REVOKED_NOTE

    db = ReviewQueue(worker).db
    lapsed = 0
    try:
        if db.kv_get(_PROGRESS, _REVOCATIONS_DONE) is not None:
            return 0
        for name, raw in db.kv_items(REVOKED):
            since = _record_time(raw)
            where = "WHERE principal = ? AND state IN ('pending', 'approved')"
            params: tuple = (name,)
            if since is not None:  # readmitted at ``since``: what was open before it
                where, params = where + " AND COALESCE(decided_ts, ts) < ?", (name, since)
            with serialized_write(db, user_lock(name)) as tx:
                lapsed += tx.execute(_SET + where, (*_params(_REVOKED_NOTE), *params)).rowcount
        db.kv_put(_PROGRESS, _REVOCATIONS_DONE, b"1")
    except Exception as error:  # noqa: BLE001 - retried at the next opening
        log.error("worker %s: requests open at an older revocation were not checked (%s)", worker.id,
                  type(error).__name__)
    if lapsed:
        log.info("worker %s: %d request(s) open at an older revocation now show lapsed", worker.id, lapsed)
    return lapsed


def _record_time(raw: bytes) -> float | None:
    """None when the record keeps the user out (revoked, or unreadable: fails closed), else the time of the
    readmission it records (0: none readable, nothing lapses)."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if type(value) is not dict or value.get("revoked") is not False:
        return None
    ts = value.get("ts")
    return float(ts) if type(ts) in (int, float) else 0.0
