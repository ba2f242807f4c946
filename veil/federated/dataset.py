"""BaseDataset, FederatedDataset and ``dataset.federate(workers)``."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.utils.data import Dataset, TensorDataset

from veil.exceptions import WorkerMismatchError
from veil.tensors.pointer import PointerTensor


class BaseDataset(Dataset):
    """Data and targets, local or on one worker (as PySyft 0.2's ``sy.BaseDataset``)."""

    def __init__(self, data: torch.Tensor, targets: torch.Tensor, transform: Any = None):
        if len(data) != len(targets):
            raise ValueError(f"data has {len(data)} rows but targets has {len(targets)}")
        remote = [isinstance(t, PointerTensor) for t in (data, targets)]
        if any(remote) and not all(remote):
            raise WorkerMismatchError("data and targets must both be local or both on the same worker")
        if all(remote) and data.location is not targets.location:
            raise WorkerMismatchError(
                f"data is on {data.location.id!r} but targets on {targets.location.id!r}: a dataset lives on one worker"
            )
        self.data, self.targets, self.transform = data, targets, transform

    @property
    def location(self) -> Any:
        return self.data.location if isinstance(self.data, PointerTensor) else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.data[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]

    def send(self, worker: Any) -> "BaseDataset":
        """A copy of this dataset whose data and targets live on ``worker``."""
        return BaseDataset(self.data.send(worker), self.targets.send(worker), self.transform)

    def __repr__(self) -> str:
        where = self.location.id if self.location is not None else "local"
        return f"<BaseDataset {len(self)} rows @ {where}>"


class FederatedDataset:
    """Datasets that each live on one worker: ``FederatedDataset([ds_bob, ds_alice])``."""

    def __init__(self, datasets: Iterable[BaseDataset]):
        self.datasets: dict[str, BaseDataset] = {}
        for ds in datasets:
            if ds.location is None:
                raise ValueError("every dataset of a FederatedDataset must be sent to a worker first")
            if ds.location.id in self.datasets:
                raise ValueError(f"two datasets on worker {ds.location.id!r}")
            self.datasets[ds.location.id] = ds

    @property
    def workers(self) -> list[str]:
        return list(self.datasets)

    def __getitem__(self, worker_id: str) -> BaseDataset:
        return self.datasets[worker_id]

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets.values())

    def __repr__(self) -> str:
        parts = ", ".join(f"{w}: {len(d)}" for w, d in self.datasets.items())
        return f"<FederatedDataset {len(self)} rows | {parts}>"


def _as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(dataset, BaseDataset):
        return dataset.data, dataset.targets
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


def federate(dataset: Dataset, workers: Iterable[Any]) -> FederatedDataset:
    """Splits a local dataset into equal contiguous parts, one sent to each worker."""
    workers = list(workers)
    if not workers:
        raise ValueError("federate needs at least one worker")
    data, targets = _as_tensors(dataset)
    parts = zip(torch.tensor_split(data, len(workers)), torch.tensor_split(targets, len(workers)))
    return FederatedDataset(BaseDataset(d, t).send(w) for (d, t), w in zip(parts, workers))
