"""A worker's object store: objects by id, with the data owner's metadata."""

from __future__ import annotations

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


class ObjectStore:
    """Id -> Entry; ids come from callers but can never overwrite an existing object."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._entries: dict[int, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, oid: int) -> bool:
        return oid in self._entries

    def put(self, oid: int, obj: Any, **meta: Any) -> None:
        if type(oid) is not int or oid <= 0:
            raise VeilError(f"object id must be a positive integer, got {oid!r}")
        if oid in self._entries:
            raise PermissionDeniedError(f"object id {oid} is already in use on worker {self.worker_id!r}")
        self._entries[oid] = Entry(obj, **meta)

    def replace(self, oid: int, obj: Any) -> None:
        self.entry(oid).obj = obj

    def entry(self, oid: Any) -> Entry:
        entry = self._entries.get(oid) if type(oid) is int else None
        if entry is None:
            raise ObjectNotFoundError(f"object {oid!r} not found on worker {self.worker_id!r}")
        return entry

    def get(self, oid: Any) -> Any:
        return self.entry(oid).obj

    def discard(self, oid: int) -> bool:
        """Deletes a client object; owner-protected objects and unknown ids are left alone."""
        entry = self._entries.get(oid)
        if entry is None or entry.protected:
            return False
        del self._entries[oid]
        return True

    def items(self) -> Iterator[tuple[int, Entry]]:
        return iter(list(self._entries.items()))

    def objects(self) -> Mapping[int, Any]:
        """Read-only id -> object view (what PySyft users know as ``worker._objects``)."""
        return {oid: e.obj for oid, e in self._entries.items()}

    def clear(self) -> None:
        """Frees every client object (owner-protected data stays)."""
        for oid in [oid for oid, e in self._entries.items() if not e.protected]:
            del self._entries[oid]
