"""Small steps the review-before-release red teams share: ids, a pending request's id, release audit rows."""

from __future__ import annotations

import time

import pytest

from veil.exceptions import ReviewPendingError


def uid(prefix: str) -> str:
    """A worker id no other test uses."""
    return f"{prefix}-{time.monotonic_ns()}"


def pending_id(fn) -> str:
    """The request id of the ReviewPendingError ``fn()`` must raise."""
    with pytest.raises(ReviewPendingError) as info:
        fn()
    return info.value.request_id


def release_rows(worker, rid: str, outcome: str = "allowed") -> list:
    """The audit log's ``release`` rows of request ``rid`` with ``outcome``."""
    from veil.governance.state import governance

    return [r for r in governance(worker).db.audit_entries()
            if r["action"] == "release" and r["outcome"] == outcome and rid in r["detail"]]
