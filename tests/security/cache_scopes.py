"""What the per-user cache red teams share (test_redteam_shared_caches.py and its second pass): a network
session of named users, and a block run as that session's request (the account a network worker sets while it
serves one)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from veil.workers.accounts import ACTING
from veil.workers.websocket_auth import Principal, Session


def user_session(*names: str, role: str = "scientist") -> Session:
    """A session of the users ``names``, each with ``role``."""
    return Session(tuple(Principal(n, role) for n in names))


@contextlib.contextmanager
def acting_as(session: Session) -> Iterator[None]:
    """Runs the block as a request of ``session``."""
    token = ACTING.set(session.account)
    try:
        yield
    finally:
        ACTING.reset(token)
