"""Allowed rows of values that leave a network worker to other workers before its reply: on record first, waited
for with the worker's turn handed over.

A get's allowed rows are queued with the refusal rows and only its reply waits for them (audit_writer.py,
``rows_held_by_reply``). An SMPC peer opening publishes its outputs to the other parties, and a move sends its
objects to the destination, before the reply: "the reply waits" would let the values out first. Their rows are
queued the same way and, before anything is published or sent, :func:`on_record_before_leaving` waits for them
outside the turn (``cancellation.outside_turn``: every other session is served meanwhile, however far behind a
refusal flood left the row writer), then re-checks the session in the turn again: a session revoked or ended
meanwhile sends nothing. A row not on record (a database error, or none within the writer's wait) is one error
line and nothing leaves.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

from veil.exceptions import PermissionDeniedError, RemoteExecutionError
from veil.workers import cancellation
from veil.workers.audit_writer import NOT_RECORDED

_moving_lock = threading.Lock()


def on_record_before_leaving(worker: Any) -> None:
    """(in the turn, before a value leaves to another worker) waits, the turn handed over, until the rows this
    thread queued are on record; raises (nothing may leave) when one is not or the session went meanwhile."""
    rows = getattr(worker, "audit_rows", None)
    session = worker.current_session() if callable(getattr(worker, "current_session", None)) else None
    if rows is None or session is None or not rows.holds_mine():  # (in process: the rows were written)
        return
    with cancellation.outside_turn():
        recorded = rows.settle_mine()
    if not recorded:
        raise RemoteExecutionError(NOT_RECORDED)
    session_still_open(worker, "while its audit rows were written")


def session_still_open(worker: Any, meanwhile: str = "meanwhile") -> None:
    """(just before values leave to another worker: a peer round's publish) raises when the requesting session was
    revoked or ended since its request was checked (``revoke`` takes no turn: a round whose row was on record
    before its step, or that waited for a peer's shares, may be past it)."""
    session = worker.current_session() if callable(getattr(worker, "current_session", None)) else None
    if session is not None and (session.revoked or worker.sessions.get(session.id) is not session):
        raise PermissionDeniedError(f"access revoked by the data owner (or the session ended) {meanwhile}: "
                                    "nothing was sent")


@contextmanager
def moving(worker: Any, entries: list) -> Iterator[None]:
    """Claims a move's entries while it hands the turn over (:func:`on_record_before_leaving`): a second move of
    one of them meanwhile (another connection of the session) is refused, never sent twice."""
    claimed = worker.__dict__.setdefault("_entries_moving", set())
    keys = {id(e) for e in entries}
    with _moving_lock:
        if keys & claimed:
            raise PermissionDeniedError("an object this move names is being moved by another request")
        claimed |= keys
    try:
        yield
    finally:
        with _moving_lock:
            claimed -= keys
