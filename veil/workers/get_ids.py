"""A get or move names its objects about once each.

Each id a get names is resolved, checked and written to the owner's audit log as an allowed row of its own, in
the worker's turn, with no cancellation checkpoint between them: a get naming its own tensor's id 100,000 times
(a 900 KB frame) held the turn ~29 s on a file database and wrote 100,000 rows; the 256 MiB message limit let one
request do that for hours. A value named again carries nothing a client lacks (it copies it), so a request
naming its objects more than :data:`REPEATS_ALLOWED` times over (plus :data:`SPARE_REPEATS`) is refused at once,
in one line (an audited refusal): what a get costs is then bounded by the objects it names, each stored once
(a client naming one object twice, by two handles to it, is still served; a governed release refuses even that).
"""

from __future__ import annotations

from typing import Any

from veil.exceptions import PermissionDeniedError
from veil.workers import cancellation
from veil.workers.audit_writer import rows_held_by_reply
from veil.workers.principals import Purpose

#: how many times over a request may name its distinct objects, and repeats allowed on top
REPEATS_ALLOWED, SPARE_REPEATS = 2, 32


def named_once(ids: Any) -> None:
    """Raises if ``ids`` (a get's or move's list) names its objects more than the bound above (anything else in
    it is the handler's to refuse)."""
    if type(ids) is not list or len(ids) <= SPARE_REPEATS:
        return
    distinct = len({oid for oid in ids if type(oid) is int})
    if len(ids) > REPEATS_ALLOWED * distinct + SPARE_REPEATS:
        raise PermissionDeniedError(f"a request names {len(ids)} ids for {distinct} distinct object(s): name each "
                                    "object once (and copy its value)")


#: ids a get or move resolves between two looks at its command's deadline and cancellation
CHECK_EVERY = 32


def resolve_each(monitor: Any, principal: Any, ids: list, purpose: Any, detail: str = "") -> list:
    """``monitor.resolve`` of each id (each an allowed audit row, a database write), looking at the command's
    deadline and cancellation every :data:`CHECK_EVERY` ids (it never did: 100,000 objects of its own held the
    turn ~30 s whatever ``--max-command-seconds`` said). No turn is handed over between them: what was resolved
    is what is released. A get's allowed rows are queued with the refusal rows (a network worker's reply waits for
    them out of the turn: audit_writer.rows_held_by_reply); a move's too, waited for out of the turn before it
    sends (leaving_rows.on_record_before_leaving)."""
    if purpose is Purpose.REVEAL or purpose is Purpose.MOVE:  # (a move's wait before it sends: leaving_rows.py)
        with rows_held_by_reply():
            return _resolved(monitor, principal, ids, purpose, detail)
    return _resolved(monitor, principal, ids, purpose, detail)


def _resolved(monitor: Any, principal: Any, ids: list, purpose: Any, detail: str) -> list:
    entries = []
    for k, oid in enumerate(ids):
        if k and k % CHECK_EVERY == 0:
            cancellation.check()
        entries.append(monitor.resolve(principal, oid, purpose, detail))
    return entries
