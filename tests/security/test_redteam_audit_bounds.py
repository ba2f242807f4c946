"""Red team: what a scientist can make the owner's side hold through bookkeeping (attack class 6, "log rows"),
and the copy of owner data a worker function is given.

- Every refused request was one row in the owner's audit database (measured: ~2 KB of SQLite file and WAL
  per refused ``get``, ~6,000 a second from one session on this machine), without limit.
- The console's Audit page filters that log by user, action and time; it had no index but its key.
- A worker function given protected owner data gets a copy of it, made before it runs and charged nowhere:
  under a 1 MiB session quota a scientist had a dataset-sized copy made on every request.

Requests go through a real network worker's request path in process (tests/security/server_sessions.py).
"""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import pytest
import torch

import veil as sy
from veil.governance.console import views
from veil.messaging import messages as m
from veil.messaging.allowlist import register_worker_function
from veil.workers.persistence import OwnerDB, db_execute
from veil.workers.websocket_server import WebsocketServerWorker

from server_sessions import open_session, request, send_tensor

TOKEN, OTHER = "scientist-token-audit-bounds-1", "scientist-token-audit-bounds-2"
PROBES = 400
#: rows one user's refusals may add per window: the burst (refusal_rows.RefusedRequestLog, 20) and a summary
MOST_ROWS = 25


@pytest.fixture
def served(hook, tmp_path):
    tokens = sy.TokenTable()
    tokens.add(TOKEN, "mallory", "scientist")
    tokens.add(OTHER, "carol", "scientist")
    srv = WebsocketServerWorker(hook, id="alice", port=0, tokens=tokens, db=OwnerDB.in_dir(tmp_path))
    yield srv
    srv.db.close()


def _rows(srv, **where) -> list[dict]:
    return [r for r in srv.db.audit_entries(10**7) if all(r[k] == v for k, v in where.items())]


def _counted(rows: list[dict]) -> int:
    """Refusals the rows account for: one each, a summary row its count."""
    return sum(int(r["detail"].split()[0]) if " more refused " in r["detail"] else 1 for r in rows)


def test_a_loop_of_refused_requests_adds_a_bounded_number_of_audit_rows(served):
    """Attack: a scientist loops a refused request (``get`` of ids that do not exist, each probe a new id),
    from two connections, to grow the owner's database. Must hold: the log gains at most the burst plus one
    summary row per action and window, and still accounts for every refusal, with the probed ids (the
    summary is written when the window closes: here, when the server's connect log is flushed, as at stop)."""
    first, second = open_session(served, TOKEN), open_session(served, TOKEN)
    probed = []
    for i in range(PROBES):
        oid = 10**12 + i
        probed.append(oid)
        reply = request(served, first if i % 2 else second, m.GetObjectsMessage([oid]))
        assert type(reply) is m.ErrorReply and "not found" in reply.message and "\n" not in reply.message
    served.refusals.flush()  # the window closes (the server's timer, or its stop)
    rows = _rows(served, principal="mallory", outcome="refused")
    assert len(rows) <= MOST_ROWS, f"{len(rows)} audit rows for {PROBES} refusals"
    assert _counted(rows) == PROBES  # nothing hidden: every refusal is counted
    named = {oid for r in rows for oid in r["object_ids"]}
    assert named == set(probed)  # and every probed id is named
    summary = [r for r in rows if " more refused " in r["detail"]]
    assert summary and first.id in summary[0]["session"] and second.id in summary[0]["session"]


def test_one_users_flood_does_not_hide_another_users_refusal(served):
    """The burst is per user: carol's one refused request after mallory's flood is written in full, at once."""
    flooder, victim = open_session(served, TOKEN), open_session(served, OTHER)
    for i in range(PROBES // 4):
        request(served, flooder, m.GetObjectsMessage([10**12 + i]))
    request(served, victim, m.GetObjectsMessage([77]))
    carol = _rows(served, principal="carol")
    assert [(r["action"], r["object_ids"], r["outcome"]) for r in carol] == [("get", [77], "refused")]
    assert "not found" in carol[0]["detail"]


def test_allowed_requests_are_never_aggregated(served):
    """Data leaving the worker is written one row per request, however many come (only refusals aggregate)."""
    session = open_session(served, TOKEN)
    gets = MOST_ROWS + 10
    for _ in range(gets):
        oid = send_tensor(served, session, torch.arange(3.0))
        reply = request(served, session, m.GetObjectsMessage([oid]))
        assert type(reply) is m.ObjectsReply and torch.equal(reply.objects[0], torch.arange(3.0)), reply
    assert len(_rows(served, principal="mallory", action="get", outcome="allowed")) == gets


@pytest.mark.parametrize("filters", [{"user": "ghost"}, {"action": "console_login"}, {"since": 1.0}])
def test_the_consoles_audit_filters_read_an_index(tmp_path, monkeypatch, filters):
    """The Audit page's filters (a user only old rows name, an action, the last N minutes) read an index, not
    the whole log; a database made before the indexes gets them on its next open (idempotent migration)."""
    path = tmp_path / "owner.sqlite3"
    old = sqlite3.connect(path)  # the audit table as databases made before the indexes have it
    old.execute("CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, worker TEXT NOT "
                "NULL, action TEXT NOT NULL, principal TEXT NOT NULL, session TEXT NOT NULL, object_ids TEXT NOT "
                "NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL)")
    old.commit()
    old.close()
    OwnerDB(str(path)).close()
    db = OwnerDB(str(path))  # opened twice: the migration runs again harmlessly
    seen = []  # the console's own query (audit_search), then its plan
    monkeypatch.setattr(views, "governance", lambda worker: SimpleNamespace(db=db))
    monkeypatch.setattr(views, "db_read", lambda database, sql, params=(): seen.append((sql, params)) or [])
    views.audit_search(object(), **filters)
    (sql, params), = seen
    plan = " ".join(str(row[-1]) for row in db_execute(db, "EXPLAIN QUERY PLAN " + sql, params))
    assert "INDEX audit_by_" in plan, plan
    db.close()


_CALLS: list = []


def _column_sums(worker, data):
    _CALLS.append(data.shape)
    return data.sum(0)


register_worker_function("test.audit_bounds.column_sums", _column_sums)


def test_a_worker_functions_copy_of_owner_data_is_charged_to_the_quota(served):
    """Attack: under a 1 MiB session quota, a scientist passes a 4 MiB owner dataset to a worker function
    (which gets a copy of protected data) again and again: a dataset-sized copy per request, charged nowhere.
    Must hold: the copy is charged before it is made (a one-line quota refusal, the function never runs, the
    worker keeps serving); a dataset that fits is copied and computed as plain PyTorch computes it."""
    served.monitor.max_session_bytes = 1 << 20
    big = served.load(torch.ones(1024, 1024), private=True)  # 4 MiB
    small_data = torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32)
    small = served.load(small_data.clone(), private=True)
    session = open_session(served, TOKEN)
    _CALLS.clear()
    reply = request(served, session, m.CommandMessage("test.audit_bounds.column_sums", (m.ObjectRef(big),), {},
                                                      [10**13]))
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    assert "\n" not in reply.message and _CALLS == []
    reply = request(served, session, m.CommandMessage("test.audit_bounds.column_sums", (m.ObjectRef(small),), {},
                                                      [10**13 + 1]))
    assert type(reply) is m.OkReply, reply
    got = request(served, session, m.GetObjectsMessage([10**13 + 1]))
    assert type(got) is m.ObjectsReply, got
    assert torch.equal(got.objects[0], small_data.sum(0))


def test_a_plan_on_owner_data_is_sized_beside_its_copy(served):
    """A plan run is a worker function: it gets a copy of the owner's data and sizes its ops against the
    session quota. Under a 1 MiB quota, a 600 KB dataset's copy plus a 600 KB result of the plan's op would
    hold 1.2 MB: refused before the op allocates (the op alone fit, the copy was beside it uncounted); a
    200 KB dataset runs and gives what plain PyTorch gives."""
    from veil.plans.plan import func2plan

    @func2plan(args_shape=[(2, 1024)])
    def double(x):
        return x * 2

    served.monitor.max_session_bytes = 1 << 20
    session = open_session(served, TOKEN)
    spec = 10**14
    assert type(request(served, session, m.ObjectMessage([m.StoredObject(spec, double.spec)]))) is m.OkReply
    large = served.load(torch.ones(150, 1024), private=True)
    data = torch.randn(50, 1024)
    small = served.load(data.clone(), private=True)
    reply = request(served, session, m.CommandMessage("veil.plan.run", (m.ObjectRef(spec), [m.ObjectRef(large)], []),
                                                      {}, [spec + 1]))
    # (inside a run on protected data every failure reaches the client as ProtectedDataError; the owner's
    # audit log says which)
    assert type(reply) is m.ErrorReply and "\n" not in reply.message, reply
    assert any("more than the owner's limit" in r["detail"] for r in _rows(served, action="store", outcome="refused"))
    assert type(request(served, session, m.GetObjectsMessage([spec + 1]))) is m.ErrorReply  # nothing stored
    reply = request(served, session, m.CommandMessage("veil.plan.run", (m.ObjectRef(spec), [m.ObjectRef(small)], []),
                                                      {}, [spec + 2]))
    assert type(reply) is m.OkReply, reply
    got = request(served, session, m.GetObjectsMessage([spec + 2]))
    assert type(got) is m.ObjectsReply and torch.equal(got.objects[0], data * 2), got


def test_the_owners_cap_deletes_the_oldest_request_rows_and_keeps_decisions_and_dp_charges(served):
    """Attack: allowed requests are one row each (data leaving the worker is never aggregated): a scientist
    fetching a tiny result of its own in a loop grew the log for as long as the worker served. Must hold: with
    ``--audit-max-rows`` the oldest such rows go once the cap's number of rows came after them, on the audit
    log's timer; the owner's decisions, release requests, releases and DP charges are never deleted."""
    from veil.workers.audit_retention import AuditRetention

    cap = 30
    served.refusals.followers.append(AuditRetention(served.db, cap))
    for action in ("approve", "policy", "revoke", "dp_release", "release", "request"):
        served.db.audit(served.id, action, "owner", "-", [1], "allowed", f"kept {action}")
    session = open_session(served, TOKEN)
    oid = send_tensor(served, session, torch.arange(3.0))
    for _ in range(cap * 3):
        reply = request(served, session, m.GetObjectsMessage([oid], delete=False))
        assert type(reply) is m.ObjectsReply and torch.equal(reply.objects[0], torch.arange(3.0)), reply
    gets = _rows(served, action="get", outcome="allowed")
    assert len(gets) == cap * 3  # (not aggregated)
    served.refusals.flush()  # the timer (or the stop)
    rows = served.db.audit_entries(10**6)
    kept = [r["detail"] for r in rows if r["detail"].startswith("kept ")]
    assert len(kept) == 6, kept
    left = _rows(served, action="get", outcome="allowed")
    assert len(rows) - 6 == cap and [r["seq"] for r in left] == [r["seq"] for r in gets[-len(left):]]  # the newest
