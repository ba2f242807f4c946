"""Red team: revocation against what is already running, and the ledger's COMMIT under faults.

The first two revocation passes (test_redteam_revocation*.py) cover the revoked session's own request paths
and what it leaves behind. This pass attacks timing and the other direction of a link: a peer whose token the
owner revokes while this worker still holds the connection it opened TO that peer, a revocation sent while a
long command holds the worker's turn (on this worker and on a replica sharing its database), a revoked
session whose command is running when the revocation comes, two owner sessions revoking and readmitting at
once, and a DP charge whose COMMIT fails. In-process workers served from threads, driven with raw frames.

Holes found (each test below failed before its fix; checked against ``git archive HEAD``): a revoked peer kept
this worker's outbound link (revocation.cut_peer_link, WebsocketClientWorker.refuse, resolve_worker); ``veil users
revoke`` and a replica's sync waited for the worker's turn (users_wire, websocket_server._sync_revocations); a
failed COMMIT left SQLite's transaction open, failing every later charge (Database.write_transaction rolls back);
a reply finished after revoke() returned still went out (the read loop and inline lane check the revoked mark);
with the database frozen a revocation waited for the sync (revocation._FORCE, never held across I/O); a revoked
peer opening of 3+ parties kept fetching for 60 s (peer_openings._fetch_all passes the command's token).
"""

from __future__ import annotations

import base64
import os
import socket
import sqlite3
import struct
import threading
import time

import pytest
import torch
from websockets.exceptions import InvalidStatus

import veil as sy
from veil.dp.budget import BudgetLedger
from veil.exceptions import PermissionDeniedError
from veil.governance.users_wire import AdminUsersMessage
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers.persistence import OwnerDB
from veil.workers.websocket_auth import handshake_headers
from veil.workers.websocket_client import WebsocketClientWorker
from veil.workers.websocket_server import WebsocketServerWorker
from veil.workers.websocket_transport import BlockingConnection

from network_helpers import ADMIN, OTHER, TOKEN
from test_redteam_revocation import _closed, _sessions_of, _wait
from worker_processes import serve_in_thread, stop_served

PEER_IN = "redgov-peer-into-alice"  # the token bob's worker presents to alice
PEER_OUT = "redgov-peer-into-bob"  # the token alice's worker presents to bob
ADMIN2 = "redgov-second-admin"

_OPEN: list = []
_SERVERS: list = []


def _start(hook, wid: str, tokens: sy.TokenTable, db_path) -> WebsocketServerWorker:
    w = WebsocketServerWorker(hook, id=wid, port=0, tokens=tokens, db=OwnerDB(str(db_path)))
    _SERVERS.append((w, serve_in_thread(w)))
    return w


def _alice_tokens(bob_id: str) -> sy.TokenTable:
    tokens = sy.TokenTable()
    tokens.add(TOKEN, "alice")
    tokens.add(OTHER, "other")
    tokens.add(PEER_IN, bob_id, role="peer")
    tokens.add(ADMIN, "owner", role="admin")
    tokens.add(ADMIN2, "owner2", role="admin")
    return tokens


@pytest.fixture
def cleanup():
    """Closes the test's connections and stops the workers it started."""
    yield
    while _OPEN:
        try:
            _OPEN.pop().close()
        except Exception:
            pass
    while _SERVERS:
        stop_served(*_SERVERS.pop())


@pytest.fixture
def server(hook, tmp_path, cleanup):
    """alice's worker on loopback (bob is a peer name in its token table), owner database in tmp_path."""
    return _start(hook, f"redgov-{time.monotonic_ns()}", _alice_tokens("bob"), tmp_path / OwnerDB.FILENAME)


def _connect(server, *tokens: str) -> BlockingConnection:
    conn = BlockingConnection(f"ws://127.0.0.1:{server.bound_port}", handshake_headers(tokens[0], tokens[1:]))
    _OPEN.append(conn)
    return conn


def _ask(conn: BlockingConnection, msg, timeout: float = 60) -> object:
    conn.send(serialize(msg, sender="c"))
    return deserialize(conn.recv(timeout))[0]


def _refused(server, token: str) -> bool:
    try:
        _connect(server, token)
    except InvalidStatus as e:
        return e.response.status_code == 401
    return False


def _held(monkeypatch, owner, name: str) -> tuple[threading.Event, threading.Event]:
    """Replaces ``owner.name`` (a module attribute, or a dict entry) by a wrapper that signals ``inside`` and
    waits for ``go_on`` before calling the real one: a command caught mid-way."""
    inside, go_on = threading.Event(), threading.Event()
    real = owner[name] if isinstance(owner, dict) else getattr(owner, name)

    def held(*args, **kwargs):
        inside.set()
        go_on.wait(30)
        return real(*args, **kwargs)

    (monkeypatch.setitem if isinstance(owner, dict) else monkeypatch.setattr)(owner, name, held)
    return inside, go_on


# --------------------------------------------------------------------------- the link this worker opened


def test_a_revoked_peers_link_from_this_worker_is_closed_and_refused(hook, cleanup, tmp_path):
    """alice's worker has bob as a peer both ways: bob's token gets in (``--accept-peer``) and alice opened a
    link to bob (``--peer``: her peer fetches, moves and pointer chains go over it). The owner revokes bob.
    The link alice opened must close (bob sees its session end), neither ``resolve_worker`` nor a link an
    object already holds may reach bob again, and a readmission opens the way again."""
    suffix = time.monotonic_ns()
    alice_id, bob_id = f"alice-{suffix}", f"bob-{suffix}"
    bob_tokens = sy.TokenTable()
    bob_tokens.add(PEER_OUT, alice_id, role="peer")
    bob_tokens.add(ADMIN, "owner", role="admin")
    bob = _start(hook, bob_id, bob_tokens, tmp_path / "bob.sqlite3")
    alice = _start(hook, alice_id, _alice_tokens(bob_id), tmp_path / "alice.sqlite3")
    link = WebsocketClientWorker(hook, id=bob_id, host="127.0.0.1", port=bob.bound_port, token=PEER_OUT, lazy=True)
    alice.add_peer(link)
    alice.resolve_worker(bob.id).connect()
    assert _wait(lambda: _sessions_of(bob, alice.id))
    alice.revoke(bob.id)
    assert _wait(lambda: not _sessions_of(bob, alice.id), 10), "the link alice opened to the revoked peer stays open"
    with pytest.raises(PermissionDeniedError, match="revoked"):
        alice.resolve_worker(bob.id)
    with pytest.raises(PermissionDeniedError, match="revoked"):
        link.send_msg(m.ObjectMessage([m.StoredObject(5, torch.ones(1))]), link)  # a link an object holds
    assert not _sessions_of(bob, alice.id)
    alice.readmit(bob.id)
    alice.resolve_worker(bob.id).connect()
    assert _wait(lambda: _sessions_of(bob, alice.id))
    link.close()


def test_a_peer_revoked_before_the_link_is_configured_gets_no_link(hook, tmp_path):
    """A restart: the stored revocation of bob is restored before the ``--peer bob`` link is added; the link is
    refused from the start (it never connects)."""
    db = tmp_path / OwnerDB.FILENAME
    first = WebsocketServerWorker(hook, id=f"redgov-a-{time.monotonic_ns()}", port=0, tokens=_alice_tokens("bob"),
                                  db=OwnerDB(str(db)))
    first.revoke("bob")
    first.db.close()
    again = WebsocketServerWorker(hook, id=f"redgov-b-{time.monotonic_ns()}", port=0, tokens=_alice_tokens("bob"),
                                  db=OwnerDB(str(db)))
    try:
        link = WebsocketClientWorker(hook, id="bob", host="127.0.0.1", port=9, token=PEER_OUT, lazy=True)
        assert link.id == "bob"
        again.add_peer(link)
        with pytest.raises(PermissionDeniedError, match="revoked"):
            link.connect()  # (refused before any connection attempt: port 9 would say "cannot reach")
        with pytest.raises(PermissionDeniedError, match="revoked"):
            again.resolve_worker("bob")
    finally:
        again.db.close()


def test_a_peer_reached_only_by_its_link_is_listed_and_can_be_revoked(hook, server):
    """A peer this worker links to (``--peer carol=...``) without accepting a token of carol's: the owner sees
    it in ``veil users list`` and can revoke it (its link is then refused) and restore it."""
    link = WebsocketClientWorker(hook, id=f"carol-{time.monotonic_ns()}", host="127.0.0.1", port=9,
                                 token=PEER_OUT, lazy=True)
    server.add_peer(link)
    admin = _connect(server, ADMIN)
    listed = {u["name"]: (u["role"], u["revoked"]) for u in _ask(admin, AdminUsersMessage("list")).objects}
    assert listed[link.id] == ("peer", False)
    assert _ask(admin, AdminUsersMessage("revoke", link.id)) == m.ObjectsReply([0])
    with pytest.raises(PermissionDeniedError, match="revoked"):
        link.connect()
    listed = {u["name"]: u["revoked"] for u in _ask(admin, AdminUsersMessage("list")).objects}
    assert listed[link.id] is True
    assert _ask(admin, AdminUsersMessage("restore", link.id)) == m.ObjectsReply([0])
    assert not link.refused


# --------------------------------------------------------------------------- a revocation is prompt


def test_a_revocation_does_not_wait_for_a_long_command(server):
    """A long command holds the worker's turn (here: the test holds it) when the owner runs ``veil users
    revoke alice``. The revocation is in force when the reply comes, not when the command ends: alice's open
    connection is closed and her token refused meanwhile. (The turn is held until after the checks, up to the
    reply's 120 s timeout: a revocation waiting for it never answers in time, however loaded the machine.)"""
    victim = _connect(server, TOKEN)
    admin = _connect(server, ADMIN)
    assert _wait(lambda: _sessions_of(server, "alice"))
    server._turn.acquire()
    try:
        try:
            reply = _ask(admin, AdminUsersMessage("revoke", "alice"), timeout=120)
        except TimeoutError:
            pytest.fail("the revocation waited for the running command")
        assert type(reply) is m.ObjectsReply and reply.objects == [1], reply
        assert _refused(server, TOKEN)
        assert _closed(victim)
        listed = _ask(admin, AdminUsersMessage("list"), timeout=120)
        assert {u["name"]: u["revoked"] for u in listed.objects}["alice"] is True
    finally:
        server._turn.release()
    assert _ask(_connect(server, OTHER), m.ObjectMessage([m.StoredObject(1, torch.ones(1))])) == m.OkReply()


def test_only_the_owners_users_message_skips_the_turn(server):
    """What skips the turn is the admin session's users message alone: a scientist's users message waits for
    the turn like any request, and is then refused (no one revoked); an admin's other message waits too."""
    scientist = _connect(server, TOKEN)
    admin = _connect(server, ADMIN)
    server._turn.acquire()
    try:
        scientist.send(serialize(AdminUsersMessage("revoke", "other"), sender="c"))
        admin.send(serialize(m.ObjectMessage([m.StoredObject(9, torch.ones(1))]), sender="c"))
        for conn in (scientist, admin):
            with pytest.raises(TimeoutError):
                conn.recv(0.5)
    finally:
        server._turn.release()
    refused = deserialize(scientist.recv(30))[0]
    assert type(refused) is m.ErrorReply and refused.error == "PermissionDeniedError"
    assert deserialize(admin.recv(30))[0] == m.OkReply()
    assert "other" not in server.tokens.revoked


def test_a_replica_puts_a_revocation_in_force_while_a_long_command_runs(hook, server, tmp_path):
    """Two replicas share the owner database; a long command holds the serving replica's turn when the owner
    revokes alice on the other. The serving replica closes alice's session within its sync (about a
    second), not when the command ends."""
    victim = _connect(server, TOKEN)
    assert _wait(lambda: _sessions_of(server, "alice"))
    elsewhere = WebsocketServerWorker(hook, id=f"redgov-replica-{time.monotonic_ns()}", port=0,
                                      tokens=_alice_tokens("bob"), db=OwnerDB(str(tmp_path / OwnerDB.FILENAME)))
    server._turn.acquire()
    try:
        elsewhere.revoke("alice")
        assert _wait(lambda: "alice" in server.tokens.revoked, 5), "the replica waited for the running command"
        assert _closed(victim)
        assert _refused(server, TOKEN)
    finally:
        server._turn.release()
        elsewhere.db.close()


def test_a_revocation_is_in_force_while_the_sync_waits_on_a_frozen_database(server, monkeypatch):
    """The owner database stops answering while the worker's revocation sync reads it (here: the sync's read
    blocks). The owner revokes alice meanwhile: she is refused and her connection closed at once, before
    the revocation can be stored; once the database answers again it is stored, and the sync that was
    waiting (which read alice's older row) does not undo it."""
    from veil.governance import revocation

    admin = _connect(server, ADMIN)
    assert _ask(admin, AdminUsersMessage("revoke", "alice")) == m.ObjectsReply([0])
    assert _ask(admin, AdminUsersMessage("restore", "alice")) == m.ObjectsReply([0])  # (stored: readmitted)
    victim = _connect(server, TOKEN)
    assert _wait(lambda: _sessions_of(server, "alice"))
    frozen, reading = threading.Event(), threading.Event()
    real = revocation._records

    def stuck(worker):
        out = real(worker)  # (alice's row says: readmitted)
        if worker is server and not frozen.is_set():
            reading.set()
            frozen.wait(30)
        return out

    monkeypatch.setattr(revocation, "_records", stuck)
    sync = threading.Thread(target=revocation.sync_stored_revocations, args=(server,), daemon=True)
    sync.start()
    assert reading.wait(30)
    revoking = threading.Thread(target=server.revoke, args=("alice",), daemon=True)
    revoking.start()
    try:
        assert _wait(lambda: "alice" in server.tokens.revoked, 2), "the revocation waited for the database"
        assert _closed(victim)
        assert _refused(server, TOKEN)
    finally:
        frozen.set()
    sync.join(30)
    revoking.join(30)
    assert "alice" in server.tokens.revoked
    assert revocation.stored_revocations(server)["alice"] is True
    revocation.sync_stored_revocations(server)
    assert "alice" in server.tokens.revoked


def _raw_websocket(port: int, token: str):
    """A TCP socket that did a WebSocket handshake by hand, and sends frames without ever answering a close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {token}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head[:80]
    return sock


def _frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    header = bytes([0x82, 0x80 | size]) if size < 126 else bytes([0x82, 0x80 | 126]) + struct.pack("!H", size)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_a_revoked_client_that_ignores_the_close_runs_nothing_and_is_cut_off(server, monkeypatch):
    """alice's client keeps its TCP connection after the revocation: it never answers the close and goes on
    sending store frames. None of them runs, and the worker drops the connection within its close timeout
    (seconds), not when the client pleases."""
    stored: list = []
    real = server.monitor.store_objects
    monkeypatch.setattr(server.monitor, "store_objects",
                        lambda principal, objects: (stored.extend(o.id for o in objects), real(principal, objects))[1])
    sock = _raw_websocket(server.bound_port, TOKEN)
    try:
        assert _wait(lambda: _sessions_of(server, "alice"))
        assert server.revoke("alice") == 1
        frame = _frame(serialize(m.ObjectMessage([m.StoredObject(77, torch.ones(1))]), sender="c"))
        deadline, cut = time.monotonic() + 8, False
        sock.settimeout(0.05)
        while time.monotonic() < deadline and not cut:
            try:
                sock.sendall(frame)
                cut = sock.recv(65536) == b""  # (the close frame arrives first; then the end of the stream)
            except socket.timeout:
                pass
            except OSError:  # reset by the worker
                cut = True
        assert cut, "the revoked client's connection stayed open while it ignored the close"
    finally:
        sock.close()
    assert 77 not in stored, "a frame of the revoked client ran"
    assert _wait(lambda: not _sessions_of(server, "alice"))


def test_a_revoked_sessions_running_command_delivers_nothing(server, monkeypatch):
    """alice's command is running (a handler of hers blocks mid-way) when the owner revokes her: the
    revocation returns at once, the connection closes, and the command's result never reaches her."""
    from veil.workers import handlers

    conn = _connect(server, TOKEN)
    assert _ask(conn, m.ObjectMessage([m.StoredObject(7, torch.tensor([2.0]))])) == m.OkReply()
    inside, go_on = _held(monkeypatch, handlers, "_run_command")
    big = torch.zeros(300_000)  # (too large to run inline: a handler thread, with the command token)
    conn.send(serialize(m.CommandMessage("torch.add", (m.ObjectRef(7), big), {}, [8], False), sender="c"))
    assert inside.wait(30)
    admin = _connect(server, ADMIN)
    try:
        assert _ask(admin, AdminUsersMessage("revoke", "alice"), timeout=5) == m.ObjectsReply([1])
    finally:
        go_on.set()
    assert _closed(conn)
    assert _wait(lambda: not _sessions_of(server, "alice"))


def test_a_reply_finished_after_the_revocation_is_not_sent(server, monkeypatch):
    """alice's command finishes just after the owner revoked her, before the event loop got to closing her
    connection (here: the close is held back a second). Its result must not go out: nothing is sent to a
    session once its revocation returned."""
    from veil.workers import handlers

    real_close = server._close_revoked
    monkeypatch.setattr(server, "_close_revoked", lambda *a: server._loop.call_later(1.0, real_close, *a))
    conn = _connect(server, TOKEN)
    assert _ask(conn, m.ObjectMessage([m.StoredObject(7, torch.tensor([2.0]))])) == m.OkReply()
    inside, go_on = _held(monkeypatch, handlers, "_run_command")
    conn.send(serialize(m.CommandMessage("torch.add", (m.ObjectRef(7), torch.zeros(300_000)), {}, [8], False),
                        sender="c"))
    assert inside.wait(30)
    try:
        assert server.revoke("alice") == 1
    finally:
        go_on.set()
    assert _closed(conn)


def test_an_inline_reply_made_while_the_revocation_ran_is_not_sent(server, monkeypatch):
    """A revocation no longer waits for the worker's turn, so it can land while one of alice's short requests
    runs inline on the event loop (here: the revocation is made right after her get ran, before its reply is
    written). The reply, alice's tensor, must not go out after revoke() returned."""
    real = server.try_inline

    def revoking(data, session):
        out = real(data, session)
        if out[0] is not None and session.user == "alice" and not session.revoked and armed:
            server.revoke("alice")
        return out

    conn = _connect(server, TOKEN)
    assert _ask(conn, m.ObjectMessage([m.StoredObject(5, torch.tensor([3.0]))])) == m.OkReply()
    armed = True
    monkeypatch.setattr(server, "try_inline", revoking)
    conn.send(serialize(m.GetObjectsMessage([5], delete=False), sender="c"))
    assert _closed(conn)


def test_a_cancelled_peer_opening_stops_fetching_from_every_peer(monkeypatch):
    """alice's peer opening with three parties waits for two peers' shares (each fetched on its own thread)
    when she is revoked (her command's token is cancelled). Every fetch must stop within a slice: before,
    only the handler thread's saw the token, the pool thread's went on asking its peer until the round's
    deadline (60 s) and held the handler thread, and a revoked session's round, that long."""
    from types import SimpleNamespace

    from veil.exceptions import CommandCancelledError
    from veil.workers import cancellation, peer_openings

    # (a fetch that ignores the token asks on until this deadline: the bound below has ~60 s of slack either way)
    monkeypatch.setattr(peer_openings, "WAIT_SECONDS", 120.0)
    asked: list = []

    def nothing_yet(msg, location):
        asked.append(location)
        time.sleep(0.01)
        return m.OkReply()  # (the peer published nothing yet: asked again)

    worker = SimpleNamespace(id="w0", resolve_worker=lambda p: p, send_msg=nothing_yet)
    msg = peer_openings.PeerOpenMessage(name="beaver_mul", round="r" * 16, parties=["w0", "p1", "p2"])
    token = cancellation.CancelToken()
    threading.Timer(0.3, token.cancel, args=("access revoked by the data owner",)).start()
    started = time.monotonic()
    with cancellation.running(token), pytest.raises(CommandCancelledError):
        peer_openings._fetch_all(worker, msg, ["p1", "p2"], [((2,), torch.int64)], {})
    assert time.monotonic() - started < 60, "a fetch thread went on after the command was cancelled"
    so_far = len(asked)
    time.sleep(0.3)
    assert len(asked) == so_far, "fetches went on after the opening returned"


def test_a_dp_query_caught_by_the_revocation_is_charged_once_and_never_answered(server, monkeypatch):
    """alice's DP count is running (charged, computing) when the owner revokes her. The revocation returns at
    once; the noisy count never reaches her; the ledger holds exactly the one charge (charged before any
    release, never refunded), and after a readmission the same request id is refused as a replay rather
    than charged and answered again."""
    from veil.dp import worker_functions
    from veil.dp.worker_owner import enable_dp

    ledger = enable_dp(server, budgets={"alice": (1.0, 1e-5)}).ledger
    inside, go_on = _held(monkeypatch, worker_functions.QUERIES, "count")
    conn = _connect(server, TOKEN)
    assert _ask(conn, m.ObjectMessage([m.StoredObject(7, torch.arange(10.0))])) == m.OkReply()
    query = m.CommandMessage("veil.dp.query", (m.ObjectRef(7), "count", 0.25, 0.0, "laplace", None, None, None,
                                               "request-revoked-1"), {}, [8, 9])
    conn.send(serialize(query, sender="c"))
    assert inside.wait(30)
    admin = _connect(server, ADMIN)
    try:
        assert _ask(admin, AdminUsersMessage("revoke", "alice"), timeout=5) == m.ObjectsReply([1])
    finally:
        go_on.set()
    assert _closed(conn)
    assert ledger.spent("alice") == pytest.approx((0.25, 0.0))
    assert _ask(admin, AdminUsersMessage("restore", "alice")) == m.ObjectsReply([0])
    again = _connect(server, TOKEN)
    assert _ask(again, m.ObjectMessage([m.StoredObject(7, torch.arange(10.0))])) == m.OkReply()
    reply = _ask(again, query)
    assert type(reply) is m.ErrorReply and reply.error == "ReplayedRequestError", reply
    assert ledger.spent("alice") == pytest.approx((0.25, 0.0))


def test_two_owner_sessions_revoking_and_readmitting_at_once_agree_with_the_store(server):
    """Two admin sessions (two owners' CLIs) revoke and readmit the same name as fast as they can, in
    parallel, while the replica sync rereads the stored rows. Every reply is a success or a one-line refusal,
    and at the end the worker's state and the stored record agree (and the token is refused if and only if
    the name is revoked)."""
    a, b = _connect(server, ADMIN), _connect(server, ADMIN2)
    errors: list = []

    def flip(conn, actions):
        for action in actions:
            reply = _ask(conn, AdminUsersMessage(action, "other"))
            if type(reply) is m.ErrorReply:
                if "\n" in reply.message or reply.error != "ObjectNotFoundError":
                    errors.append(reply)

    from veil.governance.revocation import stored_revocations, sync_stored_revocations

    done = threading.Event()

    def syncing():  # (the replica sync, which reads the stored rows the two are writing, runs all along)
        while not done.is_set():
            sync_stored_revocations(server)

    threads = [threading.Thread(target=flip, args=(a, ["revoke", "restore"] * 15)),
               threading.Thread(target=flip, args=(b, ["restore", "revoke"] * 15 + ["revoke"]))]
    sync = threading.Thread(target=syncing)
    for t in [*threads, sync]:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    sync.join(60)
    assert not errors, errors

    here = "other" in server.tokens.revoked
    assert stored_revocations(server).get("other", False) is here
    assert _refused(server, OTHER) is here


# --------------------------------------------------------------------------- the ledger's COMMIT


class _FailingCommit:
    """The ledger's SQLite connection, whose next COMMIT fails as a full disk or an I/O error at its fsync
    would (SQLite may keep the transaction open after it)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn, self.armed = conn, True

    def execute(self, sql: str, *args):
        if self.armed and sql.strip().upper() == "COMMIT":
            self.armed = False
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def test_a_charge_whose_commit_fails_is_not_recorded_and_the_ledger_keeps_working(tmp_path):
    """A DP charge's COMMIT fails: the charge raises (so nothing is released), nothing of it is recorded, here
    or after a restart; the next charge works on this worker, and another process of the owner sharing the
    ledger is not locked out by a transaction left open."""
    path = tmp_path / "ledger.sqlite3"
    ledger = BudgetLedger(path)
    ledger.set_budget("alice", 10.0, 1e-5)
    ledger._db._conn = _FailingCommit(ledger._db._conn)
    with pytest.raises(sqlite3.OperationalError):
        ledger.charge("alice", 1.0, 0.0, "query", request_id="request-0001")
    assert ledger.spent("alice") == (0.0, 0.0), "a charge whose COMMIT failed is still counted here"
    assert ledger.charge("alice", 2.0, 0.0, "query", request_id="request-0002") == pytest.approx((8.0, 1e-5))
    other = sqlite3.connect(str(path), timeout=2)
    try:
        other.execute("BEGIN IMMEDIATE")  # the owner's other process may write
        other.execute("ROLLBACK")
    finally:
        other.close()
    ledger.close()
    with BudgetLedger(path) as again:
        assert again.spent("alice") == (2.0, 0.0)
        assert [r[2] for r in again.history("alice")] == ["query"]
        # the failed charge's request id was not remembered: its retry is charged once, and answered
        assert again.charge("alice", 1.0, 0.0, "query", request_id="request-0001") == pytest.approx((7.0, 1e-5))


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_a_revocation_reported_done_survives_a_sigkill(spawn, tmp_path):
    """``veil users revoke other`` is answered, and the worker process is killed (SIGKILL) at once: after a
    restart with the same arguments (``--user other=...`` still among them) other's token is refused, and
    the owner's list says revoked."""
    from network_helpers import base_args

    args = base_args(["--data-dir", str(tmp_path)])
    wp = spawn("alice", args)
    admin = BlockingConnection(f"ws://127.0.0.1:{wp.port}", handshake_headers(ADMIN))
    try:
        assert _ask(admin, AdminUsersMessage("revoke", "other")) == m.ObjectsReply([0])
    finally:
        wp.proc.kill()
        admin.close()
    wp.proc.wait(10)
    again = spawn("alice", args)
    with pytest.raises(InvalidStatus):
        BlockingConnection(f"ws://127.0.0.1:{again.port}", handshake_headers(OTHER)).close()
    admin = BlockingConnection(f"ws://127.0.0.1:{again.port}", handshake_headers(ADMIN))
    try:
        listed = {u["name"]: u["revoked"] for u in _ask(admin, AdminUsersMessage("list")).objects}
    finally:
        admin.close()
    assert listed["other"] is True

