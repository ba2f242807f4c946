"""Red team: the owner state on PostgreSQL (replicas sharing one database, ``veil db migrate``).

What differs from the SQLite path (tests/security/test_redteam_faults_replay.py covers that one): PostgreSQL's
SQL dialect (reserved words, NUL-free text), several worker processes on one database, the server going away
and coming back, connection URLs that carry a password, and ``veil db migrate`` reading a state directory whose
text columns a scientist filled in.

Every test asserts the safe behaviour; six of them were holes found by this review, fixed since (the budgets
page's unquoted ``user``, ``?password=`` printed, ``veil db migrate`` on a ``#`` path and on a NUL byte, the
outage error naming the database, a frozen database holding a release forever).
"""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import torch

import veil as sy
from veil.dp import BudgetLedger
from veil.dp.worker_owner import LEDGER_FILENAME, enable_dp
from veil.exceptions import PermissionDeniedError, ReviewPendingError
from veil.governance.requests import ReviewQueue
from veil.workers.database import Database, redact
from veil.workers.persistence import OwnerDB
from veil.workers.registry import HookContext
from veil.workers.websocket_launcher import start_worker

from tests.scale.conftest import pg_url, postgres_server  # noqa: F401  (fixtures: a real PostgreSQL)


# ------------------------------------------------------------------ dialect: what a scientist's text becomes


HOSTILE = ["'); DROP TABLE audit; --", "x' OR '1'='1", "?", "%s", "%(x)s", "100%", "\\", "$$; SELECT 1; $$",
           '"user"', "é☃\U0001f600"]


def test_scientist_text_with_sql_metacharacters_round_trips_verbatim_on_postgres(pg_url):
    """Attack: quotes, ``?`` and ``%s`` placeholders, ``%`` and dollar quotes in every text a scientist controls
    (audit detail and session, kv key, ledger note, DP charge reason, replay request id) against the adapter
    that rewrites ``?`` to ``%s`` and doubles ``%``. Must hold: every value is a parameter, stored and read back
    byte for byte; no statement is altered (the tables are intact and hold exactly the rows written)."""
    db = OwnerDB(pg_url)
    try:
        for i, text in enumerate(HOSTILE):
            db.audit("alice-1", "get", "ana", text, [i], "refused", text)
            db.kv_put("ns", text, text.encode())
            db.ledger_append("dp", "ana", 0.125, text)
        details = [(a["session"], a["detail"]) for a in db.audit_entries()]
        assert details == [(t, t) for t in HOSTILE]
        assert sorted(db.kv_keys("ns")) == sorted(HOSTILE)
        assert all(db.kv_get("ns", t) == t.encode() for t in HOSTILE)
        assert db.ledger_total("dp", "ana") == 0.125 * len(HOSTILE)
    finally:
        db.close()
    with BudgetLedger(pg_url) as ledger:
        ledger.set_budget("ana", 10.0, 0.0)
        for i, text in enumerate(HOSTILE):
            ledger.charge("ana", 0.5, 0.0, text, request_id=f"{text}-{i:08d}")
        assert [h[2] for h in ledger.history("ana")] == HOSTILE
        assert ledger.remaining("ana")[0] == pytest.approx(10.0 - 0.5 * len(HOSTILE))


def test_console_budgets_page_names_the_scientists_and_their_spending_on_postgres(hook, pg_url):
    """Attack: none needed: a scientist spends budget on a replica whose ledger is on PostgreSQL; the owner reads
    the console's budgets page to decide whether to stop them. Must hold: the page lists each scientist by name
    with what they spent (as on SQLite), not PostgreSQL's ``user`` keyword (the database role) with nothing
    spent: the owner must see the budget going."""
    from veil.governance.console import views

    w = sy.VirtualWorker(hook, id="pg-console-budgets")
    settings = enable_dp(w, budgets={"ana": (1.0, 1e-5), "ben": (2.0, 1e-5)}, ledger_path=pg_url)
    try:
        settings.ledger.charge("ana", 0.75, 0.0, "DP count")
        rows = {r["user"]: r for r in views.budgets(w)}
        assert set(rows) == {"ana", "ben"}
        assert rows["ana"]["spent_epsilon"] == pytest.approx(0.75)
        assert rows["ana"]["left_epsilon"] == pytest.approx(0.25)
    finally:
        settings.ledger.close()


# ------------------------------------------------------------------ secrets in connection URLs


def test_a_password_given_as_a_url_parameter_is_never_printed():
    """Attack: the owner passes the password the other way libpq URLs allow (``?password=...``, documented by
    PostgreSQL) and a local user reads the worker's log, the ``veil db migrate`` output or an error line. Must
    hold: ``redact`` (what every printed location goes through) hides the password in every URL form libpq
    accepts, as it does for ``user:password@host``, and so does the error line of an unreachable database."""
    assert "s3cret" not in redact("postgresql://alice:s3cret@db.internal/alice_state")  # the form it handles
    for url in ("postgresql://alice@db.internal/alice_state?password=s3cret",
                "postgresql://db.internal/alice_state?user=alice&password=s3cret&sslmode=require",
                "postgres://alice@db.internal:5432/alice_state?sslmode=require&password=s3cret"):
        assert "s3cret" not in redact(url), redact(url)
    # the error line of an unreachable database (a worker's or `veil db migrate`'s start) goes through it too
    with pytest.raises(ConnectionError) as info:
        Database("postgresql://veil@127.0.0.1:1/nowhere?password=s3cret&connect_timeout=2", timeout=2)
    assert "cannot connect" in str(info.value) and "s3cret" not in str(info.value), str(info.value)


# ------------------------------------------------------------------ veil db migrate: a state a scientist wrote into


def _sqlite_state_with_scientist_text(hook, folder, text: str) -> None:
    """What a SQLite worker stores for a scientist: the release request they filed with their own reason
    (``sy.request(ptr, reason=...)``), its audit row, and a DP charge. A reason holding NUL is refused today
    (one line to the scientist): the state of an older worker, which took it and SQLite kept, is written
    here by giving the stored request that reason."""
    from veil.governance.client import request

    w = sy.VirtualWorker(hook, id="alice-sqlite-state")
    w.db = OwnerDB.in_dir(folder)
    w.load(torch.ones(4, 3), tags=("#a",), policy="review")
    (data,) = w.search(["#a"])
    if "\x00" in text:
        with pytest.raises(PermissionDeniedError, match="NUL"):
            request(data.mean(dim=0), reason=text)
        assert request(data.mean(dim=0), reason="older worker")["state"] == "pending"
        w.db._db.execute("UPDATE release_requests SET reason = ?", (text,))  # what an older worker stored
    else:
        assert request(data.mean(dim=0), reason=text)["state"] == "pending"
    w.db.close()
    with BudgetLedger(folder / LEDGER_FILENAME) as ledger:
        ledger.set_budget("ana", 1.0, 1e-5)
        ledger.charge("ana", 0.25, 0.0, "DP count")


def test_migrate_of_a_state_holding_a_scientists_nul_byte_is_not_a_traceback(hook, pg_url, tmp_path):
    """Attack: on the owner's SQLite worker, a scientist files a release request whose reason holds a NUL byte
    (SQLite stores it; the reason is theirs to type). Later the owner runs ``veil db migrate`` to move to
    PostgreSQL, whose text cannot hold NUL. Must hold: the worker refuses such a reason in one line (the
    helper checks it); a state an older worker stored with one does not make the command die with a
    traceback: it either migrates (every row, the charge included, the NUL as U+FFFD) or refuses in one
    ``veil db migrate:`` / ``error:`` line, leaving the target empty."""
    from veil.cli import main

    _sqlite_state_with_scientist_text(hook, tmp_path, "please\x00release")
    try:
        rc = main(["db", "migrate", "--from", str(tmp_path), "--to", pg_url])
    except SystemExit as e:  # the command's own one-line refusal
        rc = e.code
    if rc == 0:
        with BudgetLedger(pg_url) as ledger:
            assert ledger.spent("ana")[0] == pytest.approx(0.25)
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT reason FROM release_requests").fetchall() == [("please\ufffdrelease",)]
    else:
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == 0


def test_migrate_from_a_data_dir_whose_name_holds_a_hash_copies_the_ledger_or_refuses(pg_url, tmp_path):
    """Attack (data loss): the owner's ``--data-dir`` is named ``alice#2`` (or holds ``?``, legal in a path).
    ``veil db migrate --from`` that directory must copy its privacy ledger, or refuse. Must hold: never a
    "migrated" success with the charges left behind (the workers restarted on ``--db`` would hand every
    scientist their full budget again), and nothing created outside the source directory. (The path is given
    to SQLite percent-encoded: the ledger is copied.)"""
    from veil.cli import main

    folder = tmp_path / "alice#2"
    folder.mkdir()
    db = OwnerDB.in_dir(folder)
    db.audit("alice", "get", "ana", "s1", [7], "allowed")
    db.close()
    with BudgetLedger(folder / LEDGER_FILENAME) as ledger:
        ledger.set_budget("ana", 1.0, 1e-5)
        ledger.charge("ana", 0.75, 0.0, "DP count")
    try:
        rc = main(["db", "migrate", "--from", str(folder), "--to", pg_url])
    except SystemExit as e:
        rc = e.code
    assert rc == 0
    with BudgetLedger(pg_url) as ledger:
        ledger.set_budget("ana", 1.0, 1e-5)  # what a worker started with --budget ana=1.0,1e-5 does
        assert ledger.spent("ana")[0] == pytest.approx(0.75)
        assert ledger.remaining("ana")[0] == pytest.approx(0.25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice#2"]  # no stray database next to it


def test_migrate_refuses_a_state_file_without_its_tables_instead_of_copying_zero_rows(pg_url, tmp_path, capsys):
    """Attack (data loss): ``veil db migrate --from`` a directory whose ``veil-dp-budget.sqlite3`` is not a
    ledger (an empty SQLite file: a wrong path, a file re-created by a tool). Must hold: the command refuses in
    one ``veil db: error:`` line naming the missing tables, and the target stays empty, instead of reporting
    "migrated ... budgets 0, charges 0" (workers restarted on it would give every scientist a fresh budget)."""
    import sqlite3

    from veil.cli import main

    sqlite3.connect(tmp_path / LEDGER_FILENAME).close()
    with pytest.raises(SystemExit) as info:
        main(["db", "migrate", "--from", str(tmp_path), "--to", pg_url])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("veil db: error:") and "budgets" in err, err
    assert err.count("\n") == 1
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM charges").fetchone()[0] == 0


# ------------------------------------------------------------------ faults: the database goes away mid-serving

BOSTON = str(Path(sy.__file__).parent / "datasets" / "data" / "boston_housing.csv")
USERS = {"ana": "ana-token-0123456789", "ben": "ben-token-0123456789"}
BUDGET, COST = 1.0, 0.05
ADMIN = "owner-admin-token-9876543210"


def _worker_args(url: str, policy: str | None = None) -> list[str]:
    args = ["--db", url, "--dataset", f"boston={BOSTON}:target=MEDV", "--token", "owner-admin-token-0123456789",
            "--token-user", "owner", "--admin-token", ADMIN]
    for user, token in USERS.items():
        args += ["--user", f"{user}={token}", "--budget", f"{user}={BUDGET},0"]
    if policy:
        args += ["--policy", policy]
    return args


def _scientist(wp, user: str = "ana") -> sy.WebsocketClientWorker:
    return sy.WebsocketClientWorker(HookContext(), id=wp.id, host="127.0.0.1", port=wp.port,
                                    token=USERS[user])


def _pg_stop(server, mode: str = "immediate") -> None:
    server._run([server.pg_ctl, "-D", server.data, "-m", mode, "-w", "stop"])


def _pg_start(server) -> None:
    options = (f"-p {server.port} -k {server.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
               "-c max_connections=60 -c shared_buffers=16MB")
    server._run([server.pg_ctl, "-D", server.data, "-o", options, "-l", os.path.join(server.folder, "log"),
                 "-w", "start"])


def _in_thread(fn, timeout: float = 120.0):
    """fn() on a thread: (returned value or raised exception); fails the test if it hangs."""
    out: list = []

    def run():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert out, "the request hung"
    return out[0]


@pytest.fixture
def workers():
    procs: list = []
    yield procs
    for p in procs:
        p.kill()


def _crash_and_recover(server, url: str, wp) -> tuple[list, list, int]:
    """DP releases of ana before, during and after a PostgreSQL crash (immediate stop) and restart:
    (errors while down, results after, releases answered)."""
    ana = _scientist(wp)
    try:
        (target,) = ana.search(["#boston", "#target"])
        sy.dp.remote_query(target, "count", epsilon=COST)
        answered = 1
        _pg_stop(server)
        try:
            down = [_in_thread(lambda: sy.dp.remote_query(target, "count", epsilon=COST)) for _ in range(2)]
        finally:
            _pg_start(server)
        after = [_in_thread(lambda: sy.dp.remote_query(target, "count", epsilon=COST)) for _ in range(4)]
        answered += sum(not isinstance(r, Exception) for r in after) + sum(not isinstance(r, Exception) for r in down)
        return down, after, answered
    finally:
        ana.close()


def test_database_crash_mid_serving_fails_closed_and_the_worker_recovers(postgres_server, pg_url, workers):
    """Attack (fault): PostgreSQL crashes (immediate stop) while a replica serves DP releases, and comes back.
    Must hold: while it is down a DP release is refused in bounded time (nothing answered without its charge);
    after it is back the same worker process serves again (no restart needed) and every answered release has
    exactly one charge."""
    wp = start_worker("alice-1", _worker_args(pg_url))
    workers.append(wp)
    down, after, answered = _crash_and_recover(postgres_server, pg_url, wp)
    assert all(isinstance(d, Exception) for d in down), "a DP release was answered while its charge could not be written"
    assert not isinstance(after[-1], Exception), after  # recovered without a restart
    assert wp.proc.poll() is None
    with BudgetLedger(pg_url) as ledger:
        assert len(ledger.history("ana")) == answered


def test_database_crash_while_a_charge_is_uncommitted_releases_nothing_and_keeps_no_charge(
        postgres_server, pg_url, workers):
    """Attack (fault): PostgreSQL crashes (immediate stop) after a DP release's charge row is inserted and before
    it commits (held there by a test trigger). Must hold: the scientist gets no value (the charge did not
    commit), the ledger keeps no charge for it after the restart, and the same replica then answers and charges
    the next release normally."""
    wp = start_worker("alice-1", _worker_args(pg_url))
    workers.append(wp)
    ana = _scientist(wp)
    try:
        (target,) = ana.search(["#boston", "#target"])
        gate = psycopg.connect(pg_url, autocommit=True)
        gate.execute("SELECT pg_advisory_lock(4343)")
        gate.execute("CREATE FUNCTION veil_test_gate() RETURNS trigger AS $$ BEGIN "
                     "PERFORM pg_advisory_xact_lock(4343); RETURN NEW; END $$ LANGUAGE plpgsql")
        gate.execute("CREATE TRIGGER veil_test_gate AFTER INSERT ON charges FOR EACH ROW "
                     "EXECUTE FUNCTION veil_test_gate()")
        out: list = []
        t = threading.Thread(target=lambda: out.append(_try(lambda: sy.dp.remote_query(
            target, "count", epsilon=COST))), daemon=True)
        t.start()
        for _ in range(600):  # the charge waits in its trigger, inserted and uncommitted
            if gate.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND wait_event = 'advisory'").fetchone()[0] == 1:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the charge never reached the gate")
        try:
            _pg_stop(postgres_server)
        finally:
            _pg_start(postgres_server)
        t.join(120)
        gate.close()
        assert out and isinstance(out[0], Exception), out  # no value without a committed charge
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("DROP TRIGGER veil_test_gate ON charges")
        with BudgetLedger(pg_url) as ledger:
            assert ledger.history("ana") == []
        results = [_try(lambda: sy.dp.remote_query(target, "count", epsilon=COST)) for _ in range(3)]
        assert not isinstance(results[-1], Exception), results
        with BudgetLedger(pg_url) as ledger:
            assert len(ledger.history("ana")) == sum(not isinstance(r, Exception) for r in results)
    finally:
        ana.close()


def test_a_database_outage_tells_the_scientist_nothing_about_the_owners_database(postgres_server, pg_url, workers):
    """Attack: a scientist sends DP releases while the owner's PostgreSQL is down (or waits for an outage) and
    reads the error text. Must hold: the refusal is generic ("the owner's state database is unavailable"): no
    database URL, host:port, database or role name, and never a password the owner put in the URL
    (``?password=``, a form libpq accepts and ``--db`` takes); the detail is in the owner's log only."""
    url = pg_url + "?password=db-s3cret-pw"  # trust authentication: the server ignores it
    wp = start_worker("alice-1", _worker_args(url))
    workers.append(wp)
    down, _, _ = _crash_and_recover(postgres_server, url, wp)
    database = pg_url.rsplit("/", 1)[1]
    for error in down:
        text = f"{type(error).__name__}: {error}"
        assert "unavailable" in text, text  # veil's own refusal, not the driver's text
        assert "db-s3cret-pw" not in text, text
        assert "postgresql" not in text and database not in text and str(postgres_server.port) not in text, text


def _pg_processes(server) -> list[int]:
    """The test server's postmaster and its backends (this test's own server, started by the fixture)."""
    import subprocess

    with open(os.path.join(server.data, "postmaster.pid")) as f:
        master = int(f.readline())
    kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout
    return [master] + [int(k) for k in kids.split()]


@pytest.mark.slow  # a frozen PostgreSQL until the release gives up (~20-40 s)
def test_an_unresponsive_database_does_not_hold_a_release_forever(postgres_server, pg_url, workers):
    """Attack (fault): the owner's PostgreSQL stops answering without closing its connections (host frozen,
    network partition that drops packets: here SIGSTOP of the test's own server) while a scientist asks for a
    DP release on a replica that limits commands to 5 s (``--max-command-seconds 5``). Must hold: the request
    ends (refused: its charge could not be written) within a generous multiple of that limit while the database
    is still silent, instead of the scientist and the worker's handler (holding the replica's database lock)
    waiting for as long as the outage lasts."""
    import signal

    wp = start_worker("alice-1", _worker_args(pg_url) + ["--max-command-seconds", "5"])
    workers.append(wp)
    ana = _scientist(wp)
    try:
        (target,) = ana.search(["#boston", "#target"])
        sy.dp.remote_query(target, "count", epsilon=COST)  # serving
        frozen = _pg_processes(postgres_server)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            out: list = []
            t = threading.Thread(target=lambda: out.append(_try(lambda: sy.dp.remote_query(
                target, "count", epsilon=COST))), daemon=True)
            t.start()
            t.join(90)  # 18x the command limit
            assert out, "the DP release was still waiting on the silent database after 90 s"
            assert isinstance(out[0], Exception), "answered without its charge being written"
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        t.join(60)
    finally:
        ana.close()


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - inspected by the test
        return e


def test_many_scientist_sessions_do_not_multiply_the_owners_database_connections(pg_url, workers):
    """Attack (resources): a scientist opens many sessions on one replica and runs DP releases and review
    requests from all of them at once, hoping each session opens its own database connection until
    PostgreSQL's ``max_connections`` is exhausted and the owner's other replicas and tools are locked out.
    Must hold: the replica's connections to the owner database stay a small constant (its own, not per
    session), every release is charged once, and a fresh owner connection still opens afterwards."""
    wp = start_worker("alice-1", _worker_args(pg_url))
    workers.append(wp)
    database = pg_url.rsplit("/", 1)[1]

    def connections() -> int:
        with psycopg.connect(pg_url) as conn:  # (this one included: counted below as "- 1")
            return conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s",
                                (database,)).fetchone()[0] - 1
    before = connections()
    assert 1 <= before <= 3  # the replica's own (owner database, ledger)
    sessions = [_scientist(wp, "ben") for _ in range(12)]
    try:
        def release(client):
            (target,) = client.search(["#boston", "#target"])
            return [_try(lambda: sy.dp.remote_query(target, "count", epsilon=0.01)) for _ in range(3)]
        with ThreadPoolExecutor(len(sessions)) as pool:
            results = [r for rs in pool.map(release, sessions) for r in rs]
        during = connections()
    finally:
        for c in sessions:
            c.close()
    answered = sum(not isinstance(r, Exception) for r in results)
    assert answered == len(results), [r for r in results if isinstance(r, Exception)][:3]
    assert during <= before, (before, during)
    with BudgetLedger(pg_url) as ledger:
        assert len(ledger.history("ben")) == answered


# ------------------------------------------------------------------ races between replicas


class _OwnerConsole:
    """The owner's review queue on the shared database (what ``veil requests`` / the console do)."""

    def __init__(self, url: str) -> None:
        self.id = "owner-console"
        self.db = OwnerDB(url)


def _request_id(error: Exception) -> str:
    match = re.search(r"req-[0-9a-f]{16}", str(error))
    assert match, str(error)
    return match.group(0)


def _same_id_on(client, data, oid: int):
    """``data.mean(dim=0)`` stored under ``oid`` (a scientist picks the ids of their results)."""
    import veil.ids

    veil.ids._pool.append(oid)
    out = data.mean(dim=0)
    assert out.id_at_location == oid
    return out


def test_one_approval_releases_once_when_two_replicas_are_asked_at_once(pg_url, workers):
    """Attack: the owner approves one release request; the scientist then holds the same derived value under
    the same id on two replicas of the owner (ids are the scientist's to pick) and gets it from both at the same
    moment. Must hold: the approval is used up once across the replicas: exactly one get returns the value, the
    other is refused or pending, and the database shows the request released once."""
    with ThreadPoolExecutor(2) as pool:
        wps = list(pool.map(lambda i: start_worker(f"alice-{i}", _worker_args(pg_url, "review")), (1, 2)))
    workers.extend(wps)
    a, b = _scientist(wps[0]), _scientist(wps[1])
    try:
        mean_a = a.search(["#boston", "#data"])[0].mean(dim=0)
        with pytest.raises(ReviewPendingError) as info:
            mean_a.get()
        req = _request_id(info.value)
        mean_b = _same_id_on(b, b.search(["#boston", "#data"])[0], mean_a.id_at_location)
        owner = _OwnerConsole(pg_url)
        ReviewQueue(owner).approve(req)
        start = threading.Barrier(2)

        def get(ptr):
            start.wait(60)
            return ptr.get()
        with ThreadPoolExecutor(2) as pool:
            results = [f.exception() or f.result() for f in [pool.submit(get, mean_a), pool.submit(get, mean_b)]]
        released = [r for r in results if isinstance(r, torch.Tensor)]
        assert len(released) == 1, results
        assert all(isinstance(r, (ReviewPendingError, PermissionDeniedError)) for r in results
                   if not isinstance(r, torch.Tensor)), results
        assert ReviewQueue(owner).get(req).state == "released"
        owner.db.close()
    finally:
        a.close()
        b.close()


def test_a_policy_tightened_on_one_replica_holds_on_the_other_while_serving(pg_url, workers):
    """Attack: the owner puts #boston under review on replica alice-1 (admin message); the scientist keeps
    fetching derived results from replica alice-2, which started with the dataset open. Must hold: alice-2
    picks the stored decision up while serving (no restart) and from then refuses the release (pending
    review); it records the change in the shared audit log."""
    from veil.governance.wire import AdminPolicyMessage

    with ThreadPoolExecutor(2) as pool:
        wps = list(pool.map(lambda i: start_worker(f"alice-{i}", _worker_args(pg_url, "open")), (1, 2)))
    workers.extend(wps)
    admin = sy.WebsocketClientWorker(HookContext(), id=wps[0].id, host="127.0.0.1", port=wps[0].port, token=ADMIN)
    ana = _scientist(wps[1])
    try:
        data = ana.search(["#boston", "#data"])[0]
        assert data.mean(dim=0).get().shape == (13,)  # open: released
        admin.hook.local_worker.send_msg(AdminPolicyMessage("#boston", "review"), admin)
        outcome = None
        for _ in range(240):  # the replica rereads the stored decisions every second
            try:
                data.mean(dim=0).get()
            except ReviewPendingError as e:
                outcome = e
                break
            time.sleep(0.25)
        assert outcome is not None, "replica alice-2 kept releasing after the owner put the dataset under review"
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute("SELECT worker, detail FROM audit WHERE action = 'policy'").fetchall()
        assert any(w == "alice-2" and "another replica" in d for w, d in rows), rows
    finally:
        admin.close()
        ana.close()


def test_one_dp_request_id_sent_to_two_replicas_at_once_is_charged_and_answered_once(pg_url, workers,
                                                                                   monkeypatch):
    """Attack (replay across replicas): the scientist sends the same DP release (same request id: the client
    picks it) to two replicas of the owner at the same moment, hoping each replica's replay check reads the
    shared ``requests`` table before the other commits. Must hold: for every id exactly one replica answers
    (and charges); the other refuses it as a replay; the ledger holds one charge per id."""
    import veil.dp.remote as dp_remote
    from veil.dp import ReplayedRequestError

    with ThreadPoolExecutor(2) as pool:
        wps = list(pool.map(lambda i: start_worker(f"alice-{i}", _worker_args(pg_url)), (1, 2)))
    workers.extend(wps)
    clients = [_scientist(wp) for wp in wps]
    try:
        targets = [c.search(["#boston", "#target"])[0] for c in clients]
        rounds = 6
        for i in range(rounds):
            monkeypatch.setattr(dp_remote, "_request_id", lambda i=i: f"replayed-release-{i:04d}")
            start = threading.Barrier(2)

            def send(target):
                start.wait(60)
                return _try(lambda: sy.dp.remote_query(target, "count", epsilon=COST))
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(send, targets))
            answered = [r for r in results if not isinstance(r, Exception)]
            assert len(answered) == 1, results
            assert any(isinstance(r, ReplayedRequestError) for r in results), results
        with BudgetLedger(pg_url) as ledger:
            assert len(ledger.history("ana")) == rounds
    finally:
        for c in clients:
            c.close()


# ------------------------------------------------------------------ the training accountant a scientist feeds


def test_training_steps_of_ever_new_sigma_and_q_are_refused_beyond_the_cap(pg_url):
    """Attack (resources): a scientist sends DP-SGD steps each with a new huge noise multiplier and a tiny sample
    rate (each costs ~0 epsilon), or alternates two of them, so that the accountant history of their training
    grows and every later charge recomputes epsilon over all of it while holding their ledger's locks. Must
    hold: beyond ``MAX_TRAINING_EVENTS`` distinct (sigma, q) pairs a new pair is refused in one line before
    anything is recorded (no charge, no request id used up); a pair already used is still accepted; and
    alternating pairs keeps the stored history at one run per pair."""
    import json

    import veil.dp.budget
    from veil.dp.errors import PrivacyParameterError

    MAX_TRAINING_EVENTS = getattr(veil.dp.budget, "MAX_TRAINING_EVENTS", 16)  # (the code without a cap: 16)

    with BudgetLedger(pg_url) as ledger:
        ledger.set_budget("ana", 10.0, 1e-3)
        for i in range(MAX_TRAINING_EVENTS):
            ledger.charge_training_step("ana", 1000.0 + i, 1e-4, 1e-5, request_id=f"sgd-{i:04d}")
        with pytest.raises(PrivacyParameterError, match="distinct"):
            ledger.charge_training_step("ana", 5000.0, 1e-4, 1e-5, request_id="sgd-new-pair")
        assert len(ledger.history("ana")) == MAX_TRAINING_EVENTS
        for j in range(6):  # alternating two pairs already used
            ledger.charge_training_step("ana", 1000.0 + j % 2, 1e-4, 1e-5, request_id=f"sgd-alt-{j:04d}")
        assert len(ledger.history("ana")) == MAX_TRAINING_EVENTS + 6
        ledger.charge_training_step("ana", 1000.0, 1e-4, 1e-5, request_id="sgd-new-pair")  # id not used up
    with psycopg.connect(pg_url) as conn:
        (state,) = conn.execute("SELECT state FROM training").fetchone()
    history = json.loads(state)["history"]
    assert len(history) == MAX_TRAINING_EVENTS, history
    assert sum(c for _s, _q, c in history) == MAX_TRAINING_EVENTS + 7
