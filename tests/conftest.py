"""Shared fixtures. Core scenarios take ``workers`` so they run against every worker kind.

``WORKER_KINDS`` lists the kinds. "websocket": one ``veil worker`` process per
name (alice, bob, charlie, dave), started once per test session on loopback and peered
with each other; each test gets new client connections (a new session, freed
when the test closes it). The test client presents three tokens: a data
scientist's (user "scientist"), user "hospital"'s (so ``.get(user="hospital")``
is an authenticated claim, as the virtual worker's is by construction) and the
owner's admin token (so ``alice._objects`` and ``alice.load`` work as the owner's view).
"""

from __future__ import annotations

import os

import pytest
import torch

import veil as sy
from worker_processes import peer_mesh_args

if os.environ.get("PYTEST_XDIST_WORKER"):
    # several test processes share the cores (scripts/test.sh): one torch thread each, so that their OpenMP
    # threads do not spin against each other (the workers they start keep torch's default, as in one process)
    torch.set_num_threads(1)

WORKER_KINDS = ["virtual", "websocket"]

WS_NAMES = ("alice", "bob", "charlie", "dave")  # dave: the crypto provider of the SMPC tests
WS_TOKENS = {
    "scientist": "test-scientist-token",
    "hospital": "test-hospital-token",
    "admin": "test-admin-token",
    "peer": "test-peer-token",
}


@pytest.fixture(scope="session")
def hook():
    return sy.TorchHook(torch)


@pytest.fixture(autouse=True)
def _keep_default_hook_context(monkeypatch):
    """A test that makes its own TorchHook (or runs a CLI in this process) makes it the process's default
    (``sy.local_worker``, serving's and federated training's default hook): put back the one from before the test,
    so that later tests do not run against it. Asks for no hook: a file that needs one must ask for ``hook``."""
    from veil.workers import registry

    monkeypatch.setattr(registry, "_default", registry._default)


def _make_virtual(hook, name, request):
    return sy.VirtualWorker(hook, id=name)


def websocket_server_args(name: str, ports: dict) -> list[str]:
    """``veil worker`` arguments for one test server, peered with the other names."""
    t = WS_TOKENS
    return ["--token", t["scientist"], "--user", f"hospital={t['hospital']}", "--admin-token", t["admin"],
            *peer_mesh_args(name, ports, peer_token)]


def peer_token(name: str) -> str:
    """The token session server ``name`` presents to its peers."""
    return f"{WS_TOKENS['peer']}-{name}"


@pytest.fixture(scope="session")
def websocket_servers():
    """name -> WorkerProcess for alice, bob, charlie and dave; stopped at the end (even after failures).

    Ports are picked before the servers start (each is told its peers'
    addresses), so another process may take one meanwhile: the servers start
    together, and on a failure all of them restart on fresh ports (3 tries).
    """
    from concurrent.futures import ThreadPoolExecutor

    from veil.workers.websocket_launcher import free_port, start_worker

    procs: dict = {}
    try:
        for attempt in range(3):
            ports = {n: free_port() for n in WS_NAMES}
            with ThreadPoolExecutor(len(WS_NAMES)) as pool:
                futures = {n: pool.submit(start_worker, n, websocket_server_args(n, ports), port=ports[n])
                           for n in WS_NAMES}
            errors = []
            for n, f in futures.items():
                try:
                    procs[n] = f.result()
                except RuntimeError as e:
                    errors.append(e)
            if not errors:
                break
            _stop_together(procs.values())
            procs.clear()
            if attempt == 2:
                raise errors[0]
        yield procs
    finally:
        _stop_together(procs.values())


def _stop_together(procs) -> None:
    """Signals every worker first, then waits: each takes ~1.5 s to exit (its connections, the interpreter's
    teardown), so one after the other cost the sum at the end of every test process."""
    procs = list(procs)
    for p in procs:
        p.terminate()
    for p in procs:
        p.stop()


@pytest.fixture(scope="session")
def serving_cluster_pool():
    """{"cluster": a started serving cluster} that the test modules using tests/serving/serving_helpers.py's
    ``cluster`` fixture take turns on (that fixture starts it, or replaces it when a module broke it);
    stopped at the end of the session."""
    pool: dict = {}
    yield pool
    if pool.get("cluster") is not None:
        pool.pop("cluster").stop()


def _make_websocket(hook, name, request):
    servers = request.getfixturevalue("websocket_servers")
    t = WS_TOKENS
    return sy.WebsocketClientWorker(
        hook, id=name, host="127.0.0.1", port=servers[name].port, token=t["scientist"],
        extra_tokens=[t["hospital"], t["admin"]], timeout=60,
    )


WORKER_FACTORIES = {"virtual": _make_virtual, "websocket": _make_websocket}


def _closing_factory(factory, hook, request):
    """Yields ``make(name) -> worker`` built by ``factory``; closes what it made afterwards."""
    made = []

    def make(name):
        w = factory(hook, name, request)
        made.append(w)
        return w

    yield make
    for w in made:
        close = getattr(w, "close", None)
        if close is not None:
            close()


@pytest.fixture
def connect_websocket(request, hook):
    """Returns ``connect(name) -> WebsocketClientWorker`` to a session server; closed after the test."""
    yield from _closing_factory(_make_websocket, hook, request)


@pytest.fixture(params=WORKER_KINDS)
def make_worker(request, hook):
    """Returns ``factory(name) -> worker`` for the parametrized kind; cleans up after."""
    yield from _closing_factory(WORKER_FACTORIES[request.param], hook, request)


@pytest.fixture
def alice(make_worker):
    return make_worker("alice")


@pytest.fixture
def bob(make_worker):
    return make_worker("bob")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # another test process shares the cores: its timings mean nothing
        beside = pytest.mark.skip(reason="wall-clock test: run it on one process (VEIL_TEST_PROCESSES=0)")
        for item in items:
            if "wall_clock" in item.keywords:
                item.add_marker(beside)
    if os.environ.get("VEIL_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow test: set VEIL_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_unconfigure(config):
    """Every test process (and xdist's controller, which waits for them to exit) is done: collect once and
    freeze the heap, so the interpreter's exit does not walk every object of the session again (torch, keras,
    every test module: 1-2 s and more, at the very end of the run)."""
    import gc

    gc.collect()
    gc.freeze()
