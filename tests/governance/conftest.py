"""Fixtures of the governance tests."""

from __future__ import annotations

import pytest

from worker_processes import client_connections, spawned_workers

from governance_helpers import ADMIN, BOSTON, OTHER, PEER, TOKEN, console_url, run_cli, worker_args  # noqa: F401


@pytest.fixture
def spawn():
    """``spawn(id, args, port=0) -> WorkerProcess``; every process is stopped after the test, pass or fail."""
    yield from spawned_workers()


@pytest.fixture
def connect(hook):
    """``connect(wp, token=TOKEN, **kw) -> WebsocketClientWorker``; closed after the test."""
    yield from client_connections(hook, TOKEN)
