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
