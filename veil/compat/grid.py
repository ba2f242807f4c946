"""PySyft's ``sy.PrivateGridNetwork``: search several workers at once."""

from __future__ import annotations

from typing import Any


class PrivateGridNetwork:
    """A set of known workers; ``search(*terms)`` returns ``{worker id: [pointers]}``.

    Workers with no match are left out, as in PySyft. The pointers never free
    the data they point to (it belongs to each data owner).
    """

    def __init__(self, *workers: Any) -> None:
        if len(workers) == 1 and isinstance(workers[0], (list, tuple)):
            workers = tuple(workers[0])
        if not workers:
            raise ValueError("PrivateGridNetwork needs at least one worker")
        self.workers = list(workers)

    def search(self, *query: str) -> dict[str, list]:
        from veil.api import search

        if len(query) == 1 and isinstance(query[0], (list, tuple)):
            query = tuple(query[0])
        results = {}
        for worker in self.workers:
            found = search(worker, list(query))
            if found:
                results[worker.id] = found
        return results

    def __repr__(self) -> str:
        return f"<PrivateGridNetwork {[w.id for w in self.workers]}>"
