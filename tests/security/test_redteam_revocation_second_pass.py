"""Red team of run-time revocation, second pass (``worker.revoke``, ``veil users``; veil/governance/revocation.py).

The first pass (test_redteam_revocation.py) covered the request paths of the revoked session itself. This
one looks at what the revocation leaves behind and at the stored decision: state that outlives the
session and is keyed by the revoked *name* (a serving service), the stored record as other replicas and
restarts read it (a name that is the admin here, a store that failed), and the owner's message 65 with
hostile arguments. An in-process worker served from a thread, driven with raw frames.
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
import torch
from websockets.exceptions import ConnectionClosed, InvalidState, InvalidStatus

import veil as sy
from veil.governance import revocation
from veil.governance.users_wire import AdminUsersMessage
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.serving.protocol import ServingMessage
from veil.workers.persistence import OwnerDB
from veil.workers.websocket_auth import handshake_headers
from veil.workers.websocket_server import WebsocketServerWorker
from veil.workers.websocket_transport import BlockingConnection

from network_helpers import ADMIN, OTHER, TOKEN
from test_redteam_revocation import _ask, _sessions_of, _wait
from worker_processes import serve_in_thread, stop_served

MODEL_OWNER = "redrevoke2-model-owner-token"
CLIENT = "redrevoke2-client-token"


def _tokens() -> sy.TokenTable:
    tokens = sy.TokenTable()
    tokens.add(TOKEN, "alice")
    tokens.add(OTHER, "other")
    tokens.add(MODEL_OWNER, "modelowner")
    tokens.add(CLIENT, "shop", role="client")
    tokens.add(ADMIN, "owner", role="admin")
    return tokens


_OPEN: list = []


def _start(hook, db_path, tokens=None) -> tuple:
    w = WebsocketServerWorker(hook, id=f"redrevoke2-{time.monotonic_ns()}", port=0, tokens=tokens or _tokens(),
                              db=OwnerDB(str(db_path)))
    return w, serve_in_thread(w)


@pytest.fixture
def server(hook, tmp_path):
    """An in-process worker on loopback with its owner database in tmp_path (served from a thread)."""
    w, thread = _start(hook, tmp_path / OwnerDB.FILENAME)
    yield w
    while _OPEN:
        try:
            _OPEN.pop().close()
        except Exception:
            pass
    stop_served(w, thread)


def _connect(server, *tokens: str) -> BlockingConnection:
    conn = BlockingConnection(f"ws://127.0.0.1:{server.bound_port}", handshake_headers(tokens[0], tokens[1:]))
    _OPEN.append(conn)
    return conn


def _handshake_refused(server, token: str) -> bool:
    try:
        _connect(server, token)
    except InvalidStatus as e:
        return e.response.status_code == 401
    return False


def _submit(conn, rid: int) -> object:
    share = torch.tensor([[rid, 2]], dtype=torch.int64)
    return _ask(conn, ServingMessage("submit", "m", [rid, share]))


# ------------------------------------------------------------------ what a revoked name leaves behind


def test_a_revoked_serving_owners_service_is_closed(server):
    """A serving owner (scientist "modelowner") opens service "m" for client "shop" and is revoked (leaked
    token, abuse). The service is kept per worker under her *name*, not her session, so it outlives the
    revocation: only she may close it, and she can no longer connect. What must hold: from the revocation on,
    a client's submit is refused at once (ServiceClosedError, the client can go elsewhere) instead of its
    input share being queued for a user who may not connect (the client then waits for an answer that never
    comes); and another scientist may open a service under that name (today: "belongs to another user")."""
    mo = _connect(server, MODEL_OWNER)
    assert _ask(mo, ServingMessage("open", "m", [["shop"], {"input_shape": [1, 2]}])) == m.ObjectsReply(["modelowner"])
    shop = _connect(server, CLIENT)
    assert _submit(shop, 1) == m.ObjectsReply([])  # (before the revocation: queued, as it should be)
    assert server.revoke("modelowner") == 1
    assert _wait(lambda: not _sessions_of(server, "modelowner"))

    during = _submit(shop, 2)  # a client keeps submitting private inputs to the revoked user's service
    assert type(during) is m.ErrorReply and during.error == "ServiceClosedError", \
        f"a client's submit to a revoked serving owner's service was accepted: {during!r}"
    fetched = _ask(shop, ServingMessage("fetch", "m", [1]))  # the one queued before: told, not left waiting
    assert type(fetched) is m.ErrorReply, f"a request queued for the revoked owner still reads as pending: {fetched!r}"
    other = _connect(server, OTHER)
    takeover = _ask(other, ServingMessage("open", "m", [["shop"], {"input_shape": [1, 2]}]))
    assert takeover == m.ObjectsReply(["other"]), f"the revoked owner's service name stays taken: {takeover!r}"


def test_a_revoked_clients_queued_inputs_are_dropped(server):
    """The other direction (defence that holds): the *client* "shop" is revoked with requests queued; its
    queued inputs leave with its session (drop_session), so the model owner's ``pending`` no longer lists
    them and a later client session cannot fetch their results."""
    mo = _connect(server, MODEL_OWNER)
    assert _ask(mo, ServingMessage("open", "m", [["shop"], {"input_shape": [1, 2]}])) == m.ObjectsReply(["modelowner"])
    shop = _connect(server, CLIENT)
    for rid in (11, 12):
        assert _submit(shop, rid) == m.ObjectsReply([])
    assert {r for r, *_ in _ask(mo, ServingMessage("pending", "m", [])).objects} == {11, 12}
    server.revoke("shop")
    assert _wait(lambda: not _sessions_of(server, "shop"))
    assert _wait(lambda: _ask(mo, ServingMessage("pending", "m", [])).objects == [])


# ------------------------------------------------------------------ the stored decision


def test_a_stored_revocation_never_locks_out_the_admin(hook, tmp_path):
    """``revoke()`` refuses the admin role, but the replica sync and the start-up restore put any stored
    record in force without that check. A second worker on the same database (a replica started without
    ``--admin-token`` whose ``--user owner=...`` is a plain scientist; or the row edited) revokes "owner".
    What must hold: the serving worker, where "owner" is the admin, keeps accepting the admin token after
    its sync and after a restart (otherwise nobody can run ``veil users restore`` or log in to the console
    there: the revocation is restored at every start)."""
    db_path = tmp_path / OwnerDB.FILENAME
    w, thread = _start(hook, db_path)
    try:
        replica_tokens = sy.TokenTable()
        replica_tokens.add("redrevoke2-scientist-named-owner", "owner")  # a plain scientist on that replica
        replica = WebsocketServerWorker(hook, id=f"redrevoke2-replica-{time.monotonic_ns()}", port=0,
                                        tokens=replica_tokens, db=OwnerDB(str(db_path)))
        try:
            replica.revoke("owner")
        finally:
            replica.db.close()
        w.sync_policies_now()  # (what the worker runs every second)
        admin_after_sync = w.tokens.lookup(ADMIN)
    finally:
        stop_served(w, thread)
    restarted = WebsocketServerWorker(hook, id=f"redrevoke2-restart-{time.monotonic_ns()}", port=0,
                                      tokens=_tokens(), db=OwnerDB(str(db_path)))
    try:
        admin_after_restart = restarted.tokens.lookup(ADMIN)
    finally:
        restarted.db.close()
    assert admin_after_sync is not None and admin_after_sync.role == "admin", "the sync revoked the admin token"
    assert admin_after_restart is not None, "a restart keeps the admin token refused"


def test_a_revocation_whose_store_failed_is_not_undone_by_the_sync(server, monkeypatch):
    """alice was revoked once and restored (the database holds ``revoked: false`` for her). Her token leaks
    again; the owner revokes her, and storing the decision fails (disk full, a database that went away):
    ``revoke`` raises, documented as "in force first: a refusal holds even if storing fails". What must
    hold: within the next seconds (the worker's own sync of the stored decisions) alice is still refused,
    and her new connection stays impossible."""
    server.revoke("alice")
    server.readmit("alice")
    conn = _connect(server, TOKEN)
    assert _wait(lambda: _sessions_of(server, "alice"))

    def failing_put(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(server.db, "kv_put", failing_put)
    with pytest.raises(sqlite3.OperationalError):
        server.revoke("alice")
    assert _handshake_refused(server, TOKEN)  # in force, as promised
    monkeypatch.undo()
    server.sync_policies_now()  # (what the worker runs every second)
    assert "alice" in server.tokens.revoked, "the sync readmitted alice from the earlier stored readmission"
    assert _handshake_refused(server, TOKEN)
    conn.close()


def test_a_hostile_stored_record_for_an_unknown_name_changes_nobody_else(hook, tmp_path):
    """Stored rows for names this worker has no token for (a replica's users, odd keys: empty, a prefix of a
    real name, a different case) are put in force as names only: alice, "other" and the admin still get in."""
    db = OwnerDB(str(tmp_path / OwnerDB.FILENAME))
    for key in ("", "alic", "ALICE", "alice ", "owner\x00", "*"):
        db.kv_put(revocation.NAMESPACE, key, json.dumps({"revoked": True, "by": "x", "ts": 0}).encode())
    w = WebsocketServerWorker(hook, id=f"redrevoke2-odd-{time.monotonic_ns()}", port=0, tokens=_tokens(), db=db)
    try:
        for token, name in ((TOKEN, "alice"), (OTHER, "other"), (ADMIN, "owner")):
            found = w.tokens.lookup(token)
            assert found is not None and found.name == name
    finally:
        db.close()


# ------------------------------------------------------------------ the owner's message with hostile arguments


@pytest.mark.parametrize("action, name", [
    ("revoke", 7), ("revoke", ["alice"]), ("revoke", "alice\x00"), ("restore", {"alice": 1}),
    (None, "alice"), ("REVOKE", "alice"),
])
def test_malformed_users_messages_change_nothing(server, action, name):
    """The admin's message 65 with a name that is not a user's string (an int, a list, a NUL-suffixed
    name, a dict) or an unknown action: one error reply, the admin session stays usable, nobody revoked."""
    conn = _connect(server, ADMIN)
    reply = _ask(conn, AdminUsersMessage(action, name))
    assert type(reply) is m.ErrorReply
    assert server.tokens.revoked == frozenset()
    listed = _ask(conn, AdminUsersMessage("list"))
    assert type(listed) is m.ObjectsReply and not any(u["revoked"] for u in listed.objects)


def test_an_admin_connection_that_also_proved_the_revoked_name_still_revokes_it(server):
    """The owner's ``veil users revoke`` connection also proved alice's token (an owner testing with both):
    the revocation cancels and closes that very connection (it authenticated as alice), yet alice ends up
    revoked and stored, and a fresh admin connection can restore her."""
    both = _connect(server, ADMIN, TOKEN)
    both.send(serialize(AdminUsersMessage("revoke", "alice"), sender="c"))
    try:
        deserialize(both.recv(60))
    except ConnectionClosed:
        pass
    assert _wait(lambda: "alice" in server.tokens.revoked)  # in force first, stored right after
    assert _wait(lambda: revocation.stored_revocations(server).get("alice") is True)
    admin = _connect(server, ADMIN)
    assert _ask(admin, AdminUsersMessage("restore", "alice")) == m.ObjectsReply([0])
    assert not _handshake_refused(server, TOKEN)


# ------------------------------------------------------------------ races and the console


def test_a_revocation_between_authentication_and_the_session_lets_no_request_run(server, monkeypatch):
    """The owner's revocation lands after alice's handshake was authenticated but before it became a session
    (here: forced, by revoking inside ``authenticate``, on the event loop). The handshake slot must not turn
    into a working session: the connection is refused or closed, and the request alice sends at once never
    runs (nothing stored)."""
    from veil.workers import websocket_connections

    stored: list = []
    real_store = server.monitor.store_objects
    monkeypatch.setattr(server.monitor, "store_objects",
                        lambda principal, objects: (stored.extend(o.id for o in objects),
                                                    real_store(principal, objects)))
    real_auth, fired = websocket_connections.authenticate, []

    def authenticate_then_revoke(table, tokens):
        session = real_auth(table, tokens)
        if not fired and any(p.name == "alice" for p in session.principals):
            fired.append(server.revoke("alice"))
        return session

    monkeypatch.setattr(websocket_connections, "authenticate", authenticate_then_revoke)
    try:
        conn = _connect(server, TOKEN)
    except InvalidStatus:
        conn = None
    assert fired == [0]  # (the revocation ran inside the handshake, with no session of alice open yet)
    if conn is not None:
        try:
            conn.send(serialize(m.ObjectMessage([m.StoredObject(5, torch.ones(1))]), sender="c"))
            while True:
                reply = deserialize(conn.recv(60))[0]
                assert type(reply) is m.ErrorReply, f"a request ran after the revocation: {reply!r}"
        except (ConnectionClosed, InvalidState):  # (closed before or after the frame went out)
            pass
    assert _wait(lambda: not _sessions_of(server, "alice"))
    assert stored == []


def test_the_console_confirms_only_a_real_revocation(server):
    """mallory (here alice), about to be revoked, sends the owner a link to the owner's own console:
    ``/sessions?revoked=alice``. The page must not show the green "alice revoked: their tokens are refused"
    confirmation while alice is not revoked (the owner, seeing it, would not revoke her); it is shown after
    a real revocation."""
    testclient = pytest.importorskip("starlette.testclient")
    from veil.governance.console.app import build_app

    web = testclient.TestClient(build_app(server, ["testserver"]), follow_redirects=False)
    login = web.get("/login").text.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
    assert web.post("/login", data={"login_csrf": login, "token": ADMIN}).status_code == 303
    server.revoke("other")
    assert "other revoked" in web.get("/sessions?revoked=other").text  # (a real one is confirmed)
    assert "alice" not in server.tokens.revoked
    page = web.get("/sessions?revoked=alice").text
    assert "alice revoked" not in page, "the console confirmed a revocation that did not happen"


def test_a_revocation_while_the_handshake_becomes_a_session_lets_no_pipelined_request_run(server, monkeypatch):
    """The narrowest handshake window: the owner's revocation scans the sessions after ``_on_connection`` took
    alice's handshake slot and before it registered her session (here: forced, by revoking inside the session
    table's insert), while alice's first request already waits in the same TCP segment as her upgrade
    request (a raw client pipelines it). What must hold: that request never runs (nothing stored) and the
    connection is closed with the revocation."""
    import base64
    import os
    import socket
    import struct

    stored: list = []
    real_store = server.monitor.store_objects
    monkeypatch.setattr(server.monitor, "store_objects",
                        lambda principal, objects: (stored.extend(o.id for o in objects),
                                                    real_store(principal, objects)))
    fired: list = []

    class RevokeOnInsert(dict):
        def __setitem__(self, sid, session):
            if not fired and any(p.name == "alice" for p in session.principals):
                fired.append(server.revoke("alice"))  # neither in the handshakes nor in the sessions now
            super().__setitem__(sid, session)

    monkeypatch.setattr(server, "sessions", RevokeOnInsert(server.sessions))
    payload = serialize(m.ObjectMessage([m.StoredObject(9, torch.ones(1))]), sender="c")
    request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{server.bound_port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
               f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode()
    mask = os.urandom(4)
    n = len(payload)
    assert n < 65536
    frame = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)) + mask
    frame += bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    answer = b""
    with socket.create_connection(("127.0.0.1", server.bound_port)) as sock:
        sock.sendall(request + frame)  # the first request in the same write as the upgrade
        sock.settimeout(60)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert fired == [0]
    assert answer.startswith(b"HTTP/1.1 101")
    assert b"\x88" in answer.split(b"\r\n\r\n", 1)[1][:2]  # the first frame back is the close, no reply
    assert stored == [], "a request pipelined behind the handshake ran after revoke() returned"
