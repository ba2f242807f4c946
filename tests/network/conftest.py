"""Fixtures for network-worker tests: real ``veil worker`` processes on loopback."""

from __future__ import annotations

import pytest

from veil.workers.websocket_launcher import free_port, start_worker
from worker_processes import client_connections, spawned_workers

from network_helpers import ADMIN, BOSTON, HOSPITAL, OTHER, PEER, TOKEN, base_args, tensor_eq  # noqa: F401


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


@pytest.fixture
def peered(spawn, tmp_path):
    """Two workers, alice and bob, peered with each other, each with its own data dir."""
    ports = {"alice": free_port(), "bob": free_port()}
    procs = {}
    for name, other in (("alice", "bob"), ("bob", "alice")):
        args = base_args(["--peer", f"{other}=127.0.0.1:{ports[other]}", "--peer-token", f"{other}={PEER}",
                          "--accept-peer", f"{other}={PEER}", "--data-dir", str(tmp_path / name)])
        procs[name] = spawn(name, args, port=ports[name])
    return procs


@pytest.fixture
def connect(hook):
    """``connect(wp, token=TOKEN, **kw) -> WebsocketClientWorker``; closed after the test."""
    yield from client_connections(hook, TOKEN)
