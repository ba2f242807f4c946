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
import queue
import re
import secrets
import threading
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
#: session ends waiting to be told to the peers they used (beyond: the peers keep those hand-offs until
#: their link to this worker closes)
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


def frame_sender(worker_id: str, peer_id: str) -> str:
    """The sender field of a frame ``worker_id`` sends peer ``peer_id`` now (the account it is for, if any)."""
    account = ACTING.get()
    if account is None:
        return worker_id
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
    that they free what they hold for it unclaimed: queued for one background thread, best effort (a peer
    that is slow or gone must not hold up the end of a session or the worker's shutdown; if it never hears,
    it keeps the hand-offs until its link to this worker closes)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self._queue: queue.Queue | None = None
        self._lock = threading.Lock()

    def post(self, account: Account) -> None:
        if not account.peers:
            return
        with self._lock:
            if self._queue is None:
                self._queue = queue.Queue(maxsize=ACCOUNT_ENDS_QUEUED)
                threading.Thread(target=self._send, args=(self._queue,), daemon=True,
                                 name=f"veil-{self.worker.id}-account-ends").start()
        try:
            self._queue.put_nowait(account)
        except queue.Full:
            log.warning("worker %s: too many session ends queued for its peers; one is dropped", self.worker.id)

    def _send(self, ends: queue.Queue) -> None:
        worker = self.worker
        while True:
            account = ends.get()
            for peer_id in sorted(account.peers):
                peer = worker.peers.get(peer_id)
                if peer is None:
                    continue
                acting = ACTING.set(account)
                try:
                    worker.send_msg(m.CommandMessage(END_ACCOUNT, (), {}, [], False), peer)
                except Exception as e:  # noqa: BLE001  (one peer's failure must not keep the others' hand-offs)
                    log.info("worker %s: could not end a session's account at peer %s: %s", worker.id, peer_id, e)
                finally:
                    ACTING.reset(acting)
