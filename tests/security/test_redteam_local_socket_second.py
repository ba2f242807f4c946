"""Red team, second pass: the one-time tickets of same-host Unix links (``veil.workers.local_socket``).

Attacks on the ticket code a567c15 added, as another local user (a squatter on a released name, a guesser on
the abstract socket), an authenticated loopback client (ticket exhaustion), a hostile remote worker and the
owner's settings: a squatter that trickles its answer must not hold the hop past its bound; a worker that is
not on loopback names no socket the client connects to; one principal's asks do not evict another's pending
ticket; an expired ticket's tokens are not held on; a flood of guessed tickets is throttled while honest hops
pass; the ticket shows in no log or audit row; roles survive the hop unchanged; a failed hop leaves a healthy
TCP session; turned off on the server only, the client stays on TCP; held tickets are small; a live worker's
name cannot be taken. Values are compared with torch.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import tracemalloc

import pytest
import torch

import veil as sy
from veil.workers import local_socket
from veil.workers.auth_throttle import FailureThrottle
from veil.workers.websocket_auth import handshake_headers
from veil.workers.websocket_server import WebsocketServerWorker
from veil.workers.websocket_transport import BlockingConnection

from local_links import (hostile_worker, link_client, link_server, linked_on, read_head, served, squat_listener,
                         switch, works)
from network_helpers import TOKEN
from worker_processes import serve_in_thread, stop_served


pytestmark = pytest.mark.skipif(not local_socket.enabled(), reason="Unix links are Linux-only")

PEER = "peer-" + "p" * 40
ADMIN = "admin-" + "a" * 40


def _server(hook, **kwargs) -> WebsocketServerWorker:
    """A worker taking the scientist's, a peer's and an admin's tokens."""
    return link_server(hook, ((TOKEN, "scientist"), (PEER, "peerw", "peer"), (ADMIN, "owner", "admin")), **kwargs)


@pytest.fixture(scope="module")
def listening(hook):
    with served(_server(hook)) as server:
        yield server


def _url(server) -> str:
    return f"ws://127.0.0.1:{server.bound_port}"


def _asked(server, token: str = TOKEN) -> str:
    """A ticket the worker gives an authenticated loopback client that asks (the TCP session then closes)."""
    conn = BlockingConnection(_url(server), {**handshake_headers(token), local_socket.ASK_HEADER: "1"})
    try:
        return conn.response.headers[local_socket.TICKET_HEADER]
    finally:
        conn.close()


def _over_unix(server, half: str):
    from websockets.sync.client import connect

    return connect("ws://local/", sock=local_socket.connect(server.local_socket_name, 5),
                   additional_headers={local_socket.TICKET_HEADER: half}, open_timeout=5,
                   logger=logging.getLogger(_TOOL))  # (the attacker's own tool: its log is not the worker's)


@contextlib.contextmanager
def _trickler(seconds: float):
    """A squatter on a worker-like name that answers the hop's request one header byte at a time (every 0.1 s,
    for ``seconds``): each read returns well inside the hop's timeout."""
    name, listener = squat_listener(4)
    done = threading.Event()

    def serve():
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                head = switch(read_head(conn))[:-2]  # (no blank line: more headers keep coming)
                conn.sendall(head)
                end = time.monotonic() + seconds
                while time.monotonic() < end and not done.is_set():
                    conn.sendall(b"X")
                    time.sleep(0.1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield name
    finally:
        done.set()
        listener.close()
        thread.join(5)


def test_a_trickling_squatter_holds_the_hop_no_longer_than_its_bound(hook, listening, monkeypatch):
    """The hop's bound was a socket timeout, per read: a squatter on a released name that sends one byte
    every 0.1 s (a header line may be 8 KiB, 128 lines) held the link's connect, and every request waiting
    on it, for as long as it liked, not the 3 s the hop may take."""
    monkeypatch.setattr(local_socket, "OPEN_TIMEOUT", 0.5)
    # (it trickles for up to 60 s and the connect may take 30: a hop bound per read or by the connect timeout
    # takes 30 s or more; one bound by OPEN_TIMEOUT 0.5 s in all, with the TCP link, well under 10 s however
    # loaded the machine)
    with _trickler(seconds=60) as name:
        monkeypatch.setattr(listening, "local_socket_name", name)
        took = linked_on(hook, listening, socket.AF_INET, connect_timeout=30)
    assert took < 10, took


def _lan_address() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.254", 9))  # (no packet is sent: only the route's source address)
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_a_worker_off_loopback_names_no_socket_the_client_connects_to(listening, monkeypatch):
    """A worker offers its name only to loopback clients; a remote (hostile) one that names a local veil socket
    anyway steered the client there: a ticket half of its choosing went to another local worker's socket (a
    failed guess counted there) and the client took that worker's session for its peer's."""
    address = _lan_address()
    if address is None:
        pytest.skip("no address off loopback on this host")
    reached = []
    real = local_socket.connect
    monkeypatch.setattr(local_socket, "connect", lambda *a, **k: reached.append(a) or real(*a, **k))

    def names_the_workers_socket() -> bytes:
        return (f"{local_socket.HEADER}: {listening.local_socket_name}\r\n"
                f"{local_socket.TICKET_HEADER}: {_asked(listening)}\r\n").encode()

    with hostile_worker(names_the_workers_socket, host=address) as url:
        conn = BlockingConnection(url, handshake_headers(TOKEN), open_timeout=5, local=True)
        try:
            assert conn.sock.family == socket.AF_INET
        finally:
            conn.close()
    assert not reached


def test_one_principals_asks_evict_no_other_principals_pending_ticket(listening, monkeypatch):
    """Tickets were held 1024 in all, the oldest evicted first: one authenticated loopback client asking in a
    loop evicted every other principal's pending ticket (their hops fell back to TCP: cost only; measured
    ~560 tickets a second from 4 threads on 2 cores, so a hop stalled ~2 s lost its ticket). Each principal's
    asks now evict its own tickets first."""
    monkeypatch.setattr(local_socket, "MAX_TICKETS", 8)
    monkeypatch.setattr(local_socket, "MAX_TICKETS_PER_HOLDER", 2)
    pending = _asked(listening, PEER)
    for _ in range(12):
        _asked(listening)
    assert len(listening.local_tickets) <= 8
    with _over_unix(listening, pending[:32]) as ws:
        assert ws.response.headers[local_socket.PROOF_HEADER] == pending[32:]


def test_an_expired_tickets_tokens_are_not_held_on(monkeypatch):
    """Expired tickets were dropped only when a new one was issued: the tokens they stand for (in the clear,
    where the token table keeps digests) stayed in memory as long as no client asked again."""
    clock = [1000.0]
    monkeypatch.setattr(local_socket.time, "monotonic", lambda: clock[0])
    tickets = local_socket.Tickets()
    ticket = tickets.issue([PEER], ("peerw",))
    clock[0] += local_socket.TICKET_SECONDS + 1
    assert tickets.redeem("0" * 32) is None
    assert len(tickets) == 0
    assert tickets.redeem(ticket[:32]) is None


def test_a_flood_of_guessed_tickets_is_throttled_and_honest_hops_still_pass(hook):
    from websockets.exceptions import InvalidStatus

    server = _server(hook)
    server.auth_throttle = FailureThrottle(free=3)
    rows = []
    server.refusals.refused = lambda address, reason: rows.append((address, reason))
    thread = serve_in_thread(server)
    try:
        statuses = []
        for guess in range(8):
            try:
                with _over_unix(server, f"{guess:032x}"):
                    statuses.append(101)
            except InvalidStatus as refused:
                statuses.append(refused.response.status_code)
        assert statuses[:3] == [401] * 3 and statuses[-1] == 429, statuses  # counted, then blocked
        assert server.auth_throttle.blocked_for(local_socket.SOURCE) > 0
        assert server.auth_throttle.blocked_for("127.0.0.1") == 0  # (loopback TCP is another source)
        assert {address for address, _ in rows} == {local_socket.SOURCE}
        linked_on(hook, server, socket.AF_UNIX)  # a real ticket still gets in from the blocked source
    finally:
        stop_served(server, thread)


_TOOL = "redteam.tool"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(_TOOL):
            self.lines.append(self.format(record))


def test_the_ticket_shows_in_no_log_line_or_audit_row(hook, listening, monkeypatch):
    records = _Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    rows = []
    monkeypatch.setattr(listening.refusals, "refused", lambda address, reason: rows.append(f"{address} {reason}"))
    seen = []
    real_issue = local_socket.Tickets.issue

    def issue(self, *args, **kwargs):
        seen.append(real_issue(self, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(local_socket.Tickets, "issue", issue)
    try:
        client = link_client(hook, listening)  # a move
        works(client)
        client.close()
        ticket = _asked(listening)
        with pytest.raises(Exception):
            _over_unix(listening, ticket[32:])  # the wrong half: refused, audited
    finally:
        root.removeHandler(records)
        root.setLevel(level)
    assert len(seen) == 2 and rows
    text = "\n".join(records.lines + rows + [repr(client), str(listening.sessions)])
    for ticket in seen:
        for line in text.splitlines():
            assert ticket[:32] not in line and ticket[32:] not in line, line


@pytest.mark.parametrize("token,roles", [(TOKEN, {"scientist"}), (PEER, {"peer"}), (ADMIN, {"admin"})])
def test_a_ticket_gives_the_unix_session_the_roles_of_its_tokens_and_no_other(hook, listening, token, roles):
    before = set(listening.sessions)
    client = link_client(hook, listening, token)
    try:
        assert client._conn.sock.family == socket.AF_UNIX
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            new = [s for sid, s in listening.sessions.items() if sid not in before]
            if len(new) == 1:
                break
            time.sleep(0.02)
        assert len(new) == 1  # the TCP session it left is gone
        assert {p.role for p in new[0].principals} == roles
    finally:
        client.close()


def test_after_a_refused_hop_the_tcp_session_serves_pings_and_large_requests(hook, monkeypatch):
    from veil.workers import websocket_client

    monkeypatch.setattr(websocket_client, "KEEPALIVE_INTERVAL", 0.1)  # (the idle client answers pings sooner)
    server = _server(hook, ping_interval=0.5)
    thread = serve_in_thread(server)
    try:
        monkeypatch.setattr(local_socket.Tickets, "redeem", lambda self, half: None)  # every hop refused (401)
        client = link_client(hook, server)
        try:
            assert client._conn.sock.family == socket.AF_INET
            time.sleep(1.6)  # pings went out on the TCP session while the client sat idle
            works(client)
            big = torch.randn(600_000)
            assert torch.equal(big.send(client).get(), big)
            assert len(server.sessions) == 1
        finally:
            client.close()
    finally:
        stop_served(server, thread)


def test_turned_off_on_the_server_only_the_client_stays_on_tcp(hook, monkeypatch):
    monkeypatch.setenv("VEIL_LOCAL_SOCKETS", "0")
    server = _server(hook)
    thread = serve_in_thread(server)
    try:
        monkeypatch.delenv("VEIL_LOCAL_SOCKETS")
        assert server.local_socket_name is None and local_socket.enabled()
        conn = BlockingConnection(_url(server), {**handshake_headers(TOKEN), local_socket.ASK_HEADER: "1"})
        assert local_socket.TICKET_HEADER not in conn.response.headers
        conn.close()
        linked_on(hook, server, socket.AF_INET)
    finally:
        stop_served(server, thread)


def test_held_tickets_are_small():
    """A full table costs about a megabyte: 8 tokens a ticket (a fresh string each, as from a request's
    headers), measured ~1.2 KiB a ticket, held at most TICKET_SECONDS and MAX_TICKETS of them."""
    tracemalloc.start()
    try:
        tickets = local_socket.Tickets()
        before = tracemalloc.get_traced_memory()[0]
        for n in range(local_socket.MAX_TICKETS + 100):
            tickets.issue([f"{k}-{n:038d}" for k in range(8)], (f"p{n % 40}",))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(tickets) == local_socket.MAX_TICKETS
    assert held < 2048 * local_socket.MAX_TICKETS, held


def test_a_live_workers_name_cannot_be_taken_by_another_process(listening):
    """A relay between the client and the worker needs the name the TCP answer gives: while the worker
    serves, nobody else can bind it (abstract names are unique per network namespace)."""
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(OSError):
            squatter.bind(local_socket.address(listening.local_socket_name))
    finally:
        squatter.close()


def test_after_the_move_sends_wait_as_long_as_on_tcp(hook, listening):
    """The Unix socket kept the hop's timeout (3 s, and with a deadline for the whole hop whatever it left):
    a first large request to a busy worker, sent before any read sets a timeout, could fail where TCP waits
    the connect timeout."""
    for local in (False, True):
        client = sy.WebsocketClientWorker(hook, id=listening.id, host="127.0.0.1", port=listening.bound_port,
                                          token=TOKEN, local_socket=local, connect_timeout=8)
        try:
            assert client._conn.sock.family == (socket.AF_UNIX if local else socket.AF_INET)
            assert client._conn.sock.gettimeout() == 8
            works(client)
        finally:
            client.close()
