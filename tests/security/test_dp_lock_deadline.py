"""A DP release that gets its user's lock only after its command's deadline passed is charged nothing.

The release waits for its user's lock (``WorkerDP.user_lock``) checking the deadline while it waits; a release
that won the lock on the very poll its deadline passed (or found it free only after a slow step before it)
went on to charge the scientist's budget for an answer the worker then cut off as timed out.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import veil as sy

from tests.security.test_redteam_govdb_third_second import _NetworkDP


class _WonLate:
    """A user lock that is free, but is won only after ``seconds`` (the deadline passes meanwhile)."""

    def __init__(self, seconds: float) -> None:
        self._lock, self._seconds = threading.Lock(), seconds

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        time.sleep(self._seconds)
        return self._lock.acquire()

    def release(self) -> None:
        self._lock.release()


def test_a_release_that_wins_its_users_lock_past_its_deadline_is_charged_nothing(hook, tmp_path):
    net = _NetworkDP(hook, tmp_path, str(tmp_path / "ledger.sqlite3"))
    settings = net.settings
    try:
        x = torch.arange(20.0).send(net.client("alice"))
        net.worker.max_command_seconds = 0.3
        settings._user_locks["alice"] = [_WonLate(0.6), 0]  # (the release finds it: its count goes 0 -> 1 -> 0)
        with pytest.raises(Exception) as caught:
            sy.dp.remote_query(x, "count", epsilon=1.0)
        assert "limit" in str(caught.value) and "\n" not in str(caught.value).strip(), caught.value
        assert settings.ledger.spent("alice") == pytest.approx((0.0, 0.0))
        assert not settings._user_locks, "the lock of a user with no release in flight was kept"
        net.worker.max_command_seconds = None
        assert sy.dp.remote_query(x, "count", epsilon=1.0).epsilon == pytest.approx(1.0)  # still served
    finally:
        net.close()
