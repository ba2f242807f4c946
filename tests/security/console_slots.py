"""A started owner console with 4 connection slots (for the red teams of slot replacement): one place."""

from __future__ import annotations

import time

import veil as sy


def started_console(hook, monkeypatch, admin_token: str, prefix: str):
    """Yields a started ConsoleServer (4 slots, ``admin_token`` the owner's) of an in-process worker on
    loopback; stopped afterwards."""
    from veil.governance.console import connections
    from veil.governance.console.server import ConsoleServer
    from veil.workers.websocket_server import WebsocketServerWorker

    monkeypatch.setattr(connections, "MAX_CONNECTIONS", 4)
    tokens = sy.TokenTable()
    tokens.add(admin_token, "owner", "admin")
    w = WebsocketServerWorker(hook, id=f"{prefix}-{time.monotonic_ns()}", port=0, tokens=tokens)
    served = ConsoleServer(w, host="127.0.0.1", port=0).start()
    yield served
    served.stop()


def response_head(sock) -> bytes:
    """Reads one whole HTTP response (with a Content-Length) from ``sock``; returns its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            raise ConnectionError("closed")
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        got = sock.recv(65536)
        if not got:
            raise ConnectionError("closed")
        body += got
    return head
