"""PySyft's ``sy.federated.floptimizer.Optims``: one optimizer state per worker.

Stateful optimizers (momentum, Adam) must not mix one worker's running
averages into another's; ``get_optim(worker)`` returns that worker's copy.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any


class Optims:
    """``Optims(workers, optim)``: ``optim`` is an optimizer instance to clone per worker."""

    def __init__(self, workers: list, optim: Any) -> None:
        self.optim, self.workers = optim, list(workers)
        self.optimizers: dict[str, Any] = {}
        for worker in self.workers:
            clone = copy.copy(optim)  # same parameter groups, fresh state below
            clone.state = defaultdict(dict)
            # deep copy: load_state_dict keeps the given state tensors, so clones would share momentum buffers
            clone.load_state_dict(copy.deepcopy(optim.state_dict()))
            self.optimizers[_key(worker)] = clone

    def get_optim(self, worker: Any) -> Any:
        return self.optimizers[_key(worker)]

    def count(self) -> int:
        return len(self.workers)


def _key(worker: Any) -> str:
    return str(getattr(worker, "id", worker))
