"""The event loop writes its inline request's audit rows itself where nothing can make it wait (audit_writer.py:
``RowWriter.inline_ended``, ``OwnerDB.loop_write_lock``): an in-memory database, its lock and the write lock free at
once, a few rows, the writer not behind. Anywhere else the writer's thread is woken for them, as before, and the
reply still goes only once its allowed row is on record."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from veil.messaging import messages as m
from veil.workers import audit_writer
from veil.workers.persistence import OwnerDB
from veil.workers.websocket_server import WebsocketServerWorker

from test_redteam_lane import Raw, _bin, _get, _store, serve  # noqa: F401  (serve: a fixture)


def _writer(written: list, lock=None) -> audit_writer.RowWriter:
    """A writer whose write takes ``lock`` as ``OwnerDB.audit`` takes the database's (``written``: (detail, thread))."""

    def write(*row) -> None:
        with lock if lock is not None else threading.Lock():
            written.append((row[5], threading.current_thread().name))

    writer = audit_writer.RowWriter(write, f"aw-loop-{time.monotonic_ns()}")
    writer.loop_lock = lock
    return writer


def _inline_row(writer: audit_writer.RowWriter, detail: str) -> list:
    """What an inline request does: queues its allowed row, ends; the row's ticket."""
    writer.inline_started()
    try:
        writer.submit_allowed("open", "alice", "s", [1], "allowed", detail)
        tickets = writer.take_allowed()
    finally:
        writer.inline_ended()
    return tickets


def _eventually(check, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while not check() and time.monotonic() < end:
        time.sleep(0.01)
    return check()


def test_the_loops_row_is_written_on_the_loop_when_its_database_waits_on_nothing(monkeypatch):
    monkeypatch.setattr(audit_writer, "IDLE_S", 5.0)
    written: list = []
    writer = _writer(written, threading.RLock())
    tickets = _inline_row(writer, "mine")
    assert tickets[0][0] is True  # on record when the request ended: its reply needs no wait
    assert written == [("mine", threading.current_thread().name)]
    assert writer.take_mine() == 0


def test_a_held_database_lock_never_holds_the_loop_its_row_goes_to_the_writer(monkeypatch):
    monkeypatch.setattr(audit_writer, "IDLE_S", 5.0)
    written: list = []
    lock = threading.RLock()
    writer = _writer(written, lock)
    taken, let_go = threading.Event(), threading.Event()

    def transaction() -> None:  # another thread's write transaction on the owner's database
        with lock:
            taken.set()
            let_go.wait(10)

    holder = threading.Thread(target=transaction)
    holder.start()
    assert taken.wait(5)
    ended = threading.Event()
    loop = threading.Thread(target=lambda: (_inline_row(writer, "behind a transaction"), ended.set()))
    loop.start()
    try:
        assert ended.wait(5), "the loop waited for the database's lock"
        assert written == [] and holder.is_alive()  # (still held: the loop did not write, nothing was written)
    finally:
        let_go.set()
        holder.join(5)
        loop.join(5)
    assert _eventually(lambda: written == [("behind a transaction", writer._name)]), written  # the writer's thread


def test_a_row_being_written_elsewhere_or_too_many_ahead_or_a_writer_behind_wake_the_writer(monkeypatch):
    monkeypatch.setattr(audit_writer, "IDLE_S", 5.0)
    written: list = []
    writer = _writer(written, threading.RLock())
    with writer._writing:  # another thread is writing a row
        tickets = _inline_row(writer, "while another writes")
        assert tickets[0][0] is None
    assert _eventually(lambda: tickets[0][0] is True)
    assert written[-1] == ("while another writes", writer._name)

    monkeypatch.setattr(audit_writer, "LOOP_ROWS", 2)
    gate = threading.Event()
    slow: list = []
    writer = audit_writer.RowWriter(lambda *row: (gate.wait(10), slow.append((row[5], threading.current_thread().name))),
                                    f"aw-loop-{time.monotonic_ns()}")
    writer.loop_lock = threading.RLock()
    for k in range(3):  # refusal rows ahead of the loop's: its thread is held on the first
        writer.submit("compute", "mallory", "-", [], "refused", f"refused {k}")
    tickets = _inline_row(writer, "after three")
    assert tickets[0][0] is None  # (not written on the loop: more than LOOP_ROWS to write)
    gate.set()
    assert _eventually(lambda: tickets[0][0] is True)
    assert [d for d, t in slow] == ["refused 0", "refused 1", "refused 2", "after three"]
    assert {t for _, t in slow} == {writer._name}

    written = []
    writer = _writer(written, threading.RLock())
    writer._behind = True  # a wait ran out: the database is slow
    tickets = _inline_row(writer, "while behind")
    assert _eventually(lambda: tickets[0][0] is True)
    assert written == [("while behind", writer._name)]


def test_only_an_in_memory_database_lets_the_loop_write(tmp_path):
    memory, on_disk = OwnerDB(":memory:"), OwnerDB(tmp_path / "state.sqlite3")
    try:
        assert memory.loop_write_lock() is memory._lock
        assert on_disk.loop_write_lock() is None
    finally:
        memory.close()
        on_disk.close()


def test_an_inline_gets_allowed_row_is_on_record_before_its_reply_and_written_by_the_loop(serve, monkeypatch):
    written = []
    inner = WebsocketServerWorker._write_audit_now

    def spy(self, action, *rest):
        written.append((action, threading.current_thread().name))
        return inner(self, action, *rest)

    monkeypatch.setattr(WebsocketServerWorker, "_write_audit_now", spy)
    server = serve()
    assert server.audit_rows.loop_lock is server.db._lock  # (the test workers keep their state in memory)
    c = Raw(server)
    x = torch.randn(5)
    c.send(_bin(_store(7, x)))
    assert c.reply() == m.OkReply()
    written.clear()
    c.send(_bin(_get(7)))
    assert torch.equal(c.reply().objects[0], x)
    async def loop_thread() -> str:
        return threading.current_thread().name

    gets = [t for action, t in written if action == "get"]
    assert len(gets) == 1 and gets[0] == asyncio.run_coroutine_threadsafe(loop_thread(), server._loop).result(5), written
    assert any(e["action"] == "get" and e["outcome"] == "allowed" for e in server.db.audit_entries(limit=5))
