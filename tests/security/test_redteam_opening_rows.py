"""Red team on a peer round's one allowed row and the row writer's split conditions (e21bee1: openings.py
``resolve_opening(peer_round=...)``, peer_openings.py, audit_writer.py). Holes found, each failing on e21bee1
(checked by running this file on it):

- a round's one allowed row names the ids its opened values are to be stored under, written before the step; the
  second row, written once they were stored, is gone. A round that failed after that row (a wrong id count, a
  peer's error, a store refused) left the row claiming values it never stored, with no row saying otherwise
  (only a PermissionDeniedError was audited by the server): an object later stored under such an id by other
  means reads, in the log, as that round's opened value. Must hold: a refusal row names the ids left empty;
- a round naming an id already taken (or one id twice) wrote its row and published its outputs, then its store
  refused the id: its row claimed an object that another request created. Must hold: it is refused before its
  row and before anything leaves;
- a handler thread's row wakes no writer thread: a thread that found the write lock held by another thread
  writing its own rows (two handler threads settling at once, a read of the log, the stop) waited for a
  notification that came only with the next row written; the helper let the lock go without one, so the row
  waited for the writer's idle timeout (IDLE_S) or the waiter's whole wait (a release answered "not recorded").
  Must hold: it is written once the lock is free.

Found after (lead, from the red team's note; fails on 97fc220): a session revoked after its round's row was on
record (before the step on the share-slot path; revoke() takes no turn) still published. Must hold: the session
is checked again just before anything is published.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.workers import audit_writer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import request  # noqa: E402
from test_redteam_audit_openings import (_opening_worker, _peer_open, _ring, _served_meanwhile,  # noqa: E402
                                         _watch_publish, _with_peer)

JOIN_S = 30.0  # (a liveness bound only)


def _open_rows(srv) -> list[tuple]:
    """(outcome, object ids, detail) of the "open" rows on record, once every row handed is written."""
    assert srv.audit_rows.wait(10)
    with srv.db._lock:
        return [(o, [int(i) for i in ids.strip("[]").split(",") if i.strip()], d) for o, ids, d in srv.db._db.execute(
            "SELECT outcome, object_ids, detail FROM audit WHERE action = 'open' ORDER BY seq").fetchall()]


def _round_failed_after_its_row(srv, honest, msg) -> None:
    """The round's reply is one error line; its allowed row names its ids, and a later refusal row names the
    same ids as holding no opened value; none of them holds an object."""
    got = request(srv, honest, msg)
    assert type(got) is m.ErrorReply and "\n" not in got.message, got
    rows = _open_rows(srv)
    allowed = [k for k, r in enumerate(rows) if r[0] == "allowed"]
    assert len(allowed) == 1 and rows[allowed[0]][1][-len(msg.ids):] == msg.ids, rows
    after = [r for r in rows[allowed[0] + 1:] if r[0] == "refused" and r[1] == msg.ids]
    assert len(after) == 1 and "no opened value stored as" in after[0][2], \
        f"the round's row claims ids it stored nothing under, and nothing says so: {rows}"
    for oid in msg.ids:
        assert type(request(srv, honest, m.GetObjectsMessage([oid], False))) is m.ErrorReply


def test_a_round_with_a_wrong_id_count_says_it_stored_nothing(hook, monkeypatch):
    """Attack: the orchestrator gives a beaver_mask round (two opened values) one id: the row naming it goes on
    record, then the count is refused. Must hold: nothing is published, a refusal row names the id as empty."""
    srv, honest, other, ids, mine = _opening_worker(hook, "or-count")
    seen: list = []
    _with_peer(monkeypatch, srv)
    _watch_publish(monkeypatch, srv, seen)
    msg = _peer_open(ids)
    msg.ids = msg.ids[:1]
    _round_failed_after_its_row(srv, honest, msg)
    assert not seen, "a round with a wrong id count published its outputs"
    _served_meanwhile(srv, other, mine)


def test_a_round_a_peer_fails_says_it_stored_nothing(hook, monkeypatch):
    """Attack: a peer answers the round's fetch with an error once this party published. Must hold: the refusal
    row names the round's ids as empty (its allowed row claimed them)."""
    from veil.workers import peer_openings
    from veil.workers.peer_rounds import PeerOpeningError

    srv, honest, other, ids, mine = _opening_worker(hook, "or-peer")
    _with_peer(monkeypatch, srv)

    def refused(worker, msg, *a, **k):
        raise PeerOpeningError(f"peer 'ao-peer' refused round {msg.round!r}: PermissionDeniedError: no")

    monkeypatch.setattr(peer_openings, "_fetch_all", refused)
    _round_failed_after_its_row(srv, honest, _peer_open(ids))
    _served_meanwhile(srv, other, mine)


def test_a_round_whose_store_fails_names_the_ids_left_empty(hook, monkeypatch):
    """Attack: the round completes (the peer's shares are zeros here: the opened values are this party's) and the
    store of its second value is refused (the session's quota). Must hold: the first value is stored as torch
    computes it; a refusal row names only the second id as empty."""
    from veil.workers.quota import QuotaExceededError
    from veil.workers import peer_openings
    from veil.workers.peer_rounds import PeerRounds

    srv, honest, other, ids, mine = _opening_worker(hook, "or-store")
    _with_peer(monkeypatch, srv)
    monkeypatch.setattr(peer_openings, "_fetch_all",
                        lambda worker, msg, peers, expected, *a, **k: [[torch.zeros(s, dtype=d) for s, d in expected]])
    monkeypatch.setattr(PeerRounds, "wait_taken", lambda self, *a: None)
    msg = _peer_open(ids)
    real = srv.monitor.store

    def store(principal, oid, *a, **k):
        if oid == msg.ids[1]:
            raise QuotaExceededError("the session's memory quota is used up")
        return real(principal, oid, *a, **k)

    monkeypatch.setattr(srv.monitor, "store", store)
    got = request(srv, honest, msg)
    assert type(got) is m.ErrorReply and "\n" not in got.message, got
    monkeypatch.setattr(srv.monitor, "store", real)
    rows = _open_rows(srv)
    assert [r[1] for r in rows if r[0] == "refused"] == [msg.ids[1:]], rows
    e = request(srv, honest, m.GetObjectsMessage([msg.ids[0]], False)).objects[0]
    assert torch.equal(e, _ring(10, 20) - _ring(3, 4))


def test_a_round_naming_a_taken_or_repeated_id_is_refused_before_its_row(hook, monkeypatch):
    """Attack: the round names an id the session already holds (or one id twice): its row claimed the id and its
    outputs were published before the store refused it. Must hold: refused before any allowed row, nothing is
    published, the object held there is unchanged."""
    srv, honest, other, ids, mine = _opening_worker(hook, "or-taken")
    seen: list = []
    _with_peer(monkeypatch, srv)
    _watch_publish(monkeypatch, srv, seen)
    fresh = new_id()
    for stored in ([ids[0], fresh], [fresh, fresh]):
        msg = _peer_open(ids)
        msg.ids = stored
        got = request(srv, honest, msg)
        assert type(got) is m.ErrorReply and "\n" not in got.message, got
    assert not seen, "a round naming a taken id published its outputs"
    assert not [r for r in _open_rows(srv) if r[0] == "allowed"], "a refused round's row claims its ids"
    held = request(srv, honest, m.GetObjectsMessage([ids[0]], False)).objects[0]
    assert torch.equal(held, _ring(10, 20))
    # an honest round afterwards is served as before (stopped at its publish here, its row on record first)
    got = request(srv, honest, _peer_open(ids))
    assert type(got) is m.ErrorReply and "stopped at the publish" in got.message, got
    assert seen == [True]


class _LateRelease:
    """A write lock whose first release (after the first row written) waits until another thread waits for rows
    (the moment a helper lets it go with that thread already parked on the condition)."""

    def __init__(self, writer) -> None:
        self._lock, self._writer, self._first = threading.Lock(), writer, True

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        if self._first:
            self._first = False
            deadline = time.monotonic() + JOIN_S
            while not self._writer._changed._waiters and time.monotonic() < deadline:
                time.sleep(0.001)
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def test_a_thread_that_found_the_write_lock_held_is_woken_when_it_is_let_go(monkeypatch):
    """Attack: two handler threads settle their allowed rows at once; the first writes its own (the writer's
    thread, parked, is not woken by them), the second finds the write lock held and waits. Must hold: once the
    first lets the lock go, the second's row is written within its wait (the writer's idle timeout is long here:
    nothing else writes it)."""
    monkeypatch.setattr(audit_writer, "IDLE_S", 60.0)
    written: list = []
    go = threading.Event()

    def write(*row):
        if row[5] == "first":
            go.wait(JOIN_S)
        written.append(row[5])

    writer = audit_writer.RowWriter(write, "or-wake")
    writer.submit("compute", "mallory", "-", [], "refused", "probe")
    assert writer.wait(JOIN_S)
    # the lock is swapped only once the writer's thread is parked: woken by the probe, it may still be waiting on
    # the old lock (this thread wrote the probe itself), then take it and write the next row beside a thread that
    # holds the new one (the same row twice: a flake of this test, not of the writer, whose lock never changes)
    deadline = time.monotonic() + JOIN_S
    while not writer._queued._waiters and time.monotonic() < deadline:
        time.sleep(0.001)
    writer._writing = _LateRelease(writer)
    handed, out = threading.Event(), {}

    def first():
        writer.submit_allowed("open", "alice", "s-a", [1], "allowed", "first")
        handed.set()
        out["first"] = writer.settle_mine(JOIN_S)

    def second():
        handed.wait(JOIN_S)
        writer.submit_allowed("open", "bob", "s-b", [2], "allowed", "second")
        while not writer._writing.locked():  # (the first thread writes its row)
            time.sleep(0.001)
        out["second"] = writer.settle_mine(5.0)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    while not writer._changed._waiters:  # (the second waits for the lock the first holds)
        time.sleep(0.001)
    go.set()
    for t in threads:
        t.join(JOIN_S)
    assert out == {"first": True, "second": True}, (out, written)
    assert written == ["probe", "first", "second"], written


def _top_bits_open(ids):
    """A truncation round revealing top bits, in which this worker (``ao-self``) is not the first party: it
    publishes its share of c to the first party only."""
    from veil.workers.peer_openings import PeerOpenMessage

    return PeerOpenMessage("trunc_mask", (m.ObjectRef(ids[0]), m.ObjectRef(ids[1])), {},
                           str(new_id()).rjust(16, "0"), ["ao-peer", "ao-self"], [new_id()], reveal="top_bits")


@pytest.mark.parametrize("opening", [_peer_open, _top_bits_open], ids=["round", "top-bits-other-party"])
def test_a_round_whose_session_is_revoked_after_its_row_publishes_nothing(hook, monkeypatch, opening):
    """Attack (lead, from the red team's note): revoke() takes no turn, and a round whose allowed row was on
    record before its step (the share-slot path) checked the session only then. Revoked between that check and
    the publish, the outputs still went to the peers. Must hold: nothing is published after the revocation."""
    from veil.workers.peer_rounds import PeerRounds

    srv, honest, other, ids, mine = _opening_worker(hook, "or-revoked")
    seen: list = []
    _with_peer(monkeypatch, srv)
    _watch_publish(monkeypatch, srv, seen)
    opened = PeerRounds.open

    def open_then_revoked(self, *a, **k):  # (past the row's wait, before the publish)
        rnd = opened(self, *a, **k)
        honest.revoked = True
        return rnd

    monkeypatch.setattr(PeerRounds, "open", open_then_revoked)
    got = request(srv, honest, opening(ids))
    assert not seen, "a revoked session's round published its outputs"
    assert type(got) is m.ErrorReply and "revoked" in got.message and "\n" not in got.message, got
    _served_meanwhile(srv, other, mine)
