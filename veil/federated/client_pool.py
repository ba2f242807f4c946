"""Client pools: many clients a coordinator drives in batches, described compactly.

A ``FederatedDataset`` holds one dataset (two pointers, a worker handle) per
client, and ``fl.train`` over it sends one client's messages at a time. A
*client pool* is for simulations with thousands of clients: the coordinator
keeps only a compact description (client ``i``'s id, row count and the ids of
its data and targets on its worker) and hands the transport whole batches of
clients' serialized veil requests at once, with a bounded number in flight.
What each client receives and answers is the same veil message any worker
handles (allowlist, reference monitor); only how the bytes travel changes.

``veil.federated.ray_backend.RayClients`` is the pool of clients hosted in
Ray actors. ``fl.train`` uses a pool when the dataset it is given has one
(``PooledFederatedDataset``); see ``veil/federated/pooled.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from veil.federated.dataset import BaseDataset, FederatedDataset

#: builds client i's requests for this exchange (serialized veil messages, handled in order)
JobBuilder = Callable[[int], list]


class ClientPool:
    """Interface of a client pool (implemented by ``RayClients``)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def client_id(self, i: int) -> str:
        """Client ``i``'s worker id."""
        raise NotImplementedError

    def index_of(self, client_id: Any) -> int | None:
        """The index of the client with this id, or None."""
        raise NotImplementedError

    def num_samples(self, i: int) -> int:
        """Rows of client ``i``'s data (FedAvg's weight)."""
        raise NotImplementedError

    def data_ids(self, i: int) -> tuple[int, int]:
        """Ids of client ``i``'s data and targets on its worker."""
        raise NotImplementedError

    def example(self) -> tuple[tuple, torch.dtype, tuple, torch.dtype]:
        """Shape after the first dimension and dtype of the data, then of the targets (plan tracing)."""
        raise NotImplementedError

    def worker(self, i: int) -> Any:
        """A worker handle on client ``i`` (for protocols that talk to clients one by one)."""
        raise NotImplementedError

    def exchange(self, build: JobBuilder, indices: Iterable[int] | None = None,
                 deadline: float | None = None) -> Iterator[tuple[int, Any]]:
        """Sends ``build(i)`` to each client ``i`` (default: all), many clients per transport call.

        ``deadline`` (``time.monotonic()``, given only by ``fl.train(round_seconds=)``): past it, nothing more
        is sent and the exchange ends without the clients not yet reported (the caller drops them).

        Yields ``(i, replies)`` as batches complete (in no fixed order): the serialized replies, one per
        request, shorter when a request failed (the client stops at its first error reply); or
        ``(i, exception)`` when the transport could not reach the client. Never raises for one client.
        """
        raise NotImplementedError


class _LazyDatasets(Mapping):
    """client id -> BaseDataset of pointers, made on access (nothing stored per client)."""

    def __init__(self, pool: ClientPool, dataset: Callable[[int], BaseDataset]) -> None:
        self._pool, self._dataset = pool, dataset

    def _index(self, client_id: Any) -> int:
        index = self._pool.index_of(client_id)
        if index is None:
            raise KeyError(client_id)
        return index

    def __getitem__(self, client_id: str) -> BaseDataset:
        return self._dataset(self._index(client_id))

    def __contains__(self, client_id: object) -> bool:
        try:
            self._index(client_id)
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return (self._pool.client_id(i) for i in range(len(self._pool)))

    def __len__(self) -> int:
        return len(self._pool)


class PooledFederatedDataset(FederatedDataset):
    """A FederatedDataset over a client pool: ``fl.train`` dispatches its clients in batches.

    ``datasets`` (and everything a FederatedDataset offers) still works: each access makes the
    client's pointers on the fly.
    """

    def __init__(self, pool: ClientPool, dataset: Callable[[int], BaseDataset]) -> None:
        # (FederatedDataset.__init__ would build every client's pointers: not called on purpose)
        self.client_pool = pool
        self.datasets = _LazyDatasets(pool, dataset)  # type: ignore[assignment]

    def __len__(self) -> int:
        return sum(self.client_pool.num_samples(i) for i in range(len(self.client_pool)))

    def __repr__(self) -> str:
        return f"<PooledFederatedDataset {len(self.client_pool)} clients, {len(self)} rows>"


class ClientIds(Sequence):
    """Ids of a pool's clients except some (a round's survivors), without a list of them all."""

    def __init__(self, pool: ClientPool, excluded: Iterable[int] = ()) -> None:
        self._pool, self._excluded = pool, frozenset(excluded)

    def _indices(self) -> Iterator[int]:
        return (i for i in range(len(self._pool)) if i not in self._excluded)

    def __len__(self) -> int:
        return len(self._pool) - len(self._excluded)

    def __iter__(self) -> Iterator[str]:
        return (self._pool.client_id(i) for i in self._indices())

    def __getitem__(self, k: Any) -> Any:
        return list(self)[k]

    def __contains__(self, client_id: object) -> bool:
        index = self._pool.index_of(client_id)
        return index is not None and index not in self._excluded

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, (list, tuple, Sequence)) else NotImplemented

    def __repr__(self) -> str:
        return f"<{len(self)} clients>"
