"""Red team, second pass on the governance-DB third fixes (171467d, bf7b5cc): a lost COMMIT looked up after the
database lock is let go, close() final, issued holder names in lower case, the console's owner sources.

Attacks, each asserting what must hold:

- the lookup no longer holds the database's lock, but a worker's DP releases still ran under one lock of the
  whole worker (``WorkerDP.lock``) held through the charge: Alice's release whose COMMIT answer was lost held
  every other user's release on that worker for the whole lookup (~10 s against a server that is gone), the
  stall the fix was for. Must hold: Bob's release goes on meanwhile; Alice's is reported unknown, and her
  repeat of the same request id is refused: charged once. On a network worker the release also kept the
  worker's turn (one command at a time) through its charge: the same stall for every session's command.
  Must hold there too: Bob's release is answered while Alice's lookup runs, and two sessions of one user
  releasing at once are both answered (her lock is waited for outside the turn: a wait inside it deadlocked);
- many lookups at once (a proxy that drops every COMMIT's answer, then stalls what it lets through): each
  stalled lookup is a statement the watchdog checks, and it probed the server once per stalled statement,
  one after another (5 s each). The main connection's stalled statement, which holds the lock of every
  charge and audit row, waited behind all of them. Must hold: a server is probed once per watchdog round,
  however many of its statements stalled, and every stalled one is cut in that round;
- regression guards of what held: a look-alike holder name (fullwidth, the Kelvin sign, the long s, dotless
  i, a Cyrillic letter) is refused at issue time and at the handshake; a use of a closed database says so in
  one line without the database's URL or password; a non-owner's requests (a failed log-in, a page asked for
  without a session) never add their source to the owner sources the console remembers, and the owner's own
  source, refreshed by her requests, is the last of them to go.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
import torch

import veil as sy

from tests.scale import conftest as scale_fixtures
from tests.security.test_redteam_govdb_third import _CommitAnsweredThenLost
from worker_processes import serve_in_thread, stop_served

postgres_server, pg_url = scale_fixtures.postgres_server, scale_fixtures.pg_url  # fixtures: a real PostgreSQL

ISSUER_SECRET = "redteam-govdb-third-second-issuer"


# --------------------------------------------------------------------------- a lost COMMIT under the DP lock


def test_a_lost_commit_on_one_users_dp_release_does_not_hold_up_another_users_release(hook, pg_url, monkeypatch):
    """Alice's DP count loses its COMMIT's answer and the lookup cannot reach the server (its connect hangs until
    Bob's release is answered, up to 120 s). Bob asks for a DP count on the same worker meanwhile. Must hold:
    Bob's release is answered while the lookup still hangs (one waiting for it is answered only after it,
    whatever the machine's load); Alice's is reported unknown in one line, her repeat is refused as already
    charged, and each is charged exactly once."""
    from veil.dp.worker_functions import _query
    from veil.dp.worker_owner import enable_dp
    from veil.workers.database import CommitOutcomeUnknownError

    w = sy.VirtualWorker(hook, id=f"govdb3-2-dp-{time.monotonic_ns()}")
    settings = enable_dp(w, budgets={"alice": (10.0, 1e-5), "bob": (10.0, 1e-5)}, ledger_path=pg_url)
    ledger, x = settings.ledger, torch.arange(20.0)
    real_connect, looking_up, outcome = psycopg.connect, threading.Event(), {}
    bob_answered, lookup_let_go = threading.Event(), []

    def unreachable_for_the_lookup(*args, **kwargs):
        if threading.current_thread().name == "alice-release":  # (only the lost commit's lookup)
            looking_up.set()
            lookup_let_go.append(bob_answered.wait(120))  # (hangs until Bob's release was answered)
            raise psycopg.OperationalError("connection timeout expired")
        return real_connect(*args, **kwargs)

    def release(user: str, request_id: str):
        w._request.sender = user  # (the requester of this thread's request)
        try:
            return _query(w, x, "count", 1.0, request_id=request_id)
        finally:
            w._request.sender = None

    def alice_release():
        try:
            outcome["answer"] = release("alice", "govdb3-2-alice-1")
        except Exception as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    try:
        ledger._db._conn = _CommitAnsweredThenLost(ledger._db._conn)
        monkeypatch.setattr(psycopg, "connect", unreachable_for_the_lookup)
        alice = threading.Thread(target=alice_release, name="alice-release")
        alice.start()
        assert looking_up.wait(60), "the lost commit was never looked up"
        started = time.monotonic()
        value, cost = release("bob", "govdb3-2-bob-1")
        waited = time.monotonic() - started
        bob_answered.set()
        alice.join(120)
        assert lookup_let_go and lookup_let_go[0], f"Bob's release waited {waited:.1f} s for Alice's commit lookup"
        assert cost[0].item() == pytest.approx(1.0)
        assert isinstance(outcome.get("error"), CommitOutcomeUnknownError), outcome
        assert "\n" not in str(outcome["error"])
        with pytest.raises(Exception, match="already charged"):
            release("alice", "govdb3-2-alice-1")
        assert ledger.spent("alice") == pytest.approx((1.0, 0.0))
        assert ledger.spent("bob") == pytest.approx((1.0, 0.0))
    finally:
        ledger.close()


def test_a_users_releases_still_run_one_at_a_time(hook):
    """What the worker's DP lock was for stays: one user's releases do not run at once (her accountant state
    is read, stepped and written back), while another user's are not held up by them."""
    from veil.dp.worker_owner import enable_dp

    w = sy.VirtualWorker(hook, id=f"govdb3-2-dp-serial-{time.monotonic_ns()}")
    settings = enable_dp(w, budgets={"alice": (10.0, 1e-5), "bob": (10.0, 1e-5)})
    held, let_go, order = threading.Event(), threading.Event(), []

    def hold_alice():  # (until the test lets it go, up to 120 s)
        with settings.user_lock("alice"):
            held.set()
            let_go.wait(120)
            order.append("alice's first release out")

    holder = threading.Thread(target=hold_alice)
    holder.start()
    assert held.wait(60)
    with settings.user_lock("bob"):  # (entered while alice's lock is still held: no wait for it)
        bob_in_while_held = not let_go.is_set() and holder.is_alive()

    def second_alice():
        with settings.user_lock("alice"):
            order.append("alice's second release in")

    second = threading.Thread(target=second_alice)
    second.start()
    deadline = time.monotonic() + 60  # (her second release is asking for her lock: then the first lets go)
    while settings._user_locks.get("alice", [None, 0])[1] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    let_go.set()
    holder.join(60)
    second.join(60)
    assert bob_in_while_held, "bob's release waited for alice's"
    assert order == ["alice's first release out", "alice's second release in"], order
    assert not settings._user_locks, "a lock of a user with no release in flight was kept"
    settings.ledger.close()


def _lookup_connect_hangs(monkeypatch, looking_up: threading.Event, let_go: threading.Event, let: list) -> None:
    """psycopg.connect of a commit lookup (an int connect_timeout: the worker's own connections give a str)
    hangs (until ``let_go``) and fails, as to a server that is gone; every other connect goes through."""
    real_connect = psycopg.connect

    def connect(*args, **kwargs):
        if isinstance(kwargs.get("connect_timeout"), int) and not looking_up.is_set():
            looking_up.set()
            let.append(let_go.wait(120))  # (hangs until ``let_go``, up to 120 s: whether it came is in ``let``)
            raise psycopg.OperationalError("connection timeout expired")
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(psycopg, "connect", connect)


class _NetworkDP:
    """An in-process network worker with DP on (budgets for alice and bob), and client workers by token."""

    TOKENS = {"alice": "govdb3-2-alice-token", "bob": "govdb3-2-bob-token"}

    def __init__(self, hook, tmp_path, ledger_path) -> None:
        from veil.dp.worker_owner import enable_dp
        from veil.workers.persistence import OwnerDB
        from veil.workers.websocket_server import WebsocketServerWorker

        tokens = sy.TokenTable()
        for user, token in self.TOKENS.items():
            tokens.add(token, user)
        self.worker = WebsocketServerWorker(hook, id=f"govdb3-2-net-{time.monotonic_ns()}", port=0, tokens=tokens,
                                            db=OwnerDB(str(tmp_path / OwnerDB.FILENAME)))
        self.settings = enable_dp(self.worker, budgets={"alice": (10.0, 1e-5), "bob": (10.0, 1e-5)},
                                  ledger_path=ledger_path)
        self.serving = serve_in_thread(self.worker)
        self.clients: list = []

    def client(self, user: str):
        from veil.workers.registry import HookContext

        c = sy.WebsocketClientWorker(HookContext(), id=self.worker.id, host="127.0.0.1",
                                     port=self.worker.bound_port, token=self.TOKENS[user])
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        stop_served(self.worker, self.serving)
        self.settings.ledger.close()


def test_on_a_network_worker_a_lost_commits_lookup_does_not_hold_up_another_users_release(hook, pg_url, tmp_path,
                                                                                          monkeypatch):
    """The same attack over the wire: Alice's and Bob's DP counts on one network worker, Alice's COMMIT answer
    lost and its lookup hanging. Her command held the worker's turn through its charge. Must hold: Bob's
    release is answered while the lookup still hangs, and Alice's is refused (outcome unknown), charged once."""
    net = _NetworkDP(hook, tmp_path, pg_url)
    settings, looking_up, outcome = net.settings, threading.Event(), {}
    try:
        alice_x, bob_x = torch.arange(20.0).send(net.client("alice")), torch.arange(20.0).send(net.client("bob"))
        settings.ledger._db._conn = _CommitAnsweredThenLost(settings.ledger._db._conn)
        bob_answered, lookup_let_go = threading.Event(), []
        _lookup_connect_hangs(monkeypatch, looking_up, bob_answered, lookup_let_go)

        def alice_release():
            try:
                outcome["answer"] = sy.dp.remote_query(alice_x, "count", epsilon=1.0)
            except Exception as e:  # noqa: BLE001 - reported below
                outcome["error"] = e

        alice = threading.Thread(target=alice_release)
        alice.start()
        assert looking_up.wait(60), "the lost commit was never looked up"
        started = time.monotonic()
        assert sy.dp.remote_query(bob_x, "count", epsilon=1.0).epsilon == pytest.approx(1.0)
        waited = time.monotonic() - started
        bob_answered.set()
        alice.join(120)
        # (answered while the lookup's connect still hung: one waiting for the lookup is answered only after it)
        assert lookup_let_go and lookup_let_go[0], f"Bob's release waited {waited:.1f} s for Alice's commit lookup"
        assert "error" in outcome and "unknown" in str(outcome["error"]), outcome
        assert settings.ledger.spent("alice") == pytest.approx((1.0, 0.0))
        assert settings.ledger.spent("bob") == pytest.approx((1.0, 0.0))
    finally:
        net.close()


def test_two_sessions_of_one_user_releasing_at_once_on_a_network_worker_are_both_answered(hook, tmp_path,
                                                                                         monkeypatch):
    """Alice's first release charges outside the worker's turn (slowly: 1 s); her second session's release
    takes the turn meanwhile and waits for her lock. Waiting for it while holding the turn, it would keep the
    first from ever taking the turn back. Must hold: both are answered, each charged."""
    net = _NetworkDP(hook, tmp_path, str(tmp_path / "ledger.sqlite3"))
    ledger, charging, results = net.settings.ledger, threading.Event(), []
    real_charge = ledger.charge

    def slow_first_charge(*args, **kwargs):
        if not charging.is_set():
            charging.set()
            time.sleep(1.0)
        return real_charge(*args, **kwargs)

    monkeypatch.setattr(ledger, "charge", slow_first_charge)
    try:
        xs = [torch.arange(20.0).send(net.client("alice")) for _ in range(2)]

        def release(x):
            try:
                results.append(sy.dp.remote_query(x, "count", epsilon=1.0).epsilon)
            except Exception as e:  # noqa: BLE001 - reported below
                results.append(e)

        first = threading.Thread(target=release, args=(xs[0],), daemon=True)
        first.start()
        assert charging.wait(10)
        second = threading.Thread(target=release, args=(xs[1],), daemon=True)
        second.start()
        first.join(20)
        second.join(20)
        assert results == [pytest.approx(1.0)] * 2, results
        assert ledger.spent("alice") == pytest.approx((2.0, 0.0))
    finally:
        net.close()


# --------------------------------------------------------------------------- many stalled lookups at once


class _Stalled:
    """One statement the watchdog sees stalled (a commit lookup's, or the main connection's): its liveness
    check is due, its hard limit far off, its connection has no socket left to shut."""

    def __init__(self, location: str) -> None:
        self.location, self._hard_s = location, 1e9
        self._busy = [type("Conn", (), {"pgconn": None})(), time.monotonic(), time.monotonic() - 1]


def test_a_server_is_probed_once_per_round_however_many_of_its_statements_stalled(monkeypatch):
    """Nine statements on one server stall at once (eight commit lookups beside the main connection's). Each
    liveness probe of a server that is gone takes its whole timeout (here 0.5 s). Must hold: the server is
    probed once, and all nine are cut in that round (not one probe after another: 4.5 s here, 45 s with the
    real 5 s probe, while the main connection's statement held every charge's lock)."""
    from veil.workers import database

    location = "postgresql://veil@192.0.2.1:5432/gone"
    probes = []

    def no_answer(where: str, timeout: int) -> bool:
        probes.append(where)
        time.sleep(0.5)
        return False

    monkeypatch.setattr(database, "_server_answers", no_answer)
    stalled = [_Stalled(location) for _ in range(9)]
    for s in stalled:
        database._WATCHDOG.watch(s)
    started = time.monotonic()
    while any(s._busy is not None for s in stalled) and time.monotonic() - started < 10:
        time.sleep(0.05)
    took = time.monotonic() - started
    assert all(s._busy is None for s in stalled), "a stalled statement was never cut"
    assert probes.count(location) == 1, f"the server was probed {probes.count(location)} times"
    assert took < 2.5, f"cutting the stalled statements took {took:.1f} s"


# --------------------------------------------------------------------------- guards: what held


@pytest.mark.parametrize("alike", ["\uff41lice", "\u212aate", "\u017fam", "al\u0131ce", "\u0430lice", "ALICE"],
                         ids=["fullwidth", "kelvin", "long-s", "dotless-i", "cyrillic", "capitals"])
def test_look_alike_holder_names_are_refused_at_issue_and_at_the_handshake(alike):
    """A holder name that only reads like a lower-case ASCII name is refused at issue time in one line, a token
    of it (made by hand with the issuer's secret) is refused at the handshake, and it is no user the owner
    could name."""
    from veil.workers import client_tokens

    with pytest.raises(ValueError) as caught:
        client_tokens.issue(ISSUER_SECRET, "client", alike)
    assert "\n" not in str(caught.value)
    tokens = sy.TokenTable()
    tokens.add_issuer(ISSUER_SECRET, "client")
    forged = f"vc1.client.{alike}.{client_tokens._mac(ISSUER_SECRET.encode(), 'client', alike)}"
    assert tokens.lookup(forged) is None
    assert tokens.issued_principal(f"client/{alike}") is None
    assert tokens.lookup(client_tokens.issue(ISSUER_SECRET, "client", "alice")).name == "client/alice"


def test_a_closed_postgresql_database_says_so_without_its_url_or_password(pg_url):
    """The closed database's refusal is what a client may see (an error of its request): one line that names
    the close, never the URL, its user or its password."""
    from veil.workers.database import Database, DatabaseClosedError

    db = Database(pg_url)
    db.close()
    with pytest.raises(DatabaseClosedError) as caught:
        db.execute("SELECT 1")
    text = str(caught.value)
    assert "closed" in text and "\n" not in text
    assert "postgresql" not in text and "@" not in text and pg_url.rsplit("/", 1)[-1] not in text


class _Loop:
    time = staticmethod(time.monotonic)

    @staticmethod
    def call_later(seconds, callback):
        return type("Handle", (), {"cancel": lambda self: None})()


def _connection(source: str, seen: dict):
    from veil.governance.console import connections

    c = connections.BoundedH11Protocol.__new__(connections.BoundedH11Protocol)
    c._mark, c._source, c._timed_cycle, c._deadline = connections._RequestMark(), source, None, None
    c._carried_session_host = c._carried_owner = False
    c.server_state = type("ServerState", (), {})()
    c.server_state.veil_owner_sources = seen
    c.loop = _Loop()
    return c


def _next_request(c) -> None:
    """A new request head arrived on ``c`` (its previous request's mark is taken into account now)."""
    c.cycle = type("Cycle", (), {"scope": {}, "response_complete": False})()
    assert c._time_new_request()


def test_only_the_owners_requests_add_a_source_and_hers_is_the_last_to_go():
    """Requests that were not the owner's (no mark: failed log-ins, pages asked for without a session), from
    many sources, add none of them; the owner's requests from 17 sources keep the 16 latest, her current
    one among them."""
    from veil.governance.console import connections

    seen: dict = {}
    for i in range(40):
        stranger = _connection(f"100.64.{i}.0/24", seen)
        _next_request(stranger)
        _next_request(stranger)  # (the first request ended unmarked)
    assert seen == {}
    current = _connection("203.0.113.0/24", seen)
    _next_request(current)
    current._mark.owner = True  # (the app found her session)
    _next_request(current)
    for i in range(connections.MAX_OWNER_SOURCES - 1):
        roaming = _connection(f"198.51.{i}.0/24", seen)
        _next_request(roaming)
        roaming._mark.owner = True
        _next_request(roaming)
    current._mark.owner = True  # (she goes on from where she is now)
    _next_request(current)
    newest = _connection("198.51.200.0/24", seen)
    _next_request(newest)
    newest._mark.owner = True
    _next_request(newest)
    assert len(seen) == connections.MAX_OWNER_SOURCES
    assert "203.0.113.0/24" in seen and "198.51.0.0/24" not in seen and "198.51.200.0/24" in seen
