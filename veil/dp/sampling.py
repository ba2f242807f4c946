"""Poisson sampling: every example joins each batch independently with probability q.

The privacy amplification that the accountant applies
(``PoissonSampledDpEvent``) holds only for this sampling, so batch sizes
vary from step to step and a batch may be empty.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from veil.dp.errors import PrivacyParameterError
from veil.dp import core


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` batches of indices, each index kept with probability ``sample_rate``.

    Args:
        num_samples: dataset size.
        sample_rate: q in (0, 1].
        steps: batches per epoch (default ``round(1 / q)``, one expected pass).
        generator: seeded randomness for tests; by default the cryptographic sampler.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        if not 0 < sample_rate <= 1:
            raise PrivacyParameterError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        self.generator = generator  # None: veil.dp.core.poisson_mask's cryptographic uniforms

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = core.poisson_mask(self.num_samples, self.sample_rate, self.generator)
            yield mask.nonzero().flatten().tolist()


class _EmptyAwareCollate:
    """``default_collate`` that turns an empty batch into empty tensors of the right shape."""

    def __init__(self, dataset: Dataset, collate_fn=default_collate) -> None:
        self.collate_fn = collate_fn
        # Shapes and dtypes of one example tell what an empty batch looks like.
        self.example = collate_fn([dataset[0]])

    def __call__(self, batch):
        if batch:
            return self.collate_fn(batch)
        return _empty_like(self.example)


def _empty_like(example):
    if isinstance(example, torch.Tensor):
        return example[:0].clone()
    if isinstance(example, (list, tuple)):
        return type(example)(_empty_like(e) for e in example)
    if isinstance(example, dict):
        return {k: _empty_like(v) for k, v in example.items()}
    return example


class DPDataLoader(DataLoader):
    """A DataLoader whose batches are Poisson samples of the dataset.

    Args:
        dataset: a map-style dataset.
        sample_rate: q, the probability of each example joining a batch.
        steps: batches per epoch (default ``round(1 / q)``).
        generator: randomness; OS-seeded by default.
    """

    def __init__(self, dataset: Dataset, sample_rate: float, steps: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, collate_fn=None, **kwargs) -> None:
        sampler = PoissonBatchSampler(len(dataset), sample_rate, steps, generator)
        collate = _EmptyAwareCollate(dataset, collate_fn or default_collate)
        super().__init__(dataset, batch_sampler=sampler, collate_fn=collate, **kwargs)
        self.sample_rate = sample_rate

    @classmethod
    def from_data_loader(cls, loader: DataLoader, generator: Optional[torch.Generator] = None) -> "DPDataLoader":
        """The Poisson version of ``loader``: q = 1 / len(loader), as many steps per epoch."""
        return cls(loader.dataset, sample_rate=1 / len(loader), steps=len(loader), generator=generator,
                   collate_fn=loader.collate_fn,
                   num_workers=loader.num_workers, pin_memory=loader.pin_memory)
