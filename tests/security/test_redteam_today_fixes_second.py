"""Red team, second pass on today's fixes to revocation and the owner console.

Today's first pass made ``veil users revoke`` skip the worker's turn (users_wire.serve_without_turn), cut a
revoked peer's link (revocation.cut_peer_link), let a console connection over the cap take the place of one
waiting on its client (console/connections.py), bucketed the Budgets curve in SQL (budget_curve.py) and
served the console as https off loopback. This pass attacks those fixes, as a scientist who can run a long
command and open connections, a hostile peer, and anyone who reaches the console's port.

Holes found (each test failed before its fix; checked by running this file against ``git archive`` of the
commit before, with PYTHONPATH pointing there):
- the owner's users message skipped the turn but still needed one of the worker's handler threads; a
  scientist whose long command holds the turn fills them all (connections opened and closed: each closed
  session's cleanup waits for the turn on one), and the revocation waited again; so did the replica sync of
  revocations and every console page (views.on_worker ran on a handler thread): fixed, users_wire.
  serve_users_message and the sync run on owner threads of their own, console pages on the console's;
- a console connection "being answered" was never replaced: a client that pipelines requests (or does not
  read its answers) is always being answered, so a handful locked the owner out again; and the owner's
  idle keep-alive connections were the first replaced: fixed, only a request of the owner's session is
  protected, and connections that carried one go last (connections.mark_owner_request);
- cutting a revoked peer's link waited for a thread connecting to it (a stalled handshake: the connect
  timeout, under the lock every revocation takes): fixed, WebsocketClientWorker.refuse never waits;
- on PostgreSQL a charge stamped far past now (a replica's clock) overflowed the slice number's integer cast
  and failed every Budgets page: fixed, compared before the cast;
- off loopback, TLS handshakes that never started were uncounted and held a descriptor each for asyncio's
  60 s: fixed, the handshake runs in the console's bounded protocol (connections.tls_protocol).
Guards (held already): a revoked session's objects, including a result stored after the revocation, are all
freed with it; revocations stay prompt with the owner database frozen (the owner threads suffice).
"""


from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

import veil as sy
from veil.governance.users_wire import AdminUsersMessage
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers.persistence import OwnerDB
from veil.workers.websocket_auth import handshake_headers
from veil.workers.websocket_server import WebsocketServerWorker
from veil.workers.websocket_transport import BlockingConnection

from network_helpers import ADMIN, OTHER, TOKEN
from tests.scale import conftest as scale_fixtures
from test_redteam_governance_faults import _OPEN, _SERVERS, cleanup  # noqa: F401  (cleanup: a fixture)
from test_redteam_revocation import _closed, _sessions_of, _wait
from console_slots import response_head as _read_response, started_console
from worker_processes import serve_in_thread

postgres_server, pg_url = scale_fixtures.postgres_server, scale_fixtures.pg_url  # fixtures: a real PostgreSQL



def _start(hook, tmp_path, **kwargs) -> WebsocketServerWorker:
    tokens = sy.TokenTable()
    tokens.add(TOKEN, "alice")
    tokens.add(OTHER, "mallory")
    tokens.add(ADMIN, "owner", role="admin")
    w = WebsocketServerWorker(hook, id=f"rt-fixes2-{time.monotonic_ns()}", port=0, tokens=tokens,
                              db=OwnerDB(str(tmp_path / OwnerDB.FILENAME)), **kwargs)
    _SERVERS.append((w, serve_in_thread(w)))
    return w


def _connect(server, token: str) -> BlockingConnection:
    conn = BlockingConnection(f"ws://127.0.0.1:{server.bound_port}", handshake_headers(token, ()))
    _OPEN.append(conn)
    return conn


def _ask(conn: BlockingConnection, msg, timeout: float = 60) -> object:
    conn.send(serialize(msg, sender="c"))
    return deserialize(conn.recv(timeout))[0]


# --------------------------------------------------------------------------- revocation: handler threads


def test_a_revocation_needs_no_handler_thread_a_scientist_can_exhaust(hook, tmp_path, cleanup):
    """Attack: mallory's long command holds the worker's turn (here: the test holds it). She then opens and
    closes connections: each closed session's cleanup (``end_session``) waits for the turn on one of the
    worker's handler threads (``max_connections + 4`` of them), so after a dozen the pool is full. The
    owner's ``veil users revoke alice`` skips the turn, but waited for a free handler thread, i.e. for the
    long command. Must hold: the revocation is in force while the long command still holds the turn, however
    full the pool is."""
    server = _start(hook, tmp_path, max_connections=8)
    victim = _connect(server, TOKEN)
    assert _wait(lambda: _sessions_of(server, "alice"))
    server._turn.acquire()
    try:
        for _ in range(server.max_connections + 4):
            conn = _connect(server, OTHER)
            assert _wait(lambda: _sessions_of(server, "mallory"), 10)
            conn.close()
            assert _wait(lambda: not _sessions_of(server, "mallory"), 10)  # (its cleanup took a thread)
        admin = _connect(server, ADMIN)
        try:  # (the turn is held until the finally below, up to the reply's 120 s: a revocation waiting for a
            # handler thread, i.e. for the long command, never answers in time, however loaded the machine)
            reply = _ask(admin, AdminUsersMessage("revoke", "alice"), timeout=120)
        except TimeoutError:
            pytest.fail("the revocation waited for a handler thread, i.e. for the long command")
        assert reply == m.ObjectsReply([1]), reply
        assert "alice" in server.tokens.revoked
        assert _closed(victim)
    finally:
        server._turn.release()
    assert _wait(lambda: not server.sessions or all(s.user == "owner" for s in server.sessions.values()), 30)


def test_revocations_stay_prompt_while_the_owner_database_is_frozen(hook, tmp_path, cleanup, monkeypatch):
    """Behind the previous test: the owner's users messages now have threads of their own, and with the owner
    database frozen (here: the revocation sync's read blocks) each revocation, in force at once, holds its
    thread until it can be stored. The owner retries, or revokes several names: each must still be in force
    at once (the owner's threads must not run out before the owner does)."""
    from veil.governance import revocation

    server = _start(hook, tmp_path)
    names = [f"user{i}" for i in range(6)]
    for name in names:
        server.tokens.add(f"rt-fixes2-token-{name}", name)
    frozen, reading = threading.Event(), threading.Event()
    real = revocation._records

    def stuck(worker):
        if worker is server and not frozen.is_set():
            reading.set()
            frozen.wait(30)
        return real(worker)

    monkeypatch.setattr(revocation, "_records", stuck)
    sync = threading.Thread(target=revocation.sync_stored_revocations, args=(server,), daemon=True)
    sync.start()
    assert reading.wait(30)
    try:
        for name in names:
            _connect(server, ADMIN).send(serialize(AdminUsersMessage("revoke", name), sender="c"))
            assert _wait(lambda: name in server.tokens.revoked, 3), f"the revocation of {name} waited"
    finally:
        frozen.set()
    sync.join(30)
    assert _wait(lambda: all(revocation.stored_revocations(server).get(n) for n in names), 30)


def test_a_command_storing_objects_when_its_session_is_revoked_leaves_none_behind(hook, tmp_path, cleanup,
                                                                                 monkeypatch):
    """The revocation no longer waits for the turn, so it lands while alice's command is storing its results
    (here: the command is held after it ran, before its result is stored). Once it ends, nothing of hers
    may survive in the store: the objects she stored before and the result the command stored after the
    revocation are all freed with her session (none twice: the owner's dataset is untouched)."""
    from veil.workers import handlers

    server = _start(hook, tmp_path)
    dataset = server.load(torch.tensor([1.0, 2.0]), tags=("#ward",))
    inside, go_on = threading.Event(), threading.Event()
    real = handlers._run_command

    def held(*args, **kwargs):
        inside.set()
        go_on.wait(30)
        return real(*args, **kwargs)  # (stores its result after the revocation)

    conn = _connect(server, TOKEN)
    assert _ask(conn, m.ObjectMessage([m.StoredObject(7, torch.tensor([2.0]))])) == m.OkReply()
    (session,) = _sessions_of(server, "alice")
    assert any(e.created_by == session.id for _, e in server.monitor.owner_entries())  # (what the check sees)
    monkeypatch.setattr(handlers, "_run_command", held)
    conn.send(serialize(m.CommandMessage("torch.add", (m.ObjectRef(7), torch.zeros(300_000)), {}, [8], False),
                        sender="c"))
    assert inside.wait(30)
    try:
        assert _ask(_connect(server, ADMIN), AdminUsersMessage("revoke", "alice"), timeout=5) == m.ObjectsReply([1])
    finally:
        go_on.set()
    assert _closed(conn)
    assert _wait(lambda: not _sessions_of(server, "alice"))
    left = [oid for oid, e in server.monitor.owner_entries() if e.created_by == session.id]
    assert left == [], f"objects of the revoked session survived: {left}"
    assert torch.equal(dict(server.monitor.owner_entries())[dataset].obj, torch.tensor([1.0, 2.0]))


def _exhaust_handler_threads(server) -> None:
    """With the turn held by the caller: mallory opens and closes connections until every handler thread
    waits for the turn (each closed session's cleanup takes one)."""
    for _ in range(server.max_connections + 4):
        conn = _connect(server, OTHER)
        assert _wait(lambda: _sessions_of(server, "mallory"), 10)
        conn.close()
        assert _wait(lambda: not _sessions_of(server, "mallory"), 10)  # (its cleanup took a thread)


def test_the_owners_console_pages_need_no_handler_thread(hook, tmp_path, cleanup):
    """The same attack against the owner console: its Sessions page (where the revoke form is), Datasets page
    and policy form ran on one of the worker's handler threads (``views.on_worker``: a single thread once,
    serialising them with commands; since one of many, serialising nothing), so with the pool full each
    waited 60 s and failed. Must hold: the pages answer, and the owner revokes alice from the console; a policy
    change waits for the worker's turn only (it is put in force between commands), never for a handler thread."""
    from starlette.testclient import TestClient

    from veil.governance.state import policy_of

    from veil.governance.console.server import ConsoleServer

    server = _start(hook, tmp_path, max_connections=8)
    oid = server.load(torch.ones(2), tags=("#ward",), policy="review")
    console = ConsoleServer(server, host="127.0.0.1", port=0)
    victim = _connect(server, TOKEN)
    assert _wait(lambda: _sessions_of(server, "alice"))
    client = TestClient(console.app, base_url=f"http://{console.host_name}:8780", follow_redirects=False)
    page = client.get("/login")
    csrf = page.text.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
    assert client.post("/login", data={"login_csrf": csrf, "token": ADMIN},
                       headers={"origin": f"http://{console.host_name}:8780"}).status_code == 303
    answers: dict = {}
    origin = {"origin": f"http://{console.host_name}:8780"}

    def owner_clicks() -> None:
        answers["datasets"] = client.get("/datasets").status_code
        sessions = client.get("/sessions")
        answers["sessions"] = sessions.status_code
        answers["csrf"] = sessions.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        answers["revoke"] = client.post("/users/revoke", data={"csrf": answers["csrf"], "name": "alice"},
                                        headers=origin).status_code

    def owner_changes_the_policy() -> None:
        answers["policy"] = client.post("/datasets/policy", data={"csrf": csrf_token, "id": str(oid),
                                                                   "policy": "open"}, headers=origin).status_code

    server._turn.acquire()
    held = True
    try:
        _exhaust_handler_threads(server)
        clicking = threading.Thread(target=owner_clicks, daemon=True)
        clicking.start()
        clicking.join(8)
        assert not clicking.is_alive(), f"the owner's console waited for a handler thread (answered: {answers})"
        csrf_token = answers.pop("csrf")
        assert answers == {"datasets": 200, "sessions": 200, "revoke": 303}, answers
        assert "alice" in server.tokens.revoked
        # A policy change is put in force between commands (in the worker's turn: no command runs under half an
        # old policy and half a new one), so it waits for the turn -- not for a handler thread.
        changing = threading.Thread(target=owner_changes_the_policy, daemon=True)
        changing.start()
        changing.join(1.0)
        assert changing.is_alive() and "policy" not in answers, "the policy changed while a command held the turn"
        server._turn.release()
        held = False
        changing.join(10)
        assert not changing.is_alive() and answers.get("policy") == 303, answers
        assert policy_of(server, oid) == "open"
    finally:
        if held:
            server._turn.release()
    assert _closed(victim)


# --------------------------------------------------------------------------- console: which slot is replaced

CONSOLE_ADMIN = "rt-fixes2-console-admin"


@pytest.fixture
def console(hook, monkeypatch):
    """A started console (4 slots) of an in-process worker; stopped after the test."""
    yield from started_console(hook, monkeypatch, CONSOLE_ADMIN, "rt-fixes2-console")


def _owner_cookie(console) -> str:
    import httpx

    from veil.governance.console.auth import COOKIE

    with httpx.Client(base_url=f"http://127.0.0.1:{console.port}", headers={"host": console.host_name},
                      timeout=10) as owner:
        page = owner.get("/login")
        csrf = page.text.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
        r = owner.post("/login", data={"login_csrf": csrf, "token": CONSOLE_ADMIN},
                       headers={"origin": f"http://{console.host_name}"})
        assert r.status_code == 303, r.text
        return f"{COOKIE}={owner.cookies.get(COOKIE)}"


def test_clients_that_pipeline_requests_do_not_lock_the_owner_out(console):
    """Attack: anyone on loopback takes every slot with a connection that pipelines thousands of small
    requests and reads none of the answers (a 4 KiB receive buffer). Each is always "being answered" (the
    next request right behind the last, or an answer the client does not read, for up to 90 s each), and a
    connection being answered was never replaced: the owner's browser was closed at once, for as long as the
    attacker kept at it. Must hold: the owner still gets the log-in page."""
    import httpx

    request = f"GET /static/console.css HTTP/1.1\r\nHost: {console.host_name}\r\n\r\n".encode()
    held = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", console.port))
            s.settimeout(0.2)
            try:
                for _ in range(3000):
                    s.send(request)
            except (socket.timeout, BlockingIOError):  # (the console stopped reading: its answers are unread)
                pass
            held.append(s)
        time.sleep(0.5)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{console.port}", headers={"host": console.host_name},
                              timeout=10) as owner:
                assert owner.get("/login").status_code == 200
        except httpx.TransportError as e:
            pytest.fail(f"the owner was locked out by connections that pipeline requests: {e!r}")
    finally:
        for s in held:
            s.close()


def test_the_owners_idle_keep_alive_connection_is_replaced_last(console):
    """Attack: the owner's browser keeps its connection open between pages (keep-alive). Anyone on loopback
    then opens as many connections as the console takes, each with a head never finished. The owner's idle
    connection had waited longest, so it was the first replaced (the browser's next click met a reset).
    Must hold: the attacker's connections take each other's places; the owner's stays open and answers."""
    cookie = _owner_cookie(console)
    page = f"GET /requests HTTP/1.1\r\nHost: {console.host_name}\r\nCookie: {cookie}\r\n\r\n".encode()
    owner = socket.create_connection(("127.0.0.1", console.port), timeout=10)
    held = []
    try:
        owner.sendall(page)
        assert _read_response(owner).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.1)
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", console.port), timeout=5)
            s.sendall(f"GET /login HTTP/1.1\r\nHost: {console.host_name}\r\n".encode())
            held.append(s)
            time.sleep(0.05)
        try:
            owner.sendall(page)
            assert _read_response(owner).startswith(b"HTTP/1.1 200 ")
        except (ConnectionError, OSError) as e:
            pytest.fail(f"the owner's idle keep-alive connection was replaced first: {e!r}")
    finally:
        owner.close()
        for s in held:
            s.close()


# --------------------------------------------------------------------------- revocation: a stalling peer


def test_a_revoked_peer_that_stalls_its_handshake_does_not_hold_the_revocation(hook, tmp_path, cleanup):
    """Attack: bob is a peer this worker links to (``--peer bob=...``). As the worker connects to him (a
    command reaching bob), bob accepts the TCP connection and never answers the WebSocket handshake. The
    owner revokes bob: cutting the link waited for the connecting thread, i.e. for the link's connect
    timeout (10 s), under the lock every other revocation takes too. Must hold: the revocation returns at
    once, and the connection being made never carries a request (the link stays refused)."""
    from veil.exceptions import PermissionDeniedError
    from veil.workers.websocket_client import WebsocketClientWorker

    server = _start(hook, tmp_path)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted: list = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    # (its handshake waits up to 120 s: bob's silence lasts until the finally below, so a revocation waiting for
    # the connecting thread is still waiting after the 60 s it is given, however loaded the machine)
    link = WebsocketClientWorker(hook, id=f"bob-{time.monotonic_ns()}", host="127.0.0.1",
                                 port=listener.getsockname()[1], token=TOKEN, lazy=True, connect_timeout=120)
    server.add_peer(link)
    connecting = threading.Thread(target=lambda: pytest.raises(Exception, link.connect), daemon=True)
    connecting.start()
    revoking = None
    try:
        assert _wait(lambda: accepted, 10)
        time.sleep(0.2)  # (the handshake request is sent; bob never answers)
        revoking = threading.Thread(target=server.revoke, args=(link.id,), daemon=True)
        revoking.start()
        revoking.join(60)
        assert not revoking.is_alive(), "the revocation waited for the revoked peer's stalled handshake"
        assert link.id in server.tokens.revoked
    finally:
        for s in accepted:
            s.close()  # (the handshake fails now)
        listener.close()
        connecting.join(15)
        if revoking is not None:
            revoking.join(15)
    assert not link.connected
    with pytest.raises(PermissionDeniedError, match="revoked"):
        link.connect()


# --------------------------------------------------------------------------- console: the budget curve's SQL


def test_a_charge_stamped_far_ahead_does_not_break_the_budgets_page_on_postgresql(hook, pg_url):
    """Attack surface: the Budgets page now buckets charges in the ledger's database, ``CAST(FLOOR((at - t0) /
    span * 300) AS INTEGER)``, with the span ending now. A replica sharing the ledger whose clock runs
    ahead (a host set years off) stamps charges past now: their slice number passes PostgreSQL's integer
    range and the cast raised "integer out of range", so every load of the Budgets page failed (SQLite's cast
    saturates). Must hold: the page's curve is made, the late charge in its last slice, the total right."""
    import psycopg

    from veil.dp.worker_owner import enable_dp
    from veil.governance.console import svg, views

    w = sy.VirtualWorker(hook, id=f"pg-fixes2-budgets-{time.monotonic_ns()}")
    settings = enable_dp(w, budgets={"ana": (1.0, 1e-5)}, ledger_path=pg_url)
    try:
        now = time.time()
        rows = [("ana", 2.0**-12, 0.0, f"DP count #{i}", now - 10 + i / 40) for i in range(400)]  # (10 s of charges)
        rows.append(("ana", 2.0**-10, 0.0, "DP mean (a replica's clock, years ahead)", now + 10 * 365 * 86400.0))
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.cursor().executemany('INSERT INTO charges("user", epsilon, delta, reason, at) '
                                      'VALUES (%s, %s, %s, %s, %s)', rows)
        (row,) = views.budgets(w, now=now)
        assert 1 < len(row["points"]) <= svg.MAX_CURVE_POINTS
        assert row["points"][-1][1] == pytest.approx(400 * 2.0**-12 + 2.0**-10, rel=1e-12)
        assert "years ahead" in row["points"][-1][2]
    finally:
        settings.ledger.close()


# --------------------------------------------------------------------------- console: https off loopback


def test_stalled_tls_handshakes_are_counted_and_bounded(console, tmp_path, monkeypatch):
    """Attack: off loopback the console now serves https only. Anyone on the network opens connections and
    never starts the TLS handshake. asyncio's TLS hands a connection to the console's protocol only once its
    handshake is done, so none of these was counted against the console's cap or under its head deadline:
    each held a descriptor of the worker's process for asyncio's 60 s, however many were opened (enough of
    them and the worker itself cannot accept a scientist or open a file). Must hold: at most the cap are
    held, a stalled handshake is closed by the head deadline, and the owner still logs in over https."""
    import httpx

    from veil.governance.console import connections
    from veil.governance.console.server import ConsoleServer

    from network_helpers import self_signed_cert

    try:
        cert, key = self_signed_cert(tmp_path)
    except (OSError, __import__("subprocess").CalledProcessError):
        pytest.skip("needs the openssl command")
    monkeypatch.setattr(connections, "HEAD_SECONDS", 2.0)
    served = ConsoleServer(console.worker, host="0.0.0.0", port=0, certfile=str(cert), keyfile=str(key)).start()
    stalled = []
    try:
        stalled = [socket.create_connection(("127.0.0.1", served.port), timeout=5) for _ in range(40)]

        def still_open() -> int:
            n = 0
            for s in stalled:
                s.setblocking(False)
                try:
                    n += s.recv(1) != b""
                except BlockingIOError:
                    n += 1
                except OSError:
                    pass
            return n

        # (waited for, not slept: on a loaded machine the console may take a while to accept and close them)
        assert _wait(lambda: still_open() <= connections.MAX_CONNECTIONS, 10), \
            "stalled TLS handshakes are held beyond the cap"
        with httpx.Client(base_url=f"https://127.0.0.1:{served.port}", verify=False, timeout=10) as owner:
            assert owner.get("/login").status_code == 200
        assert _wait(lambda: still_open() == 0, 5), "a stalled TLS handshake outlived the head deadline"
    finally:
        for s in stalled:
            s.close()
        served.stop()
