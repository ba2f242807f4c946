"""The per-session memory quota (``veil worker --max-session-mb``): what a stored object is charged, and the
monitor's refusals (:class:`QuotaRules`, mixed into :class:`~veil.workers.monitor.ReferenceMonitor`, which
provides ``max_session_bytes``, ``worker_id``, ``session_bytes``, ``_account_state`` and ``_refuse``: only
the monitor touches the store).

A session is charged at store and freed on delete or disconnect; a peer's unclaimed hand-offs are charged
to the requester account they were sent for (veil/workers/accounts.py); with a quota, a command is sized
before it runs (veil/workers/output_bounds.py) and checked here (``check_room``, ``refuse_unsized``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from veil.exceptions import VeilError, register_remote_error
from veil.workers.accounts import MAX_PEER_ACCOUNTS, PEER_LINK_SESSIONS
from veil.workers.principals import Principal
from veil.workers.store import SHARED_NS


@register_remote_error
class QuotaExceededError(VeilError):
    """A session would hold more memory on a worker than the owner allows (``--max-session-mb``)."""


#: bytes charged for a stored object of a type without a size estimator (pointers, small wrappers):
#: every object counts, so a session cannot fill a worker with many "free" objects
DEFAULT_OBJECT_BYTES = 1024
#: the least a stored tensor is charged: its entry and tensor object take a few hundred bytes whatever its
#: data holds, so that many empty or scalar tensors are not free either
MIN_TENSOR_BYTES = 256
#: type -> bytes an object of it holds, for the per-session quota (HE ciphertexts, plans register theirs)
SIZE_ESTIMATORS: dict[type, Callable[[Any], int]] = {}


def register_size_estimator(tp: type, estimate: Callable[[Any], int]) -> None:
    """Tells the quota how many bytes a stored ``tp`` holds (see :data:`SIZE_ESTIMATORS`)."""
    SIZE_ESTIMATORS[tp] = estimate


def _nbytes(obj: Any) -> int:
    """Bytes a stored object holds, for the per-session quota."""
    tp = type(obj)
    if tp is torch.Tensor or tp is torch.nn.Parameter:
        try:
            return max(obj.untyped_storage().nbytes(), MIN_TENSOR_BYTES)
        except (RuntimeError, NotImplementedError):
            return max(obj.numel() * obj.element_size(), MIN_TENSOR_BYTES)
    estimate = SIZE_ESTIMATORS.get(tp)
    if estimate is None:
        return DEFAULT_OBJECT_BYTES
    return max(int(estimate(obj)), DEFAULT_OBJECT_BYTES)


def metadata_nbytes(tags: Any, description: Any) -> int:
    """Bytes a sent object's tags and description hold (PySyft's ``.tag()``/``.describe()``, what search
    matches): charged with it, or 100,000 tags per one-element tensor would be held for free. A str costs
    its characters plus the ~49 bytes of a Python string object (charged in characters: an upper bound
    for ASCII, the common case; a wide character is at most 4)."""
    total = 0
    for tag in tags or ():
        total += 49 + 4 * len(tag) if type(tag) is str else DEFAULT_OBJECT_BYTES
    if description:
        total += 49 + 4 * len(description) if type(description) is str else DEFAULT_OBJECT_BYTES
    return total



class QuotaRules:
    """The quota's refusals, for the reference monitor."""

    def _over_quota(self, held: int, op_name: str = "") -> QuotaExceededError:
        """The refusal of a session that would hold ``held`` bytes (``op_name``: the op sized before it ran)."""
        prefix = f"{op_name}: " if op_name else ""
        return QuotaExceededError(
            f"{prefix}worker {self.worker_id!r}: this session would hold {held / 2**20:.1f} MiB, more than the "
            f"owner's limit of {self.max_session_bytes / 2**20:.1f} MiB per session; free objects (del pointers) "
            "or ask the owner to raise --max-session-mb")

    def refuse_unsized(self, principal: Principal, op_name: str, reason: str) -> QuotaExceededError:
        """The (audited) refusal of an op that cannot be sized before it runs (veil/workers/output_bounds.py:
        its result size would depend on values, with no bound from shapes) while the session has a quota."""
        error = QuotaExceededError(
            f"{op_name}: worker {self.worker_id!r} cannot size this op before it runs ({reason}), and under "
            "the owner's per-session memory limit it does not run ops of unknown size (pass sizes as numbers, "
            "num_classes / output_size where torch takes them)")
        return self._refuse(error, "store", principal, [])

    def check_transient(self, principal: Principal, nbytes: int, op_name: str) -> None:
        """Refuses a request that would make ``nbytes`` it does not keep (a reply encoding stored views whole, a
        value named again: veil/workers/output_bounds.py ``check_view_room``) past the session quota itself: what
        a request makes for its reply alone is bounded like what a session holds, whatever it holds now.

        Raises:
            QuotaExceededError: ``nbytes`` is more than the quota.
        """
        quota = self.max_session_bytes
        if quota is None or principal.namespace == SHARED_NS or nbytes <= quota:
            return
        error = QuotaExceededError(
            f"{op_name}: worker {self.worker_id!r}: this would make {nbytes / 2**20:.1f} MiB past the storage its "
            f"tensors hold (views, a tensor named again, a broadcast), more than the owner's limit of "
            f"{quota / 2**20:.1f} MiB per session; name smaller values or ask the owner to raise --max-session-mb")
        raise self._refuse(error, "store", principal, [])

    def check_room(self, principal: Principal, nbytes: int, op_name: str) -> None:
        """Refuses a command whose results (``nbytes``, sized before its op runs: veil/workers/output_bounds.py)
        would not fit the session's quota, as :meth:`store` would once they exist.

        Raises:
            QuotaExceededError: they would not fit.
        """
        quota, ns = self.max_session_bytes, principal.namespace
        if quota is None or ns == SHARED_NS:
            return
        used = self.session_bytes(ns)
        if used + nbytes > quota:
            raise self._refuse(self._over_quota(used + nbytes, op_name), "store", principal, [])

    def _check_account(self, principal: Principal, oid: int, nbytes: int) -> None:
        """A peer's hand-off is charged to the requester account it is for (not only to the peer link, which
        every session of that peer shares): at most the session quota per account, at most
        :data:`~veil.workers.accounts.PEER_LINK_SESSIONS` quotas per peer link (a peer names the accounts:
        a lying one gets no more), and at most :data:`~veil.workers.accounts.MAX_PEER_ACCOUNTS` accounts
        holding hand-offs per link (with no quota set)."""
        ns = principal.namespace
        held, used, accounts = self._account_state(ns, principal.account)
        if not held and accounts >= MAX_PEER_ACCOUNTS:
            error = QuotaExceededError(
                f"worker {self.worker_id!r}: peer {principal.user!r} already holds unclaimed hand-offs for "
                f"{MAX_PEER_ACCOUNTS} requesters here; they are freed when claimed or when their sessions end")
            raise self._refuse(error, "store", principal, [oid])
        quota = self.max_session_bytes
        if quota is None:
            return
        if used + nbytes > quota:
            error = QuotaExceededError(
                f"worker {self.worker_id!r}: a requester at peer {principal.user!r} would hold "
                f"{(used + nbytes) / 2**20:.1f} MiB of unclaimed hand-offs here, more than the owner's "
                f"limit of {quota / 2**20:.1f} MiB per session; claim (use) what was dealt or "
                "moved here, or ask the owner to raise --max-session-mb")
            raise self._refuse(error, "store", principal, [oid])
        link = self.session_bytes(ns)
        if link + nbytes > PEER_LINK_SESSIONS * quota:
            # (no amount: the others' share of it is not this requester's to learn)
            error = QuotaExceededError(
                f"worker {self.worker_id!r}: peer {principal.user!r} holds as many unclaimed hand-offs here for "
                f"all its requesters as it may ({PEER_LINK_SESSIONS} sessions' quota); they are freed when "
                "claimed or when their sessions end")
            raise self._refuse(error, "store", principal, [oid])
