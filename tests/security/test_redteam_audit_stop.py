"""Red team: the refusal-audit writer and the worker's stop (veil/workers/audit_writer.py, refusal_rows.py,
veil/governance/lock_order.py, the console's stop), the holes the writer's second pass left. Each a strict xfail
on the code before its fix (checked by running this file on that code):

- an inline refusal's row: the event loop waited for it (up to 50 ms each while the owner's database kept up at
  50-100 ms a write: every connection and ping held that long per refusal). Must hold: the loop never waits on
  the writer; the connection's reply still goes after its row (awaited by that connection only);
- rows past the writer's cap: a handler thread did not wait for the summary row its refusal was counted into.
  Must hold: its reply goes after that row;
- a flood queued at the stop (or at the SIGTERM, which runs the same stop): the stop waited 20 s, then closed
  the database under the rows still queued. Must hold: when the queue does not drain in time, the rows still
  queued are folded into one summary row per (action, principal) written before the database closes, and the
  rows then on record account for every refusal;
- a thread waiting for the governance lock outside the turn ignored its command's deadline and cancellation.
  Must hold: it ends with the command's timeout error while the lock is still held elsewhere;
- a window's summary kept every session a user refused from (one per connection, without bound). Must hold: a
  bounded number kept per summary, and the rows still count every session and refusal;
- the console's stop waited up to 30 s for a request held open by a slow client (a body trickled in). Must
  hold: the stop cuts it at once and the client gets one clear line (503);
- an inline ``get`` (its allowed row is written directly, after the refusal rows handed before it) ran on the
  event loop while refusal rows waited for a stalled database: the loop waited up to 20 s for the writer. Must
  hold: the loop does not wait; the get goes to a handler thread and returns the value (an SMPC opening, whose
  "open" row is an allowed row too, likewise).

Guards (each checked to fail when the part it guards is taken out): a window summary still queued at the stop
keeps its count when folded; an inline reply waits for its own rows only (not a refused handshake's handed on the
loop just before); SIGTERM to a real ``veil worker`` runs the stop, so a flood of refused gets is all on record
(slow).
"""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session  # noqa: E402
from worker_processes import serve_in_thread, stop_served  # noqa: E402
from test_redteam_turn_locks import TOKENS, _in_thread, _worker  # noqa: E402


def _unknown_id_command() -> m.CommandMessage:
    return m.CommandMessage("torch.add", (m.ObjectRef(new_id()), 1.0), {}, [new_id()], False)


def _stored_refusals(srv, action: str = "compute") -> list[tuple]:
    """The refused rows on record now (read straight from the table: no wait for the writer)."""
    with srv.db._lock:
        return srv.db._db.execute("SELECT principal, session, object_ids, detail FROM audit WHERE action = ? AND "
                                  "outcome = 'refused' ORDER BY seq", (action,)).fetchall()


def _counted(rows) -> int:
    """Refusals the rows account for: one each, a summary ("N more ...") its N."""
    return sum(int(r[3].split()[0]) if re.match(r"\d+ more ", r[3]) else 1 for r in rows)


def _slow_refusal_writes(monkeypatch, srv, seconds: float) -> None:
    real = srv.db.audit

    def slow(*a, **k):
        if a[5] == "refused":
            time.sleep(seconds)
        return real(*a, **k)

    monkeypatch.setattr(srv.db, "audit", slow)


# --------------------------------------------------------------------------- the event loop


def test_an_inline_refusal_does_not_wait_for_its_row_on_the_event_loop(hook, monkeypatch):
    """Attack: refused inline commands (unknown ids) while the owner's database takes 80 ms a write, one at a time
    (the writer keeps up between them). Must hold: the thread running ``try_inline`` (the event loop) never
    waits on the row writer; every row is still written."""
    from veil.workers import audit_writer

    srv, _ = _worker(hook, "as-loop")
    alice = open_session(srv, TOKENS["alice"])
    _slow_refusal_writes(monkeypatch, srv, 0.08)
    loop_waits: list = []
    inside: list = []  # (set while try_inline runs)
    real_wait = audit_writer.RowWriter._wait_for

    def recorded(self, seq, timeout):
        if inside:
            loop_waits.append(timeout)
        return real_wait(self, seq, timeout)

    monkeypatch.setattr(audit_writer.RowWriter, "_wait_for", recorded)

    def serve_three():
        for _ in range(3):
            inside.append(1)
            reply, _ = srv.try_inline(serialize(_unknown_id_command(), sender="client"), alice)
            inside.clear()
            assert deserialize(reply)[0].error == "ObjectNotFoundError"
            assert srv.audit_rows.wait(5)  # (the writer caught up: the database "keeps up")

    loop = threading.Thread(target=serve_three, name="as-loop")
    loop.start()
    loop.join(30)
    assert not loop.is_alive()
    assert loop_waits == [], "the event loop waited for a refusal's row"
    assert len(_stored_refusals(srv)) == 3


def test_a_refused_inline_request_over_a_connection_is_answered_after_its_row(hook, monkeypatch):
    """The reply to a refused inline request still goes after its row (a client reading the owner's log right
    after the refusal finds it), now awaited by that connection alone while the database takes 300 ms."""
    srv, _ = _worker(hook, "as-conn")
    _slow_refusal_writes(monkeypatch, srv, 0.3)
    server = serve_in_thread(srv)
    client = sy.WebsocketClientWorker(hook, id=srv.id, host="127.0.0.1", port=srv.bound_port,
                                      token=TOKENS["alice"], timeout=30)
    try:
        for n in range(1, 3):
            reply = deserialize(client._recv_msg(serialize(_unknown_id_command(), sender="client")))[0]
            assert reply.error == "ObjectNotFoundError", reply
            assert len(_stored_refusals(srv)) == n, "the reply went out before its refusal's row"
    finally:
        client.close()
        stop_served(srv, server)


# --------------------------------------------------------------------------- rows past the cap, and the stop


def test_a_handler_thread_waits_for_the_summary_row_its_refusal_was_counted_into(monkeypatch):
    from veil.workers import audit_writer

    monkeypatch.setattr(audit_writer, "MAX_PENDING", 2)
    go, written = threading.Event(), []

    def write(*row):
        if row[5] == "first":
            go.wait(10)
        if row[5].startswith("2 more"):
            time.sleep(0.3)  # (so a wait that returned before the summary was written is seen)
        written.append(row[5])

    writer = audit_writer.RowWriter(write, "as-test-cap")
    done = {}

    def handler():
        for detail in ("first", "second", "third", "fourth"):  # (the last two past the cap)
            writer.submit("compute", "alice", "s-1", [], "refused", detail)
        done["waited"] = writer.wait_mine(10)
        done["written"] = list(written)

    t = threading.Thread(target=handler)
    t.start()
    time.sleep(0.1)
    go.set()
    t.join(20)
    assert done["waited"] and len(done["written"]) == 3, done
    assert done["written"][2].startswith("2 more refused compute rows"), done


def test_a_flood_queued_at_the_stop_is_accounted_for_before_the_database_closes(hook, monkeypatch):
    """Attack: ten users flood refusals (each its burst of 20, written in full) while the owner's database takes
    50 ms a write, then the worker is stopped (SIGTERM runs the same stop: ``refusals.flush``, then the
    database closes). Must hold: the rows on record when the stop's flush returns account for every refusal
    (those not written one by one in a summary row per user), within the stop's bound."""
    from veil.workers import audit_writer

    monkeypatch.setattr(audit_writer, "WAIT_S", 1.0)
    monkeypatch.setattr(audit_writer, "STOP_FOLD_S", 0.5, raising=False)
    srv, _ = _worker(hook, "as-stop")
    _slow_refusal_writes(monkeypatch, srv, 0.05)
    users = [f"user{i}" for i in range(10)]
    for _ in range(20):
        for user in users:
            srv.refused_requests.refused("compute", user, f"s-{user}", [7], "probe")
    started = time.monotonic()
    srv.refusals.flush()  # (the stop's flush)
    assert time.monotonic() - started < 10
    rows = _stored_refusals(srv)
    assert _counted(rows) == 200, f"{_counted(rows)} of 200 refusals on record when the database closes"
    for user in users:
        assert _counted([r for r in rows if r[0] == user]) == 20, user
    srv.db.close()


def test_the_stop_keeps_the_count_of_a_queued_window_summary(hook, monkeypatch):
    """A window summary ("N more refused ...") still queued at the stop counts its N in the row it is folded
    into, not one."""
    from veil.workers import audit_writer

    monkeypatch.setattr(audit_writer, "STOP_FOLD_S", 0.5, raising=False)
    srv, _ = _worker(hook, "as-stop-sum")
    _slow_refusal_writes(monkeypatch, srv, 0.05)
    for user in ("u1", "u2", "u3"):
        for _ in range(60):  # 20 in full, 40 in the window's summary
            srv.refused_requests.refused("compute", user, f"s-{user}", [9], "probe")
    for i in range(30):  # refused handshakes: 5 in full, 25 in the connect log's summary
        srv.refusals.refused(f"203.0.113.{i % 3}:4000", "bad token")
    srv.refusals.flush()
    rows = _stored_refusals(srv)
    for user in ("u1", "u2", "u3"):
        assert _counted([r for r in rows if r[0] == user]) == 60, (user, rows)
    assert _counted(_stored_refusals(srv, "connect")) == 30, _stored_refusals(srv, "connect")
    srv.db.close()


# --------------------------------------------------------------------------- the governance lock


@pytest.mark.parametrize("end", ["deadline", "cancel"])
def test_a_command_waiting_for_the_governance_lock_keeps_its_deadline(hook, end):
    from veil.exceptions import CommandCancelledError, CommandTimeoutError
    from veil.governance.lock_order import governance_lock
    from veil.governance.state import governance
    from veil.workers import cancellation

    srv, _ = _worker(hook, "as-lock")
    lock = governance(srv).lock
    lock.acquire()  # (a release decision in a lost COMMIT's lookup)
    token = cancellation.CancelToken(seconds=0.3 if end == "deadline" else None)
    token.start()

    def command():
        srv._turn.acquire()
        try:
            with cancellation.running(token, turn=srv._turn):
                with governance_lock(srv):
                    return "got the lock"
        finally:
            srv._turn.release()

    try:
        t, out = _in_thread(command)
        if end == "cancel":
            time.sleep(0.2)
            token.cancel("the worker is stopping")
        t.join(5)
        held = t.is_alive()
    finally:
        lock.release()
    t.join(10)
    assert not held, "the command waited for the lock past its deadline"
    expected = CommandTimeoutError if end == "deadline" else CommandCancelledError
    assert isinstance(out.get("error"), expected), out
    assert srv._turn.try_acquire(), "the turn was left taken"
    srv._turn.release()


# --------------------------------------------------------------------------- a window's summary


def test_a_window_summary_keeps_a_bounded_number_of_sessions_and_counts_them_all():
    from veil.workers.refusal_rows import RefusedRequestLog

    rows: list = []
    log = RefusedRequestLog(lambda *row, **_: rows.append(row), burst=0)
    largest = 0
    for i in range(5000):  # one refusal per connection, a new connection each time
        log.refused("compute", "mallory", f"s-{i}", [i], "probe")
        largest = max(largest, max(len(s.sessions) for s in log._suppressed.values()))
    log.flush()
    assert largest <= 1024, f"one summary kept {largest} sessions"
    counts = [int(r[5].split()[0]) for r in rows]
    sessions = [int(re.search(r"from (\d+) session", r[5]).group(1)) for r in rows]
    assert sum(counts) == 5000 and sum(sessions) == 5000, rows[:3]
    assert len(rows) <= 10, f"{len(rows)} summary rows"
    assert sorted(oid for r in rows for oid in r[3]) == list(range(5000))


# --------------------------------------------------------------------------- the console's stop


def test_a_console_request_held_by_a_slow_client_does_not_hold_the_stop(hook, monkeypatch):
    """Attack: anyone reaching the console's port sends a ``POST /login`` head and trickles its body; the owner
    stops the worker. The stop waited for that request (30 s at most, the body's own deadline aside: 60 s here).
    Must hold: the stop returns within a few seconds and the client is told in one line that the console is
    stopping."""
    from veil.governance.console import connections
    from veil.governance.console.server import ConsoleServer

    monkeypatch.setattr(connections, "BODY_SECONDS", 60.0)
    srv, _ = _worker(hook, "as-console")
    console = ConsoleServer(srv, host="127.0.0.1", port=0).start()
    slow = socket.create_connection(("127.0.0.1", console.port), timeout=10)
    try:
        slow.sendall((f"POST /login HTTP/1.1\r\nHost: {console.host_name}\r\nContent-Type: application/"
                      "x-www-form-urlencoded\r\nContent-Length: 4000\r\n\r\nlogin_csrf=").encode())
        deadline = time.monotonic() + 10
        while console.app.state.in_flight.count == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert console.app.state.in_flight.count == 1
        started = time.monotonic()
        stopping, _ = _in_thread(console.stop)
        stopping.join(20)
        took = time.monotonic() - started
        answer = b""
        try:
            while chunk := slow.recv(4096):
                answer += chunk
        except OSError:
            pass
    finally:
        slow.close()
        console.stop()
    assert took < 5, f"the stop waited {took:.1f} s for a slow client's request"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"stopping" in body and body.strip().count(b"\n") == 0, body


# --------------------------------------------------------------------------- SIGTERM


@pytest.mark.slow
def test_sigterm_runs_the_stop_and_a_flood_of_refusals_is_on_record(hook, tmp_path):
    """Guard (a real ``veil worker``): a scientist floods refused gets, then the worker gets SIGTERM. Must hold:
    SIGTERM runs the same stop (the window's summary and the queued rows are written before the database closes),
    so the log accounts for every refusal."""
    from veil.workers.persistence import OwnerDB
    from veil.workers.websocket_launcher import start_worker

    token = "audit-stop-sigterm-scientist"
    wp = start_worker("as-sigterm", ["--token", token, "--data-dir", str(tmp_path)])
    try:
        client = sy.WebsocketClientWorker(hook, id="as-sigterm", host="127.0.0.1", port=wp.port, token=token,
                                          timeout=30)
        for i in range(150):
            reply = deserialize(client._recv_msg(serialize(m.GetObjectsMessage([10**12 + i]), sender="c")))[0]
            assert type(reply) is m.ErrorReply
        client.close()
    finally:
        assert wp.stop(30) == 0
    db = OwnerDB.in_dir(tmp_path)
    try:
        rows = [(r["principal"], r["session"], r["object_ids"], r["detail"]) for r in db.audit_entries(10**6)
                if r["action"] == "get" and r["outcome"] == "refused"]
    finally:
        db.close()
    assert _counted(rows) == 150, rows[-2:]
    assert sorted(oid for r in rows for oid in r[2]) == [10**12 + i for i in range(150)]


def test_an_inline_reply_waits_for_its_own_rows_only(hook, monkeypatch):
    """A refused handshake's row (handed on the event loop) while the database is slow: another session's allowed
    inline request right after is not made to wait for that row."""
    from veil.workers.loop_rows import AfterRows, after_rows

    srv, _ = _worker(hook, "as-own")
    alice = open_session(srv, TOKENS["alice"])
    go = threading.Event()
    real = srv.db.audit
    monkeypatch.setattr(srv.db, "audit", lambda *a, **k: (go.wait(10), real(*a, **k))[1])
    try:
        srv.refusals.refused("203.0.113.9:5000", "bad token")  # (on this thread, as the loop does)
        reply, _ = srv.try_inline(serialize(m.ObjectMessage([m.StoredObject(new_id(), torch.ones(2))]),
                                            sender="client"), alice)
        assert reply is not None and deserialize(reply)[0].__class__.__name__ != "ErrorReply", reply
        assert type(after_rows(srv.audit_rows, reply)) is not AfterRows, "an allowed reply waited for another's row"
        reply, _ = srv.try_inline(serialize(_unknown_id_command(), sender="client"), alice)
        assert type(after_rows(srv.audit_rows, reply)) is AfterRows  # (its own refusal row: awaited)
    finally:
        go.set()
    assert srv.audit_rows.wait(10)


def test_an_inline_get_does_not_wait_on_the_event_loop_for_queued_refusal_rows(hook, monkeypatch):
    """Attack: refusals queued behind a stalled write of the owner's database, then any client's ``get`` (its
    allowed row is written directly, after the rows handed before it). The get ran on the event loop and waited
    there for the writer (up to 20 s: every connection and ping held). Must hold: the loop does not wait; the get's
    reply (awaited by its connection, off the loop) returns the value once the rows are written. (It went to a
    handler thread; since test_redteam_audit_turns.py its allowed row is queued after those rows instead.)"""
    import asyncio

    from veil.workers.loop_rows import AfterRows, released
    from server_sessions import quota_worker, send_tensor
    from test_redteam_turn_locks import _HangOnce
    from veil.workers import audit_writer

    srv = quota_worker(hook, f"as-get-{time.monotonic_ns()}", "as-get-scientist", None)
    sci = open_session(srv, "as-get-scientist")
    oid = send_tensor(srv, sci, torch.tensor([1.5, -2.0]))
    hang = _HangOnce(monkeypatch, srv.db, "audit", when=lambda *a, **k: a[5] == "refused")
    loop_waits: list = []
    real_wait = audit_writer.RowWriter._wait_for

    def recorded(self, seq, timeout):
        if threading.current_thread().name == "as-get-loop":
            loop_waits.append(timeout)
            return False  # (would have waited: the test does not)
        return real_wait(self, seq, timeout)

    monkeypatch.setattr(audit_writer.RowWriter, "_wait_for", recorded)
    data = serialize(m.GetObjectsMessage([oid]), sender="client")
    try:
        srv.refused_requests.refused("compute", "mallory", "s-m", [1], "probe")
        assert hang.started.wait(10)
        out: dict = {}
        loop = threading.Thread(target=lambda: out.update(r=srv.lane_request(data, sci)), name="as-get-loop")
        loop.start()
        loop.join(10)
        assert loop_waits == [], "the event loop waited for the row writer"
        reply, decoded = out["r"]
        assert decoded is None and type(reply) is AfterRows  # (its reply awaits its rows on the connection)
    finally:
        hang.release()
    got = deserialize(asyncio.run(released(srv.audit_rows, reply)))[0]
    assert torch.equal(got.objects[0], torch.tensor([1.5, -2.0]))


def test_an_inline_opening_does_not_wait_on_the_event_loop_while_refusal_rows_wait(hook, monkeypatch):
    """The same for an SMPC opening: while rows wait for the database the loop does not wait for them. (It went to
    a handler thread; since test_redteam_audit_openings.py its allowed row is queued after them, and its connection
    awaits it: here it is refused, an unknown id, answered at once.)"""
    from server_sessions import quota_worker
    from test_redteam_turn_locks import _HangOnce
    from veil.mpc.party import OPENABLE, OpenMessage

    srv = quota_worker(hook, f"as-open-{time.monotonic_ns()}", "as-open-scientist", None)
    sci = open_session(srv, "as-open-scientist")
    opening = serialize(OpenMessage(sorted(OPENABLE)[0], (m.ObjectRef(new_id()),), {}), sender="client")
    idle_reply, _ = srv.try_inline(opening, sci)
    assert idle_reply is not None  # (the writer idle: served inline, here refused)
    assert srv.audit_rows.wait(10)
    hang = _HangOnce(monkeypatch, srv.db, "audit", when=lambda *a, **k: a[5] == "refused")
    try:
        srv.refused_requests.refused("compute", "mallory", "s-m", [1], "probe")
        assert hang.started.wait(10)
        started = time.monotonic()
        reply, decoded = srv.try_inline(opening, sci)
        assert reply is not None and decoded is None and time.monotonic() - started < 5, "the loop waited"
    finally:
        hang.release()
