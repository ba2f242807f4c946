"""Worker-wide caches kept apart per user, so that one user's timing says nothing of another's requests.

A cache shared by every session of a worker is a side channel: a DP query's Gaussian sigma took ~3 ms on a
miss and ~2 us on a hit (a one-step PLD 0.1-4 s against a lookup), so another scientist learned whether
someone had recently used the same (sensitivity, epsilon, delta) or (sigma, q), and by filling the cache
could evict everyone's entries (each of their next charges paid the miss again, some inside the ledger's
write lock). Here each *scope* (the requesting users of a network session, see :func:`current_scope`) has
its own least-recently-used entries within its own bound; a hit or a miss follows only that scope's own
past requests. The scopes together are bounded too: past ``total``, whole partitions of the least recently
active *other* scopes are dropped (never the requester's own entries, never one entry of another scope that
the requester could then probe). What a user can still learn is coarse: that its own idle partition was
dropped because other users became active meanwhile.

In-process callers (no network session) share one scope (``None``): the owner's own process.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

from veil.workers.accounts import ACTING

_MISSING = object()


def current_scope() -> Hashable:
    """The requesting users of the session this thread serves (sorted ``(role, name)`` pairs), or None
    in-process. Every session of one user shares that user's scope (it reveals only the user's own requests)."""
    account = ACTING.get()
    return None if account is None else account.users


class ScopedCache:
    """Least-recently-used entries per scope: at most ``per_scope`` weight each (an entry heavier than that is
    not kept), at most ``total`` for all scopes together (the least recently active other scopes' partitions
    dropped first). Thread-safe."""

    def __init__(self, per_scope: int, total: int) -> None:
        if not 0 < per_scope <= total:
            raise ValueError(f"need 0 < per_scope <= total, got {per_scope}, {total}")
        self.per_scope, self.total = per_scope, total
        self._scopes: OrderedDict = OrderedDict()  # scope -> [OrderedDict(key -> (value, weight)), weight]
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, scope: Hashable, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            part = self._scopes.get(scope)
            if part is None:
                return default
            found = part[0].get(key, _MISSING)
            if found is _MISSING:
                return default
            self._scopes.move_to_end(scope)
            part[0].move_to_end(key)
            return found[0]

    def put(self, scope: Hashable, key: Hashable, value: Any, weight: int = 1) -> None:
        if weight > self.per_scope:
            return
        with self._lock:
            part = self._scopes.get(scope)
            if part is None:
                part = self._scopes[scope] = [OrderedDict(), 0]
            self._scopes.move_to_end(scope)
            entries = part[0]
            if key in entries:
                return
            entries[key] = (value, weight)
            part[1] += weight
            self._weight += weight
            while part[1] > self.per_scope:  # the scope's own oldest first
                _k, (_v, w) = entries.popitem(last=False)
                part[1] -= w
                self._weight -= w
            while self._weight > self.total:  # then the least recently active other scopes, whole
                oldest = next(iter(self._scopes))
                self._weight -= self._scopes.pop(oldest)[1]

    def keys(self, scope: Hashable) -> list:
        """The scope's keys, least recently used first."""
        with self._lock:
            part = self._scopes.get(scope)
            return [] if part is None else list(part[0])

    def weight(self, scope: Hashable = _MISSING) -> int:
        """The weight kept for ``scope`` (all scopes when not given)."""
        with self._lock:
            if scope is _MISSING:
                return self._weight
            part = self._scopes.get(scope)
            return 0 if part is None else part[1]

    def clear(self) -> None:
        with self._lock:
            self._scopes.clear()
            self._weight = 0


def per_user_cache(per_user: int, total: int) -> Callable[[Callable], Callable]:
    """``functools.lru_cache`` for a function of hashable arguments, its entries kept per requesting user
    (:class:`ScopedCache`, one entry weighing 1). The wrapper has ``cache`` and ``cache_clear``."""

    def wrap(fn: Callable) -> Callable:
        cache = ScopedCache(per_user, total)

        @functools.wraps(fn)
        def cached(*args: Any, **kwargs: Any) -> Any:
            scope, key = current_scope(), (args if not kwargs else (*args, _MISSING, *sorted(kwargs.items())))
            found = cache.get(scope, key, _MISSING)
            if found is not _MISSING:
                return found
            value = fn(*args, **kwargs)
            cache.put(scope, key, value)
            return value

        cached.cache = cache  # type: ignore[attr-defined]
        cached.cache_clear = cache.clear  # type: ignore[attr-defined]
        return cached

    return wrap
