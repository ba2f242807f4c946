"""Red team, second pass on the refusal-row writer (veil/workers/audit_writer.py, 86afd57 / 0ef8f30).

Refused requests' and handshakes' audit rows go to a thread of the worker's own, in order. Holes found, each a
strict xfail on the code before its fix (checked by running this file on that code):

- a full queue (MAX_PENDING rows waiting on a stalled database) made whoever handed the next row wait for room:
  the event loop again (an inline refusal, a refused handshake), every connection and ping held. Must hold:
  handing a row never waits; the rows past the cap are counted into a summary row (count, ids, last text),
  written after the rows before it, and a wait for the rows handed (the stop's flush, before the database
  closes) covers them;
- a queued row held the requester's whole id list and text (the audit table keeps 1000 ids and 500
  characters) until the database answered: 20 rows a user a window of a request's decoded ids. Must hold: the
  queued row is the stored row's copy, and the row written is what the table kept before;
- governance rows (a policy change, release filings and decisions: ``state.audit``) went straight to the
  database while refusal rows handed before them waited in the queue: the log showed the owner's change before
  an earlier probe. Must hold: a direct row goes after the rows handed before it;
- lock order (lock_order.py): a thread in the turn missing the governance lock waited until it was free, gave
  it back, re-entered the turn and tried again, for as long as release decisions (outside the turn, many
  sessions) took it meanwhile while other commands queued for the turn: the owner's policy change (admin
  message) and the sync of a stricter policy stored on another replica were starved. Must hold: each completes
  within a bound while decisions keep coming.

Guards (could fail): a database error on one row neither kills the writer nor holds the rows after it; rows
handed as the idle thread exits are all written.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from veil.ids import new_id
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session  # noqa: E402
from test_redteam_turn_locks import (HOLD_S, TOKENS, _HangOnce, _in_thread, _inline,  # noqa: E402
                                     _refused_rows, _worker)


def _compute_refused(a, k) -> bool:
    return a[1] == "compute" and a[5] == "refused"


def test_a_full_row_queue_does_not_hold_the_event_loop_and_counts_the_rows_past_it(hook, monkeypatch):
    from veil.messaging.serde import deserialize
    from veil.workers import audit_writer

    monkeypatch.setattr(audit_writer, "MAX_PENDING", 3)
    srv, _ = _worker(hook, "aw-full")
    alice = open_session(srv, TOKENS["alice"])
    audit = _HangOnce(monkeypatch, srv.db, "audit", when=lambda *a, **k: _compute_refused(a, k), hold=HOLD_S)
    hung = srv.db.audit

    def slow_summary(*a, **k):  # (so a wait that returned before the summary was written is seen)
        if str(a[6]).startswith("5 more"):
            time.sleep(0.3)
        return hung(*a, **k)

    monkeypatch.setattr(srv.db, "audit", slow_summary)
    unknown = [new_id() for _ in range(8)]
    try:
        for oid in unknown:
            loop, out = _inline(srv, alice, m.CommandMessage("torch.add", (m.ObjectRef(oid), 1.0), {},
                                                             [new_id()], False))
            loop.join(HOLD_S)
            # (answered while the first row's write is still held: a loop waiting for room is answered only after)
            assert not loop.is_alive() and not audit.ended(), "the event loop waited for room in the row queue"
            assert deserialize(out["reply"][0])[0].error == "ObjectNotFoundError", out
        assert audit.started.wait(10)
        assert not srv.audit_rows.wait(0.1)  # (nothing written yet: the first row's write hangs)
    finally:
        audit.release()
    assert srv.audit_rows.wait(10)  # (the summary too: what the stop's flush waits for before the database closes)
    rows = [e for e in srv.db._db.execute("SELECT object_ids, detail, principal FROM audit WHERE action = 'compute'"
                                          " AND outcome = 'refused' ORDER BY seq").fetchall()]
    rows = [{"object_ids": __import__("json").loads(r[0]), "detail": r[1], "principal": r[2]} for r in rows]
    assert [r["object_ids"] for r in rows[:3]] == [[oid] for oid in unknown[:3]], rows
    assert len(rows) == 4, rows  # (the 5 past the cap: one row, after the 3 queued)
    assert rows[3]["detail"].startswith("5 more refused compute rows not written one by one"), rows[3]
    assert rows[3]["object_ids"] == unknown[3:] and rows[3]["principal"] == "alice", rows[3]
    assert rows[3]["detail"].endswith(f"last: object {unknown[-1]} not found on worker {srv.id!r}")


def test_a_queued_refusal_row_holds_only_what_the_audit_table_keeps(hook, monkeypatch):
    srv, _ = _worker(hook, "aw-copy")
    audit = _HangOnce(monkeypatch, srv.db, "audit", when=lambda *a, **k: _compute_refused(a, k))
    ids, text = list(range(1, 200_001)), "x" * 100_000
    try:
        for _ in range(2):
            srv.refused_requests.refused("compute", "alice", "s-1", ids, text)
        assert audit.started.wait(10)
        queued = list(srv.audit_rows._rows)
        assert len(queued) == 2
        assert all(len(row[3]) <= 1000 and len(row[5]) <= 500 for row in queued), "a queued row holds the request"
    finally:
        audit.release()
    rows = _refused_rows(srv, "compute")
    assert len(rows) == 2 and all(r["object_ids"] == ids[:1000] and r["detail"] == text[:500] for r in rows)


def test_a_governance_row_goes_after_the_refusal_rows_handed_before_it(hook, monkeypatch):
    from veil.governance.policy import set_policy

    srv, did = _worker(hook, "aw-order")
    audit = _HangOnce(monkeypatch, srv.db, "audit", when=lambda *a, **k: _compute_refused(a, k))
    probe = new_id()
    try:
        srv.refused_requests.refused("compute", "alice", "s-1", [probe], "a probe before the owner's change")
        assert audit.started.wait(10)
        changing, out = _in_thread(lambda: set_policy(srv, "#d", "open"))
        time.sleep(0.2)
    finally:
        audit.release()
    changing.join(20)
    assert not changing.is_alive() and "error" not in out, out
    srv.audit_rows.wait(10)
    entries = srv.db.audit_entries()
    probe_at = next(i for i, e in enumerate(entries) if e["object_ids"] == [probe])
    change_at = next(i for i, e in enumerate(entries) if e["action"] == "policy" and e["object_ids"] == [did])
    assert probe_at < change_at, "the owner's change was logged before a refusal handed before it"


def test_a_database_error_on_one_row_neither_stops_the_writer_nor_holds_the_rows_after(monkeypatch):
    from veil.workers import audit_writer

    monkeypatch.setattr(audit_writer, "IDLE_S", 0.05)
    written: list = []

    def write(action, principal, session, ids, outcome, detail):
        if detail == "boom":
            raise RuntimeError("the database failed")
        written.append(detail)

    writer = audit_writer.RowWriter(write, "aw-test-errors")
    for detail in ("a", "boom", "b", "c"):
        writer.submit("compute", "alice", "-", [], "refused", detail)
    assert writer.wait(5) and written == ["a", "b", "c"]
    time.sleep(0.2)  # (the thread ended idle)
    writer.submit("compute", "alice", "-", [], "refused", "d")
    assert writer.wait(5) and written[-1] == "d"


def test_rows_handed_while_the_idle_writer_exits_are_all_written(monkeypatch):
    from veil.workers import audit_writer

    monkeypatch.setattr(audit_writer, "IDLE_S", 0.0005)
    written: list = []
    writer = audit_writer.RowWriter(lambda *row: written.append(row[5]), "aw-test-idle")

    def hand(prefix):
        for i in range(150):
            writer.submit("compute", "alice", "-", [], "refused", f"{prefix}{i}")
            time.sleep(0.0007 if i % 3 else 0)

    threads = [threading.Thread(target=hand, args=(p,)) for p in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert writer.wait(5) and len(written) == 300
    for p in "xy":  # (each thread's rows in the order it handed them)
        assert [d for d in written if d[0] == p] == [f"{p}{i}" for i in range(150)]


# --------------------------------------------------------------------------- lock order: starvation


def _starved(srv, action) -> tuple[bool, dict]:
    """Runs ``action`` in a thread while three release decisions hold the governance lock back to back (each
    across its database statements, outside the turn) and other sessions' commands take the turn: whether it was
    still waiting after 3 s, and its outcome once that load stopped."""
    from veil.governance.state import governance

    lock, stop = governance(srv).lock, threading.Event()

    def decisions():
        while not stop.is_set():
            with lock:
                time.sleep(0.004)

    def commands():
        while not stop.is_set():
            with srv._turn:
                time.sleep(0.002)

    busy = [threading.Thread(target=decisions, daemon=True) for _ in range(3)]
    busy.append(threading.Thread(target=commands, daemon=True))
    for t in busy:
        t.start()
    try:
        acting, out = _in_thread(action)
        acting.join(3.0)
        starved = acting.is_alive()
    finally:
        stop.set()
        for t in busy:
            t.join(5)
    acting.join(10)
    return starved, out


def test_an_owners_policy_change_in_the_turn_is_not_starved_by_release_decisions(hook):
    """Release decisions of many sessions (outside the turn) hold the governance lock back to back. The owner's
    tightening in the turn waited until the lock was free, gave it back, re-entered the turn and tried again:
    by then another decision held it, for as long as they kept coming. Must hold: it completes within a bound."""
    from veil.governance.state import policy_of
    from veil.governance.wire import AdminPolicyMessage
    from server_sessions import request

    srv, _ = _worker(hook, "aw-starve")
    other = srv.load(__import__("torch").ones(4), tags=("#e",))
    owner = open_session(srv, TOKENS["owner"])
    starved, out = _starved(srv, lambda: request(srv, owner, AdminPolicyMessage("#e", "dp-only")))
    assert not starved, "the owner's policy change waited as long as release decisions kept coming"
    assert type(out.get("reply")) is m.ObjectsReply and policy_of(srv, other) == "dp-only", out


def test_a_synced_stricter_policy_is_not_starved_by_release_decisions(hook):
    """The same for the sync of a stricter policy the owner stored on another replica (turn_and_governance_lock)."""
    from veil.governance import policy
    from veil.governance.state import policy_of

    srv, _ = _worker(hook, "aw-starve-sync")
    other = srv.load(__import__("torch").ones(4), tags=("#e",))
    policy._store_policy(srv, dict(srv.monitor.owner_entries())[other], "dp-only", "owner")
    starved, out = _starved(srv, srv.sync_policies_now)
    assert not starved, "the sync of the owner's stricter policy waited as long as release decisions kept coming"
    assert out.get("reply") == [other] and policy_of(srv, other) == "dp-only", out
