"""Who can reach whom: the worker registry a hook (or the default context) keeps."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from veil.workers.base import BaseWorker


class HookContext:
    """Worker registry + the local worker that owns the user's pointers.

    ``TorchHook`` subclasses this; without a hook, a default context is created
    on first use so that ``veil.send(x, worker)`` works with plain torch.
    """

    def __init__(self) -> None:
        # Weak values: a worker that the user drops is not kept alive by the registry.
        self.workers: "weakref.WeakValueDictionary[str, BaseWorker]" = weakref.WeakValueDictionary()
        self._local_worker: "BaseWorker | None" = None
        # pools that make worker handles on demand (Ray clients: one handle per client only while it is
        # referenced), asked for an id the registry no longer holds; ``handle_for(worker_id) -> worker | None``
        self.worker_sources: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def register_worker(self, worker: "BaseWorker") -> None:
        self.workers[worker.id] = worker

    def find_worker(self, worker_id: str) -> "BaseWorker | None":
        """The registered worker, else a handle from a pool that names it (None: nobody here knows it)."""
        worker = self.workers.get(worker_id)
        for source in list(self.worker_sources) if worker is None else ():
            worker = source.handle_for(worker_id)
            if worker is not None:
                break
        return worker

    @property
    def local_worker(self) -> "BaseWorker":
        if self._local_worker is None:
            from veil.workers.virtual import VirtualWorker

            self._local_worker = VirtualWorker(self, id="me")
        return self._local_worker


_default: HookContext | None = None


def default_hook_context() -> Any:
    """The context of the most recent TorchHook, or a fresh default one."""
    global _default
    if _default is None:
        _default = HookContext()
    return _default


def set_default_hook_context(ctx: HookContext) -> None:
    global _default
    _default = ctx
