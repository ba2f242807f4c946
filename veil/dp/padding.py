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

Data past the bound (marked DP-only later, or grown in place after its checks) is released over its first
``max_records`` records, the rest unread: the same work, reply, charge and error (none) as data within the
bound, where a refusal told any scientist n > max_records, free. Removing one of those first records then
moves the next one in, a replaced record, so every release over the bound, whatever the count (charging only
data past it would tell n > N), is noised for the larger of an added/removed and a replaced record: a sum
with signed bounds for ``upper - lower`` per value (``veil.dp.queries``; one-signed bounds: unchanged), a
histogram for two bins moved, and a DP-SGD step charged at ``sigma / 2`` (sensitivity 2C: checked
numerically to bound the replaced record's Renyi divergence under Poisson sampling; exact at q = 1).

Tensors of a layout other than strided (sparse) are refused: indexing one scans its stored values, work in
proportion to the count (and the release failed after its charge).

Each release holds about :func:`release_bytes` for the bound's rows, uncharged: the owner's bound is
checked against the worker's memory (:func:`check_memory`) at ``enable_dp`` and at a DP-only load, and
again before each release's charge (from public figures: the bound, the row's shape and dtype).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from veil.dp.errors import PrivacyParameterError
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


def is_hidden(worker: Any, x: Any) -> bool:
    """Whether ``x`` is stored owner data whose record count the owner hides (DP-only, under hide_count)."""
    if not getattr(worker.monitor, "hide_dp_counts", False) or not isinstance(x, torch.Tensor):
        return False
    return any(entry.obj is x and entry.meta.get("dp_only") for _, entry in worker.monitor.owner_entries())


def release_bound(worker: Any, settings: Any, *tensors: torch.Tensor, dataset: bool = False) -> Optional[int]:
    """The padded size a release on ``tensors`` computes over (None: their count is not hidden, used as
    they are), checked before the charge: refused when the owner declared no bound, or the bound's rows
    of one would not fit the worker's memory (public figures only). ``dataset``: a DP training dataset's,
    hidden whenever the owner hides counts (stored or not). Data past the bound is not refused (that told
    n > max_records, free): its first max_records records are read, like any other data's slots."""
    if not settings.hide_count or not dataset and not any(is_hidden(worker, t) for t in tensors):
        return None
    if settings.max_records is None:
        raise PermissionDeniedError(
            f"worker {worker.id!r} keeps its record counts private and declared no public bound on them for "
            "releases to compute over (the owner's enable_dp(..., max_records=N) or --dp-max-records N): "
            "only a DP count is answered")
    for t in tensors:  # (before any read: a sparse tensor's gather scans its values, and then failed)
        if t.layout is not torch.strided:
            raise PermissionDeniedError(
                f"this data on worker {worker.id!r} is stored in the {str(t.layout).replace('torch.', '')} "
                "layout: releases on data whose record count is hidden read dense (strided) tensors only, "
                "refused until the owner stores it dense; a DP count is answered")
    try:
        check_memory(worker, settings.max_records, tensors)
    except PrivacyParameterError:  # (the owner's row grew wider since: public shape, public bound)
        raise PermissionDeniedError(
            f"a release on this data would hold more memory on worker {worker.id!r} than it allows, over its "
            "owner's public bound on the record count (max_records): refused until the owner lowers the "
            "bound") from None
    return settings.max_records


#: what one padded slot holds at most during a release, beyond twice its row: its index and mask, and
#: the query's float64 working copies per value (a histogram's peak measured ~25 + 34 d + 2 row bytes)
_SLOT_BYTES, _VALUE_BYTES = 32, 32


def release_bytes(max_records: int, row_shape: Any = (), dtype: torch.dtype = torch.uint8) -> int:
    """About the most memory one release over ``max_records`` rows of this shape and dtype holds at once."""
    values = max(math.prod(row_shape), 1)
    row = values * dtype.itemsize
    return max_records * (_SLOT_BYTES + _VALUE_BYTES * values + 2 * row)


_CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read(4096)
    except (OSError, ValueError):
        return ""


def _cgroup_places() -> list[tuple[str, str, str]]:
    """(mount, the process's cgroup path, limit file) for cgroup v2 and v1's memory controller: the roots
    as a namespaced container sees them, and the paths /proc/self/cgroup names (a systemd service, a pod,
    a container seen from the host)."""
    places = [(_CGROUP_ROOT, "/", "memory.max"), (f"{_CGROUP_ROOT}/memory", "/", "memory.limit_in_bytes")]
    for line in _read("/proc/self/cgroup").splitlines()[:64]:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            places.append((_CGROUP_ROOT, parts[2], "memory.max"))
        elif "memory" in parts[1].split(","):
            places.append((f"{_CGROUP_ROOT}/memory", parts[2], "memory.limit_in_bytes"))
    return places


def _cgroup_limit() -> Optional[int]:
    """The lowest memory limit on the process's cgroups and their ancestors (a parent's limit holds its
    children too; v2 "max" and v1's unlimited figure are no limit), None when none is readable."""
    limits = []
    for mount, path, name in _cgroup_places():
        parts = [p for p in path.split("/") if p and p not in (".", "..")][:32]
        for depth in range(len(parts), -1, -1):  # the cgroup itself, then each ancestor up to the mount
            text = _read("/".join([mount, *parts[:depth], name])).strip()
            if text.isascii() and text.isdigit():  # (str.isdigit passes '²', which int() refuses)
                limits.append(int(text))
    return min(limits) if limits else None


@functools.lru_cache(maxsize=1)
def _machine_memory() -> int:
    """The machine's memory, or the container's limit when lower (cgroup v2 or v1); read once."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return total if limit is None else min(total, limit)


def memory_limit() -> int:
    """The most one release may hold: a quarter of the machine's memory (the owner's data, other sessions'
    objects and the worker's own needs share the rest)."""
    return _machine_memory() // 4


def check_memory(worker: Any, max_records: int, tensors: Iterable[Any]) -> None:
    """Refuses (PrivacyParameterError, the figures: the owner's or public ones) a bound whose release over
    the rows of one of ``tensors``, or of one-value rows, would not fit :func:`memory_limit`. (Not the
    session quota: a DP release's working rows are the worker's, never charged to the asking session.)"""
    limit = memory_limit()
    rows = [(t.shape[1:], t.dtype) for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0]
    for shape, dtype in [((), torch.uint8), *rows]:
        need = release_bytes(max_records, shape, dtype)
        if need > limit:
            raise PrivacyParameterError(
                f"max_records={max_records}: a release over that many rows of {tuple(shape)} {dtype} values "
                f"holds about {need / 2**20:.0f} MiB on worker {worker.id!r}, more than it allows "
                f"({limit / 2**20:.0f} MiB, a quarter of the machine's memory): choose a lower bound")


def check_ahead(worker: Any, settings: Any, tensors: Iterable[torch.Tensor]) -> None:
    """The owner's ``enable_dp``: refuses (to the owner, with the figures) hidden-count data above the bound,
    and a bound whose releases would not fit the worker's memory, before anything changes, so no
    scientist's release meets either."""
    if not settings.hide_count or settings.max_records is None:
        return
    tensors = list(tensors)
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.layout is not torch.strided:
            raise ValueError(f"worker {worker.id!r}: DP-only data whose record count is hidden must be a dense "
                             f"tensor (strided layout), got the {t.layout} layout (its releases read it by index)")
        if isinstance(t, torch.Tensor) and t.dim() > 0 and len(t) > settings.max_records:
            raise ValueError(f"worker {worker.id!r} holds DP-only data of {len(t)} records, more than "
                             f"max_records={settings.max_records}")
    check_memory(worker, settings.max_records, tensors)


def check_owner_load(worker: Any, obj: Any) -> None:
    """The owner's ``load(..., policy="dp-only")`` after ``enable_dp(hide_count=True, max_records=N)``:
    data of more than N records, or whose N rows a release could not hold, is refused to the owner before
    it is stored. A re-flag to DP-only is not refused (a tightening holds): its releases read its first N
    records (or, too wide for the worker's memory, are refused on public figures)."""
    from veil.dp.worker_owner import dp_settings

    try:
        settings = dp_settings(worker)
    except PermissionDeniedError:
        return
    check_ahead(worker, settings, [obj])


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
