"""The quota check of one store, made under the object store's lock together with its put.

``ReferenceMonitor.store`` holds ``ObjectStore.locked`` across :meth:`StoreAdmission.admit_store` and
``ObjectStore.put`` (which refuses a taken id itself): stores from threads outside the server's one-request turn
(peer hand-offs, worker functions, plan threads, Ray) each checked the session's usage before either stored,
so two of them together passed a quota each fitted alone. Mixed into the monitor, which provides
``max_session_bytes``, ``session_bytes``, ``_check_account``, ``_over_quota`` and ``_refuse``.
"""

from __future__ import annotations

from veil.workers.principals import Principal
from veil.workers.store import SHARED_NS


class StoreAdmission:
    """The monitor's quota check of a store (call it with the store's lock held)."""

    def admit_store(self, principal: Principal, oid: int, nbytes: int, hand_off: bool) -> None:
        """Refuses (audited) a store of ``nbytes`` that would pass the session's quota, or, for a peer's
        hand-off, the requester account's (``QuotaRules._check_account``)."""
        ns = principal.namespace
        if hand_off:
            self._check_account(principal, oid, nbytes)
        elif self.max_session_bytes is not None and ns != SHARED_NS:
            used = self.session_bytes(ns)
            if used + nbytes > self.max_session_bytes:
                raise self._refuse(self._over_quota(used + nbytes), "store", principal, [oid])
