"""A worker's object store: objects by id, with the data owner's metadata."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from veil.exceptions import ObjectNotFoundError, PermissionDeniedError, VeilError


@dataclass
class Entry:
    obj: Any
    tags: tuple = ()
    description: str = ""
    allowed_users: tuple | None = None  # who may .get() it; None = anyone who holds the id
    protected: bool = False  # loaded by the data owner: clients can never delete or take it
    created_by: str = ""
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Viewer:
    """Who is naming objects right now (network servers set one per request).

    Attributes:
        name: the requester's session id; it matches ``Entry.created_by``.
        sees_all: may name any client object (trusted peer workers acting on
            ids that data scientists handed them).
        hands_off: objects this requester stores may be claimed by the first
            other requester that names their (unguessable) id (``.move`` from a
            peer worker: the data scientist chose the id and holds the pointer).
    """

    name: str
    sees_all: bool = False
    hands_off: bool = False


class ObjectStore:
    """Id -> Entry; ids come from callers but can never overwrite an existing object.

    Without a viewer (in-process workers) every id is visible. Inside
    :meth:`viewing`, a requester sees owner-protected objects, its own objects
    and hand-off objects (which it then claims); anything else reads as absent,
    so one client can neither name nor probe another's objects.
    """

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._entries: dict[int, Entry] = {}
        self._local = threading.local()  # the viewer is per handling thread

    @contextmanager
    def viewing(self, viewer: Viewer | None) -> Iterator[None]:
        """Scopes lookups to what ``viewer`` may name (restores the previous viewer after)."""
        previous = getattr(self._local, "viewer", None)
        self._local.viewer = viewer
        try:
            yield
        finally:
            self._local.viewer = previous

    def _visible(self, entry: Entry) -> bool:
        viewer = getattr(self._local, "viewer", None)
        if viewer is None or entry.protected or entry.created_by == viewer.name or viewer.sees_all:
            return True
        if entry.meta.get("hand_off"):
            entry.created_by = viewer.name  # claimed: from now on it is this requester's object
            entry.meta.pop("hand_off")
            return True
        return False

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, oid: int) -> bool:
        return oid in self._entries

    def put(self, oid: int, obj: Any, **meta: Any) -> None:
        if type(oid) is not int or oid <= 0:
            raise VeilError(f"object id must be a positive integer, got {oid!r}")
        if oid in self._entries:
            raise PermissionDeniedError(f"object id {oid} is already in use on worker {self.worker_id!r}")
        entry = Entry(obj, **meta)
        viewer = getattr(self._local, "viewer", None)
        if viewer is not None and viewer.hands_off and not entry.protected:
            entry.meta["hand_off"] = True
        self._entries[oid] = entry

    def replace(self, oid: int, obj: Any) -> None:
        self.entry(oid).obj = obj

    def entry(self, oid: Any) -> Entry:
        entry = self._entries.get(oid) if type(oid) is int else None
        if entry is None or not self._visible(entry):
            raise ObjectNotFoundError(f"object {oid!r} not found on worker {self.worker_id!r}")
        return entry

    def get(self, oid: Any) -> Any:
        return self.entry(oid).obj

    def discard(self, oid: int) -> bool:
        """Deletes a client object; owner-protected objects and unknown ids are left alone."""
        entry = self._entries.get(oid)
        if entry is None or entry.protected or not self._visible(entry):
            return False
        del self._entries[oid]
        return True

    def items(self) -> Iterator[tuple[int, Entry]]:
        """Entries the current viewer owns or the data owner shares (all without a viewer)."""
        viewer = getattr(self._local, "viewer", None)
        if viewer is None:
            return iter(list(self._entries.items()))
        return iter([(k, e) for k, e in self._entries.items() if e.protected or e.created_by == viewer.name])

    def drop_created_by(self, name: str) -> int:
        """Frees every client object ``name`` created (a disconnected session); returns how many."""
        gone = [oid for oid, e in self._entries.items() if e.created_by == name and not e.protected]
        for oid in gone:
            del self._entries[oid]
        return len(gone)

    def objects(self) -> Mapping[int, Any]:
        """Read-only id -> object view (what PySyft users know as ``worker._objects``)."""
        return {oid: e.obj for oid, e in self._entries.items()}

    def clear(self) -> None:
        """Frees every client object (owner-protected data stays)."""
        for oid in [oid for oid, e in self._entries.items() if not e.protected]:
            del self._entries[oid]
