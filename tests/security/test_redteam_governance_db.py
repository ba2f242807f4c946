"""Red team: the owner console and the governance state store (PostgreSQL / SQLite back ends).

Attacks, each asserting what must hold:

- a COMMIT on PostgreSQL whose connection is lost: reported for what it is (recorded, rolled back, or unknown),
  never "refused" when it was recorded, and a repeat is charged at most once;
- the console's Budgets page over a big ledger: it never holds the ledger's lock, so charges go on meanwhile;
- refused connects from many addresses: the aggregate refusal log stays bounded (per source, then one row);
- revocation by name: principals whose names are alike are refused at configuration, exact names stay apart;
- a client reconnecting in a loop at the console: it cannot evict the connection of an owner who has not
  logged in yet (on the secret host name), nor one from another source.
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
from console_slots import response_head as _response_head, started_console

postgres_server, pg_url = scale_fixtures.postgres_server, scale_fixtures.pg_url  # fixtures: a real PostgreSQL


# --------------------------------------------------------------------------- PostgreSQL: a COMMIT lost


class _LosingCommit:
    """The ledger's PostgreSQL connection, whose next COMMIT loses its connection: after the server ran it
    (``ran=True``: the answer is what was lost) or before it reached the server (its backend is ended)."""

    def __init__(self, conn: psycopg.Connection, url: str, ran: bool) -> None:
        self._conn, self._url, self._ran, self.armed = conn, url, ran, True

    def execute(self, sql, *args, **kwargs):
        if self.armed and str(sql).strip().upper() == "COMMIT":
            self.armed = False
            if self._ran:
                self._conn.execute(sql, *args, **kwargs)
            else:
                with psycopg.connect(self._url, autocommit=True) as other:
                    other.execute("SELECT pg_terminate_backend(%s)", (self._conn.pgconn.backend_pid,))
            raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
        return self._conn.execute(sql, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def _ledger(url: str) -> BudgetLedger:
    ledger = BudgetLedger(url)
    ledger.set_budget("alice", 10.0, 1e-5)
    return ledger


def test_a_commit_recorded_before_its_connection_was_lost_is_not_reported_refused(pg_url):
    """The server recorded a DP charge's COMMIT, then the connection dropped before the answer came back.
    Must hold: the charge is not reported as refused ("try again" would invite a second charge under a new
    id, and the owner's books would say nothing was spent); it is recorded once, the ledger keeps working."""
    ledger = _ledger(pg_url)
    try:
        ledger._db._conn = _LosingCommit(ledger._db._conn, pg_url, ran=True)
        try:
            left = ledger.charge("alice", 1.0, 0.0, "query", request_id="request-lost-1")
        except OwnerStateUnavailableError as e:
            pytest.fail(f"a recorded charge was reported as: {e}")
        assert left == pytest.approx((9.0, 1e-5))
        assert ledger.spent("alice") == pytest.approx((1.0, 0.0))
        assert ledger.charge("alice", 2.0, 0.0, "query", request_id="request-lost-2") == pytest.approx((7.0, 1e-5))
    finally:
        ledger.close()


def test_a_commit_lost_before_the_server_ran_it_is_reported_not_recorded_and_a_retry_charges_once(pg_url):
    """The connection dropped before the COMMIT reached the server (the server rolled the charge back).
    Must hold: one line saying it was not recorded; nothing is spent; the retry with the same request id is
    charged once (it is no replay)."""
    ledger = _ledger(pg_url)
    try:
        ledger._db._conn = _LosingCommit(ledger._db._conn, pg_url, ran=False)
        with pytest.raises(OwnerStateUnavailableError) as caught:
            ledger.charge("alice", 1.0, 0.0, "query", request_id="request-lost-3")
        assert type(caught.value) is OwnerStateUnavailableError and "\n" not in str(caught.value)
        assert "not recorded" in str(caught.value), str(caught.value)
        assert ledger.spent("alice") == (0.0, 0.0)
        assert ledger.charge("alice", 1.0, 0.0, "query", request_id="request-lost-3") == pytest.approx((9.0, 1e-5))
    finally:
        ledger.close()


def test_a_commit_whose_outcome_cannot_be_looked_up_is_reported_unknown_and_a_repeat_is_charged_once(
        pg_url, monkeypatch):
    """The connection dropped during COMMIT and the server cannot be asked what became of it. Must hold: the
    error says the outcome is unknown (not "refused"), in one line naming no host; the same request id
    repeated is charged at most once in all."""
    ledger = _ledger(pg_url)
    try:
        ledger._db._conn = _LosingCommit(ledger._db._conn, pg_url, ran=True)
        real_connect = psycopg.connect
        monkeypatch.setattr(psycopg, "connect", lambda *a, **k: (_ for _ in ()).throw(
            psycopg.OperationalError("connection refused")))
        with pytest.raises(CommitOutcomeUnknownError) as caught:
            ledger.charge("alice", 1.0, 0.0, "query", request_id="request-lost-4")
        monkeypatch.setattr(psycopg, "connect", real_connect)
        text = str(caught.value)
        assert "unknown" in text and "refused" not in text and "\n" not in text and "127.0.0.1" not in text, text
        with pytest.raises(Exception, match="already charged"):
            ledger.charge("alice", 1.0, 0.0, "query", request_id="request-lost-4")
        assert ledger.spent("alice") == pytest.approx((1.0, 0.0))
    finally:
        ledger.close()


# --------------------------------------------------------------------------- the Budgets page and charges


def _written_while_a_slow_read_runs(monkeypatch, read, marker: str, write, waited: str):
    """Runs ``read()`` on a thread whose SQL naming ``marker`` stalls (as over a table of millions of rows)
    and ``write()`` meanwhile; fails with ``waited`` unless the write finishes within 3 s while the read is
    still stalled. Returns what the read returned once let go."""
    from veil.workers.database import Database

    out: list = []
    page = threading.Thread(target=lambda: out.append(read()))
    reading, go_on = threading.Event(), threading.Event()
    real_execute = Database.execute

    def slow_reads(self, sql, params=()):
        if threading.current_thread() is page and marker in sql:
            reading.set()
            go_on.wait(10)
        return real_execute(self, sql, params)

    monkeypatch.setattr(Database, "execute", slow_reads)
    page.start()
    try:
        assert reading.wait(10)
        written = threading.Thread(target=write)
        written.start()
        written.join(3)
        assert not written.is_alive(), waited
    finally:
        go_on.set()
        page.join(30)
    monkeypatch.setattr(Database, "execute", real_execute)
    return out[0]


def test_the_budgets_page_over_a_big_ledger_never_holds_up_a_charge(hook, tmp_path, monkeypatch):
    """The owner opens the Budgets page while a scientist's ledger holds many charges: the page's sums and
    buckets ran under the ledger's lock, the one every DP charge (so every release) of every user waits for.
    The read is made slow here (as on a ledger of millions of charges) and a charge is made meanwhile.
    Must hold: the charge completes while the page is still reading; the page then shows the right sums."""
    from veil.dp.worker_owner import enable_dp
    from veil.governance.console import views

    worker = sy.VirtualWorker(hook, id=f"rt-govdb-budgets-{time.monotonic_ns() % 10**6}")
    ledger = enable_dp(worker, budgets={"mallory": (100.0, 1e-5), "alice": (10.0, 1e-5)},
                       ledger_path=tmp_path / "ledger.sqlite3").ledger
    for i in range(310):  # more than the curve's points: the grouped query runs too
        ledger.charge("mallory", 0.01, 0.0, f"DP mean #{i}")
    shown = _written_while_a_slow_read_runs(  # (the grouped sums: a long GROUP BY pass on a big ledger)
        monkeypatch, lambda: views.budgets(worker), "charges", lambda: ledger.charge("alice", 1.0, 0.0, "DP count"),
        "a DP charge waited for the owner's Budgets page")
    rows = {r["user"]: r for r in shown}
    assert rows["mallory"]["spent_epsilon"] == pytest.approx(3.1)
    assert rows["mallory"]["spent_epsilon"] == pytest.approx(ledger.spent("mallory")[0])
    assert rows["mallory"]["points"][-1][1] == pytest.approx(3.1)
    assert ledger.spent("alice") == pytest.approx((1.0, 0.0))


def test_the_budgets_page_reads_on_a_connection_that_cannot_write(tmp_path):
    """The page's own connection (which a charge never waits for) is read-only: nothing the console runs
    there can change the ledger."""
    import sqlite3

    ledger = BudgetLedger(tmp_path / "ledger.sqlite3")
    ledger.set_budget("alice", 1.0, 0.0)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ledger.reader().execute('DELETE FROM budgets')
        assert ledger.remaining("alice") == (1.0, 0.0)
    finally:
        ledger.close()


# --------------------------------------------------------------------------- the refused-connects log


class _Rows:
    def __init__(self) -> None:
        self.rows: list[str] = []

    def audit(self, worker_id, action, principal, session, ids, outcome, detail) -> None:
        self.rows.append(detail)


@pytest.mark.parametrize("addresses", [
    [f"2001:db8:{i >> 16:x}:{i & 0xffff:x}::1" for i in range(5000)],  # a /64 each
    [f"127.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(5000)],  # every loopback address
], ids=["ipv6-prefixes", "loopback-addresses"])
def test_refused_connects_from_ever_new_addresses_keep_the_refusal_log_bounded(addresses):
    """An unauthenticated attacker refused from a new address every time (a /64 each, or every 127.0.0.0/8
    address of this host): the per-window counts were keyed by raw address, one entry and one summary row
    each. Must hold: the counts stay bounded, the summary rows too (one per source group, then one for
    the rest), and every refusal is still counted."""
    from veil.workers.websocket_auth import RefusalLog

    db = _Rows()
    log = RefusalLog(db, "w0", window=3600, burst=5)
    for address in addresses:
        log.refused(address, "unknown access token")
        assert len(log._suppressed) <= log.max_sources + 1
    log.flush()
    assert len(db.rows) <= log.burst + log.max_sources + 1, len(db.rows)
    counted = sum(int(row.split()[0]) for row in db.rows[log.burst:])
    assert counted == len(addresses) - log.burst
    if addresses[0].startswith("127."):
        assert db.rows[log.burst:] == [f"{len(addresses) - log.burst} more refused connects from loopback "
                                       "(aggregated over 3600 s)"]


# --------------------------------------------------------------------------- revocation by name

ISSUER_SECRET = "redteam-govdb-issuer-secret-0123456789"


class _Owner:
    """What revocation needs of a worker: its id, token table and owner database (no sessions, no peers)."""

    def __init__(self, tokens, db) -> None:
        self.id, self.tokens, self.db, self.peers = "w-govdb", tokens, db, {}


@pytest.mark.parametrize("first,second", [
    ("alice", "Alice"),            # case
    ("alice", "\uff41lice"),       # a fullwidth letter (NFKC folds it)
    ("alice", "alice\u200b"),      # a zero-width space
    ("bob", "bo\u0062\u202e"),     # a bidi override
    ("STRASSE", "stra\u00dfe"),    # casefold: sharp s
], ids=["case", "fullwidth", "zero-width", "bidi", "sharp-s"])
def test_principal_names_told_apart_only_by_case_or_form_are_refused(first, second):
    """Revocation, audit rows and ``allowed_users`` go by name: two principals whose names read the same
    (``veil users list`` and the console show them alike) let the owner revoke one where she meant the other.
    Must hold: the second such name is refused when the owner configures it (either order); exact repeats of
    one name (one principal's several tokens) stay allowed."""
    for a, b in ((first, second), (second, first)):
        tokens = sy.TokenTable()
        try:
            tokens.add("redteam-govdb-token-a", a)
        except ValueError:
            continue  # (a name with an invisible character is refused on its own)
        with pytest.raises(ValueError) as caught:
            tokens.add("redteam-govdb-token-b", b)
        assert "\n" not in str(caught.value)
    tokens = sy.TokenTable()
    tokens.add("redteam-govdb-token-a", "alice")
    tokens.add("redteam-govdb-token-b", "alice")
    assert tokens.lookup("redteam-govdb-token-b").name == "alice"


def test_a_table_principal_named_like_an_issuers_client_is_refused_in_either_order():
    """A table token named ``client/x`` and an issuer ``client`` whose client ``x`` is principal ``client/x``:
    one name for two principals, so revoking the issued client revoked the table principal too (and
    ``allowed_users`` granted both). Must hold: refused whichever is configured second."""
    tokens = sy.TokenTable()
    tokens.add("redteam-govdb-token-a", "client/x")
    with pytest.raises(ValueError):
        tokens.add_issuer(ISSUER_SECRET, "client")
    with pytest.raises(ValueError):
        tokens.add_issuer(ISSUER_SECRET, "CLIENT")
    tokens = sy.TokenTable()
    tokens.add_issuer(ISSUER_SECRET, "client")
    with pytest.raises(ValueError):
        tokens.add("redteam-govdb-token-a", "client/x")
    tokens.add("redteam-govdb-token-c", "client")  # (the issuer's own name as a table principal: allowed)
    with pytest.raises(ValueError):  # (two issuers whose clients' names read the same)
        tokens.add_issuer(ISSUER_SECRET, "Client")
    tokens.add_issuer(ISSUER_SECRET + "-2", "client")  # (the same issuer's secret replaced: allowed)


def test_revoking_an_issued_client_and_a_principal_its_holder_name_echoes_acts_on_each_alone(tmp_path):
    """Issued client ``client/x`` and table principal ``x``: revoking one must neither revoke nor spare the
    other, here and on a replica that restores the stored decisions."""
    from veil.governance.revocation import readmit, restore_revocations, revoke
    from veil.workers import client_tokens
    from veil.workers.persistence import OwnerDB

    def table():
        tokens = sy.TokenTable()
        tokens.add("redteam-govdb-token-x", "x")
        tokens.add_issuer(ISSUER_SECRET, "client")
        return tokens

    issued = client_tokens.issue(ISSUER_SECRET, "client", "x")
    owner = _Owner(table(), OwnerDB(str(tmp_path / "owner.db")))
    revoke(owner, "client/x")
    assert owner.tokens.lookup(issued) is None and owner.tokens.lookup("redteam-govdb-token-x").name == "x"
    replica = _Owner(table(), owner.db)
    restore_revocations(replica)
    assert replica.tokens.lookup(issued) is None and replica.tokens.lookup("redteam-govdb-token-x").name == "x"
    readmit(owner, "client/x")
    revoke(owner, "x")
    assert owner.tokens.lookup("redteam-govdb-token-x") is None
    assert owner.tokens.lookup(issued).name == "client/x"
    with pytest.raises(Exception, match="no user named"):
        revoke(owner, "X")  # (a name alike is not the name: nothing else is revoked in its place)


# --------------------------------------------------------------------------- the console's connection slots

CONSOLE_ADMIN = "redteam-govdb-console-admin"


@pytest.fixture
def console(hook, monkeypatch):
    """A started console (4 slots) of an in-process worker on loopback; stopped after the test."""
    yield from started_console(hook, monkeypatch, CONSOLE_ADMIN, "rt-govdb-console")


def test_a_client_reconnecting_in_a_loop_does_not_push_out_an_owner_who_has_not_logged_in_yet(console):
    """The owner opened the log-in page at the secret address the worker printed (her browser keeps the
    connection for the form's POST) and is typing her token. Anyone on loopback reconnects in a loop, many
    more times than the console has slots, with heads that never finish. Her connection, with no owner
    session yet, was the oldest unmarked one, so it was the first replaced. Must hold: the looping
    connections replace each other; hers stays open and is answered."""
    import socket

    page = f"GET /login HTTP/1.1\r\nHost: {console.host_name}:{console.port}\r\n\r\n".encode()
    owner = socket.create_connection(("127.0.0.1", console.port), timeout=10)
    looping: list = []
    try:
        owner.sendall(page)
        assert _response_head(owner).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.05)
        for _ in range(12):  # (three times the slots)
            s = socket.create_connection(("127.0.0.1", console.port), timeout=5)
            s.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            looping.append(s)
            time.sleep(0.03)
        try:
            owner.sendall(page)
            assert _response_head(owner).startswith(b"HTTP/1.1 200 ")
        except (ConnectionError, OSError) as e:
            pytest.fail(f"the owner's log-in connection was replaced by a reconnecting client: {e!r}")
    finally:
        owner.close()
        for s in looping:
            s.close()


def test_requests_to_another_host_name_do_not_shield_a_connection(console):
    """The mark that shields a connection is the secret host name itself: a client that sends complete
    requests to ``127.0.0.1`` (answered: the page says where to go) gains nothing, and its connection is
    replaced before a newer one of the same kind."""
    import socket

    held: list = []
    try:
        first = socket.create_connection(("127.0.0.1", console.port), timeout=5)
        held.append(first)
        first.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _response_head(first).startswith(b"HTTP/1.1 200 ")
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", console.port), timeout=5)
            held.append(s)
            time.sleep(0.05)
        first.settimeout(5)
        try:
            first.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert first.recv(1) == b"", "the oldest connection without the secret host name was kept"
        except (ConnectionError, OSError):
            pass
    finally:
        for s in held:
            s.close()


class _Transport:
    def is_closing(self) -> bool:
        return False


def _connection(source: str, opened_at: float, session_host: bool = False, owner: bool = False):
    from veil.governance.console import connections

    c = connections.BoundedH11Protocol.__new__(connections.BoundedH11Protocol)
    c.transport, c.cycle, c._mark = _Transport(), None, connections._RequestMark()
    c._source, c._opened_at, c._waiting_since = source, opened_at, opened_at
    c._carried_session_host, c._carried_owner = session_host, owner
    return c


def test_off_loopback_a_reconnect_loop_from_one_address_replaces_its_own_connections_first():
    """Served off loopback (https, no secret host name), an owner who has not logged in yet is told apart
    only by her address. Another address reconnecting in a loop held all but one slot; the owner's
    connection, the oldest, was the one replaced. Must hold: the source holding the most connections gives
    up one of its own (its oldest); an owner's connections, and the secret name's, go after all others."""
    from veil.governance.console.connections import replaced_first

    owner_before_login = _connection("198.51.100.0/24", 1.0)
    looping = [_connection("203.0.113.0/24", 2.0 + i) for i in range(31)]
    assert replaced_first([owner_before_login, *looping]) is looping[0]
    # the same source: oldest first, as before
    assert replaced_first([_connection("loopback", 3.0), first := _connection("loopback", 1.0)]) is first
    # a connection that carried a request to the secret name, then the owner's, go last
    named, logged_in = _connection("loopback", 0.5, session_host=True), _connection("loopback", 0.1, owner=True)
    newest = _connection("loopback", 9.0)
    assert replaced_first([logged_in, named, newest]) is newest
    assert replaced_first([logged_in, named]) is named


def test_an_audit_search_over_a_long_log_never_holds_up_the_workers_audit_rows(hook, tmp_path, monkeypatch):
    """The owner searches the audit log for a word (the Audit page: a LIKE over every row of a log a scientist
    grows with refused commands) on the owner database's one connection, under the lock every audit row,
    filed request and decision waits for. The search is made slow here and the worker audits meanwhile.
    Must hold: the audit row is written while the search still runs; the search then finds its rows."""
    from veil.governance.console import views
    from veil.governance.state import governance
    from veil.workers.persistence import OwnerDB

    worker = sy.VirtualWorker(hook, id=f"rt-govdb-audit-{time.monotonic_ns() % 10**6}")
    worker.db = OwnerDB(str(tmp_path / OwnerDB.FILENAME))
    db = governance(worker).db
    for i in range(50):
        db.audit(worker.id, "get", "mallory", "s", [i], "refused", f"probe {i}")
    found = _written_while_a_slow_read_runs(  # (a LIKE over millions of rows)
        monkeypatch, lambda: views.audit_search(worker, text="probe"), "FROM audit",
        lambda: db.audit(worker.id, "get", "alice", "s", [1], "allowed", "x"),
        "an audit row waited for the owner's audit search")
    assert len(found) == 50 and {r["principal"] for r in found} == {"mallory"}


class _LosingStatement(_LosingCommit):
    """A PostgreSQL connection whose next statement starting with ``prefix`` runs, and then the connection
    is lost (its backend ended) before the answer comes back."""

    def __init__(self, conn: psycopg.Connection, url: str, prefix: str) -> None:
        super().__init__(conn, url, ran=True)
        self._prefix = prefix

    def execute(self, sql, *args, **kwargs):
        if self.armed and str(sql).lstrip().upper().startswith(self._prefix):
            self.armed = False
            self._conn.execute(sql, *args, **kwargs)
            with psycopg.connect(self._url, autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s)", (self._conn.pgconn.backend_pid,))
            raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
        return self._conn.execute(sql, *args, **kwargs)


def test_a_review_decision_lost_with_its_connection_is_refused_only_if_it_was_not_recorded(pg_url):
    """The owner approves a release request (the conditional UPDATE that arbitrates between her processes) and
    the connection to PostgreSQL is lost right after the server ran it: as a lone statement it had committed,
    yet the console said "refused, try again", and her retry then said "already approved" (a release: the
    approval used up, the value never sent). Must hold: what is reported agrees with what is stored."""
    from veil.workers.persistence import OwnerDB, db_update

    db = OwnerDB(pg_url)
    try:
        db.kv_put("redteam", "decision", b"pending")
        db._db._conn = _LosingStatement(db._db._conn, pg_url, "UPDATE")
        try:
            changed = db_update(db, "UPDATE kv SET value = ? WHERE namespace = ? AND key = ? AND value = ?",
                                (b"approved", "redteam", "decision", b"pending"))
        except OwnerStateUnavailableError as e:
            reported = f"refused: {e}"
        else:
            reported = "recorded" if changed == 1 else f"changed {changed}"
        with psycopg.connect(pg_url, autocommit=True) as look:  # (what the database holds, on its own session)
            stored = bytes(look.execute("SELECT value FROM kv WHERE namespace = 'redteam'").fetchone()[0])
        assert (reported, stored) in {("recorded", b"approved")} or (reported.startswith("refused")
                                                                     and stored == b"pending"), (reported, stored)
    finally:
        db.close()
