"""Opening (reconstructing) secret-shared values: the one place shares meet.

Every protocol reveals values only through :func:`reconstruct` or
:func:`open_values`. To run on remote shares, register a *fetcher* for the
remote handle type (e.g. ``PointerTensor -> ptr.get()``); plain tensors need
none. A simple counter records rounds and ring elements sent so that
protocols' costs can be asserted in tests and reported by benchmarks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

_FETCHERS: dict[type, Callable[[object], torch.Tensor]] = {}
#: handle type -> fetch of many handles at once (e.g. one message per worker)
_BATCH_FETCHERS: dict[type, Callable[[list], list]] = {}


def register_fetcher(handle_type: type, fetch_fn: Callable[[object], torch.Tensor]) -> None:
    """Declares how to bring a share of ``handle_type`` to the local process."""
    _FETCHERS[handle_type] = fetch_fn


def register_batch_fetcher(handle_type: type, fetch_many: Callable[[list], list]) -> None:
    """Declares how to bring many shares of ``handle_type`` here at once."""
    _BATCH_FETCHERS[handle_type] = fetch_many


def fetch_all(shares: list) -> list[torch.Tensor]:
    """Fetches shares, batching handle types that have a batch fetcher."""
    out: list = list(shares)
    groups: dict[type, list[int]] = {}
    for k, s in enumerate(shares):
        if type(s) in _BATCH_FETCHERS:
            groups.setdefault(type(s), []).append(k)
        else:
            out[k] = fetch(s)
    for tp, idx in groups.items():
        for k, value in zip(idx, _BATCH_FETCHERS[tp]([shares[k] for k in idx])):
            out[k] = value
    return out


def fetch(share: object) -> torch.Tensor:
    """Returns a share's value as a local int64 tensor."""
    for klass in type(share).__mro__:
        fn = _FETCHERS.get(klass)
        if fn is not None:
            return fn(share)
    if type(share) is torch.Tensor:
        return share
    raise TypeError(f"no fetcher registered for share type {type(share).__name__}")


@dataclass
class OpeningStats:
    """Communication counted by :func:`open_values`.

    Attributes:
        rounds: Number of opening rounds (sequential message exchanges).
        elements: Ring elements sent in total, counting every party sending
            its share of every opened entry to each of the other parties.
    """

    rounds: int = 0
    elements: int = 0
    #: party -> bytes it sent to the other parties in openings (its shares of opened values)
    bytes_by_party: dict = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        """Bytes sent, at 8 bytes per ring element."""
        return 8 * self.elements


_ACTIVE: list[OpeningStats] = []


@contextlib.contextmanager
def count_openings() -> Iterator[OpeningStats]:
    """Counts rounds and elements of openings run inside the block."""
    stats = OpeningStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)


def reconstruct(shares: Mapping[object, object]) -> torch.Tensor:
    """Sums additive shares in Z/2^64 (one opening round)."""
    return open_values(shares)[0]


def open_values(*share_maps: Mapping[object, object]) -> list[torch.Tensor]:
    """Opens several shared values in one round.

    Args:
        *share_maps: Each a mapping party -> share of one value.

    Returns:
        The public values, in order.
    """
    opened = []
    elements = 0
    by_party: dict = {}
    flat = fetch_all([s for shares in share_maps for s in shares.values()])
    pos = 0
    for shares in share_maps:
        values, pos = flat[pos : pos + len(shares)], pos + len(shares)
        total = values[0]
        for v in values[1:]:
            total = total + v  # int64 addition wraps: sum mod 2^64
        opened.append(total)
        n = len(values)
        elements += n * (n - 1) * total.numel()
        for party in shares:
            by_party[party] = by_party.get(party, 0) + 8 * (n - 1) * total.numel()
    record_opening(elements, by_party)
    return opened


def record_opening(elements: int, by_party: Mapping[object, int] | None = None) -> None:
    """Counts one opening round of ``elements`` ring elements sent (and bytes per sending party)."""
    for stats in _ACTIVE:
        stats.rounds += 1
        stats.elements += elements
        for party, nbytes in (by_party or {}).items():
            stats.bytes_by_party[party] = stats.bytes_by_party.get(party, 0) + nbytes
