"""Fixtures for adversarial tests against real ``veil worker`` processes (shared with tests/network)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
from network_helpers import TOKEN, start_peered_pair  # noqa: E402
from worker_processes import client_connections, spawned_workers  # noqa: E402


@pytest.fixture
def spawn():
    """``spawn(id, args, port=0) -> WorkerProcess``; stopped after the test, pass or fail."""
    yield from spawned_workers()


@pytest.fixture
def connect(hook):
    """``connect(wp, token=TOKEN, **kw) -> WebsocketClientWorker``; closed after the test."""
    yield from client_connections(hook, TOKEN)


@pytest.fixture
def peered(spawn, tmp_path):
    """alice and bob, each accepting the other as a peer (direct worker-to-worker moves)."""
    return start_peered_pair(spawn, tmp_path)


@pytest.fixture
def raw():
    """``raw(wp, token=TOKEN) -> send(bytes) -> reply bytes``: frames straight onto an authenticated connection."""
    from veil.workers.websocket_auth import handshake_headers
    from veil.workers.websocket_transport import BlockingConnection

    conns = []

    def open_(wp, token: str = TOKEN):
        conn = BlockingConnection(f"ws://127.0.0.1:{wp.port}", handshake_headers(token))
        conns.append(conn)

        def send(data: bytes, timeout: float = 60) -> bytes:
            conn.send(data)
            return conn.recv(timeout)

        return send

    yield open_
    for c in conns:
        try:
            c.close()
        except Exception:
            pass


@pytest.fixture
def fresh_size_cache(monkeypatch):
    """An empty sizing cache (veil/workers/output_bounds.py) for the test: no size another test left."""
    from veil.workers import output_bounds

    monkeypatch.setattr(output_bounds, "_cache", type(output_bounds._cache)())
