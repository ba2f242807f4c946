"""Fixtures for network-worker tests: real ``veil worker`` processes on loopback."""

from __future__ import annotations

import pytest
import torch

import veil as sy
from veil.workers.websocket_launcher import start_worker

from network_helpers import ADMIN, BOSTON, HOSPITAL, OTHER, PEER, TOKEN, base_args, tensor_eq  # noqa: F401


@pytest.fixture
def spawn():
    """``spawn(id, args, port=0) -> WorkerProcess``; every process is stopped after the test, pass or fail."""
    procs = []

    def start(worker_id: str, args: list[str], port: int = 0):
        wp = start_worker(worker_id, args, port=port)
        procs.append(wp)
        return wp

    yield start
    for wp in procs:
        wp.kill()


@pytest.fixture(scope="module")
def owner_server():
    """One worker for a test module: boston as private data, hospital may .get() the target."""
    wp = start_worker("alice", base_args([
        "--dataset", f"boston={BOSTON}:target=MEDV", "--tags", "#boston,#housing", "--allow", "hospital=#target",
    ]))
    yield wp
    wp.kill()


@pytest.fixture
def connect(hook):
    """``connect(wp, token=TOKEN, **kw) -> WebsocketClientWorker``; closed after the test."""
    made = []

    def make(wp, token: str = TOKEN, **kwargs):
        c = sy.WebsocketClientWorker(hook, id=kwargs.pop("id", wp.id), host="127.0.0.1", port=wp.port,
                                     token=token, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
