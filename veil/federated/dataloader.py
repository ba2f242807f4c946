"""FederatedDataLoader: batches that each live on one worker."""

from __future__ import annotations

from typing import Any, Iterator

import secrets

import torch

from veil.exceptions import WorkerMismatchError
from veil.federated.dataset import FederatedDataset


class FederatedDataLoader:
    """Iterates worker by worker (in ``fed.workers`` order), yielding ``(data, target)`` pointers.

    Args:
        federated_dataset: the datasets to draw from.
        batch_size: rows per batch.
        shuffle: shuffle rows within each worker every epoch (indices are sent
            along with the slicing command; the data never moves).
        drop_last: skip each worker's last incomplete batch.
        iter_per_worker: PySyft's option: each step yields ``{worker: (data, target)}``,
            one batch from every worker that still has one.
    """

    def __init__(self, federated_dataset: FederatedDataset, batch_size: int = 8, shuffle: bool = False,
                 drop_last: bool = False, seed: int | None = None, iter_per_worker: bool = False):
        if not isinstance(federated_dataset, FederatedDataset):
            raise TypeError("FederatedDataLoader needs a FederatedDataset (see dataset.federate(workers))")
        self.federated_dataset, self.batch_size = federated_dataset, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.iter_per_worker = iter_per_worker
        self._gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))

    def _batches(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        counts = [self._batches(len(d)) for d in self.federated_dataset.datasets.values()]
        return max(counts, default=0) if self.iter_per_worker else sum(counts)

    def __iter__(self) -> Iterator[Any]:
        if self.iter_per_worker:
            return self._iter_per_worker()
        return self._iter_batches()

    def _iter_per_worker(self) -> Iterator[dict]:
        streams = {ds.data.location: self._worker_batches(ds) for ds in self.federated_dataset.datasets.values()}
        while streams:
            step = {}
            for worker, stream in list(streams.items()):
                batch = next(stream, None)
                if batch is None:
                    del streams[worker]
                else:
                    step[worker] = batch
            if step:
                yield step

    def _iter_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for ds in self.federated_dataset.datasets.values():
            yield from self._worker_batches(ds)

    def _worker_batches(self, ds: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(ds)
        order = torch.randperm(n, generator=self._gen) if self.shuffle else None
        for b in range(self._batches(n)):
            start, stop = b * self.batch_size, min((b + 1) * self.batch_size, n)
            index = slice(start, stop) if order is None else order[start:stop]
            data, target = ds.data[index], ds.targets[index]
            if data.location is not target.location:
                raise WorkerMismatchError(
                    f"batch mixes workers: data on {data.location.id!r}, target on {target.location.id!r}"
                )
            yield data, target
