"""Refusal audit rows written off the requester's thread, in order, by one thread of the worker's own.

A refused request's row went to the owner's database on the thread that refused it: the event loop for an inline
request (an over-quota ObjectMessage, a command naming an unknown id) and for a refused handshake, the worker's
turn for a request on a handler thread (a get under review naming an unknown id). A stalled database statement
(a frozen database, or a COMMIT whose answer was lost, looked up for up to ~10 s) then held every connection and
ping, or every session's command, until the watchdog cut it. Now ``refusal_rows.RefusedRequestLog`` and
``websocket_auth.RefusalLog`` (which keep the rate limits) hand their rows to a :class:`RowWriter`: they are
written in the order handed, by its thread. A handler thread waits for its own rows once it has left the turn
(:meth:`RowWriter.wait_mine`), so its reply still goes after its rows are on record; so does an inline reply
(below), not while the writer is behind (a stalled database).
A row written synchronously (an allowed one: data leaving the worker) waits for the rows handed before it
(:meth:`RowWriter.wait`), so the log keeps its order, as does a read of the log (``OwnerDB.audit_entries``); on
the event loop it waits for none (rows other threads hand meanwhile go after its own: :meth:`RowWriter.inline_started`).

A get's allowed rows (its release is its reply) are queued instead, in order with the refusal rows
(:func:`rows_held_by_reply`, :meth:`RowWriter.submit_allowed`): they waited for the whole queue in the worker's
turn (a session flooding refusals made every honest get hold the turn while the writer caught up), and an inline
get's was a database write on the event loop. Now only the request's reply waits, for its own rows, out of the
turn (:meth:`RowWriter.settle_mine`) or on its connection (loop_rows.py); a row not written (a database error, or
none within :data:`WAIT_S`) turns the reply into one error line: no release is answered before its allowed row is
on record. Allowed rows are never counted into a summary; a thread queues at most :data:`ALLOWED_AHEAD` before it
waits for them. A star opening's row is queued the same way (its reply is its release); a peer opening's and a
move's too, waited for before their values leave to other workers, the turn handed over (leaving_rows.py).
A handler thread's allowed row wakes no writer thread (the handler writes it when it settles it: a wake-up per
opening, its thread then contending for the interpreter, cost a network party a tenth of its CPU), an inline
request's wake it once the request ran (:meth:`RowWriter.inline_ended`), unless the loop can write them itself
without waiting (an in-memory database whose lock is free: ``RowWriter.loop_lock``), and the writer's thread waits
on a condition of its own (a row written wakes only the threads waiting for rows).

Bounded: a queued row is a copy of what the audit table keeps of it (at most 1000 ids, 500 characters); at most
:data:`MAX_PENDING` rows wait, and past that a row is counted into one summary row per (action, principal) (ids
up to 1000, the last text), queued once the rows before it are written: handing a row never waits (it blocked
the event loop while a stalled database held the queue full); the thread ends when idle.

The event loop never waits on the writer (at 50-100 ms a write it waited up to 50 ms per refusal, every connection
and ping held meanwhile): the connection whose inline request was refused awaits its rows before its reply
(:meth:`RowWriter.take_mine`, :meth:`RowWriter.written_async`; loop_rows.py). A handler thread whose row was
counted past the cap waits for the summary it is in. At the stop (SIGTERM runs the same stop) the
rows still queued after :data:`STOP_FOLD_S` are folded into one summary row per (action, principal), written
before the database closes (:meth:`RowWriter.finish`): a flood then a stop loses no refusal from the log (queued
allowed rows are kept, one each, ahead of those summaries).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from veil.exceptions import RemoteExecutionError
from veil.workers.refusal_rows import SUMMARY_IDS, RefusedRequestLog

log = logging.getLogger(__name__)

#: rows waiting for the database at most (then handing one waits for room)
MAX_PENDING = 10_000
#: how long a handler thread (or a synchronous write, or the stop) waits for rows handed before: past a lost
#: COMMIT's lookup (the watchdog's 10 s stall check and 5 s probe)
WAIT_S = 20.0
#: how long the stop lets queued rows be written one by one before folding the rest into summary rows
STOP_FOLD_S = 2.0
#: the writer's thread ends after this long without rows (a new row starts it again)
IDLE_S = 2.0
#: most rows (its own and those ahead of them) the event loop writes itself after an inline request, where its
#: database waits on no I/O (:meth:`RowWriter.inline_ended`); past that the writer's thread is woken for them
LOOP_ROWS = 16
#: what the audit table keeps of a row (persistence.OwnerDB.audit): a queued row is cut to it when handed
STORED_IDS, STORED_DETAIL = 1000, 500
#: (action, principal, outcome) keys counted past a full queue (the rest share one principal)
OVERFLOW_KEYS = 64
OTHER_PRINCIPALS = "(other principals)"
#: allowed rows one thread may have queued before it waits for them (a get naming thousands of its objects)
ALLOWED_AHEAD = 64
#: what a release whose allowed row is not on record answers instead of its values
NOT_RECORDED = "the owner's audit log is unavailable (it did not record this release): nothing was released, " \
    "try again later"

_reply_rows = threading.local()
#: set while this thread writes a queued row (a writer's thread, or one helping: RowWriter._wait_for): its
#: ``OwnerDB.audit`` waits for no writer's rows (two workers sharing a database each waited for the other's)
_row_write = threading.local()


@contextmanager
def rows_held_by_reply() -> Iterator[None]:
    """Allowed rows audited in the block (a get's: the release is its reply) are queued in order with the refusal
    rows (:meth:`RowWriter.submit_allowed`) instead of written in the turn after the whole queue; the request's
    reply waits for them (:meth:`RowWriter.settle_mine`, ``loop_rows.released``) and is an error if one failed."""
    before = getattr(_reply_rows, "on", False)
    _reply_rows.on = True
    try:
        yield
    finally:
        _reply_rows.on = before


def held_by_reply() -> bool:
    """Whether an allowed row audited now goes to the queue (:func:`rows_held_by_reply`)."""
    return getattr(_reply_rows, "on", False)


def _as_stored(action: str, principal: str, session: str, ids: Any, outcome: str, detail: str) -> tuple:
    """The row as the audit table keeps it: ids that are ints, at most STORED_IDS; detail cut to STORED_DETAIL
    (a request's id list and text were held while the row waited, up to the whole decoded message each)."""
    kept = []
    for oid in ids:
        if type(oid) is int:
            kept.append(oid)
            if len(kept) >= STORED_IDS:
                break
    return action, principal, session, kept, outcome, detail[:STORED_DETAIL]


class RowWriter:
    """Calls ``write(*row)`` for each row handed to :meth:`submit`, in that order, on a thread of its own."""

    def __init__(self, write: Callable[..., None], name: str) -> None:
        self._write, self._name = write, name
        lock = threading.RLock()
        #: rows written (or the head free to write): the threads waiting for their rows (_wait_for)
        self._changed = threading.Condition(lock)
        #: rows to write: the writer's thread waits on it alone (a row written wakes only those waiting for it)
        self._queued = threading.Condition(lock)
        #: held while a row is written: by the writer's thread, or by a thread waiting for its rows (_wait_for)
        self._writing = threading.Lock()
        self._rows: deque[tuple] = deque()
        self._submitted = self._written = 0
        self._thread: threading.Thread | None = None
        self._behind = False  # a brief wait ran out: the database is slow (cleared once every row is written)
        self._mine = threading.local()  # the newest row each thread handed (wait_mine)
        #: rows handed while the queue was full: (action, principal, outcome) -> [count, ids, last detail]
        self._overflow: dict[tuple, list] = {}
        self._stopping = False  # (finish: the rows still queued at the stop are folded too)
        #: connections awaiting their rows on an event loop: (seq, loop, future)
        self._loop_waiters: set[tuple] = set()
        #: the database's lock where writing a row waits on no I/O (an in-memory one: ``OwnerDB.loop_write_lock``):
        #: the event loop then writes its own rows when that lock is free at once (:meth:`inline_ended`); else None
        self.loop_lock: Any = None

    def submit_allowed(self, *row: Any) -> None:
        """Queues an allowed row (:func:`rows_held_by_reply`): never counted into a summary, after every row handed
        before it (the summaries of rows counted past the cap first). The thread's reply waits for it
        (:meth:`settle_mine`); a handler thread with :data:`ALLOWED_AHEAD` rows queued waits for them first.
        A handler thread's row wakes no writer: it is written when the thread settles it, or by the writer's
        thread with the next row that wakes it (at the latest after :data:`IDLE_S`)."""
        mine = self._mine.__dict__.setdefault("tickets", [])
        if len(mine) >= ALLOWED_AHEAD and not getattr(self._mine, "inline", False):
            if not self._settle(mine, getattr(self._mine, "seq", 0), WAIT_S):
                raise RemoteExecutionError(NOT_RECORDED)
            mine.clear()
        ticket: list = [None]  # (set by the writer: whether the row is on record)
        with self._changed:
            if self._overflow:
                self._queue_overflow()
            self._rows.append(_as_stored(*row) + (1, ticket))
            self._submitted += 1
            self._mine.seq = self._submitted
            mine.append(ticket)
            # only the event loop's rows wake the writer's thread: a handler thread writes its own when it
            # settles them (_wait_for), and a wake-up per opening (its thread then contending for the
            # interpreter) cost a network party about a tenth of its CPU in the MLP step
            if getattr(self._mine, "inline", False):  # (woken, or started, once the loop is done with it:
                self._mine.wake = True  # inline_ended, which may write it itself)
            else:
                self._start_thread()
            self._changed.notify_all()

    def _settle(self, tickets: list, seq: int, timeout: float) -> bool:
        self._wait_for(seq, timeout)
        return all(t[0] is True for t in tickets)

    def settle_mine(self, timeout: float = WAIT_S) -> bool:
        """(a handler thread, out of the turn, before its reply) :meth:`wait_mine`; whether every allowed row it
        queued is on record (else its reply must not release anything)."""
        tickets = self._mine.__dict__.pop("tickets", None)
        seq = getattr(self._mine, "seq", 0)
        self._mine.seq = 0
        return self._settle(tickets, seq, timeout) if tickets else (self._wait_for(seq, timeout) or True)

    def holds_mine(self) -> bool:
        """Whether this thread queued allowed rows not yet settled (:meth:`settle_mine`)."""
        return bool(self._mine.__dict__.get("tickets"))

    def take_allowed(self) -> list | None:
        """(the event loop) the tickets of the allowed rows this thread queued since :meth:`inline_started`."""
        return self._mine.__dict__.pop("tickets", None)

    def full(self) -> bool:
        """Whether refusal rows are being counted past the cap (an inline get then takes a handler thread, which
        bounds what it queues: the event loop never waits)."""
        return len(self._rows) >= MAX_PENDING or bool(self._overflow)

    def submit(self, *row: Any, stands_for: int = 1) -> None:
        """Hands ``row`` (action, principal, session, ids, outcome, detail) to the thread; never waits. A copy
        of what the database keeps of it is queued (the requester's ids and text are not held meanwhile).
        Past :data:`MAX_PENDING` rows waiting, it is counted into a summary row instead (queued once every row
        before it is written, so the log keeps its order). ``stands_for``: the refusals the row counts (a window's
        summary row: its N), kept when it is folded into a summary."""
        row = _as_stored(*row) + (stands_for, None)
        with self._changed:
            if self._overflow or len(self._rows) >= MAX_PENDING:
                self._count_over(row)
                self._behind = True
                # (its summary is queued in the order first counted: at most this many rows from now)
                self._mine.seq = self._submitted + len(self._overflow)
            else:
                self._rows.append(row)
                self._submitted += 1
                self._mine.seq = self._submitted
            self._start_thread()
            self._queued.notify()
            self._changed.notify_all()

    def _start_thread(self) -> None:
        """(under the lock) The writer's thread, started if none runs (it ends when idle)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def _count_over(self, row: tuple) -> None:
        action, principal, _session, ids, outcome, detail, stands_for, _ticket = row
        key = (action, principal, outcome)
        if key not in self._overflow and len(self._overflow) >= OVERFLOW_KEYS:
            key = (action, OTHER_PRINCIPALS, outcome)
        over = self._overflow.setdefault(key, [0, {}, ""])
        over[0] += stands_for
        for oid in ids:
            if len(over[1]) >= SUMMARY_IDS:
                break
            over[1][oid] = None
        over[2] = detail

    def _queue_overflow(self) -> None:
        """(under the lock) the counted rows' summaries, in the order first counted (a thread waits for the one it
        is in: :meth:`submit`), then the queue takes rows again."""
        why = ("the worker stopped while the owner's database was behind" if self._stopping
               else f"the owner's database was behind: {MAX_PENDING} rows waiting")
        for (action, principal, outcome), (count, ids, last) in self._overflow.items():
            self._rows.append(_as_stored(
                action, principal, "-", list(ids), outcome,
                f"{count} more {outcome} {action} rows not written one by one ({why}); last: {last}") + (count, None))
            self._submitted += 1
        self._overflow.clear()

    def _run(self) -> None:
        while True:
            with self._changed:
                if not self._rows and not self._queued.wait_for(lambda: self._rows, IDLE_S):
                    self._thread = None  # (under the lock: a row handed after this starts a new thread)
                    return
            with self._writing:
                self._write_head()

    def _write_head(self) -> bool:
        """(holding ``_writing``: one row is written at a time, in the order handed) writes the oldest row; whether
        there was one."""
        with self._changed:
            if not self._rows:
                return False
            row = self._rows[0]
        before = getattr(_row_write, "on", False)
        _row_write.on = True
        try:
            self._write(*row[:6])
            written = True
        except Exception:  # noqa: BLE001 - the refusal stood whatever the log did
            written = False
            log.exception("%s: could not write an audit row (%s %s of %s, standing for %d request(s))",
                          self._name, row[4], row[0], row[1], row[6])
        finally:
            _row_write.on = before
        if row[7] is not None:
            row[7][0] = written  # (an allowed row's: its reply releases nothing unless written)
        with self._changed:
            self._rows.popleft()
            self._written += 1
            if not self._rows and self._overflow:
                self._queue_overflow()
            if self._written == self._submitted:
                self._behind = False
            if self._loop_waiters:
                self._wake_loop_waiters()
            self._changed.notify_all()
        return True

    def _wait_for(self, seq: int, timeout: float) -> bool:
        """Waits until row ``seq`` is written. A handler thread writes the rows ahead of it itself while no one
        else is writing: the writer's thread, woken by the hand-over, gets the interpreter only once the handler
        thread blocks (a peer opening's row handed before its step was written after it, ~0.5 ms a round). It
        starts no write past ``timeout`` (one under way ends by the database's own limits), and with nothing
        queued it waits (a row the stop folded into a summary has a number never reached: it spun forever)."""
        if self._written >= seq or threading.current_thread() is self._thread or getattr(_row_write, "on", False):
            return True  # (a queued row's write waits for no writer's rows: not for itself, nor another's)
        if getattr(self._mine, "inline", False):  # (the event loop: never waits here, see inline_started)
            return False
        deadline = time.monotonic() + timeout
        while self._written < seq and time.monotonic() < deadline:
            if self._rows and self._writing.acquire(blocking=False):
                try:
                    wrote = self._write_head()
                finally:
                    self._let_go_of_writing()
                if wrote:
                    continue
            with self._changed:  # another thread writes (its row's notify wakes this one), or nothing is queued
                left = deadline - time.monotonic()
                if left <= 0 or not self._changed.wait_for(
                        lambda: self._written >= seq or (self._rows and not self._writing.locked()), left):
                    break
        return self._written >= seq

    def wait(self, timeout: float = WAIT_S) -> bool:
        """Waits until every row handed so far is written (or ``timeout``); whether it was. Rows counted past a
        full queue too (the stop's flush waits for them before the database closes): their summaries are the
        next rows queued."""
        with self._changed:
            seq = self._submitted + len(self._overflow)
        return self._wait_for(seq, timeout)

    def wait_mine(self, timeout: float = WAIT_S) -> bool:
        """Waits until the rows this thread handed are written (or ``timeout``); whether they were. (Its allowed rows'
        tickets are dropped: a request that failed before :meth:`settle_mine` leaves none to the thread's next.)"""
        seq = getattr(self._mine, "seq", 0)
        self._mine.seq = 0
        self._mine.__dict__.pop("tickets", None)
        return self._wait_for(seq, timeout)

    def busy(self) -> bool:
        """Whether rows handed are still waiting (a row written directly now would wait for them: the event
        loop hands such a request to a handler thread instead)."""
        return self._written < self._submitted or bool(self._overflow)

    def inline_started(self) -> None:
        """(the event loop, before an inline request runs) forgets the rows this thread handed so far (its reply
        goes after its own rows only), and until :meth:`inline_ended` no wait on this thread waits: an inline get's
        or opening's allowed rows are queued (:meth:`submit_allowed`), its connection awaits them (loop_rows.py)."""
        self._mine.seq = 0
        self._mine.__dict__.pop("tickets", None)
        self._mine.inline = True

    def inline_ended(self) -> None:
        """The inline request ran: the allowed rows it queued are written here where that cannot wait
        (:meth:`_written_on_loop`), else the writer's thread is woken for them (woken as each was queued, it
        contended with the loop for the interpreter while the step ran, and seldom wrote the row before the reply
        was ready)."""
        self._mine.inline = False
        if self._mine.__dict__.pop("wake", False) and not self._written_on_loop():
            with self._changed:
                self._start_thread()
                self._queued.notify()

    def _written_on_loop(self) -> bool:
        """(the event loop, its inline request's allowed rows queued) Writes them on this thread, the rows ahead of
        them first, where nothing can make it wait: a database that waits on no I/O (``loop_lock``), its lock and
        the write lock both free at once, at most :data:`LOOP_ROWS` rows to write, the writer not behind. A star
        opening's reply then goes at once (the writer's thread woken for its row and the loop woken again by it
        were 4-14% of a CNN inference batch 1 call over network workers). Whether its rows are written."""
        lock, seq = self.loop_lock, getattr(self._mine, "seq", 0)
        if lock is None or not seq or self._behind or seq - self._written > LOOP_ROWS \
                or not self._writing.acquire(blocking=False):
            return False
        try:
            if not lock.acquire(blocking=False):  # (a transaction of another thread: never waited for here)
                return False
            try:
                while self._written < seq and self._write_head():
                    pass
            finally:
                lock.release()
        finally:
            self._let_go_of_writing()
        return self._written >= seq

    def _let_go_of_writing(self) -> None:
        """Frees the write lock taken by a thread other than the writer's: a thread that found it held waits for
        just that (the writer's thread, which took it next, is not woken by a handler thread's or the loop's rows:
        it waited IDLE_S)."""
        self._writing.release()
        with self._changed:
            if self._rows:
                self._changed.notify_all()

    def take_mine(self) -> int:
        """(the event loop, which never waits here) the newest row this thread handed, if not yet written (else
        0): the connection that made it awaits :meth:`written_async` before its reply."""
        seq = getattr(self._mine, "seq", 0)
        self._mine.seq = 0
        return seq if seq > self._written else 0

    async def written_async(self, seq: int, timeout: float = WAIT_S, strict: bool = False) -> None:
        """Awaits (without holding the event loop) until row ``seq`` is written, at most ``timeout`` and not
        while the writer is behind (a stalled database: then replies go without waiting until it caught up),
        unless ``strict`` (a release's allowed row: its reply goes only once it is on record)."""
        if self._written >= seq or (self._behind and not strict):
            return
        loop = asyncio.get_running_loop()
        waiter = (seq, loop, loop.create_future())
        with self._changed:
            if self._written >= seq:
                return
            self._loop_waiters.add(waiter)
        # (a timer on the future itself: asyncio.wait_for wraps it in more futures and callbacks, per inline
        # opening's reply)
        timer = loop.call_later(timeout, _set_done, waiter[2])
        try:
            await waiter[2]
            if self._written < seq:  # (the timer, not the writer)
                self._behind = True
        finally:
            timer.cancel()
            with self._changed:
                self._loop_waiters.discard(waiter)

    def _wake_loop_waiters(self) -> None:
        """(under the lock, on the writer's thread) wakes the connections whose rows are now written."""
        for waiter in [w for w in self._loop_waiters if w[0] <= self._written]:
            self._loop_waiters.discard(waiter)
            try:
                waiter[1].call_soon_threadsafe(_set_done, waiter[2])
            except RuntimeError:  # (its loop closed meanwhile)
                pass

    def finish(self, timeout: float | None = None) -> bool:
        """The stop, before the database closes: waits :data:`STOP_FOLD_S` for the rows handed so far; then the
        rows still queued (all but the one being written) are folded into one summary row per (action,
        principal, outcome), counting every refusal they stood for, and waited for up to ``timeout`` (default
        :data:`WAIT_S`). What is still not written then is logged with its count (a database that answers
        nothing). Whether every row is on record."""
        timeout = WAIT_S if timeout is None else timeout
        if self.wait(STOP_FOLD_S):
            return True
        with self._changed:
            head = 1 if self._thread is not None and self._rows else 0
            queued = list(self._rows)[head:]
            for _ in queued:
                self._rows.pop()
            allowed = [row for row in queued if row[7] is not None]  # (never folded: written one each, first)
            queued = [row for row in queued if row[7] is None]
            self._rows.extend(allowed)
            self._submitted -= len(queued)
            folded = dict(self._overflow)  # (those counted past the cap come after the queued ones)
            self._overflow.clear()
            for row in queued:
                self._count_over(row)
            for key, (count, ids, last) in folded.items():
                over = self._overflow.setdefault(key, [0, {}, last])
                over[0] += count
                for oid in ids:
                    if len(over[1]) >= SUMMARY_IDS:
                        break
                    over[1][oid] = None
                over[2] = last
            self._stopping = True
            if not self._rows:
                self._queue_overflow()
            if self._rows:
                self._start_thread()
            self._queued.notify()
            self._changed.notify_all()
        if self.wait(timeout):
            return True
        with self._changed:
            lost = sum(row[6] for row in self._rows) + sum(over[0] for over in self._overflow.values())
        log.error("%s: %d refused requests' audit rows could not be written before the owner's database closed "
                  "(it did not answer)", self._name, lost)
        return False


def _set_done(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def refused_request_log(db: Any, write_now: Callable[..., None], worker_id: str,
                        refused_connects: Any) -> tuple[RowWriter, RefusedRequestLog]:
    """A network worker's refused requests' log (rate limits: refusal_rows.py) over a :class:`RowWriter` of
    ``write_now``, which also writes the rows of ``refused_connects`` (``websocket_auth.RefusalLog``: a refused
    handshake's row was written on the event loop) and closes its windows with it; reads of ``db``'s log
    (``OwnerDB.audit_entries``) wait for the rows handed before them."""
    writer = RowWriter(write_now, f"veil-audit-{worker_id}")
    writers = getattr(db, "row_writers", None)
    if writers is not None:  # (those of workers gone are dropped)
        writers[:] = [w for w in writers if w() is not None] + [weakref.WeakMethod(writer.wait)]
    requests = RefusedRequestLog(writer.submit, written=writer.finish)
    refused_connects.write_row = writer.submit
    refused_connects.followers.append(requests)
    return writer, requests
