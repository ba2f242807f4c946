"""Red team on audit rows and the worker's turn (veil/workers/audit_writer.py, allowed_rows.py, inline_lane.py,
loop_rows.py, get_ids.py): an honest session's get starved by another session flooding refusals. Each hole was a
strict xfail on the code before its fix (checked by running this file on that code):

- a get sent to a handler thread undecoded (the lane found the turn held, as it is while a flood is served) took
  the turn, then its allowed row waited there for the queued refusal rows: every session's command held while the
  writer caught up (up to 20 s behind a stalled write). Must hold: no get waits for the writer in the turn; another
  session is served meanwhile; the get's reply goes only once its own allowed row is on record, after the rows
  handed before it (the log keeps its order);
- every allowed row of a get waited for the whole queue, rows handed between two of its ids included, in the turn.
  Must hold: its rows are queued in order; only its reply waits for them, outside the turn;
- an inline get's allowed row was one database write on the event loop (a slow database held every connection
  per get). Must hold: the loop queues it; the connection's reply waits for it and carries the value;
- a summary row (standing for N refusals) whose write failed was logged without N. Must hold: the log says how many
  refused requests it stood for.

Guards (each checked to fail with the part it guards taken out): an allowed row that could not be written turns
the get's reply into one error line with no value, on a handler thread and inline alike (a release is never
answered before its row is on record); a get naming many objects has at most ``ALLOWED_AHEAD`` rows queued at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from pathlib import Path

import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, quota_worker, request, send_tensor  # noqa: E402
from test_redteam_turn_lookup import _HangOnce  # noqa: E402


def _rows(srv, outcome: str) -> list[tuple]:
    """(seq, action, principal, object_ids) on record now, read straight from the table (no wait for the writer)."""
    with srv.db._lock:
        return srv.db._db.execute("SELECT seq, action, principal, object_ids FROM audit WHERE outcome = ? "
                                  "ORDER BY seq", (outcome,)).fetchall()


def _two_sessions(hook, prefix: str):
    srv = quota_worker(hook, f"{prefix}-{new_id()}", f"{prefix}-scientist", None)
    honest, other = open_session(srv, f"{prefix}-scientist"), open_session(srv, f"{prefix}-scientist")
    return srv, honest, other


def _watch_waits(monkeypatch, srv, thread_name: str) -> list:
    """Records, for each wait of thread ``thread_name`` on the row writer that had rows to wait for, whether the
    worker's turn was held then (nobody else holds it in these tests: held means held by that thread)."""
    from veil.workers import audit_writer

    seen: list = []
    real = audit_writer.RowWriter._wait_for

    def watched(self, seq, timeout):
        if threading.current_thread().name == thread_name and self._written < seq:
            seen.append(srv._turn._held)
            waiting.set()
        return real(self, seq, timeout)

    waiting = threading.Event()
    monkeypatch.setattr(audit_writer.RowWriter, "_wait_for", watched)
    return seen, waiting


def _get_in_thread(srv, session, ids, name: str, decoded=None) -> tuple[threading.Thread, dict]:
    out: dict = {}
    data = serialize(m.GetObjectsMessage(ids, False), sender="client")

    def get():
        out["reply"] = deserialize(srv.serve_bytes(data, session, decoded=decoded))[0]
        out["allowed_then"] = len(_rows(srv, "allowed"))

    t = threading.Thread(target=get, name=name)
    t.start()
    return t, out


def test_an_undecoded_get_does_not_wait_for_queued_rows_in_the_turn(hook, monkeypatch):
    """Attack: a hostile session's refusal rows queue behind a slow (here: stalled) write; an honest get reaches a
    handler thread undecoded (the lane found the turn held) and its allowed row waited for the queue in the turn.
    Must hold: it never waits for the writer in the turn; another session's command is served meanwhile; its reply
    carries the value once its allowed row is on record, after the refusal handed before it."""
    srv, honest, other = _two_sessions(hook, "at-undecoded")
    oid = send_tensor(srv, honest, torch.tensor([7.0, 8.0]))
    mine = send_tensor(srv, other, torch.tensor([1.0, 2.0]))
    assert srv.audit_rows.wait(10)
    hang = _HangOnce(monkeypatch, srv.db, "audit", when=lambda *a, **k: a[5] == "refused")
    waits, waiting = _watch_waits(monkeypatch, srv, "at-getter")
    try:
        flood = threading.Thread(target=srv.refused_requests.refused,  # (the other session's thread)
                                 args=("compute", "mallory", "s-m", [12345], "a probe"))
        flood.start()
        flood.join(10)
        assert hang.started.wait(10)
        getter, out = _get_in_thread(srv, honest, [oid], "at-getter")  # (undecoded: decoded=None)
        assert waiting.wait(10)
        assert not srv._turn._held, "the get waited for the row writer holding the turn"
        served = request(srv, other, m.CommandMessage("torch.mul", (m.ObjectRef(mine), 2.0), {}, [new_id()], False))
        assert type(served) is m.OkReply, served
        assert "reply" not in out, "the get was answered before its allowed row was on record"
    finally:
        hang.release()
    getter.join(20)
    assert not any(waits), f"the get waited for the row writer holding the turn: {waits}"
    assert torch.equal(out["reply"].objects[0], torch.tensor([7.0, 8.0])), out
    assert out["allowed_then"] == 1, "the reply went before its allowed row was on record"
    refused, allowed = _rows(srv, "refused"), _rows(srv, "allowed")
    assert refused[0][0] < allowed[0][0], "the allowed row was logged before the refusal handed before it"


def test_rows_handed_during_a_get_are_waited_for_outside_the_turn(hook, monkeypatch):
    """Attack: another thread hands a refusal row (which stalls) between two ids of a get already in the turn: the
    second id's allowed row waited for it in the turn. Must hold: the get waits only outside the turn, its reply
    goes once both its rows are on record, and the log keeps the order (first id, the refusal, second id)."""
    srv, honest, _ = _two_sessions(hook, "at-between")
    a = send_tensor(srv, honest, torch.tensor([1.5]))
    b = send_tensor(srv, honest, torch.tensor([-2.5]))
    assert srv.audit_rows.wait(10)
    hang = _HangOnce(monkeypatch, srv.db, "audit", when=lambda *a_, **k: a_[5] == "refused")
    real_check, handed = srv.monitor._check_release, []

    def between(principal, entry, oid, action):  # (the flood's row, handed after the get's first allowed row)
        if oid == b and not handed:
            handed.append(oid)
            t = threading.Thread(target=srv.refused_requests.refused,
                                 args=("compute", "mallory", "s-m", [999], "a probe"))
            t.start()
            t.join(10)
            assert hang.started.wait(10)
        return real_check(principal, entry, oid, action)

    monkeypatch.setattr(srv.monitor, "_check_release", between)
    waits, waiting = _watch_waits(monkeypatch, srv, "at-getter2")
    try:
        getter, out = _get_in_thread(srv, honest, [a, b], "at-getter2")
        assert waiting.wait(10)
        turn_free = srv._turn.try_acquire()
        if turn_free:
            srv._turn.release()
        assert "reply" not in out, "the get was answered before its allowed rows were on record"
    finally:
        hang.release()
    getter.join(20)
    assert turn_free, "the get held the turn while the writer was behind"
    assert waits and not any(waits), f"the get waited for the row writer holding the turn: {waits}"
    assert [t.tolist() for t in out["reply"].objects] == [[1.5], [-2.5]], out
    assert out["allowed_then"] == 2
    order = sorted([(s, act) for s, act, _, _ in _rows(srv, "allowed") + _rows(srv, "refused")])
    assert [act for _, act in order] == ["get", "compute", "get"], order


def test_an_inline_gets_allowed_row_is_not_written_on_the_event_loop(hook, monkeypatch):
    """Attack: the owner's database is slow but keeps up (nothing queued when the get arrives): an inline get's
    allowed row was one write on the event loop, every connection held per get. Must hold: the loop writes no row;
    the connection's reply (awaited off the loop) carries the value once the row is on record. (A database whose
    writes can wait on I/O, a file or PostgreSQL, gives the loop no lock to write with; an in-memory one does:
    test_loop_rows_written.py.)"""
    from veil.workers.loop_rows import released

    srv, honest, _ = _two_sessions(hook, "at-inline")
    srv.audit_rows.loop_lock = None  # (as OwnerDB.loop_write_lock gives for a file or a PostgreSQL database)
    oid = send_tensor(srv, honest, torch.tensor([3.25, -1.0]))
    assert srv.audit_rows.wait(10) and not srv.audit_rows.busy()
    writers: list = []
    real = srv.db.audit

    def recorded(*a, **k):
        if a[5] == "allowed":
            writers.append(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(srv.db, "audit", recorded)
    data = serialize(m.GetObjectsMessage([oid], False), sender="client")
    out: dict = {}
    loop = threading.Thread(target=lambda: out.update(r=srv.lane_request(data, honest)), name="at-loop")
    loop.start()
    loop.join(10)
    reply, decoded = out["r"]
    assert decoded is None and reply is not None, "not served inline"
    sent = asyncio.run(released(srv.audit_rows, reply))
    assert "at-loop" not in writers, "the event loop wrote the get's allowed row"
    assert len(_rows(srv, "allowed")) == 1
    got = deserialize(sent)[0]
    assert torch.equal(got.objects[0], torch.tensor([3.25, -1.0])), got


def _failing_allowed(monkeypatch, srv) -> None:
    real = srv.db.audit

    def failing(*a, **k):
        if a[5] == "allowed":
            raise RuntimeError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(srv.db, "audit", failing)


def test_a_get_whose_allowed_row_fails_releases_nothing(hook, monkeypatch):
    """Guard. Attack: the owner's database refuses the allowed row (a full disk) while a get is served on a handler
    thread or inline, hoping the value goes out unlogged. Must hold: one error line, no value; the worker serves."""
    from veil.workers.loop_rows import released

    srv, honest, _ = _two_sessions(hook, "at-fail")
    oid = send_tensor(srv, honest, torch.tensor([4.0, 5.0]))
    assert srv.audit_rows.wait(10)
    _failing_allowed(monkeypatch, srv)
    data = serialize(m.GetObjectsMessage([oid], False), sender="client")
    sent = asyncio.run(released(srv.audit_rows, srv.lane_request(data, honest)[0]))
    for raw in (srv.serve_bytes(data, honest), sent):
        got = deserialize(raw)[0]
        assert type(got) is m.ErrorReply and "\n" not in got.message, got
    monkeypatch.undo()
    got = request(srv, honest, m.GetObjectsMessage([oid], False))
    assert torch.equal(got.objects[0], torch.tensor([4.0, 5.0])), got


def test_a_failed_summary_row_is_logged_with_its_count(caplog):
    """Attack: a summary row standing for many refusals fails to be written (a database error): the log said only
    that a row was lost. Must hold: it says how many refused requests the lost row stood for."""
    from veil.workers.audit_writer import RowWriter

    def write(*row):
        raise RuntimeError("the database failed")

    writer = RowWriter(write, "at-summary")
    with caplog.at_level(logging.ERROR, logger="veil.workers.audit_writer"):
        writer.submit("compute", "mallory", "-", [1], "refused", "137 more refused compute requests", stands_for=137)
        assert writer.wait(10)
    assert any("137" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_get_naming_many_objects_queues_a_bounded_number_of_rows(hook, monkeypatch):
    """Guard. Attack: a get naming hundreds of its own objects queues one allowed row each without waiting, hoping
    to grow the row queue without bound (a database slower than the get). Must hold: one thread has at most
    ``ALLOWED_AHEAD`` allowed rows queued at once; every value comes back and every row is on record."""
    from veil.workers import audit_writer

    srv, honest, _ = _two_sessions(hook, "at-ahead")
    ids, values = [new_id() for _ in range(150)], [torch.tensor([float(i)]) for i in range(150)]
    reply = request(srv, honest, m.ObjectMessage([m.StoredObject(i, v) for i, v in zip(ids, values)]))
    assert type(reply) is m.OkReply, reply
    assert srv.audit_rows.wait(10)
    monkeypatch.setattr(audit_writer, "ALLOWED_AHEAD", 16)
    queued: list = []
    real_submit = audit_writer.RowWriter.submit_allowed

    def counted(self, *row):
        real_submit(self, *row)
        with self._changed:
            queued.append(sum(1 for r in self._rows if r[7] is not None))

    monkeypatch.setattr(audit_writer.RowWriter, "submit_allowed", counted)
    real_audit = srv.db.audit

    def slower(*a, **k):  # (a database slower than the get: its rows would pile up)
        time.sleep(0.002)
        return real_audit(*a, **k)

    monkeypatch.setattr(srv.db, "audit", slower)
    got = request(srv, honest, m.GetObjectsMessage(ids, False))
    assert [t.tolist() for t in got.objects] == [v.tolist() for v in values]
    assert len(queued) == 150 and max(queued) <= 16, max(queued)
    assert len(_rows(srv, "allowed")) == 150
