"""PySyft 0.2 worker methods: ``list_objects``, ``objects_count`` (and their ``*_remote``
forms), ``add_worker(s)``, ``request_search``. BaseWorker inherits them from
:class:`PySyftWorkerMethods`, so they live here rather than in the worker core."""

from __future__ import annotations

from typing import Any


class PySyftWorkerMethods:
    """Mixin of BaseWorker; every method is a thin call into veil's own API."""

    def list_objects(self) -> list:
        """Descriptors of the objects *you* created on this worker (others' ids are never listed)."""
        from veil.api import list_objects

        return list_objects(self)

    def objects_count(self) -> int:
        return len(self.list_objects())

    list_objects_remote = list_objects
    objects_count_remote = objects_count

    def add_worker(self, worker: Any) -> Any:
        """Makes ``worker`` reachable from this one: a peer for a server, the shared registry otherwise."""
        add_peer = getattr(self, "add_peer", None)
        if add_peer is not None:
            add_peer(worker)
        else:
            self.hook.register_worker(worker)
        return self

    def add_workers(self, workers: list) -> Any:
        for w in workers:
            self.add_worker(w)
        return self

    def request_search(self, query: Any, location: Any = None) -> list:
        """``me.request_search(["#tag"], location=bob)``: pointers to ``location``'s matching tensors."""
        from veil.api import search

        if location is None:
            raise ValueError("request_search needs location=<worker to search>")
        return search(location, query)
