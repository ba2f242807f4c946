"""Fixtures of the governance tests."""

from __future__ import annotations

import pytest

import veil as sy
from veil.workers.websocket_launcher import start_worker

from governance_helpers import ADMIN, BOSTON, OTHER, PEER, TOKEN, console_url, run_cli, worker_args  # noqa: F401


@pytest.fixture
def spawn():
    procs = []

    def start(worker_id: str, args: list[str], port: int = 0):
        wp = start_worker(worker_id, args, port=port)
        procs.append(wp)
        return wp

    yield start
    for wp in procs:
        wp.kill()


@pytest.fixture
def connect(hook):
    made = []

    def make(wp, token: str = TOKEN, **kwargs):
        c = sy.WebsocketClientWorker(hook, id=kwargs.pop("id", wp.id), host="127.0.0.1", port=wp.port,
                                     token=token, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
