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

    def register_worker(self, worker: "BaseWorker") -> None:
        self.workers[worker.id] = worker

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
