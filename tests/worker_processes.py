"""Fixture bodies shared by the test folders that start real ``veil worker`` processes, or serve an
in-process ``WebsocketServerWorker`` from a thread.

Each folder's conftest wraps these with its own tokens (network and governance tests
use different ones), so the start/stop and connect/close bookkeeping lives once.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import veil as sy
from veil.workers.websocket_launcher import start_worker


@contextlib.contextmanager
def websocket_sink(handler) -> Iterator[int]:
    """A plain websockets (sync) server on a free loopback port, ``handler(ws)`` per connection, served from a
    thread (a fake or hostile party: red-team tests); yields its port, shut down afterwards."""
    from websockets.sync.server import serve

    from veil.workers.websocket_launcher import free_port

    port = free_port()
    server = serve(handler, "127.0.0.1", port, max_size=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield port
    finally:
        server.shutdown()


def serve_in_thread(worker, timeout: float = 30) -> threading.Thread:
    """Serves the in-process ``worker`` (a ``WebsocketServerWorker``) on loopback from a daemon thread and waits
    until it listens (``worker.bound_port`` is set); the thread, for :func:`stop_served`. No signal handlers:
    they can only be installed from the main thread."""
    ready = threading.Event()
    thread = threading.Thread(target=worker.serve_forever, daemon=True,
                              kwargs={"on_ready": lambda _: ready.set(), "handle_signals": False})
    thread.start()
    assert ready.wait(timeout), f"worker {worker.id} did not start serving within {timeout} s"
    return thread


def stop_served(worker, thread: threading.Thread, timeout: float = 30) -> None:
    """Stops a worker :func:`serve_in_thread` started and waits (at most ``timeout`` s) for its thread."""
    worker.stop()
    thread.join(timeout)


def peer_mesh_args(name: str, ports: dict, token_of) -> list[str]:
    """``veil worker`` arguments peering ``name`` with every other worker of ``ports`` (name -> port) on
    loopback: it reaches each as ``--peer``, presents ``token_of(name)`` to it and accepts ``token_of(other)``
    from it (one token per worker: a server tells its peers apart, as peer openings need)."""
    args = []
    for other, port in ports.items():
        if other != name:
            args += ["--peer", f"{other}=127.0.0.1:{port}", "--peer-token", f"{other}={token_of(name)}",
                     "--accept-peer", f"{other}={token_of(other)}"]
    return args


def spawned_workers() -> Iterator:
    """Yields ``spawn(id, args, port=0, **start_worker_options) -> WorkerProcess``; every process is killed
    afterwards, pass or fail."""
    procs = []

    def start(worker_id: str, args: list[str], port: int = 0, **options):
        wp = start_worker(worker_id, args, port=port, **options)
        procs.append(wp)
        return wp

    yield start
    for wp in procs:
        wp.kill()


def spawn_all(spawn, specs: dict) -> dict:
    """Starts several workers at once (``spawn`` of :func:`spawned_workers`; ``specs``: name -> (args,
    port)): each spends seconds importing torch before it listens, so a cluster one after the other
    costs the sum. name -> WorkerProcess; one that fails raises here, the others are still killed
    with the fixture."""
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {name: pool.submit(spawn, name, args, port=port) for name, (args, port) in specs.items()}
    return {name: f.result() for name, f in futures.items()}


def client_connections(hook, default_token: str) -> Iterator:
    """Yields ``connect(wp, token=default_token, **kw) -> WebsocketClientWorker``; all closed afterwards."""
    made = []

    def make(wp, token: str = default_token, **kwargs):
        c = sy.WebsocketClientWorker(hook, id=kwargs.pop("id", wp.id), host="127.0.0.1", port=wp.port,
                                     token=token, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
    # deletions and deferred commands still queued for these (now closed) workers would
    # otherwise fail a later test's flush
    local = hook.local_worker
    with local._queue_lock:
        for key in [k for k, entry in local._pending_deletes.items() if entry[0] in made]:
            del local._pending_deletes[key]
