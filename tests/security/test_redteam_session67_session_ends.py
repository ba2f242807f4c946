"""Red team (session 67): session-end notices to peers, against a slow peer.

A worker tells every peer a session sent frames to that the session ended (``accounts.SessionEndNotices``), so
that the peer frees the hand-offs it still holds unclaimed for that session's account; a peer link holds them
for at most 256 accounts (``MAX_PEER_ACCOUNTS``), then refuses hand-offs for any new one.

Attack (real): the notices went through one queue and one thread, peer after peer, and past 4,096 queued they
were dropped. A session cycler whose sessions each reach a slow (or hung) peer and an honest one held that thread
on the slow peer; every notice past the queue was lost, to the honest peer too, whose link then kept the dropped
accounts' hand-offs until the link closed: after 256 of them, no session of this worker could deal to, or move
to, the honest peer.

Must hold: each peer is told on its own (a slow peer delays only the notices to itself), and no notice is ever
dropped: while a peer has that many ends waiting, no new account reaches it (a one-line refusal of the frame,
naming no session), accounts that reached it already go on, and so do new accounts at every other peer; once the
slow peer catches up it is told of every end and new accounts reach it again.
"""

from __future__ import annotations

import threading
import time

import pytest

from veil.messaging import messages as m
from veil.workers import accounts
from veil.workers.accounts import ACTING, Account, SessionEndNotices

from review_steps import shows_number  # noqa: E402
from server_sessions import answers_next_command, open_session, quota_worker  # noqa: E402

CAP = 16  # the queue bound, made small (the worker's is accounts.ACCOUNT_ENDS_QUEUED)
TOKEN = "rt67-session-ends-scientist-0123456789abcdef"


class _Peer:
    def __init__(self, pid: str) -> None:
        self.id = pid


class _Worker:
    """What the notices need of a worker: its id, its peers and ``send_msg``; a message to a gated peer waits
    for ``open`` (60 s at most). Records ``(peer, account tag)`` per notice delivered."""

    def __init__(self, gated=("slow",)) -> None:
        self.id = "rt67-provider"
        self.peers = {pid: _Peer(pid) for pid in ("fast", "slow")}
        self.gated = set(gated)
        self.open = threading.Event()
        self.told: list = []
        self.lock = threading.Lock()

    def send_msg(self, msg, peer):
        assert msg.op == accounts.END_ACCOUNT
        if peer.id in self.gated:
            self.open.wait(60)
        with self.lock:
            self.told.append((peer.id, ACTING.get().tag))
        return m.OkReply()

    def told_to(self, pid: str) -> set:
        with self.lock:
            return {tag for p, tag in self.told if p == pid}


def _ended(notices: SessionEndNotices, peers=("fast", "slow")) -> Account:
    account = Account()
    account.peers.update(peers)
    notices.post(account)
    return account


def _until(condition, seconds: float = 30) -> None:
    """Waits for ``condition`` (a bound, not a timed assertion: the test asserts what was told afterwards)."""
    until = time.monotonic() + seconds
    while not condition() and time.monotonic() < until:
        time.sleep(0.01)


def test_a_slow_peer_neither_delays_nor_drops_the_other_peers_notices(monkeypatch):
    monkeypatch.setattr(accounts, "ACCOUNT_ENDS_QUEUED", CAP)
    worker = _Worker()
    notices = SessionEndNotices(worker)
    ended = [_ended(notices).tag for _ in range(CAP + 40)]  # sessions that reached both peers, then left

    _until(lambda: worker.told_to("fast") >= set(ended))
    fast_before_slow_answered = worker.told_to("fast")
    worker.open.set()
    last = _ended(notices).tag  # told after every earlier end, at each peer (each peer's ends in order)
    _until(lambda: last in worker.told_to("fast") and last in worker.told_to("slow"))

    assert fast_before_slow_answered >= set(ended), (
        f"the honest peer was told {len(fast_before_slow_answered & set(ended))} of {len(ended)} ends while the "
        "slow one held the notices")
    for pid in ("fast", "slow"):
        missing = set(ended) - worker.told_to(pid)
        assert not missing, f"{len(missing)} session ends were never told to peer {pid!r}: their hand-offs stay"


def test_no_new_account_reaches_a_peer_with_a_full_backlog_and_every_other_goes_on(monkeypatch):
    monkeypatch.setattr(accounts, "ACCOUNT_ENDS_QUEUED", CAP)
    worker = _Worker()
    notices = SessionEndNotices(worker)
    staying = Account()  # a live session that reached the slow peer before its backlog filled
    notices.admit(staying, "slow")
    staying.peers.add("slow")
    for _ in range(CAP + 1):  # (the first one is in flight at the slow peer)
        _ended(notices)

    with pytest.raises(Exception) as refused:
        notices.admit(Account(), "slow")
    text = str(refused.value)
    assert "slow" in text and "\n" not in text, text
    assert not shows_number(text, str(CAP + 1)), text  # (how many others ended is not the requester's to learn)
    _until(lambda: len(worker.told_to("fast")) == CAP + 1)
    notices.admit(Account(), "fast")  # other peers, told already, take new accounts
    notices.admit(staying, "slow")  # an account that is there already goes on (its end will be told)

    worker.open.set()
    _until(lambda: len(worker.told_to("slow")) == CAP + 1)
    _until(lambda: _admitted(notices, "slow"))
    assert _admitted(notices, "slow"), "the slow peer caught up, yet new accounts stay refused there"


def _admitted(notices: SessionEndNotices, pid: str) -> bool:
    try:
        notices.admit(Account(), pid)
    except Exception:  # noqa: BLE001
        return False
    return True


def test_a_server_refuses_the_first_frame_of_a_new_account_to_a_backlogged_peer_and_serves_on(hook, monkeypatch):
    """Through a network worker's frames: a session's first frame to the backlogged peer is refused in one line;
    its frames to another peer, and other sessions' commands, go on."""
    monkeypatch.setattr(accounts, "ACCOUNT_ENDS_QUEUED", CAP)
    srv = quota_worker(hook, f"rt67-ends-{time.monotonic_ns()}", TOKEN, None)
    fake = _Worker()
    srv.peers.update(fake.peers)
    monkeypatch.setattr(srv, "send_msg", fake.send_msg)
    for _ in range(CAP + 1):
        s = open_session(srv, TOKEN)
        s.account.peers.add("slow")
        srv.end_session(s)

    session = open_session(srv, TOKEN)
    acting = ACTING.set(session.account)
    try:
        with pytest.raises(Exception) as refused:
            srv._frame_sender(fake.peers["slow"])
        assert srv._frame_sender(fake.peers["fast"]).endswith(session.account.tag)
    finally:
        ACTING.reset(acting)
    assert "\n" not in str(refused.value) and session.id not in str(refused.value)
    answers_next_command(srv, open_session(srv, TOKEN))
    fake.open.set()
    _until(lambda: len(fake.told_to("slow")) == CAP + 1)
