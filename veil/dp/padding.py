"""Releases on data whose record count is hidden, computed over the owner's public bound on the count.

With ``enable_dp(hide_count=True)`` the count is private, yet a release that reads every record takes time
and memory in proportion to it (a sum over 10^6 records took ~49 ms against ~0.4 ms over 10^3): one timed
release at any epsilon told the count's order of magnitude. The owner therefore declares ``max_records``, a
public bound, as OpenDP's bounded-DP transformations take a public dataset size: a hidden-count release
reads the records into ``max_records`` slots (a query) or into its lot's slots drawn over them (DP-SGD),
slots past the records zero rows masked out, so its work and memory follow the bound only. (Padding the
response time to a wall-clock schedule instead would hold only while the machine is idle, and would still
let the release's memory and CPU show.)

The rows are gathered from the owner's live tensor at each release (one index gather of the bound's size,
whatever the count): no padded copy is kept, so none goes stale when the owner writes through
``x.numpy()`` or ``x.data`` (which a copy keyed on the version counter missed), none holds the bound's rows
per tensor between releases, and DP-only data flagged after ``enable_dp`` needs no first copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from veil.exceptions import PermissionDeniedError


@dataclass(frozen=True)
class PaddedRecords:
    """``rows``: one row per slot (a record's, or zeros); ``present``: which slots are records (bool)."""

    rows: torch.Tensor
    present: torch.Tensor


def padded_rows(x: torch.Tensor, slots: torch.Tensor) -> PaddedRecords:
    """The rows of ``x`` at ``slots`` (indices into ``max_records`` slots, the first ``len(x)`` its records;
    any other slot: a zero row, masked). The same ops on the same sizes whatever ``len(x)``, 0 and the bound
    included: a gather of ``len(slots)`` rows, read from the live tensor at each release (no copy kept: a
    cached copy went stale when the owner wrote through ``x.numpy()`` or ``x.data``, and held the bound's
    rows per tensor for its whole life)."""
    n = len(x)
    slots = slots.to(x.device)
    present = slots < n
    zero_row = torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device)
    source = x if n else zero_row  # (no record: every slot reads the zero row, masked)
    with torch.no_grad():  # (not x.detach(): a view sized by the count is work the trace shows)
        rows = source.index_select(0, slots.clamp(max=max(n - 1, 0)))
        keep = present.reshape(-1, *([1] * (rows.dim() - 1)))
        return PaddedRecords(torch.where(keep, rows, zero_row), present)


def all_slots(x: torch.Tensor, max_records: int) -> PaddedRecords:
    """``x``'s records then zero rows, ``max_records`` rows in all (a query's input)."""
    return padded_rows(x, torch.arange(max_records))


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
    Refusing data above the bound tells that one public threshold is passed (n > max_records), free: the
    owner's ``enable_dp`` refuses such data it covers, so only data the owner adds later can meet it."""
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


def check_ahead(settings: Any, tensors: Iterable[torch.Tensor], worker_id: str) -> None:
    """The owner's ``enable_dp``: refuses (to the owner, with the figures) hidden-count data above the bound,
    before anything changes, so no scientist's release meets the refusal."""
    if not settings.hide_count or settings.max_records is None:
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and len(t) > settings.max_records:
            raise ValueError(f"worker {worker_id!r} holds DP-only data of {len(t)} records, more than "
                             f"max_records={settings.max_records}")


def check_owner_load(worker: Any, obj: Any) -> None:
    """The owner's ``load(..., policy="dp-only")`` after ``enable_dp(hide_count=True, max_records=N)``:
    data of more than N records is refused to the owner before it is stored (stored, every release on it
    was refused, free, telling a scientist n > N). A re-flag to DP-only is not refused (a tightening
    holds): releases on such data are refused as before."""
    from veil.dp.worker_owner import dp_settings

    try:
        settings = dp_settings(worker)
    except PermissionDeniedError:
        return
    check_ahead(settings, [obj], worker.id)


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
