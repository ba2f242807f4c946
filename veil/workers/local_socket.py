"""Same-host links over a Unix socket beside a worker's TCP port.

Loopback TCP exchanges a party's 16 MB share each way in ~1.4x the time and ~1.3x the CPU of a Unix stream
socket pair on a quiet host, and swings to ~3x under load (the TCP stack, segmentation and acknowledgements on
both sides: ``bench/bench_raw_socket.py --unix``, bench/RESULTS.md "Thirty-eighth landing"), and
an SMPC product over peer openings exchanges such shares every round. A worker served without TLS on
Linux therefore also listens on an abstract Unix socket with a random name and tells it, in its
handshake response, to a client that authenticated over loopback TCP and asked for it (a server's peer
links do), with a fresh one-time ticket. The client then opens the same websocket session over the Unix
socket, presenting half of the ticket instead of its tokens; the worker answers with the other half (it
proves it issued the ticket) and authenticates the tokens the ticket stands for again (a token revoked
meanwhile is refused). The client drops the TCP session; if anything fails it keeps TCP.

What this keeps: the websocket protocol and every limit are the same on both sockets (one handler), and
tokens go over TCP only. Any local user may connect to an abstract name (listed in /proc/net/unix) or
bind one a worker released (at its exit or crash, maybe just after it told it to a client): so the Unix
socket admits only a ticket (no door for guessing tokens beside the port: red team,
tests/security/test_redteam_local_socket.py), and a client sends there nothing but its half of a ticket
and takes the session only if the other half comes back (a squatter gets a useless half and no shares).
The hop waits at most :data:`OPEN_TIMEOUT` in all (same host: milliseconds; a squatter trickling its
answer a byte at a time held it for as long as it liked while the bound was per read), and a client takes a
name only from a worker it reached over loopback (a remote one steered it to another local worker's socket).
A holder of tokens keeps at most :data:`MAX_TICKETS_PER_HOLDER` tickets (one client asking in a loop evicted
everyone else's). Red team, second pass: tests/security/test_redteam_local_socket_second.py. Not offered
under TLS (the Unix socket would skip what TLS proves) nor off Linux (no abstract namespace).
``VEIL_LOCAL_SOCKETS=0`` turns it off on either side.
"""
from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import re
import secrets
import socket
import sys
import time
from typing import Any, AsyncIterator

#: the handshake response header naming the worker's Unix socket (to loopback clients that ask for it)
HEADER = "X-Veil-Local-Socket"
#: the request header a client sends to ask for it
ASK_HEADER = "X-Veil-Local-Ask"
#: the one-time ticket for the Unix hop: 64 hex digits in the TCP response (the client's half, then the
#: worker's); the client's half alone in the Unix request
TICKET_HEADER = "X-Veil-Local-Ticket"
#: the Unix response's header with the worker's half (it proves the worker that issued the ticket answers)
PROOF_HEADER = "X-Veil-Local-Proof"
#: seconds the Unix hop may take before the client keeps TCP (same host: milliseconds; more is a stall)
OPEN_TIMEOUT = 3.0
#: seconds a ticket stays valid, and how many a worker holds at once (the oldest goes first)
TICKET_SECONDS = 10.0
MAX_TICKETS = 1024
#: tickets one holder (the principals of one authenticated handshake) keeps at once: its concurrent hops
MAX_TICKETS_PER_HOLDER = 64
#: socket buffers of a Unix link (the kernel caps them at net.core.[rw]mem_max): with the default
#: ~200 KiB a 1 MiB reply frame waits in the event loop's buffer (a copy) and takes many wake-ups
BUFFER_BYTES = 4 << 20
#: the source a Unix connection counts as (authentication throttling, handshake slots): a local one
SOURCE = "local"

_NAME = re.compile(r"veil-[0-9a-f]{32}")
_TICKET = re.compile(r"[0-9a-f]{64}")
_HALF = re.compile(r"[0-9a-f]{32}")


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


def is_loopback(address: Any) -> bool:
    """Whether ``address`` (an IP string) is a loopback one (IPv4-mapped IPv6 included)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def offered_to(connection: Any, request: Any) -> bool:
    """Whether the worker's name may go in this handshake's response: the client asked, over loopback TCP."""
    if request.headers.get(ASK_HEADER) != "1" or is_unix(getattr(connection, "transport", None)):
        return False
    return bool(connection.remote_address) and is_loopback(connection.remote_address[0])


def from_loopback(sock: Any) -> bool:
    """Whether a client's TCP socket reached its worker over loopback: only then may it take a name the worker
    tells (a worker offers one only there; a remote one naming a local socket steered the client to another
    local worker, a ticket of its choosing with it)."""
    try:
        return is_loopback(sock.getpeername()[0])
    except (OSError, AttributeError, IndexError, TypeError):
        return False


def one(headers: Any, name: str) -> str | None:
    """The header's value if it appears exactly once (``get`` raises on a repeated one), else None."""
    values = headers.get_all(name)
    return values[0] if len(values) == 1 else None


class Tickets:
    """One-time tickets a worker issued (event-loop thread only): the client's half -> the tokens it stands
    for, the worker's half, until when it is valid, and its holder (the principals that asked). A holder keeps
    at most :data:`MAX_TICKETS_PER_HOLDER` (its own oldest goes first: one client asking in a loop evicted
    every other's pending ticket, their hops falling back to TCP); past :data:`MAX_TICKETS` in all the busiest
    holder's oldest goes. Expired tickets go at each issue and each use (their tokens are not held on)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[list[str], str, float, Any]] = {}  # oldest first (same lifetime for all)
        self._by_holder: dict[Any, dict[str, None]] = {}  # holder -> its client halves, oldest first

    def _drop(self, half: str) -> tuple[list[str], str, float, Any]:
        held = self._held.pop(half)
        mine = self._by_holder[held[3]]
        del mine[half]
        if not mine:
            del self._by_holder[held[3]]
        return held

    def _prune(self, now: float) -> None:
        while self._held:
            first = next(iter(self._held))
            if self._held[first][2] > now:
                return
            self._drop(first)

    def issue(self, tokens: list[str], holder: Any = ()) -> str:
        now = time.monotonic()
        self._prune(now)
        mine = self._by_holder.get(holder)
        if mine is not None and len(mine) >= MAX_TICKETS_PER_HOLDER:
            self._drop(next(iter(mine)))
        while self._held and len(self._held) >= MAX_TICKETS:
            busiest = max(self._by_holder.values(), key=len)
            self._drop(next(iter(busiest)))
        mine_half, theirs = secrets.token_hex(16), secrets.token_hex(16)
        self._held[mine_half] = (list(tokens), theirs, now + TICKET_SECONDS, holder)
        self._by_holder.setdefault(holder, {})[mine_half] = None
        return mine_half + theirs

    def redeem(self, half: str | None) -> tuple[list[str], str] | None:
        """The tokens and the worker's half of a valid ticket, which is used up; None for any other string."""
        self._prune(time.monotonic())
        if not isinstance(half, str) or half not in self._held:
            return None
        held = self._drop(half)
        return held[0], held[1]

    def __len__(self) -> int:
        return len(self._held)


def tokens_for(worker: Any, connection: Any, request: Any, from_headers: Any) -> list[str]:
    """The tokens a handshake authenticates with: its headers' over TCP; over the Unix socket only those its
    ticket stands for (tokens sent there count for nothing).

    Raises:
        PermissionDeniedError: a Unix handshake without a valid ticket (counted as one failed guess).
    """
    if not is_unix(getattr(connection, "transport", None)):
        return from_headers(request.headers)
    tickets = getattr(worker, "local_tickets", None)
    held = tickets.redeem(one(request.headers, TICKET_HEADER)) if tickets is not None else None
    if held is None:
        from veil.exceptions import PermissionDeniedError

        refusal = PermissionDeniedError("no valid ticket for the worker's local socket")
        refusal.failures = 1
        raise refusal
    connection.veil_local_proof = held[1]
    return held[0]


def answer(worker: Any, connection: Any, request: Any, response: Any, from_headers: Any, session: Any = None) -> None:
    """Headers of an authenticated ``session``'s 101: over the Unix socket the worker's half of the ticket
    redeemed; over loopback TCP, to a client that asked, the worker's Unix name and a fresh ticket (held
    under the session's principals)."""
    proof = getattr(connection, "veil_local_proof", None)
    if proof is not None:
        response.headers[PROOF_HEADER] = proof
        return
    name, tickets = getattr(worker, "local_socket_name", None), getattr(worker, "local_tickets", None)
    if name and tickets is not None and offered_to(connection, request):
        response.headers[HEADER] = name
        holder = tuple(sorted({p.name for p in getattr(session, "principals", ())}))
        response.headers[TICKET_HEADER] = tickets.issue(from_headers(request.headers), holder)


def hop(headers: Any) -> tuple[str, str] | None:
    """From a TCP response: the worker's Unix name and its ticket, or None (none, repeated or malformed)."""
    name, ticket = one(headers, HEADER), one(headers, TICKET_HEADER)
    if name is None or ticket is None or _NAME.fullmatch(name) is None or _TICKET.fullmatch(ticket) is None:
        return None
    return name, ticket


def proven(headers: Any, ticket: str) -> bool:
    """Whether a Unix response carries the worker's half of ``ticket`` (only the worker that issued it can)."""
    proof = one(headers, PROOF_HEADER)
    return proof is not None and _HALF.fullmatch(proof) is not None and hmac.compare_digest(proof, ticket[32:])


@contextlib.asynccontextmanager
async def serving_beside(worker: Any, handler: Any, options: dict) -> AsyncIterator[None]:
    """Serves ``handler`` (with the TCP server's ``options``) on a fresh abstract Unix socket while the
    block runs, and sets ``worker.local_socket_name`` and ``worker.local_tickets``; does nothing under TLS or
    where not :func:`enabled`."""
    worker.local_socket_name = worker.local_tickets = None
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
    worker.local_socket_name, worker.local_tickets = name, Tickets()
    try:
        yield
    finally:
        worker.local_socket_name = worker.local_tickets = None
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
