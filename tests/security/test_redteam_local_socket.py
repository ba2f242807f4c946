"""Red team: same-host peer links over the worker's Unix socket (``veil.workers.local_socket``).

Attacks as another local user, a hostile peer worker and raw bytes: a process holding the name a client is
told (after the worker released it: its shutdown, a crash) must get no token and no session; the Unix socket
must not be a second door for guessing tokens beside the loopback port; a stalled or odd Unix hop costs the
link little and leaves it on a working TCP session; the move exceeds no session cap, honours ``refuse``,
audits its refusals as 'local', and the listener's opening limits hold; no Unix socket under TLS or when
turned off. Values are compared with torch.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch

from veil.exceptions import PermissionDeniedError
from veil.workers import local_socket
from veil.workers.auth_throttle import FailureThrottle
from veil.workers.websocket_auth import handshake_headers
from veil.workers.websocket_transport import BlockingConnection

from local_links import (hostile_worker, link_client, link_server, linked_on, read_head, served, squat_listener,
                         switch, works)
from network_helpers import TOKEN
from worker_processes import serve_in_thread, stop_served

pytestmark = pytest.mark.skipif(not local_socket.enabled(), reason="Unix links are Linux-only")


@pytest.fixture(scope="module")
def listening(hook):
    with served(link_server(hook)) as server:
        yield server


@contextlib.contextmanager
def _squatter(answer: bool):
    """A process of another user holding a worker-like abstract name: it records what it is sent, and answers
    101 (``answer``) or stalls."""
    name, listener = squat_listener(8)
    got: list[bytes] = []
    held: list[socket.socket] = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            conn.settimeout(10)
            try:
                request = read_head(conn)
                got.append(request)
                if answer and request:
                    conn.sendall(switch(request))
                    got.append(conn.recv(65536))
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield name, got
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        for conn in held:
            conn.close()
        thread.join(5)


def test_a_squatter_on_the_told_name_gets_no_token_and_the_link_stays_on_tcp(hook, listening, monkeypatch):
    """The worker released its name (stopped, crashed) just after it told it; another local user, watching
    /proc/net/unix, binds it before the client connects. The client must not send it its token, nor take
    its session for the worker's (shares would go there)."""
    with _squatter(answer=True) as (name, got):
        monkeypatch.setattr(listening, "local_socket_name", name)
        linked_on(hook, listening, socket.AF_INET)
    seen = b"".join(got)
    assert seen.startswith(b"GET ")  # (the hop was tried: the test can fail)
    assert TOKEN.encode() not in seen


def test_the_unix_socket_gives_a_token_guesser_no_second_allowance(hook):
    """Another local user may connect to the abstract socket: it must not be a door beside the loopback port
    with an allowance of its own (failures counted as 'local', not 'loopback', doubled the guesses)."""
    short = "owner-chosen"
    server = link_server(hook, ((short, "scientist"),))
    server.auth_throttle = FailureThrottle(free=2)
    thread = serve_in_thread(server)
    try:
        url = f"ws://127.0.0.1:{server.bound_port}"
        for guess in range(4):
            with pytest.raises(Exception):
                BlockingConnection(url, handshake_headers(f"guess-{guess}"), open_timeout=5)
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        statuses = []
        for token in ("owner-wrong1", short):  # loopback is blocked now: the Unix socket tells nothing either
            try:
                with connect("ws://local/", sock=local_socket.connect(server.local_socket_name, 5),
                             additional_headers=handshake_headers(token), open_timeout=5) as ws:
                    statuses.append(ws.response.status_code)
            except InvalidStatus as refused:
                statuses.append(refused.response.status_code)
        assert 101 not in statuses and len(set(statuses)) == 1, statuses
    finally:
        stop_served(server, thread)


def test_a_stalled_unix_hop_costs_the_link_little_and_it_stays_on_tcp(hook, listening, monkeypatch):
    monkeypatch.setattr(local_socket, "OPEN_TIMEOUT", 0.5, raising=False)
    with _squatter(answer=False) as (name, got):
        monkeypatch.setattr(listening, "local_socket_name", name)
        # (a hop bound only by the 30 s connect timeout takes 30 s; one bound by OPEN_TIMEOUT 0.5 s and the TCP
        # link: well under 10 s however loaded the machine)
        took = linked_on(hook, listening, socket.AF_INET, connect_timeout=30)
    assert got and took < 10, took


@pytest.mark.parametrize("extra", [
    b"X-Veil-Local-Socket: veil-" + b"0" * 32 + b"\r\nX-Veil-Local-Socket: veil-" + b"1" * 32 + b"\r\n",
    b"X-Veil-Local-Socket: @veil-" + b"0" * 32 + b"\r\n",
    b"X-Veil-Local-Socket: veil-" + b"A" * 32 + b"\r\n",
    b"X-Veil-Local-Socket: veil-" + b"0" * 32 + b"/../x\r\n",
], ids=["duplicate", "at-sign", "upper-case", "path"])
def test_an_odd_name_header_from_a_hostile_worker_keeps_the_connection_on_tcp(extra):
    with hostile_worker(lambda: extra) as url:
        conn = BlockingConnection(url, handshake_headers(TOKEN), open_timeout=5, local=True)
        try:
            assert conn.sock.family == socket.AF_INET
        finally:
            conn.close()


def test_the_move_exceeds_no_session_cap_and_leaves_one_session(hook):
    for cap, family in ((1, socket.AF_INET), (2, socket.AF_UNIX)):
        server = link_server(hook, max_sessions_per_principal=cap)
        thread = serve_in_thread(server)
        try:
            client = link_client(hook, server)
            try:
                assert client._conn.sock.family == family
                works(client)
                deadline = time.monotonic() + 5
                while len(server.sessions) > 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert len(server.sessions) == 1  # the TCP session it left is gone
            finally:
                client.close()
        finally:
            stop_served(server, thread)


def test_a_link_refused_during_the_move_carries_nothing(hook, listening, monkeypatch):
    client = link_client(hook, listening, lazy=True)
    real = local_socket.connect

    def refused_meanwhile(*args, **kwargs):
        client.refuse("the owner revoked this peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(local_socket, "connect", refused_meanwhile)
    with pytest.raises(PermissionDeniedError, match="revoked this peer"):
        client.connect()
    assert client._conn is None


def test_refusals_over_the_unix_socket_are_audited_as_local_without_secrets(listening, monkeypatch):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    rows = []
    monkeypatch.setattr(listening.refusals, "refused", lambda address, reason: rows.append((address, reason)))
    wrong = "t" + "w" * 40
    with pytest.raises(InvalidStatus):
        connect("ws://local/", sock=local_socket.connect(listening.local_socket_name, 5),
                additional_headers={**handshake_headers(wrong), "X-Veil-Local-Ticket": "a" * 32}, open_timeout=5)
    assert rows and all(address == local_socket.SOURCE for address, _ in rows)
    assert all(wrong not in reason and "a" * 32 not in reason and "\n" not in reason for _, reason in rows)


def test_silent_unix_connections_are_bounded_per_source_and_the_worker_serves(hook, listening):
    from veil.workers.websocket_connections import MAX_OPENING_PER_ADDRESS

    held = [local_socket.connect(listening.local_socket_name, 5) for _ in range(MAX_OPENING_PER_ADDRESS + 8)]
    try:
        time.sleep(0.3)
        dropped = 0
        for sock in held[:8]:
            sock.settimeout(2)
            try:
                dropped += sock.recv(1) == b""
            except ConnectionResetError:
                dropped += 1
            except OSError:
                pass
        assert dropped == 8
        client = link_client(hook, listening)
        try:
            works(client)
        finally:
            client.close()
    finally:
        for sock in held:
            sock.close()


class _Worker:
    ssl_context = None
    local_socket_name = "unset"


@pytest.mark.parametrize("case", ["tls", "turned-off"])
def test_no_unix_socket_under_tls_or_turned_off(case, monkeypatch):
    import asyncio

    worker = _Worker()
    if case == "tls":
        worker.ssl_context = object()
    else:
        monkeypatch.setenv("VEIL_LOCAL_SOCKETS", "0")

    async def run():
        async with local_socket.serving_beside(worker, None, {}):
            return worker.local_socket_name

    assert asyncio.run(run()) is None


def test_a_token_revoked_during_the_move_gets_no_session_over_unix(hook, monkeypatch):
    """The ticket stands for the tokens, not for a session: they are authenticated again when it is used."""
    server = link_server(hook)
    thread = serve_in_thread(server)
    try:
        real = local_socket.connect

        def revoked_meanwhile(*args, **kwargs):
            server.revoke("scientist")
            return real(*args, **kwargs)

        monkeypatch.setattr(local_socket, "connect", revoked_meanwhile)
        client = link_client(hook, server, lazy=True)
        try:
            with pytest.raises(Exception):
                client.connect()
                torch.ones(2).send(client).get()
            assert not (client._conn is not None and client._conn.sock.family == socket.AF_UNIX)
            deadline = time.monotonic() + 5
            while server.sessions and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not server.sessions
        finally:
            client.close()
    finally:
        stop_served(server, thread)
