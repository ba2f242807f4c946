"""Red team, third pass on the owner governance DB (workers/database.py, the owner DB, the budget ledger, issued
client names, the console's connection slots).

Attacks, each asserting what must hold:

- a COMMIT whose connection was lost, on a server that is really gone: looking its outcome up (up to ~10 s)
  held the database's lock, so every other charge of the worker stalled behind it. Must hold: other
  charges go on while the lookup runs; the lookup still reports the outcome (here: unknown) and a repeat of
  the same request id is charged at most once;
- a closed owner database or ledger: its reader connection stayed set (a closed connection was used after),
  a reader asked for after the close was opened afresh and never closed, and on PostgreSQL the closed main
  connection reconnected silently. Must hold: close() is final for OwnerDB and BudgetLedger alike, on both
  engines: every later read or write is one clear line, and no connection is opened;
- issued client names that differ only in case ("client/Alice" and "client/alice"): two principals that read
  alike in the audit log, the console and ``veil users``. Must hold: refused at issue time in one line (a
  holder name is case-folded, NFKC form), and a token of such a name (made before) is refused at the
  handshake like an unknown token;
- off loopback, a reconnect loop spread over several sources (/24s) pushed out the connection of an owner who
  had logged in before from her address but whose session has ended. Must hold: a connection from a source
  where the owner's session was seen is replaced only after every other source's.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

import veil as sy

from veil.dp.budget import BudgetLedger
from veil.workers.database import CommitOutcomeUnknownError, OwnerStateUnavailableError

from tests.scale import conftest as scale_fixtures

postgres_server, pg_url = scale_fixtures.postgres_server, scale_fixtures.pg_url  # fixtures: a real PostgreSQL

ISSUER_SECRET = "redteam-govdb-third-issuer-secret"


# --------------------------------------------------------------------------- a lost COMMIT's lookup


class _CommitAnsweredThenLost:
    """The ledger's PostgreSQL connection: its next COMMIT runs on the server, then the answer is lost."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn, self.armed = conn, True

    def execute(self, sql, *args, **kwargs):
        if self.armed and str(sql).strip().upper() == "COMMIT":
            self.armed = False
            self._conn.execute(sql, *args, **kwargs)
            raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
        return self._conn.execute(sql, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def test_a_lost_commits_lookup_does_not_hold_up_the_workers_other_charges(pg_url, monkeypatch):
    """Alice's charge loses its COMMIT's answer and the server cannot be reached for the lookup (its try to
    connect hangs, as to a host that is gone, until Bob's charge is done: up to 120 s). Bob's charge comes in
    meanwhile. Must hold: Bob's charge is done while the lookup still hangs (one waiting for it is done only
    after it, however loaded the machine); Alice's is reported unknown (one line) and her repeat is refused as
    already charged: charged once in all."""
    ledger = BudgetLedger(pg_url)
    ledger.set_budget("alice", 10.0, 1e-5)
    ledger.set_budget("bob", 10.0, 1e-5)
    real_connect, looking_up, outcome = psycopg.connect, threading.Event(), {}
    bob_done, lookup_let_go = threading.Event(), []

    def unreachable_for_the_lookup(*args, **kwargs):
        if threading.current_thread().name == "alice-charge":  # (only the lost commit's lookup)
            looking_up.set()
            lookup_let_go.append(bob_done.wait(120))  # (hangs until Bob's charge is done)
            raise psycopg.OperationalError("connection timeout expired")
        return real_connect(*args, **kwargs)

    def charge_alice():
        try:
            outcome["left"] = ledger.charge("alice", 1.0, 0.0, "query", request_id="third-lost-1")
        except Exception as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    try:
        ledger._db._conn = _CommitAnsweredThenLost(ledger._db._conn)
        monkeypatch.setattr(psycopg, "connect", unreachable_for_the_lookup)
        alice = threading.Thread(target=charge_alice, name="alice-charge")
        alice.start()
        assert looking_up.wait(10), "the lost commit was never looked up"
        started = time.monotonic()
        assert ledger.charge("bob", 1.0, 0.0, "query", request_id="third-bob-1") == pytest.approx((9.0, 1e-5))
        waited = time.monotonic() - started
        bob_done.set()
        alice.join(120)
        assert lookup_let_go and lookup_let_go[0], f"Bob's charge waited {waited:.1f} s for Alice's commit lookup"
        assert isinstance(outcome.get("error"), CommitOutcomeUnknownError), outcome
        assert "\n" not in str(outcome["error"])
        with pytest.raises(Exception, match="already charged"):
            ledger.charge("alice", 1.0, 0.0, "query", request_id="third-lost-1")
        assert ledger.spent("alice") == pytest.approx((1.0, 0.0))
        assert ledger.spent("bob") == pytest.approx((1.0, 0.0))
    finally:
        ledger.close()


# --------------------------------------------------------------------------- a closed database stays closed


def _owner_db(location: str):
    from veil.workers.persistence import OwnerDB

    return OwnerDB(location)


def _ledger(location: str) -> BudgetLedger:
    ledger = BudgetLedger(location)
    ledger.set_budget("alice", 10.0, 1e-5)
    return ledger


def _reads(store) -> list:
    """A main-connection read and a write of ``store`` (OwnerDB or BudgetLedger)."""
    if isinstance(store, BudgetLedger):
        return [lambda: store.spent("alice"), lambda: store.set_budget("bob", 1.0, 0.0)]
    return [lambda: store.kv_get("ns", "k"), lambda: store.kv_put("ns", "k", b"v")]


def _refused_in_one_line(call) -> None:
    with pytest.raises(OwnerStateUnavailableError) as caught:
        call()
    text = str(caught.value)
    assert "closed" in text and "\n" not in text, text


@pytest.mark.parametrize("opened", [_owner_db, _ledger], ids=["owner-db", "ledger"])
@pytest.mark.parametrize("read_before", [True, False], ids=["reader-used", "reader-unused"])
def test_a_closed_sqlite_store_and_its_reader_refuse_every_later_use_in_one_line(tmp_path, opened, read_before):
    """Close the owner DB or the ledger, with its reader opened before or not. Must hold: the reader handed
    out before, a reader asked for after, and the main connection all refuse in one line naming the close; no
    reader connection is opened after the close."""
    store = opened(str(tmp_path / "state.sqlite3"))
    earlier = store.reader() if read_before else None
    if earlier is not None:
        assert earlier.execute("SELECT 1").fetchone()[0] == 1
    store.close()
    _refused_in_one_line(store.reader)
    assert store._reader._conn is None, "a reader connection stayed set (or was opened) after the close"
    if earlier is not None:
        _refused_in_one_line(lambda: earlier.execute("SELECT 1"))
    for call in _reads(store):
        _refused_in_one_line(call)
    store.close()  # (closing again is harmless)


def _backends(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as admin:
        name = admin.execute("SELECT current_database()").fetchone()[0]
        # client sessions only: an autovacuum worker on the fresh database is listed with its name too (CI, busy)
        return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                             "pg_backend_pid() AND backend_type = 'client backend'", (name,)).fetchone()[0]


@pytest.mark.parametrize("opened", [_owner_db, _ledger], ids=["owner-db", "ledger"])
def test_a_closed_postgresql_store_does_not_reconnect(pg_url, opened):
    """On PostgreSQL the main connection reconnected when used after close() (a connection nobody closes
    again), and the reader did too. Must hold: every use after the close is refused in one line and the
    database sees no session of the closed store."""
    store = opened(pg_url)
    earlier = store.reader()
    assert earlier.execute("SELECT 1").fetchone()[0] == 1
    store.close()
    _refused_in_one_line(lambda: earlier.execute("SELECT 1"))
    _refused_in_one_line(store.reader)
    for call in _reads(store):
        _refused_in_one_line(call)
    deadline = time.monotonic() + 5
    while _backends(pg_url) and time.monotonic() < deadline:  # (a closed session leaves the view shortly)
        time.sleep(0.05)
    assert _backends(pg_url) == 0, f"the closed store still holds (or opened) a session: {_sessions(pg_url)}"


def _sessions(url: str) -> list:
    """What the database's client sessions are doing (the failure message: a flaky one, once in ~4 full runs on a
    busy 2-core box, left no trace of which connection stayed)."""
    with psycopg.connect(url, autocommit=True) as admin:
        name = admin.execute("SELECT current_database()").fetchone()[0]
        return admin.execute("SELECT application_name, state, left(query, 80), backend_start, state_change FROM "
                             "pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = "
                             "'client backend'", (name,)).fetchall()


# --------------------------------------------------------------------------- issued names that read alike


def test_issued_client_names_differing_only_in_case_or_form_are_refused_at_issue_time():
    """The owner issues ``alice`` and then ``Alice``: two principals, ``client/alice`` and ``client/Alice``,
    that read alike in the audit log and the console. Issuing keeps no table (a token is an HMAC), so the
    only name an issue can stand for is the folded one. Must hold: a holder name not in its case-folded NFKC
    form is refused in one line at issue time (``client_tokens.issue`` and ``Cluster.issue_client_token``);
    a token of such a name made before is refused at the handshake like an unknown one, and is not a user
    the owner can name; the folded name is issued and accepted."""
    from veil.serving.errors import ServingError
    from veil.serving.cluster import Cluster, NetworkWorker
    from veil.workers import client_tokens

    for alike in ("Alice", "ALICE", "\uff41lice"):
        with pytest.raises(ValueError) as caught:
            client_tokens.issue(ISSUER_SECRET, "client", alike)
        assert "\n" not in str(caught.value)
    cluster = Cluster(*(NetworkWorker(f"127.0.0.1:{7100 + i}") for i in range(3)), auto_managed=True)
    with pytest.raises(ServingError) as caught:
        cluster.issue_client_token("Alice")
    assert "\n" not in str(caught.value) and "case" in str(caught.value)
    tokens = sy.TokenTable()
    tokens.add_issuer(ISSUER_SECRET, "client")
    alice = client_tokens.issue(ISSUER_SECRET, "client", "alice")
    assert tokens.lookup(alice).name == "client/alice"
    made_before = f"vc1.client.Alice.{client_tokens._mac(ISSUER_SECRET.encode(), 'client', 'Alice')}"
    assert tokens.lookup(made_before) is None
    assert tokens.issued_principal("client/Alice") is None
    assert tokens.issued_principal("client/alice").name == "client/alice"
    assert [p.name for p in tokens.principals()] == ["client/alice"]


# --------------------------------------------------------------------------- the console's slots, off loopback


class _Transport:
    def is_closing(self) -> bool:
        return False


def _connection(source: str, opened_at: float, owner_sources: dict):
    from veil.governance.console import connections

    c = connections.BoundedH11Protocol.__new__(connections.BoundedH11Protocol)
    c.transport, c.cycle, c._mark = _Transport(), None, connections._RequestMark()
    c._source, c._opened_at, c._waiting_since = source, opened_at, opened_at
    c._carried_session_host = c._carried_owner = False
    c.server_state = type("ServerState", (), {})()
    c.server_state.veil_owner_sources = owner_sources
    return c


def test_off_loopback_a_loop_over_many_sources_does_not_push_out_an_owner_who_logged_in_from_there():
    """Off loopback (https, no secret host name), the owner's session ended (logged out, expired) and her
    browser holds 6 connections to the log-in page from her /24, while a reconnect loop spread over 6 other
    /24s holds 26: her source held the most, so it was replaced first. Must hold: her source, where an owner
    session was seen, is replaced only after every other source's connections; among the others the
    per-source order stands (the largest source first, then the oldest)."""
    from veil.governance.console import connections

    seen = {"198.51.100.0/24": 1.0}
    owner = [_connection("198.51.100.0/24", 1.0 + i / 10, seen) for i in range(6)]
    looping = [_connection(f"203.0.{113 + i % 6}.0/24", 2.0 + i, seen) for i in range(26)]
    victim = connections.replaced_first([*owner, *looping])
    assert victim in looping, "the owner's source was replaced before the loop's"
    assert victim is looping[0]  # (the loop's largest sources, 203.0.113/114: the oldest of them)
    assert connections.replaced_first(owner) is owner[0]  # (among her own: the oldest)


def test_owner_sources_are_remembered_off_loopback_only_and_in_bounded_number():
    """What feeds that order: a connection that carried an owner's request records its source on the server.
    Must hold: never loopback (every local user shares it: after the owner's log-in, a local user's loop
    would rank with her secret-name connections and push out her idle log-in page); at most
    ``MAX_OWNER_SOURCES`` sources, the least recent dropped."""
    from veil.governance.console import connections

    seen: dict = {}
    clock = type("Loop", (), {"time": staticmethod(time.monotonic)})()
    for source in ("loopback", *(f"198.51.{i}.0/24" for i in range(connections.MAX_OWNER_SOURCES + 3))):
        c = _connection(source, 1.0, seen)
        c.loop = clock
        c._note_owner_source()
    assert "loopback" not in seen and len(seen) == connections.MAX_OWNER_SOURCES
    assert "198.51.0.0/24" not in seen and f"198.51.{connections.MAX_OWNER_SOURCES + 2}.0/24" in seen
    named = _connection("loopback", 1.0, seen)
    named._carried_session_host = True  # (the owner's log-in page on the secret name, idle longest)
    local_loop = [_connection("loopback", 2.0 + i, seen) for i in range(31)]
    assert connections.replaced_first([named, *local_loop]) is local_loop[0]
