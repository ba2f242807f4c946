"""Red team on threads that write the audit rows ahead of them themselves (veil/workers/audit_writer.py,
``RowWriter._wait_for`` since 075631e: a thread waiting for its rows writes the oldest queued row while no one
else writes). Holes found, each failing on 075631e (checked by running this file on it):

- a thread waiting for a row the stop had folded into a summary (``finish``: the queue's numbering shrinks, the
  row's number is never reached) spun forever once the queue was empty: it took the free write lock, found
  nothing to write and tried again, never looking at its timeout (a handler thread's ``wait_mine`` at the stop).
  Must hold: it ends at its timeout, as the wait did before;
- a helping thread looked at its timeout only while another thread wrote: once it held the write lock it wrote
  every row ahead of it (a refusal flood of up to MAX_PENDING rows on a slow database: a thread in the worker's
  turn held it for the whole flood, not WAIT_S). Must hold: no write starts past the timeout;
- two workers sharing one OwnerDB (a replica in the same process): a queued row's write (``OwnerDB.audit``)
  waited for the rows handed to the other worker's writer, whose write waited for the first's: both waits ran
  out (20 s each) on every pair of rows in flight (this one predates 075631e). Must hold: a queued row's write
  waits for no writer's rows.

Guards (each checked to fail with the part it guards taken out): rows handed by threads that wait and help at
once are written once each, in the order handed, and every allowed row's ticket says it is on record (checked
with helpers writing without the write lock); a row whose write fails while a thread helps turns only that
request's release into an error, and the rows after it are written (checked with the ticket left unset).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from veil.workers import audit_writer
from veil.workers.persistence import OwnerDB

JOIN_S = 30.0  # (a liveness bound only: the waits below end long before)


def _refused(writer, principal: str, detail: str) -> None:
    writer.submit("compute", principal, "s-1", [], "refused", detail)


def test_a_wait_for_a_row_the_stop_folded_ends_at_its_timeout(monkeypatch):
    """Attack: a flood is queued behind a hung write; a handler thread waits for its own refusal row (the last
    one handed) while the stop folds the queue into summaries. Must hold: its wait ends (at its timeout), it
    does not spin."""
    monkeypatch.setattr(audit_writer, "STOP_FOLD_S", 0.05)
    go = threading.Event()

    def write(*row):
        if row[5] == "first":
            go.wait(JOIN_S)

    writer = audit_writer.RowWriter(write, "rah-fold")
    count_over = writer._count_over

    def folding(row):  # (the hung write answers once the stop folds: the fold comes first, however slow the box)
        count_over(row)
        go.set()

    writer._count_over = folding
    _refused(writer, "alice", "first")
    for i in range(50):
        _refused(writer, "bob", f"probe {i}")
    handed, waited = threading.Event(), {}

    def handler():
        _refused(writer, "carol", "mine")
        handed.set()
        waited["ok"] = writer.wait_mine(2.0)

    t = threading.Thread(target=handler, daemon=True)
    t.start()
    assert handed.wait(JOIN_S)
    assert writer.finish(JOIN_S)
    t.join(JOIN_S)
    spinning = t.is_alive()
    while t.is_alive() and writer._written < 60:  # (let a spinning thread end: its row's number is reached)
        _refused(writer, "dave", "cleanup")
        writer.wait(JOIN_S)
    assert not spinning, "a wait for a row folded at the stop never ended (it spun with nothing to write)"
    assert waited == {"ok": False}, waited  # (its refusal is in a summary on record; its own number never came)


def test_a_helping_thread_starts_no_write_past_its_timeout(monkeypatch):
    """Attack: 50 refusal rows are queued on a database taking 1 s a write (a clock the writes advance) and the
    writer's thread has not got the interpreter yet; a thread (one in the worker's turn: a direct allowed row
    waits for the rows handed before it) waits 2.5 s for them. Must hold: it writes what fits in its timeout
    (the write under way ends) and returns; the rest are left to the writer's thread."""
    clock = [0.0]
    monkeypatch.setattr(audit_writer, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    written = []

    def write(*row):
        clock[0] += 1.0
        written.append(row[5])

    writer = audit_writer.RowWriter(write, "rah-bound")
    writer._thread = SimpleNamespace(name="descheduled")  # (handing rows starts no thread: not yet scheduled)
    for i in range(50):
        _refused(writer, "bob", f"probe {i}")
    assert not writer.wait(2.5)
    assert len(written) <= 3, f"a thread waiting 2.5 s wrote {len(written)} rows of 1 s each"


def test_workers_sharing_one_database_do_not_wait_for_each_others_rows():
    """Attack: two workers (a replica in one process) share one OwnerDB, each with its writer; each writes a row
    while the other's row is being written. Must hold: neither write waits for the other writer's rows (each
    waited for the other's until its wait ran out), and every row is on record in the order each writer got it."""
    db = OwnerDB(":memory:")
    writing = {"A": threading.Event(), "B": threading.Event()}
    waits_out: list = []

    def writer_of(name: str, other: str) -> audit_writer.RowWriter:
        def write(*row):
            if row[5] == "first":  # (both first rows in flight at once)
                writing[name].set()
                writing[other].wait(JOIN_S)
            db.audit(name, *row)
        return audit_writer.RowWriter(write, f"rah-{name}")

    writers = {"A": writer_of("A", "B"), "B": writer_of("B", "A")}
    for w in writers.values():  # (as refused_request_log registers them, with a wait whose outcome is kept)
        def wait(w=w):
            if not w.wait(2.0):
                waits_out.append(w)
        db.row_writers.append(lambda wait=wait: wait)
    for name, w in writers.items():
        for detail in ("first", "second", "third"):
            _refused(w, name.lower(), detail)
    assert all(w.wait(JOIN_S) for w in writers.values())
    assert not waits_out, "a queued row's write waited for another worker's writer until its wait ran out"
    rows = db._db.execute("SELECT worker, detail FROM audit ORDER BY seq").fetchall()
    for name in writers:
        assert [d for wk, d in rows if wk == name] == ["first", "second", "third"], rows
    db.close()


def test_rows_handed_by_threads_that_help_are_written_once_each_in_order():
    """Guard. Attack: eight handler threads each hand refusal and allowed rows and wait for them (settle_mine,
    wait_mine) at once, so they and the writer's thread race to write the queue. Must hold: the rows written
    are the rows handed, once each, in the order handed; each allowed row's ticket says it is on record."""
    order = threading.Lock()
    handed, written = [], []

    def write(*row):
        written.append(row[5])

    writer = audit_writer.RowWriter(write, "rah-race")
    settled = []

    def handler(k: int) -> None:
        for i in range(60):
            with order:  # (the order handed: the queue's)
                detail = f"{k}-{i}"
                if i % 3 == 0:
                    writer.submit_allowed("get", f"user{k}", "s-1", [i], "allowed", detail)
                else:
                    _refused(writer, f"user{k}", detail)
                handed.append(detail)
            if i % 3 == 0:
                settled.append(writer.settle_mine(JOIN_S))
            elif i % 5 == 0:
                writer.wait_mine(JOIN_S)

    threads = [threading.Thread(target=handler, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert writer.wait(JOIN_S)
    assert written == handed, "rows written twice, lost or out of the order handed"
    assert len(settled) == 8 * 20 and all(settled), settled.count(False)


def test_a_row_that_fails_while_a_thread_helps_fails_only_its_release():
    """Guard. Attack: the database fails on one allowed row written by a thread helping (its own request's), and
    on a refusal row before it. Must hold: that release is reported not on record (its reply releases nothing),
    the next request's is, and every other row is written."""
    written = []

    def write(*row):
        if row[5] in ("fails", "refusal fails"):
            raise OSError("disk full")
        written.append(row[5])

    writer = audit_writer.RowWriter(write, "rah-fail")
    writer._thread = SimpleNamespace(name="descheduled")  # (the handler thread writes them itself)
    _refused(writer, "bob", "refusal fails")
    writer.submit_allowed("get", "alice", "s-1", [1], "allowed", "fails")
    _refused(writer, "bob", "after")
    assert writer.settle_mine(1.0) is False
    writer.submit_allowed("get", "alice", "s-1", [2], "allowed", "fine")
    assert writer.settle_mine(1.0) is True
    assert written == ["after", "fine"], written
