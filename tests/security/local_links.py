"""What the same-host Unix link red teams share (``veil.workers.local_socket``, first and second passes): a
worker to link to, served in a thread; a client that asks for the Unix hop; a squatter's listener on a
worker-like abstract name; and a hostile TCP 'worker' that answers a handshake with headers of its choosing."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import threading
import time
from typing import Any, Callable, Iterator

import torch

import veil as sy
from veil.workers import local_socket
from veil.workers.websocket_server import WebsocketServerWorker

from network_helpers import TOKEN
from worker_processes import serve_in_thread, stop_served

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def link_server(hook: Any, grants: tuple = ((TOKEN, "scientist"),), **kwargs: Any) -> WebsocketServerWorker:
    """A worker (not yet serving) whose token table holds ``grants``, each ``(token, *principal and role)``."""
    tokens = sy.TokenTable()
    for grant in grants:
        tokens.add(*grant)
    return WebsocketServerWorker(hook, id=f"unix-rt-{os.getpid()}-{time.monotonic_ns()}", port=0, tokens=tokens,
                                 **kwargs)


@contextlib.contextmanager
def served(server: WebsocketServerWorker) -> Iterator[WebsocketServerWorker]:
    """``server`` serving in a thread, stopped on leaving."""
    thread = serve_in_thread(server)
    try:
        yield server
    finally:
        stop_served(server, thread)


def link_client(hook: Any, server: WebsocketServerWorker, token: str = TOKEN, **kwargs: Any) -> Any:
    """A client of ``server`` over loopback that moves to its Unix socket when it can."""
    return sy.WebsocketClientWorker(hook, id=server.id, host="127.0.0.1", port=server.bound_port, token=token,
                                    local_socket=True, **kwargs)


def works(client: Any) -> None:
    """The link computes with torch's values."""
    x = torch.randn(5, 3)
    assert torch.equal((x.send(client) * 3 + 1).get(), x * 3 + 1)


def linked_on(hook: Any, server: WebsocketServerWorker, family: int, **kwargs: Any) -> float:
    """Links a client (``kwargs``: its own) to ``server``: on ``family``, it computes with torch's values, and is
    closed; the seconds its connect took."""
    start = time.monotonic()
    client = link_client(hook, server, **kwargs)
    took = time.monotonic() - start
    try:
        assert client._conn.sock.family == family
        works(client)
    finally:
        client.close()
    return took


def read_head(conn: socket.socket) -> bytes:
    """An HTTP request's or response's bytes up to its blank line (with whatever came in the same reads after
    it), or what came before the peer closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def switch(request: bytes, extra: bytes = b"") -> bytes:
    """A 101 answer to ``request`` (what any websocket server, a hostile one included, can send)."""
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n" + extra + b"\r\n")


def squat_listener(backlog: int) -> tuple:
    """``(name, listener)``: another local user's socket listening on a fresh worker-like abstract name."""
    name = local_socket.new_name()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(local_socket.address(name))
    listener.listen(backlog)
    return name, listener


@contextlib.contextmanager
def hostile_worker(extra: Callable[[], bytes], host: str = "127.0.0.1") -> Iterator[str]:
    """The URL of a TCP 'worker' (a hostile peer) on ``host`` that answers one handshake with the header lines
    ``extra()`` gives when it arrives."""
    listener = socket.create_server((host, 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(switch(read_head(conn), extra()))
            with contextlib.suppress(OSError):
                conn.recv(1024)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"ws://{host}:{port}"
    finally:
        listener.close()
        thread.join(5)
