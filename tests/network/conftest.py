"""Fixtures for network-worker tests: real ``veil worker`` processes on loopback."""

from __future__ import annotations

import pytest

from veil.workers.websocket_launcher import start_worker
from worker_processes import client_connections, spawned_workers

from network_helpers import ADMIN, BOSTON, HOSPITAL, OTHER, PEER, TOKEN, base_args, start_peered_pair, tensor_eq  # noqa: F401


@pytest.fixture
def spawn():
    """``spawn(id, args, port=0) -> WorkerProcess``; every process is stopped after the test, pass or fail."""
    yield from spawned_workers()


@pytest.fixture(scope="module")
def owner_server():
    """One worker for a test module: boston as private data, hospital may .get() the target."""
    wp = start_worker("alice", base_args([
        "--dataset", f"boston={BOSTON}:target=MEDV", "--tags", "#boston,#housing", "--allow", "hospital=#target",
    ]))
    yield wp
    wp.kill()


@pytest.fixture(scope="module")
def plain_worker():
    """One plain worker (base_args) shared by a module's tests that leave it as they found it, each checking it
    still serves afterwards: a worker process costs seconds of CPU to start (torch)."""
    wp = start_worker("alice", base_args())
    yield wp
    wp.kill()


@pytest.fixture
def peered(spawn, tmp_path):
    """Two workers, alice and bob, peered with each other, each with its own data dir."""
    return start_peered_pair(spawn, tmp_path)


@pytest.fixture
def connect(hook):
    """``connect(wp, token=TOKEN, **kw) -> WebsocketClientWorker``; closed after the test."""
    yield from client_connections(hook, TOKEN)
