"""The owner of the pointers a network client sends: it refuses every act (no confused deputy).

Moved verbatim from veil/workers/monitor.py (which re-exports it)."""

from __future__ import annotations

from typing import Any

from veil.exceptions import PermissionDeniedError


class _NoDeputy:
    """The owner of every pointer a network client sends (in any argument, nested or stored).

    A pointer acts through its owner (``owner.send_msg``); this owner refuses, so a client's
    pointer can never make the worker act on another worker with the worker's own peer rights
    (the confused deputy), whatever op, worker function or protocol step it reaches. Its
    garbage collection never deletes anything there.
    """

    id = "(a network client's pointer)"

    def schedule_delete(self, location: Any, oid: int) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # anything a pointer would do through its owner
        raise PermissionDeniedError(
            "a pointer sent by a network client is a pointer to another worker: pointer chains are not "
            "followed on network workers (the worker would act there with its own peer rights, not "
            "yours); use a pointer to that worker directly")


#: see _NoDeputy (veil.workers.base.BaseWorker._make_pointer uses it for network sessions)
NO_DEPUTY = _NoDeputy()

