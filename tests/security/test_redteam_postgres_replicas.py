"""Red team: PostgreSQL going away, freezing or shared by replicas while ``veil worker`` processes serve.

Split from tests/security/test_redteam_postgres.py (the SQL dialect, ``veil db migrate`` and the training
accountant stay there): a crash mid-serving or mid-charge fails closed and the worker recovers, an outage tells
the scientist nothing about the owner's database, a frozen database does not hold a release forever, scientist
sessions do not multiply database connections, and two replicas release, tighten and charge once.
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
from veil.exceptions import PermissionDeniedError, ReviewPendingError
from veil.governance.requests import ReviewQueue
from veil.workers.persistence import OwnerDB
from veil.workers.registry import HookContext
from veil.workers.websocket_launcher import start_worker

from tests.scale.conftest import pg_url, postgres_server  # noqa: F401  (fixtures: a real PostgreSQL)


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
            return conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s "
                                "AND backend_type = 'client backend'",  # (not an autovacuum worker's)
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
