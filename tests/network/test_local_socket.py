"""Same-host links over the worker's Unix socket (``veil.workers.local_socket``).

A client that asks, authenticated over loopback TCP, moves to the Unix socket the worker names and is
the same kind of session there (values compared with torch); the name goes to no one else (no token, a
wrong token, no ask, TLS); a client told a name that is not a worker's keeps TCP; the Unix socket admits
only the one-time ticket the port gave (no token) and a raw hostile connection there leaves the worker serving.
"""

from __future__ import annotations

import socket

import pytest
import torch

import veil as sy
from veil.workers import local_socket
from veil.workers.websocket_auth import handshake_headers
from veil.workers.websocket_transport import BlockingConnection

from network_helpers import TOKEN, listening_server

pytestmark = pytest.mark.skipif(not local_socket.enabled(), reason="Unix links are Linux-only")


@pytest.fixture(scope="module")
def listening(hook):
    yield from listening_server(hook, "local")


def _client(hook, server, local: bool, token: str = TOKEN) -> sy.WebsocketClientWorker:
    return sy.WebsocketClientWorker(hook, id=server.id, host="127.0.0.1", port=server.bound_port, token=token,
                                    local_socket=local)


def test_a_client_that_asks_moves_to_the_unix_socket_and_computes_as_over_tcp(hook, listening):
    assert local_socket._NAME.fullmatch(listening.local_socket_name)
    x, y = torch.randn(40, 7), torch.randn(40, 7)
    for local, family in ((True, socket.AF_UNIX), (False, socket.AF_INET)):
        client = _client(hook, listening, local)
        try:
            assert client._conn.sock.family == family
            p, q = x.send(client), y.send(client)
            assert torch.equal((p * q + p).get(), x * y + x)
            big = torch.randn(700_000)  # (2.8 MB: fragmented both ways)
            assert torch.equal(big.send(client).get(), big)
        finally:
            client.close()


def test_the_name_goes_only_to_a_loopback_client_that_authenticated_and_asked(listening):
    url = f"ws://127.0.0.1:{listening.bound_port}"
    asked = {**handshake_headers(TOKEN), local_socket.ASK_HEADER: "1"}
    conn = BlockingConnection(url, asked)
    assert conn.response.headers.get(local_socket.HEADER) == listening.local_socket_name
    conn.close()
    conn = BlockingConnection(url, handshake_headers(TOKEN))  # did not ask
    assert local_socket.HEADER not in conn.response.headers
    conn.close()
    for bad in ({local_socket.ASK_HEADER: "1"}, {**handshake_headers("t" + "x" * 40), local_socket.ASK_HEADER: "1"}):
        with pytest.raises(Exception) as refused:
            BlockingConnection(url, bad)
        assert listening.local_socket_name not in str(refused.value)
        assert local_socket.HEADER not in str(getattr(getattr(refused.value, "response", None), "headers", ""))


def test_the_unix_socket_admits_only_a_ticket_the_port_gave(listening):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    def over_unix(headers: dict):
        return connect("ws://local/", sock=local_socket.connect(listening.local_socket_name, 5),
                       additional_headers=headers, open_timeout=5)

    told = BlockingConnection(f"ws://127.0.0.1:{listening.bound_port}",
                              {**handshake_headers(TOKEN), local_socket.ASK_HEADER: "1"})
    ticket = told.response.headers[local_socket.TICKET_HEADER]
    told.close()
    # tokens count for nothing there (the right one included): no door for guessing beside the port
    for bad in (handshake_headers("t" + "y" * 40), handshake_headers(TOKEN), {local_socket.TICKET_HEADER: ticket},
                {local_socket.TICKET_HEADER: ticket[32:]}):
        with pytest.raises(InvalidStatus) as refused:
            over_unix(bad)
        assert refused.value.response.status_code == 401
    with over_unix({local_socket.TICKET_HEADER: ticket[:32]}) as ws:
        assert ws.response.status_code == 101
        assert ws.response.headers[local_socket.PROOF_HEADER] == ticket[32:]
    with pytest.raises(InvalidStatus):  # used up
        over_unix({local_socket.TICKET_HEADER: ticket[:32]})


def test_a_hostile_raw_connection_on_the_unix_socket_leaves_the_worker_serving(hook, listening):
    for junk in (b"\x00" * 70_000, b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 100_000 + b"\r\n\r\n", b""):
        raw = local_socket.connect(listening.local_socket_name, 5)
        try:
            raw.sendall(junk)
        except OSError:
            pass
        raw.close()
    client = _client(hook, listening, True)
    try:
        x = torch.arange(6.0)
        assert torch.equal((x.send(client) * 2).get(), x * 2)
    finally:
        client.close()


def test_a_name_that_is_not_a_workers_keeps_the_client_on_tcp(hook, listening, monkeypatch):
    """A server that names a socket nobody serves, or a string no worker makes (another abstract name, a
    path): the client stays on TCP and works."""
    for told in ("veil-" + "0" * 32, "/run/other.sock", "../x", "veil-" + "g" * 32):
        monkeypatch.setattr(local_socket, "offered_to", lambda *a: True)
        monkeypatch.setattr(listening, "local_socket_name", told)
        client = _client(hook, listening, True)
        try:
            assert client._conn.sock.family == socket.AF_INET
            x = torch.ones(3)
            assert torch.equal((x.send(client) + 1).get(), x + 1)
        finally:
            client.close()


def test_turned_off_the_client_stays_on_tcp(hook, listening, monkeypatch):
    monkeypatch.setenv("VEIL_LOCAL_SOCKETS", "0")
    client = _client(hook, listening, True)
    try:
        assert client._conn.sock.family == socket.AF_INET
    finally:
        client.close()
