"""Requester accounts on peer links: what a peer hands over is charged to the session it was for.

A crypto provider deals material to the parties, and a worker moves a value to a peer, on behalf of one of
its sessions; the receiving worker stores it as a hand-off in the peer link's namespace until a session
there claims it (names its id). That namespace is shared by every session of the peer, so without more a
session at the provider alone could fill it by never claiming what it had dealt, and keep it filled after
it left (README, memory quota).

So a network worker names, in the sender field of every frame it sends a peer while it handles a session's
request, that session's *account*: ``"<worker id>#<tag>"``, where the tag is random per session (it says
nothing about the session or user to the peer). The receiving worker charges each unclaimed hand-off to
``(peer link, account)``: at most its session quota per account, at most :data:`MAX_PEER_ACCOUNTS` accounts
per peer link (``ReferenceMonitor._check_account``). When the session ends, its worker tells every peer it
sent frames for it (:data:`END_ACCOUNT`, a peer command under the same account) and they free what is
still unclaimed. The account only ever narrows what a peer's request is charged to; a peer that lies about
it can do no more than it could with its own link (which the owner trusted with a peer token).
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from veil.messaging import messages as m

log = logging.getLogger(__name__)

#: the sender field of a frame for an account: worker id, this separator, the account's tag
SEP = "#"
#: requester accounts of one peer link that may hold unclaimed hand-offs at once (an honest provider has
#: one per session that deals ahead: the server's connection limit is 64 by default)
MAX_PEER_ACCOUNTS = 256
#: with a session quota, what one peer link may hold unclaimed for all its accounts together, in session
#: quotas: the peer names the accounts, so one that lies about them must not get more than this
PEER_LINK_SESSIONS = 16
#: the peer command that ends the sender's account at the receiver (registered by veil.workers.handlers)
END_ACCOUNT = "veil.peer.end_account"
#: session ends of one user waiting to be told to one peer past which no new account of that user reaches it
#: (SessionEndNotices.admit: another user's sessions are not held up by a cycler's backlog)
ACCOUNT_ENDS_QUEUED = 4096

_TAG = re.compile(r"[0-9a-f]{16}")


@dataclass(eq=False)
class Account:
    """One session's account at the peers of its worker: its tag, and the peers that were sent frames."""

    tag: str = field(default_factory=lambda: secrets.token_hex(8))
    peers: set = field(default_factory=set)
    #: the session's users, sorted ``(role, name)`` pairs: the scope of its entries in worker-wide caches
    #: (veil/workers/user_caches.py)
    users: tuple = ()


#: the account the requests sent from this context are for (set while a network worker handles a session's
#: request; runtimes copy the context into the threads that send for it)
ACTING: contextvars.ContextVar[Account | None] = contextvars.ContextVar("veil_acting_account", default=None)


def frame_sender(worker_id: str, peer_id: str, ends: "SessionEndNotices | None" = None) -> str:
    """The sender field of a frame ``worker_id`` sends peer ``peer_id`` now (the account it is for, if any);
    ``ends``: the worker's notices, which refuse a new account at a peer they are behind with."""
    account = ACTING.get()
    if account is None:
        return worker_id
    if ends is not None:
        ends.admit(account, peer_id)
    account.peers.add(peer_id)
    return worker_id + SEP + account.tag


def split_sender(sender: str) -> tuple[str, str]:
    """``(worker id, account tag)`` of a frame's sender field (tag ``""``: none, or not a well-formed one)."""
    if SEP not in sender:
        return sender, ""
    worker_id, _, tag = sender.rpartition(SEP)
    return (worker_id, tag) if _TAG.fullmatch(tag) else (sender, "")


class SessionEndNotices:
    """Tells every peer a session sent frames to that it ended (:data:`END_ACCOUNT` under its account), so
    that they free what they hold for it unclaimed: in the background, each peer from a thread of its own (a peer
    that is slow or gone holds up only the notices to itself, never the end of a session, the worker's shutdown
    or another peer's notices), and none is dropped: while a peer has :data:`ACCOUNT_ENDS_QUEUED` ends of one user
    waiting, no new account of that user reaches it (:meth:`admit`). Dropped ends left their hand-offs at the peer until its link
    closed, and 256 of them filled the link for every session here (red team: test_redteam_session67_session_ends.py)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self._waiting: dict[str, deque] = {}  # peer id -> accounts whose end it has not been told yet, in order
        self._of_users: dict[tuple, int] = {}  # (peer id, user) -> how many of those ends are that user's
        self._cond = threading.Condition()

    def admit(self, account: Account, peer_id: str) -> None:
        """Refuses the first frame of ``account`` to ``peer_id`` while that peer's ends waiting of the account's users
        are at the bound (its end could not be queued: the peer would keep its hand-offs); later frames of an account
        there go on. Counted per user: a session cycler's ends refused every other user's new sessions at the peer."""
        if peer_id in account.peers:
            return
        with self._cond:
            waiting = max(self._of_users.get((peer_id, u), 0) for u in _counted_as(account.users))
        if waiting >= ACCOUNT_ENDS_QUEUED:
            from veil.workers.quota import QuotaExceededError

            # (no count: how many other sessions ended is not this requester's to learn)
            raise QuotaExceededError(f"worker {self.worker.id!r}: peer {peer_id!r} is behind with the session ends "
                                     "this worker tells it; no new session reaches it until it has caught up")

    def post(self, account: Account) -> None:
        with self._cond:
            for peer_id in account.peers:
                if peer_id not in self.worker.peers:  # (only peers are told: one thread each)
                    continue
                waiting = self._waiting.get(peer_id)
                if waiting is None:
                    waiting = self._waiting[peer_id] = deque()
                    threading.Thread(target=self._tell, args=(peer_id, waiting), daemon=True,
                                     name=f"veil-{self.worker.id}-account-ends-{peer_id}"[:60]).start()
                waiting.append(account)
                for user in _counted_as(account.users):
                    key = (peer_id, user)
                    self._of_users[key] = self._of_users.get(key, 0) + 1
            self._cond.notify_all()

    def _tell(self, peer_id: str, waiting: deque) -> None:
        """Tells ``peer_id`` of each end in ``waiting``; one stays counted there until its notice is answered."""
        worker = self.worker
        while True:
            with self._cond:
                while not waiting:
                    self._cond.wait()
                account = waiting[0]
            peer = worker.peers.get(peer_id)
            if peer is not None:
                acting = ACTING.set(account)
                try:
                    worker.send_msg(m.CommandMessage(END_ACCOUNT, (), {}, [], False), peer)
                except Exception as e:  # noqa: BLE001  (one failure must not keep the other ends from the peer)
                    log.info("worker %s: could not end a session's account at peer %s: %s", worker.id, peer_id, e)
                finally:
                    ACTING.reset(acting)
            with self._cond:
                waiting.popleft()
                for user in _counted_as(account.users):
                    key = (peer_id, user)
                    if self._of_users[key] > 1:
                        self._of_users[key] -= 1
                    else:
                        del self._of_users[key]


def _counted_as(users: tuple) -> tuple:
    """The users a session's end is counted under at a peer: each of the session's (counted per set of users, a
    holder of k tokens queued 2^k - 1 bounds of ends, one per combination it presented: red team
    test_redteam_session67_third.py); a session without users (in-process) under one key of its own."""
    return users or ((),)
