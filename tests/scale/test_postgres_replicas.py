"""Four `veil worker` processes of one owner on one PostgreSQL database: 8 scientists race DP releases,
the shared budget is never overspent; a worker killed (SIGKILL) in the middle of a charge leaves the
ledger consistent and the owner's other replicas serving."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

import veil as sy
from veil.dp import BudgetExceededError, BudgetLedger
from veil.exceptions import ConnectionLostError
from veil.workers.registry import HookContext
from veil.workers.websocket_launcher import start_worker

BOSTON = str(Path(sy.__file__).parent / "datasets" / "data" / "boston_housing.csv")
USERS = {"ana": "ana-token-0123456789", "ben": "ben-token-0123456789", "victim": "victim-token-0123456789"}
BUDGET, COST = 1.0, 0.05  # 20 releases per user fit


def _args(url: str) -> list[str]:
    args = ["--db", url, "--dataset", f"boston={BOSTON}:target=MEDV", "--token", USERS["ana"],
            "--token-user", "ana"]
    for user, token in USERS.items():
        if user != "ana":
            args += ["--user", f"{user}={token}"]
        args += ["--budget", f"{user}={BUDGET},0"]
    return args


def _client(replica: int, port: int, user: str) -> sy.WebsocketClientWorker:
    # One registry per scientist: each is a separate data scientist with their own session.
    return sy.WebsocketClientWorker(HookContext(), id=f"alice-{replica}", host="127.0.0.1", port=port,
                                    token=USERS[user])


def _release_until_refused(client, counts: list, errors: list) -> None:
    try:
        (target,) = client.search(["#boston", "#target"])
        while True:
            try:
                sy.dp.remote_query(target, "count", epsilon=COST)
            except BudgetExceededError:
                return
            counts.append(1)
    except Exception as e:  # reported by the test, not swallowed
        errors.append(e)


def _slow_charges(url: str) -> None:
    """Widens the read-then-insert window of every charge (test only): unlocked charges would overspend."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE FUNCTION veil_test_slow() RETURNS trigger AS $$ BEGIN "
                     "PERFORM pg_sleep(0.01); RETURN NEW; END $$ LANGUAGE plpgsql")
        conn.execute("CREATE TRIGGER veil_test_slow BEFORE INSERT ON charges "
                     "FOR EACH ROW EXECUTE FUNCTION veil_test_slow()")


@pytest.fixture
def replicas(pg_url):
    procs = []
    try:
        with ThreadPoolExecutor(4) as pool:  # start together: each spends seconds importing torch
            futures = [pool.submit(start_worker, f"alice-{i}", _args(pg_url)) for i in range(4)]
            for f in futures:
                try:
                    procs.append(f.result())
                except Exception:
                    for g in futures:
                        if g.done() and not g.exception():
                            g.result().kill()
                    raise
        yield pg_url, procs
    finally:
        for p in procs:
            p.kill()


def test_replicas_share_one_budget_and_survive_a_kill_mid_charge(replicas):
    url, procs = replicas
    assert any("owner state: postgresql://veil@" in line for line in procs[0].output)
    _slow_charges(url)
    # --- 8 scientists (ana and ben, one session on each replica each) race until refused
    clients = [_client(i % 4, procs[i % 4].port, "ana" if i < 4 else "ben") for i in range(8)]
    counts = {"ana": [], "ben": []}
    errors: list = []
    threads = [threading.Thread(target=_release_until_refused,
                                args=(c, counts["ana" if i < 4 else "ben"], errors)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    with BudgetLedger(url) as ledger:
        for user in ("ana", "ben"):
            spent, _ = ledger.spent(user)
            assert spent <= BUDGET + 1e-9  # never overspent, whichever replica charged
            assert spent > BUDGET - COST - 1e-9  # and all of it usable
            assert len(ledger.history(user)) == len(counts[user]) == 20  # one charge per answered release
    with psycopg.connect(url) as conn:
        audited = conn.execute("SELECT DISTINCT worker FROM audit").fetchall()
        releases = conn.execute("SELECT COUNT(*) FROM audit WHERE principal IN ('ana', 'ben')").fetchone()[0]
    assert {w for (w,) in audited} == {f"alice-{i}" for i in range(4)} and releases >= 40
    for c in clients:
        c.close()

    # --- kill -9 replica 0 while it holds an uncommitted charge of "victim"
    with psycopg.connect(url, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(4242)")
        gate.execute("CREATE FUNCTION veil_test_gate() RETURNS trigger AS $$ BEGIN "
                     "PERFORM pg_advisory_xact_lock(4242); RETURN NEW; END $$ LANGUAGE plpgsql")
        gate.execute("CREATE TRIGGER veil_test_gate AFTER INSERT ON charges FOR EACH ROW "
                     "EXECUTE FUNCTION veil_test_gate()")
        victim = _client(0, procs[0].port, "victim")
        outcome: list = []
        t = threading.Thread(target=lambda: outcome.append(_try_release(victim)))
        t.start()
        _wait_for(lambda: gate.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                       "AND wait_event = 'advisory'").fetchone()[0] == 1)
        procs[0].kill()  # SIGKILL, the charge row inserted but not committed
        gate.execute("SELECT pg_advisory_unlock(4242)")
        t.join(60)
        assert outcome and isinstance(outcome[0], ConnectionLostError)  # no answer reached the scientist
        gate.execute("DROP TRIGGER veil_test_gate ON charges")
        # the dead worker's transaction is rolled back: no charge, and the user's row lock is free again
        _wait_for(lambda: gate.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                  .fetchone()[0] == 0)
    with BudgetLedger(url) as ledger:
        assert ledger.history("victim") == [] and ledger.remaining("victim") == (BUDGET, 0.0)
    procs[0] = start_worker("alice-0", _args(url))  # restart on the same database
    counts_v: list = []
    errors = []
    scientists = [_client(i, procs[i].port, "victim") for i in (0, 1)]
    threads = [threading.Thread(target=_release_until_refused, args=(c, counts_v, errors)) for c in scientists]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    with BudgetLedger(url) as ledger:
        assert len(ledger.history("victim")) == len(counts_v) == 20
        assert BUDGET - COST - 1e-9 < ledger.spent("victim")[0] <= BUDGET + 1e-9
    for c in scientists:
        c.close()


def _try_release(client) -> object:
    try:
        (target,) = client.search(["#boston", "#target"])
        return sy.dp.remote_query(target, "count", epsilon=COST)
    except Exception as e:
        return e


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)
