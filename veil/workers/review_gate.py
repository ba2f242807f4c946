"""Governance (#16) as the command handlers meet it: objects derived from ``review`` data leave a worker (a get, a
move, an opening, a secure-aggregation masked input) only with the owner's approval
(:mod:`veil.governance.release` decides; this module names the session asking)."""

from __future__ import annotations

from typing import Any


def release(worker: Any, ids: list, entries: list, user: str, purpose: str, consume: bool = True) -> None:
    """Refused unless the owner approved what leaves; the approval used up (``consume=False``: checked only, used
    up by a second call once the values go)."""
    from veil.governance.release import enforce_all

    enforce_all(worker, ids, entries, user, session_id(worker), purpose, consume)


def releasing(worker: Any, ids: list, entries: list, user: str, purpose: str) -> Any:
    """The approvals of a move, used up while it sends the objects and given back when the destination refused
    them (its answer: a destination stores an ObjectMessage all or none, ObjectStore.all_or_none;
    :func:`veil.governance.release.releasing`). A failure to reach it may come after it stored them: that keeps
    them used."""
    from veil.governance.release import releasing as moving

    return moving(worker, ids, entries, user, session_id(worker), purpose,
                  lambda error: getattr(error, "from_reply", False) is True)


def session_id(worker: Any) -> str:
    """The session of the request being served (``-`` in process)."""
    current = getattr(worker, "current_session", None)
    session = current() if current is not None else None
    return session.id if session is not None else "-"
