"""Fixtures for adversarial tests against real ``veil worker`` processes (shared with tests/network)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import veil as sy
from veil.workers.websocket_launcher import free_port, start_worker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
from network_helpers import PEER, TOKEN, base_args  # noqa: E402


@pytest.fixture
def spawn():
    """``spawn(id, args, port=0) -> WorkerProcess``; stopped after the test, pass or fail."""
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
    # deletions still queued for these (now closed) workers would fail later tests' flushes
    pending = hook.local_worker._pending_deletes
    for key in [k for k, (location, _) in pending.items() if location in made]:
        del pending[key]


@pytest.fixture
def peered(spawn, tmp_path):
    """alice and bob, each accepting the other as a peer (direct worker-to-worker moves)."""
    ports = {"alice": free_port(), "bob": free_port()}
    procs = {}
    for name, other in (("alice", "bob"), ("bob", "alice")):
        args = base_args(["--peer", f"{other}=127.0.0.1:{ports[other]}", "--peer-token", f"{other}={PEER}",
                          "--accept-peer", f"{other}={PEER}", "--data-dir", str(tmp_path / name)])
        procs[name] = spawn(name, args, port=ports[name])
    return procs


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
