"""The data scientist's side: file requests, list them, wait for decisions."""

from __future__ import annotations

import time
from typing import Any

from veil.exceptions import ReviewPendingError

#: seconds between two polls of a waiting ``get(wait=...)`` (the worker is never blocked by a waiter)
POLL_INTERVAL = 0.25


def request(ptr: Any, reason: str = "") -> dict:
    """Files (or annotates) the release request for the object behind ``ptr``; returns its state."""
    from veil.governance.wire import RequestReleaseMessage

    reply = ptr.owner.send_msg(RequestReleaseMessage(ptr.id_at_location, str(reason)), ptr.location)
    return reply.objects[0]


def requests(worker: Any, user: str | None = None) -> list[dict]:
    """The caller's release requests on ``worker``, newest first (id, state, reason, shape, message)."""
    from veil.governance.wire import ListRequestsMessage

    return worker.hook.local_worker.send_msg(ListRequestsMessage(user), worker).objects


def get_waiting(fetch: Any, wait: float) -> Any:
    """Calls ``fetch()`` until it stops raising ReviewPendingError or ``wait`` seconds have passed."""
    deadline = time.monotonic() + float(wait)
    while True:
        try:
            return fetch()
        except ReviewPendingError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
