"""Same-host links over a Unix socket beside a worker's TCP port.

Loopback TCP moves a party's 16 MB share in about twice the time and CPU of a Unix stream socket (the
TCP stack, segmentation and acknowledgements on both sides: ``bench/bench_raw_socket.py --unix``), and
an SMPC product over peer openings exchanges such shares every round. A worker served without TLS on
Linux therefore also listens on an abstract Unix socket with a random name and tells it, in its
handshake response, to a client that authenticated over loopback TCP and asked for it (a server's peer
links do). The client then opens the same websocket session over the Unix socket (authenticating
again) and drops the TCP one; if anything fails it keeps TCP.

What this keeps: the websocket protocol, token authentication and every limit are the same on both
sockets (one handler). No name is ever derived or cached: a client learns it from the worker whose port
it just authenticated to, and the worker holds the name from start to exit, so nobody else can bind it
meanwhile (abstract names are listed in /proc/net/unix, like ports: knowing one only lets a process try
a token, as the port does). Not offered under TLS (the Unix socket would skip what TLS proves) nor off
Linux (no abstract namespace). ``VEIL_LOCAL_SOCKETS=0`` turns it off on either side.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import sys
from typing import Any, AsyncIterator

#: the handshake response header naming the worker's Unix socket (to loopback clients that ask for it)
HEADER = "X-Veil-Local-Socket"
#: the request header a client sends to ask for it
ASK_HEADER = "X-Veil-Local-Ask"
#: socket buffers of a Unix link (the kernel caps them at net.core.[rw]mem_max): with the default
#: ~200 KiB a 1 MiB reply frame waits in the event loop's buffer (a copy) and takes many wake-ups
BUFFER_BYTES = 4 << 20
#: the source a Unix connection counts as (authentication throttling, handshake slots): a local one
SOURCE = "local"

_NAME = re.compile(r"veil-[0-9a-f]{32}")


def enabled() -> bool:
    """Whether this process offers and uses Unix links (Linux, not turned off)."""
    return sys.platform.startswith("linux") and os.environ.get("VEIL_LOCAL_SOCKETS", "1") != "0"


def new_name() -> str:
    """A fresh random name (bound in the abstract namespace, see :func:`address`)."""
    return "veil-" + secrets.token_hex(16)


def address(name: str) -> str:
    """The abstract-namespace address of ``name``: no file, gone when the worker's process is."""
    return "\0" + name


def widen(sock: Any) -> None:
    """Larger buffers on a Unix socket (best effort)."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)
        except OSError:
            pass


def is_unix(transport_or_socket: Any) -> bool:
    """Whether an asyncio transport's (or a socket's) connection is a Unix socket."""
    sock = transport_or_socket
    if not isinstance(sock, socket.socket):
        sock = transport_or_socket.get_extra_info("socket") if transport_or_socket is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


def source(connection: Any) -> str:
    """The address a server connection counts as: its peer's IP, :data:`SOURCE` over a Unix socket."""
    if is_unix(getattr(connection, "transport", None)):
        return SOURCE
    return connection.remote_address[0] if connection.remote_address else "?"


def offered_to(connection: Any, request: Any) -> bool:
    """Whether the worker's name may go in this handshake's response: the client asked, over loopback TCP."""
    if request.headers.get(ASK_HEADER) != "1" or is_unix(getattr(connection, "transport", None)):
        return False
    remote = connection.remote_address[0] if connection.remote_address else ""
    return remote in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or remote.startswith("127.")


@contextlib.asynccontextmanager
async def serving_beside(worker: Any, handler: Any, options: dict) -> AsyncIterator[None]:
    """Serves ``handler`` (with the TCP server's ``options``) on a fresh abstract Unix socket while the
    block runs, and sets ``worker.local_socket_name``; does nothing under TLS or where not :func:`enabled`."""
    worker.local_socket_name = None
    if worker.ssl_context is not None or not enabled():
        yield
        return
    from websockets.asyncio.server import unix_serve

    name = new_name()
    try:
        server = await unix_serve(handler, path=address(name), **options)
    except OSError:  # (a sandbox without Unix sockets: TCP only)
        yield
        return
    worker.local_socket_name = name
    try:
        yield
    finally:
        worker.local_socket_name = None
        server.close()
        await server.wait_closed()


def connect(name: str, timeout: float | None) -> socket.socket | None:
    """A connected Unix socket to a worker's advertised ``name``, or None (not a name a worker makes, or
    nobody there)."""
    if not enabled() or not isinstance(name, str) or _NAME.fullmatch(name) is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        widen(sock)
        sock.settimeout(timeout)
        sock.connect(address(name))
    except OSError:
        sock.close()
        return None
    return sock
