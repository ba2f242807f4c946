"""The owner's run-time policy decisions survive restarts, and decisions or releases lost in a race between two
processes of one owner are refused, on SQLite and (when its binaries are installed) PostgreSQL."""

from __future__ import annotations

import time

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError
from veil.governance.state import policy_of
from veil.workers.persistence import OwnerDB, add_release_requests_table, db_execute

SECRET = torch.tensor([[1.5, -2.25, 3.0], [4.0, 5.5, -6.75]])
TAGS = ("#clinic", "#data")


@pytest.fixture(scope="module")
def pg_server():
    try:
        from tests.scale.postgres_server import PostgresServer

        server = PostgresServer()
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"no PostgreSQL: {e}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path) -> str:
    """Where the owner's state lives (what --data-dir or --db names)."""
    if request.param == "sqlite":
        return str(tmp_path / OwnerDB.FILENAME)
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture
def start(hook, location):
    """``start(policy, tags=TAGS, wid=...) -> (worker, oid)``: a worker (re)started on the same owner state that
    loads the dataset with ``policy`` (the command line's); every database is closed after the test."""
    dbs, wid = [], f"gov-persist-{time.monotonic_ns()}"

    def start_(policy: str, tags: tuple = TAGS, worker_id: str | None = None):
        w = sy.VirtualWorker(hook, id=worker_id or wid)
        w.db = OwnerDB(location)
        dbs.append(w.db)
        return w, w.load(SECRET.clone(), tags=tags, description="clinic data", private=True, policy=policy)

    yield start_
    for db in dbs:
        db.close()


def test_a_tightening_is_restored_over_a_looser_command_line(start):
    w, oid = start("open")
    w.set_policy("#clinic", "review")
    w2, oid2 = start("open")  # restarted as it was started before
    assert policy_of(w2, oid2) == "review"
    restored = [e for e in w2.db.audit_entries() if e["action"] == "policy" and "restored" in e["detail"]]
    assert [e["object_ids"] for e in restored] == [[oid2]]
    w3, oid3 = start("dp-only")  # a stricter command line wins over the stored decision
    assert policy_of(w3, oid3) == "dp-only"


def test_a_loosening_persists_but_never_below_the_command_line(start):
    w, oid = start("review")
    w.set_policy(oid, "open")  # by id: stored under the dataset's tags (ids are new at every start)
    w2, oid2 = start("open")
    assert policy_of(w2, oid2) == "open"
    w3, oid3 = start("review")
    assert policy_of(w3, oid3) == "review"


def test_the_last_decision_counts_and_tags_added_keep_it(start):
    w, _ = start("open")
    w.set_policy("clinic", "dp-only")
    w.set_policy("#clinic", "review")
    w2, oid2 = start("open", tags=(*TAGS, "#2024"))
    assert policy_of(w2, oid2) == "review"
    w2.set_policy("#clinic", "open")  # (stored under the new tag set; the older, stricter record still matches)
    w3, oid3 = start("open", tags=(*TAGS, "#2024"))
    assert policy_of(w3, oid3) == "review"
    w4, oid4 = start("open")  # the older record alone: review
    assert policy_of(w4, oid4) == "review"


def test_decisions_are_per_owner_database_and_per_dataset(start):
    w, _ = start("open")
    w.set_policy("#clinic", "review")
    other, oid = start("open", worker_id=f"gov-persist-other-{time.monotonic_ns()}")
    assert policy_of(other, oid) == "review"  # another replica of the owner (same database, another id)
    w2, oid2 = start("open", tags=("#clinic", "#target"))
    assert policy_of(w2, oid2) == "open"


def test_an_unreadable_stored_decision_stops_the_load(start):
    w, _ = start("open")
    w.set_policy("#clinic", "review")
    namespace = "governance.policy"
    (key,) = w.db.kv_keys(namespace)
    w.db.kv_put(namespace, key, b'{"policy": "wide-open"}')
    with pytest.raises(ValueError, match="unknown data policy"):
        start("open")


# -------------------------------------------------------------- two processes of one owner, one database

class _OwnerProcess:
    def __init__(self, db) -> None:
        self.id, self.db = "alice", db


def _two_queues(location, state: str):
    from veil.governance.requests import ReviewQueue

    dbs = [OwnerDB(location), OwnerDB(location)]
    add_release_requests_table(dbs[0])
    db_execute(dbs[0], "INSERT INTO release_requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               ("req-persist0000001", time.time(), "alice", "scientist", "s1", "7", "", "[]", "float32", "d",
                "[]", "{}", state, "", None, ""))
    return dbs, [ReviewQueue(_OwnerProcess(db)) for db in dbs]


def test_a_decision_lost_to_another_process_is_refused_and_not_audited(location, monkeypatch):
    dbs, (q0, q1) = _two_queues(location, "pending")
    try:
        stale = q1.get("req-persist0000001")  # process 1 read it pending ...
        q0.approve("req-persist0000001")  # ... then process 0 approved it
        reads = iter([stale])
        monkeypatch.setattr(q1, "get", lambda rid, real=q1.get: next(reads, None) or real(rid))
        with pytest.raises(PermissionDeniedError, match="already approved"):
            q1.deny("req-persist0000001")
        assert q0.get("req-persist0000001").state == "approved"
        assert [e["action"] for e in dbs[0].audit_entries()] == ["approve"]
    finally:
        [db.close() for db in dbs]


def test_an_approval_is_used_up_by_one_process_only(location):
    dbs, (q0, q1) = _two_queues(location, "approved")
    try:
        q0.mark_released("req-persist0000001")
        with pytest.raises(PermissionDeniedError, match="already released"):
            q1.mark_released("req-persist0000001")
    finally:
        [db.close() for db in dbs]


# -------------------------------------------------------------- replicas of one owner, both serving

def test_a_serving_replica_takes_the_other_replicas_tightening_and_never_a_loosening(start):
    from veil.governance.policy import sync_stored_policies

    a, _ = start("open", worker_id=f"gov-replica-a-{time.monotonic_ns()}")
    b, oid_b = start("open", worker_id=f"gov-replica-b-{time.monotonic_ns()}")
    assert sync_stored_policies(b) == [] and policy_of(b, oid_b) == "open"  # nothing stored yet
    a.set_policy("#clinic", "dp-only")
    assert policy_of(b, oid_b) == "open"  # b serves on with what it loaded...
    assert sync_stored_policies(b) == [oid_b]  # ...until it rereads the owner's decisions
    assert policy_of(b, oid_b) == "dp-only" and b.monitor.owner_entries()  # (the DP guard's mark too:)
    assert dict(b.monitor.owner_entries())[oid_b].meta.get("dp_only") is True
    a.set_policy("#clinic", "open")  # a loosening on one replica is the owner's to repeat on the others
    assert sync_stored_policies(b) == [] and policy_of(b, oid_b) == "dp-only"


def test_a_network_worker_rereads_the_stored_decisions_while_it_serves(hook, tmp_path, monkeypatch):
    from veil.governance import policy
    from worker_processes import serve_in_thread, stop_served

    monkeypatch.setattr(policy, "SYNC_SECONDS", 0.05)
    location = str(tmp_path / OwnerDB.FILENAME)
    tokens = sy.TokenTable()
    tokens.add("replica-sync-token", "alice")
    server = sy.WebsocketServerWorker(hook, host="127.0.0.1", port=0, id=f"gov-sync-{time.monotonic_ns()}",
                                      tokens=tokens, db=OwnerDB(location))
    oid = server.load(SECRET.clone(), tags=TAGS, private=True, policy="open")
    thread = serve_in_thread(server)
    other = sy.VirtualWorker(hook, id=f"gov-sync-other-{time.monotonic_ns()}")
    other.db = OwnerDB(location)
    try:
        other.load(SECRET.clone(), tags=TAGS, private=True, policy="open")
        other.set_policy("#clinic", "review")
        deadline = time.monotonic() + 10
        while policy_of(server, oid) != "review" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert policy_of(server, oid) == "review"
    finally:
        stop_served(server, thread)
        other.db.close()


@pytest.mark.parametrize("sql", ["SELECT COUNT(*) FROM release_requests WHERE state = ?",
                                 "SELECT COUNT(*) FROM release_requests WHERE state = ? AND principal = ?"])
def test_counting_requests_by_state_reads_an_index_not_every_request(tmp_path, sql):
    """The console's pending badge (every page) and the cap on a user's pending requests count by state; a
    scientist's requests each hold up to ~400 KB of op graph, so a count that scans the table slows every page."""
    db = OwnerDB(str(tmp_path / "owner.sqlite3"))
    add_release_requests_table(db)
    add_release_requests_table(db)  # idempotent: a database made before the index gets it on the next open
    params = ("pending",) if sql.count("?") == 1 else ("pending", "alice")
    plan = " ".join(str(row[-1]) for row in db_execute(db, "EXPLAIN QUERY PLAN " + sql, params))
    assert "USING COVERING INDEX release_requests_by_state" in plan, plan
