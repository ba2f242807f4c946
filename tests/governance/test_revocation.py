"""Run-time revocation of a user's tokens (``worker.revoke``, ``veil users revoke|list|restore``).

In-process workers served from a thread (fast), the CLI as the owner runs it (a subprocess), and real
``veil worker`` processes for restarts and a second process on the same data dir.
"""

from __future__ import annotations

import time

import pytest
import torch
from websockets.exceptions import InvalidStatus

import veil as sy
from veil.exceptions import ConnectionLostError, ObjectNotFoundError, PermissionDeniedError
from veil.workers.persistence import OwnerDB
from veil.workers.websocket_auth import handshake_headers
from veil.workers.websocket_server import WebsocketServerWorker
from veil.workers.websocket_transport import BlockingConnection

from governance_helpers import ADMIN, OTHER, TOKEN, run_cli
from worker_processes import serve_in_thread

ALICE = "gov-revoke-alice-token"


def _tokens() -> sy.TokenTable:
    tokens = sy.TokenTable()
    tokens.add(ALICE, "alice")
    tokens.add(OTHER, "other")
    tokens.add(ADMIN, "owner", "admin")
    return tokens


@pytest.fixture
def serve(hook, tmp_path):
    """``serve(db_path=tmp_path/owner.db) -> server``: an in-process worker on loopback, stopped after."""
    started = []

    def start(db_path=None):
        db = OwnerDB(str(db_path or tmp_path / OwnerDB.FILENAME))
        server = WebsocketServerWorker(hook, id=f"gov-revoke-{time.monotonic_ns()}", port=0, tokens=_tokens(), db=db)
        started.append((server, serve_in_thread(server)))
        return server

    yield start
    for server, thread in started:
        if thread.is_alive():  # (one a test stopped itself has a closed loop)
            server.stop()
        thread.join(30)


@pytest.fixture
def client(hook):
    made = []

    def make(server, token):
        c = sy.WebsocketClientWorker(hook, id=server.id, host="127.0.0.1", port=server.bound_port, token=token)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _handshake_status(server, token: str) -> tuple:
    """(HTTP status, body) the worker answers a handshake with ``token``; (101, b"") when accepted."""
    try:
        BlockingConnection(f"ws://127.0.0.1:{server.bound_port}", handshake_headers(token)).close()
    except InvalidStatus as e:
        return e.response.status_code, e.response.body
    return 101, b""


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _sessions_of(server, name: str) -> list:
    return [s for s in list(server.sessions.values()) if any(p.name == name for p in s.principals)]


def test_a_revoked_token_is_refused_at_handshake_as_an_unknown_one(serve):
    """Revoked: alice's token is refused at every later handshake, with exactly the refusal an unknown token
    gets (status, body: nothing says the name existed); other users still connect."""
    server = serve()
    assert _handshake_status(server, ALICE) == (101, b"")
    server.revoke("alice")
    unknown = _handshake_status(server, "no-such-token-at-all")
    assert unknown[0] == 401
    assert _handshake_status(server, ALICE) == unknown
    assert _handshake_status(server, OTHER) == (101, b"")


def test_an_open_session_is_closed_and_its_objects_freed(serve, client):
    """Revoking closes alice's open session at once: its objects are freed by the session-end path, its next
    request fails (it cannot reconnect), the audit log has the row, and other's session keeps computing."""
    server = serve()
    alice, other = client(server, ALICE), client(server, OTHER)
    x = torch.tensor([1.0, 2.0]).send(alice)
    y = torch.tensor([3.0, 4.0]).send(other)
    (session,) = _sessions_of(server, "alice")
    held = [oid for oid, e in server.monitor.owner_entries() if e.created_by == session.id]
    assert held

    assert server.revoke("alice") == 1
    assert _wait(lambda: not _sessions_of(server, "alice"))
    alive = {oid for oid, _ in server.monitor.owner_entries()}
    assert not alive & set(held)
    with pytest.raises((ConnectionLostError, PermissionDeniedError)):
        (x + 1).get()
    with pytest.raises(PermissionDeniedError):
        (x + 1).get()  # (the client reconnects with the same token: refused)
    assert torch.equal((y * 2).get(), torch.tensor([6.0, 8.0]))
    rows = [r for r in server.db.audit_entries() if r["action"] == "revoke"]
    assert len(rows) == 1 and "alice" in rows[0]["detail"] and rows[0]["outcome"] == "allowed"


def test_admin_and_unknown_names_are_refused(serve):
    """The admin role cannot be revoked, nor a name with no token: each with a clear error, nothing stored
    or audited, and the owner's token still works."""
    server = serve()
    with pytest.raises(PermissionDeniedError, match="admin role"):
        server.revoke("owner")
    with pytest.raises(ObjectNotFoundError, match="no user named 'mallory'"):
        server.revoke("mallory")
    assert server.db.kv_items("governance.revoked") == []
    assert not [r for r in server.db.audit_entries() if r["action"] == "revoke"]
    assert _handshake_status(server, ADMIN) == (101, b"")


def test_readmit_lets_the_same_token_in_again(serve):
    """``readmit`` (``veil users restore``) undoes a revocation; readmitting a name that is not revoked is
    an error."""
    server = serve()
    server.revoke("alice")
    assert _handshake_status(server, ALICE)[0] == 401
    server.readmit("alice")
    assert _handshake_status(server, ALICE) == (101, b"")
    with pytest.raises(ObjectNotFoundError, match="not revoked"):
        server.readmit("alice")


def test_a_revocation_survives_a_restart_and_reaches_a_replica(serve, tmp_path):
    """Stored in the owner database: a worker restarted with the same tokens keeps alice out, and a replica
    already serving on the same database takes the revocation (and the readmission) within its sync."""
    first = serve()
    replica = serve()  # same database file, serving meanwhile
    assert _handshake_status(replica, ALICE) == (101, b"")
    first.revoke("alice")
    assert _wait(lambda: _handshake_status(replica, ALICE)[0] == 401)
    first.stop()
    restarted = serve()
    assert _handshake_status(restarted, ALICE)[0] == 401
    assert _handshake_status(restarted, OTHER) == (101, b"")
    restarted.readmit("alice")
    assert _handshake_status(restarted, ALICE) == (101, b"")
    assert _wait(lambda: _handshake_status(replica, ALICE) == (101, b""))


def test_cli_lists_revokes_and_restores(serve):
    """``veil users`` end to end: list shows name, role and state (never a token), revoke closes and refuses,
    restore readmits."""
    server = serve()
    worker = f"127.0.0.1:{server.bound_port}"
    listed = run_cli("users", "list", "--worker", worker, "--admin-token", ADMIN)
    assert listed.returncode == 0, listed.stderr
    assert ALICE not in listed.stdout and ADMIN not in listed.stdout and OTHER not in listed.stdout
    lines = {line.split()[0]: line.split()[1:] for line in listed.stdout.splitlines()}
    assert lines == {"alice": ["scientist", "active"], "other": ["scientist", "active"],
                     "owner": ["admin", "active"]}

    revoked = run_cli("users", "revoke", "alice", "--worker", worker, "--admin-token", ADMIN)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.startswith("revoked alice")
    assert _handshake_status(server, ALICE)[0] == 401
    listed = run_cli("users", "list", "--worker", worker, "--admin-token", ADMIN)
    assert "alice" in listed.stdout and listed.stdout.split("alice", 1)[1].split()[1] == "revoked"

    restored = run_cli("users", "restore", "alice", "--worker", worker, "--admin-token", ADMIN)
    assert restored.returncode == 0, restored.stderr
    assert _handshake_status(server, ALICE) == (101, b"")


@pytest.mark.parametrize("args, code, text", [
    (("revoke", "owner"), 1, "admin role"),
    (("revoke", "mallory"), 1, "no user named 'mallory'"),
    (("restore", "alice"), 1, "not revoked"),
    (("revoke",), 2, "needs a user name"),
])
def test_cli_errors_are_one_line(serve, args, code, text, capsys, monkeypatch):
    """Refusals and bad arguments: one line on stderr, no traceback, exit status 1 (refused) or 2 (usage).

    ``veil.cli.main`` in this process (a ``veil`` process costs seconds of torch import, four times here): its
    return value or SystemExit code is the process's exit status; the tests around run the real command."""
    from veil.cli import main

    server = serve()
    monkeypatch.setenv("VEIL_ADMIN_TOKEN", "")  # as run_cli: only the flag gives the token
    capsys.readouterr()
    try:
        returncode = main(["users", *args, "--worker", f"127.0.0.1:{server.bound_port}", "--admin-token", ADMIN])
    except SystemExit as e:
        returncode = e.code
    stderr = capsys.readouterr().err
    assert returncode == code
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert text in stderr


def test_cli_without_admin_token_or_worker_address(serve):
    """No admin token, or a malformed address: one line, exit status 2, nothing sent."""
    server = serve()
    done = run_cli("users", "list", "--worker", f"127.0.0.1:{server.bound_port}")
    assert done.returncode == 2 and "needs --admin-token" in done.stderr
    done = run_cli("users", "list", "--worker", "nowhere", "--admin-token", ADMIN)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_worker_processes_share_revocations_through_the_data_dir(spawn, connect, tmp_path):
    """Real ``veil worker`` processes: two on one --data-dir; ``veil users revoke`` on the first closes
    alice's open session on the second within its sync and refuses her there; a restart of the first with
    the same --user keeps her out."""
    from governance_helpers import worker_args

    args = worker_args("open", ["--user", f"alice={ALICE}", "--data-dir", str(tmp_path / "owner")])
    first = spawn("alice", args)
    second = spawn("alice", args)
    on_second = connect(second, token=ALICE, id="alice-second")
    x = torch.tensor([5.0]).send(on_second)
    done = run_cli("users", "revoke", "alice", "--worker", f"127.0.0.1:{first.port}", "--admin-token", ADMIN)
    assert done.returncode == 0, done.stderr

    def refused_on_second() -> bool:
        try:
            (x + 1).get()
        except (ConnectionLostError, PermissionDeniedError):
            return True
        return False
    assert _wait(refused_on_second, timeout=60)
    first.stop()
    restarted = spawn("alice", args)
    with pytest.raises(PermissionDeniedError, match="refused the access token"):
        torch.tensor([1.0]).send(connect(restarted, token=ALICE, id="alice-restarted"))
    assert torch.equal((torch.tensor([2.0]).send(connect(restarted, token=TOKEN, id="alice-restarted-2")) * 2).get(), torch.tensor([4.0]))


def test_console_revoke_is_csrf_guarded_and_closes_the_session(serve):
    """The console's Sessions page offers to revoke each user but the admin; the action needs the CSRF token (a
    forged post changes nothing), then revokes alice: her connection is closed and her token refused."""
    testclient = pytest.importorskip("starlette.testclient")
    from veil.governance.console.app import build_app

    server = serve()
    end_session = server.end_session

    def slow_end(session):  # (wide enough that a redirect not waiting for the closes sees alice's session listed)
        time.sleep(0.3)
        return end_session(session)

    server.end_session = slow_end
    conn = BlockingConnection(f"ws://127.0.0.1:{server.bound_port}", handshake_headers(ALICE))
    assert _wait(lambda: _sessions_of(server, "alice"))
    web = testclient.TestClient(build_app(server, ["testserver"]), follow_redirects=False)
    login = web.get("/login").text.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
    assert web.post("/login", data={"login_csrf": login, "token": ADMIN}).status_code == 303
    page = web.get("/sessions").text
    assert page.count('action="/users/revoke"') == 1
    assert "<option>alice</option>" in page and "<option>other</option>" in page and "<option>owner</option>" not in page
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert web.post("/users/revoke", data={"csrf": "forged", "name": "alice"}).status_code == 403
    assert "alice" not in server.tokens.revoked
    done = web.post("/users/revoke", data={"csrf": csrf, "name": "alice"})
    assert done.status_code == 303 and done.headers["location"] == "/sessions?revoked=alice"
    assert not _sessions_of(server, "alice")  # (the redirect waited for the closes: the page lists none of hers)
    assert "alice revoked" in web.get(done.headers["location"]).text
    assert _handshake_status(server, ALICE)[0] == 401
    assert "cannot be revoked" in web.post("/users/revoke", data={"csrf": csrf, "name": "owner"}).text
    conn.close()


def test_an_owner_disconnect_has_ended_the_session_when_it_returns(serve, client):
    """``disconnect`` (the console's button) returns only after the session's read loop ended it: the page it
    redirects to must no longer list it (CI at 30e4dab: it still did, and showed no confirmation). Its
    objects are freed, its next request fails, and the other session keeps computing."""
    server = serve()
    end_session = server.end_session

    def slow_end(session):  # the race CI lost, made wide: the loop's finally runs after close() returned
        time.sleep(0.3)
        return end_session(session)

    server.end_session = slow_end
    alice, other = client(server, ALICE), client(server, OTHER)
    torch.tensor([1.0, 2.0]).send(alice)
    y = torch.tensor([3.0, 4.0]).send(other)
    (session,) = _sessions_of(server, "alice")
    held = [oid for oid, e in server.monitor.owner_entries() if e.created_by == session.id]
    assert held
    for _ in range(2):
        assert server.disconnect(session.id, "owner")
        assert session.id not in server.sessions
        assert not {oid for oid, _ in server.monitor.owner_entries()} & set(held)
        alice.close()
        alice = client(server, ALICE)
        torch.tensor([1.0, 2.0]).send(alice)
        (session,) = _sessions_of(server, "alice")
        held = [oid for oid, e in server.monitor.owner_entries() if e.created_by == session.id]
    assert not server.disconnect("session-no-such", "owner")
    assert torch.equal((y + 1).get(), torch.tensor([4.0, 5.0]))
