"""Releases on data whose record count is hidden, computed over the owner's public bound on the count.

With ``enable_dp(hide_count=True)`` the count is private, yet a release that reads every record takes time
and memory in proportion to it (a sum over 10^6 records took ~49 ms against ~0.4 ms over 10^3): one timed
release at any epsilon told the count's order of magnitude. The owner therefore declares ``max_records``, a
public bound, as OpenDP's bounded-DP transformations take a public dataset size: a hidden-count release
reads a copy of the data padded with zero rows up to that bound, and masks the padding rows out, so its
work and memory follow the bound only. (Padding the response time to a wall-clock schedule instead would
hold only while the machine is idle, and would still let the release's memory and CPU show.)

The padded copy is made once per stored tensor (and again after the owner changes it in place), by
``enable_dp`` for the data it covers; for DP-only data added later, by its first release, whose time then
shows the count once. Its memory is the owner's: ``max_records`` rows per hidden-count tensor released on.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from veil.exceptions import PermissionDeniedError


@dataclass(frozen=True)
class PaddedRecords:
    """``rows``: the records, then zero rows up to the owner's ``max_records``; ``count``: how many are records."""

    rows: torch.Tensor
    count: int

    def present(self) -> torch.Tensor:
        """Which rows are records (bool, one per row): computed over all the rows, whatever the count."""
        return torch.arange(len(self.rows)) < self.count


class PaddedCache:
    """Padded copies of hidden-count tensors, by tensor (dropped with it; remade when it changes in place)."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Any, int, int, PaddedRecords]] = {}
        self._guard = threading.RLock()  # (re-entrant: a tensor's weakref callback may run under it, in GC)

    def get(self, x: torch.Tensor, max_records: int) -> PaddedRecords:
        with self._guard:
            held = self._by_id.get(id(x))
            if held is not None and held[0]() is x and held[1] == x._version and held[2] == max_records:
                return held[3]
        padded = _pad(x, max_records)
        key = id(x)

        def forget(_ref: Any, key: int = key) -> None:
            with self._guard:
                if key in self._by_id and self._by_id[key][0]() is None:
                    del self._by_id[key]

        with self._guard:
            self._by_id[key] = (weakref.ref(x, forget), x._version, max_records, padded)
        return padded


def _pad(x: torch.Tensor, max_records: int) -> PaddedRecords:
    rows = torch.zeros((max_records, *x.shape[1:]), dtype=x.dtype)
    rows[:len(x)] = x.detach()
    return PaddedRecords(rows, len(x))


def check_bound(x: torch.Tensor, max_records: int, worker_id: str) -> None:
    """Refuses data with more records than the owner's public bound (the message states neither number)."""
    if len(x) > max_records:
        raise PermissionDeniedError(
            f"this data on worker {worker_id!r} holds more records than its owner's public bound on the record "
            "count (max_records): releases on it are refused until the owner raises the bound")


def is_hidden(worker: Any, x: Any) -> bool:
    """Whether ``x`` is stored owner data whose record count the owner hides (DP-only, under hide_count)."""
    if not getattr(worker.monitor, "hide_dp_counts", False) or not isinstance(x, torch.Tensor):
        return False
    return any(entry.obj is x and entry.meta.get("dp_only") for _, entry in worker.monitor.owner_entries())


def release_bound(worker: Any, settings: Any, *tensors: torch.Tensor, dataset: bool = False) -> Optional[int]:
    """The padded size a release on ``tensors`` computes over (None: their count is not hidden, used as
    they are), checked before the charge: refused when the owner declared no bound, or one exceeds it.
    ``dataset``: a DP training dataset's, hidden whenever the owner hides counts (stored or not).
    The copy itself (:meth:`PaddedCache.get`) is taken after the charge: made there only for DP-only data
    added after ``enable_dp``, its time is then paid for."""
    if not settings.hide_count or not dataset and not any(is_hidden(worker, t) for t in tensors):
        return None
    if settings.max_records is None:
        raise PermissionDeniedError(
            f"worker {worker.id!r} keeps its record counts private and declared no public bound on them for "
            "releases to compute over (the owner's enable_dp(..., max_records=N) or --dp-max-records N): "
            "only a DP count is answered")
    for t in tensors:
        check_bound(t, settings.max_records, worker.id)
    return settings.max_records


def pad_ahead(settings: Any, tensors: Iterable[torch.Tensor], worker_id: str) -> None:
    """The owner's ``enable_dp``: checks every hidden-count tensor against the bound and pads it now, so
    no scientist's release times the copy."""
    if not settings.hide_count or settings.max_records is None:
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            try:
                check_bound(t, settings.max_records, worker_id)
            except PermissionDeniedError:
                raise ValueError(f"worker {worker_id!r} holds DP-only data of {len(t)} records, more than "
                                 f"max_records={settings.max_records}") from None
            settings.padded.get(t, settings.max_records)


def masked_lot_gradients(samples: list, present: torch.Tensor) -> list:
    """Per-record gradients with the padding rows' set to zero (they are no record: nothing to clip)."""
    out = []
    for s in samples:
        if s is None:
            out.append(s)
        else:
            keep = present.reshape(-1, *([1] * (s.dim() - 1)))
            out.append(torch.where(keep, s, torch.zeros((), dtype=s.dtype)))
    return out
