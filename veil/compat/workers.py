"""PySyft 0.2 worker methods (``list_objects``, ``objects_count``, ``add_worker``,
``request_search``) as plain functions; BaseWorker exposes them as methods."""

from __future__ import annotations

from typing import Any


def list_objects(worker: Any) -> list:
    """Descriptors of the objects *you* created on ``worker`` (others' ids are never listed)."""
    from veil.api import list_objects as _list

    return _list(worker)


def objects_count(worker: Any) -> int:
    return len(list_objects(worker))


def add_worker(worker: Any, other: Any) -> Any:
    """Makes ``other`` reachable from ``worker``: a peer for a server, the shared registry otherwise."""
    add_peer = getattr(worker, "add_peer", None)
    if add_peer is not None:
        add_peer(other)
    else:
        worker.hook.register_worker(other)
    return worker


def request_search(worker: Any, query: Any, location: Any) -> list:
    """``me.request_search(["#tag"], location=bob)``: pointers to ``location``'s matching tensors."""
    from veil.api import search

    if location is None:
        raise ValueError("request_search needs location=<worker to search>")
    return search(location, query)
