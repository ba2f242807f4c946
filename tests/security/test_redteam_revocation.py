"""Red team of run-time revocation (``worker.revoke``, ``veil users``; veil/governance/revocation.py).

The attacker holds a token the owner revokes, or a lesser token and wants to revoke or list users. An
in-process worker served from a thread, driven with raw frames: requests pipelined behind a held worker
turn, a batch caught mid-run, tokens combined in one handshake, every restricted role, a damaged stored
record. What must hold: after ``revoke`` returns none of the revoked principal's requests starts, its
connections are closed and its tokens refused like unknown ones; only the admin token manages users.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus

import veil as sy
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.governance.users_wire import AdminUsersMessage
from veil.workers import handlers
from veil.workers.inline_lane import INLINE_MAX_BYTES
from veil.workers.persistence import OwnerDB
from veil.workers.websocket_auth import handshake_headers
from veil.workers.websocket_server import WebsocketServerWorker
from veil.workers.websocket_transport import BlockingConnection

from network_helpers import ADMIN, OTHER, PEER, TOKEN
from worker_processes import serve_in_thread, stop_served

CLIENT = "redrevoke-client-token"


def _tokens() -> sy.TokenTable:
    tokens = sy.TokenTable()
    tokens.add(TOKEN, "alice")
    tokens.add(OTHER, "other")
    tokens.add(CLIENT, "shop", role="client")
    tokens.add(PEER, "bob", role="peer")
    tokens.add(ADMIN, "owner", role="admin")
    return tokens


@pytest.fixture
def server(hook, tmp_path):
    """An in-process worker on loopback with its owner database in tmp_path (served from a thread)."""
    w = WebsocketServerWorker(hook, id=f"redrevoke-{time.monotonic_ns()}", port=0, tokens=_tokens(),
                              db=OwnerDB(str(tmp_path / OwnerDB.FILENAME)))
    thread = serve_in_thread(w)
    yield w
    while _OPEN:
        try:
            _OPEN.pop().close()
        except Exception:
            pass
    stop_served(w, thread)


_OPEN: list = []


def _connect(server, *tokens: str) -> BlockingConnection:
    conn = BlockingConnection(f"ws://127.0.0.1:{server.bound_port}", handshake_headers(tokens[0], tokens[1:]))
    _OPEN.append(conn)
    return conn


def _ask(conn: BlockingConnection, msg) -> object:
    conn.send(serialize(msg, sender="c"))
    return deserialize(conn.recv(60))[0]


def _store(oid: int) -> bytes:
    return serialize(m.ObjectMessage([m.StoredObject(oid, torch.tensor([float(oid)]))]), sender="c")


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _closed(conn: BlockingConnection) -> bool:
    """Whether the worker closed ``conn``: every message until the close must be an error reply."""
    try:
        while True:
            reply = deserialize(conn.recv(60))[0]
            assert type(reply) is m.ErrorReply, f"a request ran after the revocation: {reply!r}"
    except ConnectionClosed:
        return True


def _sessions_of(server, name: str) -> list:
    return [s for s in list(server.sessions.values()) if any(p.name == name for p in s.principals)]


@pytest.mark.parametrize("token", [TOKEN, CLIENT, PEER])
@pytest.mark.parametrize("action, name", [("list", None), ("revoke", "other"), ("restore", "other")])
def test_no_restricted_role_manages_users(server, token, action, name):
    """A scientist, serving client or peer token sends the owner's users message (list, revoke someone,
    restore someone): refused with PermissionDeniedError, audited as a refusal, and nobody is revoked."""
    if action == "restore":
        server.revoke("other")
    before = server.tokens.revoked
    conn = _connect(server, token)
    reply = _ask(conn, AdminUsersMessage(action, name))
    assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError"
    assert server.tokens.revoked == before
    refused = [r for r in server.db.audit_entries() if r["outcome"] == "refused" and "AdminUsers" in r["action"]]
    assert refused, "the refusal was not audited"


def test_the_admin_cannot_revoke_itself_and_keeps_working(server):
    """The owner's own session asks to revoke the admin principal: refused with a clear message; the admin
    session stays open and can still list (no name is marked revoked)."""
    conn = _connect(server, ADMIN)
    reply = _ask(conn, AdminUsersMessage("revoke", "owner"))
    assert type(reply) is m.ErrorReply and "admin role" in reply.message
    listed = _ask(conn, AdminUsersMessage("list"))
    assert type(listed) is m.ObjectsReply
    assert {u["name"]: u["revoked"] for u in listed.objects} == {"alice": False, "other": False, "shop": False,
                                                                 "bob": False, "owner": False}
    assert all(set(u) == {"name", "role", "revoked"} for u in listed.objects)  # never a token


def test_pipelined_frames_behind_a_revocation_never_run(server, monkeypatch):
    """alice pipelines stores while another request holds the worker (here: the test holds its turn); the
    owner revokes her meanwhile. None of the queued frames may run once revoke returns: no store happens,
    the connection is closed, and the object she stored before is freed through the session-end path."""
    stored, served = [], []
    real, real_serve = server.monitor.store_objects, server.serve_bytes
    monkeypatch.setattr(server.monitor, "store_objects",
                        lambda principal, objects, *a: (stored.extend(o.id for o in objects),
                                                         real(principal, objects, *a)))
    monkeypatch.setattr(server, "serve_bytes", lambda data, session, *a: (served.append(session.revoked),
                                                                          real_serve(data, session, *a))[1])
    conn = _connect(server, TOKEN)
    assert _ask(conn, m.ObjectMessage([m.StoredObject(1, torch.tensor([1.0]))])) == m.OkReply()
    assert stored == [1]
    (session,) = _sessions_of(server, "alice")
    held = [oid for oid, e in server.monitor.owner_entries() if e.created_by == session.id]
    server._turn.acquire()
    try:
        for oid in range(100, 120):
            conn.send(_store(oid))
        assert _wait(lambda: server._turn._waiters)  # a frame waits for its turn on a handler thread
        assert server.revoke("alice") == 1
    finally:
        server._turn.release()
    assert _closed(conn)
    assert _wait(lambda: not _sessions_of(server, "alice"))
    assert stored == [1], f"frames queued before the revocation ran after it: {stored}"
    # only the frame already waiting for its turn reached a handler thread; the rest were dropped unread
    assert served.count(True) <= 1, f"{served.count(True)} frames of the revoked session went to handler threads"
    assert not {oid for oid, _ in server.monitor.owner_entries()} & set(held)


def test_a_batch_caught_mid_run_stops_at_its_next_command(server, monkeypatch):
    """alice's large batch of deferred commands is running when the owner revokes her: at most the command
    under way finishes; none of the rest starts (the session's command token is cancelled)."""
    conn = _connect(server, TOKEN)
    assert _ask(conn, m.ObjectMessage([m.StoredObject(7, torch.zeros(1))])) == m.OkReply()
    ran, reached, go_on = [0], threading.Event(), threading.Event()
    real = handlers._run_command

    def spy(*args, **kwargs):
        ran[0] += 1
        if ran[0] == 50:
            reached.set()
            go_on.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(handlers, "_run_command", spy)
    n = 20000
    items = [["Tensor.add_", [m.ObjectRef(7), 1.0], {}, [0], False]] * n
    batch = serialize(m.DeleteMessage([]), sender="c", prelude=items)
    assert len(batch) > INLINE_MAX_BYTES  # (a handler thread runs it, with its command token)
    conn.send(batch)
    assert reached.wait(60)
    server.revoke("alice")
    at_revoke = ran[0]
    go_on.set()
    assert _closed(conn)
    assert _wait(lambda: not _sessions_of(server, "alice"))
    assert ran[0] <= at_revoke + 1 < n, f"{ran[0] - at_revoke} commands of the batch ran after the revocation"


@pytest.mark.parametrize("token, name", [(TOKEN, "alice"), (CLIENT, "shop"), (PEER, "bob")])
def test_every_role_is_cut_off(server, token, name):
    """A scientist's, a serving client's or a peer's open connection is closed when its name is revoked, and
    its token is refused from then on; another user's connection stays open and served."""
    victim, bystander = _connect(server, token), _connect(server, OTHER)
    assert _wait(lambda: _sessions_of(server, name) and _sessions_of(server, "other"))
    assert server.revoke(name) == 1
    assert _closed(victim)
    with pytest.raises(InvalidStatus):
        _connect(server, token)
    assert _ask(bystander, m.ObjectMessage([m.StoredObject(3, torch.ones(1))])) == m.OkReply()


def test_a_revoked_token_cannot_ride_along_with_a_valid_one(server):
    """alice presents her revoked token beside other's valid one: the whole handshake is refused. And a
    connection that proved both (alice second, so not its default user) is closed by alice's revocation."""
    both = _connect(server, OTHER, TOKEN)
    assert _wait(lambda: _sessions_of(server, "alice"))
    server.revoke("alice")
    assert _closed(both)
    for tokens in ((OTHER, TOKEN), (TOKEN, OTHER)):
        with pytest.raises(InvalidStatus) as refused:
            _connect(server, *tokens)
        assert refused.value.response.status_code == 401


def test_the_refusal_does_not_reveal_the_name(server):
    """A revoked token and a never-issued one get the same HTTP answer and the same audit detail; neither
    names alice or says "revoked"."""
    server.revoke("alice")
    answers = []
    for token in (TOKEN, "never-issued-token-xyz"):
        with pytest.raises(InvalidStatus) as refused:
            _connect(server, token)
        answers.append((refused.value.response.status_code, refused.value.response.body))
    assert answers[0] == answers[1]
    rows = [r for r in server.db.audit_entries() if r["action"] == "connect" and r["outcome"] == "refused"]
    assert len(rows) == 2 and rows[0]["detail"] == rows[1]["detail"]
    assert "alice" not in rows[0]["detail"] and "revoked" not in rows[0]["detail"]


@pytest.mark.parametrize("value", [b"not json", b'{"revoked": "no"}', b"[]"])
def test_a_damaged_stored_revocation_stops_the_start(hook, tmp_path, value):
    """A stored revocation that cannot be read (damaged, or edited to a non-boolean): the worker refuses to
    start (one-line ValueError) rather than letting the name in."""
    db = OwnerDB(str(tmp_path / OwnerDB.FILENAME))
    db.kv_put("governance.revoked", "alice", value)
    with pytest.raises(ValueError, match="stored revocation 'alice' is unreadable") as e:
        WebsocketServerWorker(hook, id=f"redrevoke-damaged-{time.monotonic_ns()}", port=0, tokens=_tokens(), db=db)
    assert len(str(e.value).splitlines()) == 1
    db.close()


def test_a_replica_closes_a_session_the_owner_revoked_elsewhere(server, hook, tmp_path):
    """The owner revokes alice on another process sharing the database (here: a second worker object on the
    same file): the serving worker closes alice's open connection within its sync and refuses her token."""
    conn = _connect(server, TOKEN)
    assert _wait(lambda: _sessions_of(server, "alice"))
    elsewhere = WebsocketServerWorker(hook, id=f"redrevoke-replica-{time.monotonic_ns()}", port=0,
                                      tokens=_tokens(), db=OwnerDB(str(tmp_path / OwnerDB.FILENAME)))
    try:
        elsewhere.revoke("alice")
    finally:
        elsewhere.db.close()
    assert _closed(conn)
    with pytest.raises(InvalidStatus):
        _connect(server, TOKEN)

    def rows():  # (the sync writes its row after it closed the sessions: the close can be seen first)
        return [r for r in server.db.audit_entries() if r["action"] == "revoke" and r["worker"] == server.id]

    assert _wait(rows), "the replica's sync closed the session but wrote no revoke row"
    assert "another replica" in rows()[0]["detail"]


def test_a_damaged_record_does_not_stop_other_revocations_syncing(server, caplog):
    """A record of "other" is damaged while the worker serves (an edited row); then alice is revoked on
    another replica. The sync still closes alice's session (before: every sync raised on the damaged row,
    each second, and no later decision took effect); "other" keeps its state here and is still served; the
    damaged row is logged once, not every second."""
    conn, bystander = _connect(server, TOKEN), _connect(server, OTHER)
    assert _wait(lambda: _sessions_of(server, "alice") and _sessions_of(server, "other"))
    with caplog.at_level("ERROR", logger="veil.governance.revocation"):
        server.db.kv_put("governance.revoked", "other", b"not json")
        server.db.kv_put("governance.revoked", "alice", b'{"revoked": true, "by": "owner", "ts": 0}')
        assert _wait(lambda: not _sessions_of(server, "alice")), "the sync never put alice's revocation in force"
        assert _closed(conn)
        time.sleep(1.5)  # another sync (once a second)
    assert _ask(bystander, m.ObjectMessage([m.StoredObject(3, torch.ones(1))])) == m.OkReply()
    damaged = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(damaged) == 1 and "'other'" in damaged[0].getMessage()


def test_every_request_path_refuses_a_revoked_session(hook):
    """A frame of a revoked session that reaches the worker before its connection is closed (read by the
    lane, served inline, or waiting for a handler thread): none runs it. Driven directly on a worker that is
    not listening (so no close happens): the inline paths hand it on unrun, the handler thread refuses it."""
    from network_helpers import in_process_server

    server, _, session = in_process_server(hook, f"redrevoke-paths-{time.monotonic_ns()}")
    stored: list = []
    real = server.monitor.store_objects
    server.monitor.store_objects = lambda principal, objects, *a: (stored.extend(o.id for o in objects),
                                                                   real(principal, objects, *a))
    assert deserialize(server.serve_bytes(_store(1), session))[0] == m.OkReply()
    assert server.revoke("scientist") == 1 and session.revoked
    assert server.try_inline(_store(2), session) == (None, None)
    assert server.lane_request(_store(3), session) == (None, None)
    reply = deserialize(server.serve_bytes(_store(4), session))[0]
    assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError"
    assert stored == [1]
    assert not server._turn._held  # (the inline paths gave the worker back)
