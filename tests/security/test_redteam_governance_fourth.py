"""Red team, fourth pass on review and policies: the turn, the migrations at opening, a policy change mid-command.

Holes found, each a strict xfail on the code before its fix (checked by running this file on that code):

- a move read the user's stored revocation record (a database read) in the worker's turn on every move once any
  dataset was under review: a frozen database held every session's command. Must hold: the read runs outside it;
- the migration of approvals a later denial voided read ``LIMIT 1000`` per opening from the start of the table:
  approvals whose same-bytes denial came from another computation never lapse, so 1,000 of them hid every voided
  one behind them at every opening. Must hold: the voided one lapses (a bounded number checked per opening,
  the next opening going on from the last checked);
- requests left open by a revocation an older version stored (before revocation lapses) stayed approved: after
  readmission the same value recomputed under the same id was released. Must hold: they lapse at opening;
- the console's (and ``worker.set_policy``'s) change ran with no turn: a get in a command's turn passed the review
  check's fast path against the new policy after the DP guard passed against the old one. Must hold: the change
  waits for the turn;
- a value computed from a dataset under review was released to anyone asking once the owner tightened the dataset
  to dp-only (review no longer applied, and the DP guard marks only what is computed after). Must hold: refused;
- an admin policy change stored its decision (one database write, a lost COMMIT's lookup ~10 s) in the turn.
  Must hold: stored outside it, in force before the reply.
"""

from __future__ import annotations

import importlib
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError
from veil.ids import new_id
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import computed, open_session, request  # noqa: E402

SECRET = torch.tensor([[1.5, -2.25, 3.0], [4.0, 5.5, -6.75]])
TOKENS = {"alice": "gov-fourth-alice-token", "owner": "gov-fourth-owner-token"}
REVOKED = "governance.revoked"


def _server(hook, prefix: str, db=None):
    from veil.workers.websocket_server import WebsocketServerWorker

    tokens = sy.TokenTable()
    tokens.add(TOKENS["alice"], "alice", "scientist")
    tokens.add(TOKENS["owner"], "owner", "admin")
    kwargs = {} if db is None else {"db": db}
    srv = WebsocketServerWorker(hook, id=f"{prefix}-{time.monotonic_ns()}", port=0, tokens=tokens, **kwargs)
    return srv, srv.load(SECRET.clone(), tags=("#d",), policy="review")


def _rid(reply) -> str:
    assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
    return reply.message.split("release request ")[1].split()[0]


def _approved_times_three(srv, did, oid=None):
    """alice's ``d * 3`` (under ``oid``), approved: (session, object id, request id)."""
    from veil.governance.requests import ReviewQueue

    alice, oid = open_session(srv, TOKENS["alice"]), oid or new_id()
    reply = request(srv, alice, m.CommandMessage("torch.mul", (m.ObjectRef(did), 3.0), {}, [oid], False))
    assert type(reply) is m.OkReply, reply
    rid = _rid(request(srv, alice, m.GetObjectsMessage([oid], False)))
    ReviewQueue(srv).approve(rid)
    return alice, oid, rid


def _in_turn() -> bool:
    from veil.workers import cancellation

    return cancellation._local.turn is not None


# --------------------------------------------------------------------------- 1. a move's revocation read


def test_a_moves_revocation_record_is_read_outside_the_turn(hook, monkeypatch):
    """A move (``releasing``, as the move handler runs it in a command's turn) under review reads the user's stored
    revocation record; the read must not hold the turn. Guard: the refused move still gives the approval back."""
    from veil.governance.release import releasing
    from veil.governance.state import governance
    from veil.workers import cancellation

    srv, did = _server(hook, "gov4-move")
    alice, oid, rid = _approved_times_three(srv, did)
    db, reads = governance(srv).db, []
    real = db.kv_get
    monkeypatch.setattr(db, "kv_get", lambda ns, key, *a: (reads.append(_in_turn()) if ns == REVOKED else None,
                                                           real(ns, key, *a))[1])
    entry = dict(srv.monitor.owner_entries())[oid]
    srv._turn.acquire()
    try:
        with cancellation.running(None, srv._turn.yield_turn, srv._turn):
            with pytest.raises(PermissionDeniedError, match="already in use"):
                with releasing(srv, [oid], [entry], "alice", alice.id, "move", lambda error: True):
                    raise PermissionDeniedError(f"object id {oid} is already in use on worker 'elsewhere'")
    finally:
        srv._turn.release()
    assert reads and not any(reads), f"the revocation record was read in the turn: {reads}"
    from veil.governance.requests import ReviewQueue

    assert ReviewQueue(srv).get(rid).state == "approved"  # (given back: nothing voided it)


def test_a_revocation_while_a_move_holds_its_approval_still_voids_it(hook):
    """Guard for the read's new place: the owner revokes and readmits alice while her move holds the approval; the
    refused move gives nothing back (the approval lapses)."""
    from veil.governance.release import releasing
    from veil.governance.requests import ReviewQueue

    srv, did = _server(hook, "gov4-revoke")
    alice, oid, rid = _approved_times_three(srv, did)
    entry = dict(srv.monitor.owner_entries())[oid]
    with pytest.raises(PermissionDeniedError, match="already in use"):
        with releasing(srv, [oid], [entry], "alice", alice.id, "move", lambda error: True):
            srv.revoke("alice")
            srv.readmit("alice")
            raise PermissionDeniedError(f"object id {oid} is already in use on worker 'elsewhere'")
    req = ReviewQueue(srv).get(rid)
    assert req.state == "lapsed" and "revoked" in req.message, req


# --------------------------------------------------------------------------- 2, 3. migrations at opening


def _rows(path, sql, params=()):
    with sqlite3.connect(path) as db:
        columns = None
        cur = db.execute(sql, params)
        if cur.description:
            columns = [c[0] for c in cur.description]
            return [dict(zip(columns, r)) for r in cur.fetchall()]
    return []


def _insert(path, rows):
    with sqlite3.connect(path) as db:
        for row in rows:
            db.execute(f"INSERT INTO release_requests ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                       tuple(row.values()))


def _old_database(hook, tmp_path, approvals=1):
    """An owner database holding ``approvals`` approved ``d * 3`` of alice, closed; (path, [(object id, rid)])."""
    from veil.workers.persistence import OwnerDB

    path = tmp_path / OwnerDB.FILENAME
    srv, did = _server(hook, "gov4-db", OwnerDB(str(path)))
    made = [_approved_times_three(srv, did)[1:] for _ in range(approvals)]
    srv.db.close()
    with sqlite3.connect(path) as db:  # (an older version wrote no migration progress)
        db.execute("DELETE FROM kv WHERE namespace = 'governance.migration'")
    return path, made


def _reopened(hook, path):
    from veil.governance.requests import ReviewQueue
    from veil.workers.persistence import OwnerDB

    srv, did = _server(hook, "gov4-db", OwnerDB(str(path)))
    return srv, did, ReviewQueue(srv)


def _decoys_and_one_voided(path, rid, decoys):
    """``decoys`` approvals of ``rid``'s value with a later denial of the same bytes from another computation (it
    voids none of them), their ids before one approval of another id a later denial of the very value voided
    (``req-zz-voided``)."""
    (row,) = _rows(path, "SELECT * FROM release_requests WHERE id = ?", (rid,))
    rows = [dict(row, id=f"req-aa-{i:05d}") for i in range(decoys)]
    rows.append(dict(row, id="req-ab-denial", state="denied", graph="{}", message="another computation",
                     decided_ts=row["decided_ts"] + 1))
    elsewhere = str(int(row["object_id"]) + 1)
    rows += [dict(row, id="req-zz-voided", object_id=elsewhere),
             dict(row, id="req-zz-denial", object_id=elsewhere, state="denied", message="not this",
                  decided_ts=row["decided_ts"] + 1)]
    _insert(path, rows)


def test_the_migration_goes_past_approvals_it_cannot_lapse(hook, tmp_path):
    """1,001 approvals whose same-bytes denial came from another computation sort before a voided one: the fixed
    ``LIMIT 1000`` read them at every opening and never reached it."""
    path, [(_, rid)] = _old_database(hook, tmp_path)
    _decoys_and_one_voided(path, rid, 1001)
    srv, _, queue = _reopened(hook, path)
    try:
        voided = queue.get("req-zz-voided")
        assert voided.state == "lapsed" and "req-zz-denial" in voided.message, voided
        assert queue.get("req-aa-00000").state == "approved"  # (another computation's denial voids nothing)
    finally:
        srv.db.close()


def test_the_migration_checks_a_bounded_number_per_opening_and_goes_on_at_the_next(hook, tmp_path, monkeypatch):
    """Bound: 2 checked per opening (pages of 2) with 3 approvals it cannot lapse first (2 decoys and the original):
    the first opening does not reach the voided one, the second goes on from where the first stopped and lapses
    it."""
    from veil.governance import lapse_migration

    monkeypatch.setattr(lapse_migration, "PAGE", 2)
    monkeypatch.setattr(lapse_migration, "CHECK_AT_MOST", 2)
    path, [(_, rid)] = _old_database(hook, tmp_path)
    _decoys_and_one_voided(path, rid, 2)
    checked = []
    real = lapse_migration.after_given_back
    monkeypatch.setattr(lapse_migration, "after_given_back", lambda q, r, k: (checked.append(r), real(q, r, k))[1])
    for opening, state in enumerate(("approved", "lapsed")):
        srv, _, queue = _reopened(hook, path)
        try:
            assert queue.get("req-zz-voided").state == state, opening
        finally:
            srv.db.close()
    assert len(checked) == 4 and len(set(checked)) == 4, checked  # (2 an opening, none twice)


def _store_revocation(path, name, revoked, ts):
    """As an older version stored a revocation or readmission: the record only, no lapse."""
    import json

    with sqlite3.connect(path) as db:
        db.execute("INSERT OR REPLACE INTO kv (namespace, key, value, updated) VALUES (?, ?, ?, ?)",
                   (REVOKED, name, json.dumps({"revoked": revoked, "by": "owner", "ts": ts}).encode(), ts))


def test_approvals_open_at_a_revocation_an_older_version_stored_lapse_at_opening(hook, tmp_path):
    """An older version revoked and readmitted alice without lapsing her approval of ``d * 3``: at the next start
    the same value recomputed under the same id used it. Must hold: it lapses at opening, the recomputed value is
    pending a new request, nothing is released; an approval given after the readmission stands."""
    path, [(oid, rid)] = _old_database(hook, tmp_path)
    _store_revocation(path, "alice", False, time.time() + 1)  # (readmitted after the approval)
    srv, did, queue = _reopened(hook, path)
    try:
        req = queue.get(rid)
        assert req.state == "lapsed" and "revoked" in req.message, req
        alice = open_session(srv, TOKENS["alice"])
        assert type(request(srv, alice, m.CommandMessage("torch.mul", (m.ObjectRef(did), 3.0), {}, [oid],
                                                         False))) is m.OkReply
        assert _rid(request(srv, alice, m.GetObjectsMessage([oid], False))) != rid
        _, later_oid, later = _approved_times_three(srv, did)
    finally:
        srv.db.close()
    srv, _, queue = _reopened(hook, path)  # (the migration ran once: an approval after the readmission stands)
    try:
        assert queue.get(later).state == "approved"
    finally:
        srv.db.close()


def test_approvals_of_a_user_an_older_version_left_revoked_lapse_at_opening(hook, tmp_path):
    path, [(_, rid)] = _old_database(hook, tmp_path)
    _store_revocation(path, "alice", True, time.time() - 3600)  # (whatever its time: still revoked)
    srv, _, queue = _reopened(hook, path)
    try:
        req = queue.get(rid)
        assert req.state == "lapsed" and "revoked" in req.message, req
    finally:
        srv.db.close()


# --------------------------------------------------------------------------- 4, 5. policy changes and the turn


def test_a_policy_change_from_the_owners_code_is_put_in_force_in_the_turn(hook, monkeypatch):
    """A get of alice's ``d * 3`` under review runs in its turn; the owner's change to dp-only (``worker.set_policy``,
    no turn) lands between the DP guard's check and the review check. Must hold: the change waits for the turn, the
    get answers pending, and then the value is refused under dp-only."""
    release = importlib.import_module("veil.governance.release")
    from veil.governance.state import policy_of

    srv, did = _server(hook, "gov4-mix")
    alice = open_session(srv, TOKENS["alice"])
    x = computed(srv, alice, "torch.mul", m.ObjectRef(did), 3.0)
    changing: list = []
    real = release.needs_review

    def the_owner_changes_meanwhile(*args, **kwargs):
        if not changing:
            t = threading.Thread(target=srv.set_policy, args=("#d", "dp-only"), daemon=True)
            changing.append(t)
            t.start()
            t.join(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(release, "needs_review", the_owner_changes_meanwhile)
    reply = request(srv, alice, m.GetObjectsMessage([x.id], False))
    changing[0].join(10)
    assert not changing[0].is_alive() and policy_of(srv, did) == "dp-only"
    assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
    after = request(srv, alice, m.GetObjectsMessage([x.id], False))
    assert type(after) is m.ErrorReply and "differential-privacy" in after.message, after


def test_a_console_policy_change_waits_for_the_turn(hook):
    starlette_testclient = pytest.importorskip("starlette.testclient")
    from veil.governance.console.app import build_app
    from veil.governance.state import policy_of

    srv, did = _server(hook, "gov4-console")
    client = starlette_testclient.TestClient(build_app(srv, ["testserver"]), follow_redirects=False)
    page = client.get("/login")
    login = page.text.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
    client.post("/login", data={"login_csrf": login, "token": TOKENS["owner"]})
    csrf = client.get("/datasets").text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    out: dict = {}
    srv._turn.acquire()  # (a command in its turn)
    try:
        t = threading.Thread(target=lambda: out.update(r=client.post(
            "/datasets/policy", data={"csrf": csrf, "id": str(did), "policy": "dp-only"})), daemon=True)
        t.start()
        t.join(0.5)
        assert policy_of(srv, did) == "review", "the console changed the policy while a command held the turn"
    finally:
        srv._turn.release()
    t.join(10)
    assert out["r"].status_code == 303 and policy_of(srv, did) == "dp-only"


def test_values_computed_under_review_are_not_released_once_the_dataset_is_dp_only(hook):
    w = sy.VirtualWorker(hook, id=f"gov4-dponly-{time.monotonic_ns()}")
    w.load(SECRET.clone(), tags=("#d",), policy="review")
    y = w.search(["#d"])[0] * 3
    w.set_policy("#d", "dp-only")
    with pytest.raises(PermissionDeniedError, match="differential-privacy"):
        y.get()


def test_an_admin_policy_change_stores_its_decision_outside_the_turn(hook, monkeypatch):
    from veil.governance.state import governance, policy_of
    from veil.governance.wire import AdminPolicyMessage

    srv, did = _server(hook, "gov4-admin")
    db, stores = governance(srv).db, []
    real = db.kv_put
    monkeypatch.setattr(db, "kv_put", lambda ns, *a: (stores.append(_in_turn()) if ns == "governance.policy"
                                                      else None, real(ns, *a))[1])
    owner = open_session(srv, TOKENS["owner"])
    reply = request(srv, owner, AdminPolicyMessage("#d", "dp-only"))
    assert type(reply) is m.ObjectsReply and reply.objects == [did], reply
    assert policy_of(srv, did) == "dp-only"
    assert stores == [False], f"the decision was stored in the turn: {stores}"
    from veil.governance.policy import stored_decisions

    assert ({"#d"}, "dp-only") in stored_decisions(srv)
