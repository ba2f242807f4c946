"""The quota check of one store, made under the object store's lock together with its put.

``ReferenceMonitor.store`` holds ``ObjectStore.locked`` across :meth:`StoreAdmission.admit_store` and
``ObjectStore.put`` (which refuses a taken id itself): stores from threads outside the server's one-request turn
(peer hand-offs, worker functions, plan threads, Ray) each checked the session's usage before either stored,
so two of them together passed a quota each fitted alone. Mixed into the monitor, which provides
``max_session_bytes``, ``session_bytes``, ``_check_account``, ``_over_quota`` and ``_refuse``.

A refusal made under the lock is audited once the lock is let go (:data:`AFTER_LOCK`): the audit row goes to the
owner's database, and one that is frozen (a COMMIT whose answer was lost is looked up for up to ~10 s) held the
store's lock, and with it every store of the worker (peer hand-offs, worker functions), that long. A batch
(``store_objects``: the lock held across an ObjectMessage) writes its refusal after the whole batch, outside a
network worker's turn.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from veil.workers import cancellation
from veil.workers.principals import Principal
from veil.workers.store import SHARED_NS

log = logging.getLogger(__name__)


class _Flags(threading.local):
    audit_later = False  # _refuse keeps the row on the error (the store's lock is held)
    batches = 0  # store_objects blocks running on this thread: the outermost writes the row


_FLAGS = _Flags()
_IN_TURN = contextlib.nullcontext()


def audit_later() -> bool:
    """Whether a refusal made now is to be audited after the store's lock (the monitor's ``_refuse`` asks)."""
    return _FLAGS.audit_later


class _AfterLock:
    """Context (entered before the store's lock, left after it): writes the audit row a refusal under the lock
    kept on its error (``error.audit_row``), unless a batch around it will."""

    def __init__(self, batch: bool) -> None:
        self.batch = batch

    def __enter__(self) -> None:
        if self.batch:
            _FLAGS.batches += 1

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        if self.batch:
            _FLAGS.batches -= 1
        row = getattr(error, "audit_row", None) if error is not None else None
        if row is None or _FLAGS.batches:
            return
        del error.audit_row
        monitor, action, principal, ids, detail = row
        try:
            # a batch (an ObjectMessage's handler) also outside the turn: the database only, and its caller holds
            # no lock (one store may be called by code that does: left in the turn)
            with cancellation.outside_turn() if self.batch else _IN_TURN:
                monitor.audit(action, principal, ids, "refused", detail)
        except Exception:  # noqa: BLE001 - the refusal stands whatever the log did
            log.exception("could not audit a refused store")


#: ``with AFTER_LOCK, store.locked(key):`` one store; ``with BATCH_AFTER_LOCK, store.all_or_none(...):`` a batch
AFTER_LOCK, BATCH_AFTER_LOCK = _AfterLock(False), _AfterLock(True)


class StoreAdmission:
    """The monitor's quota check of a store (call it with the store's lock held)."""

    def admit_store(self, principal: Principal, oid: int, nbytes: int, hand_off: bool) -> None:
        """Refuses (audited once the lock is let go) a store of ``nbytes`` that would pass the session's quota,
        or, for a peer's hand-off, the requester account's (``QuotaRules._check_account``)."""
        ns = principal.namespace
        _FLAGS.audit_later = True
        try:
            if hand_off:
                self._check_account(principal, oid, nbytes)
            elif self.max_session_bytes is not None and ns != SHARED_NS:
                used = self.session_bytes(ns)
                if used + nbytes > self.max_session_bytes:
                    raise self._refuse(self._over_quota(used + nbytes), "store", principal, [oid])
        finally:
            _FLAGS.audit_later = False
