"""Worker-wide caches kept apart per user, so that one user's timing says nothing of another's requests.

A cache shared by every session of a worker is a side channel: a DP query's Gaussian sigma took ~3 ms on a
miss and ~2 us on a hit (a one-step PLD 0.1-4 s against a lookup), so another scientist learned whether
someone had recently used the same (sensitivity, epsilon, delta) or (sigma, q), and by filling the cache
could evict everyone's entries (each of their next charges paid the miss again, some inside the ledger's
write lock). Here each *scope* (a requesting user, see :func:`current_scope`) has its own least-recently-used
entries within its own share; a hit or a miss follows only that scope's own past requests.

What no other user can do is drop a scope's partition: it goes only when its own user has been idle for
``idle_seconds`` (checked against the clock at every use, whoever uses the cache), so whether a user's next
request hits depends on that user's requests and the time alone. (An earlier rule dropped the least recently
active other users' partitions once all users' together passed the total: two user names filled the kept
PLDs' total, so one could drop a chosen victim's partition at will, just before its request, and learn from
its own entries which users had been active since.) The total is kept by a number of *slots*, one share each:
a user without one while every slot is held by users active within ``idle_seconds`` is not kept there (what
it learns is only that many users were recently active; :func:`per_user_cache` keeps its entries per session), and the clients of one issuer (client
tokens ``NAME/HOLDER``) hold at most a quarter of the slots together. In-process callers (no network session)
share one scope (``None``, the owner's own process) that always has its slot.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable

from veil.workers.accounts import ACTING

_MISSING = object()

#: a user's partition is dropped once it was not used for this long (by its user: nobody else can drop it)
IDLE_SECONDS = 600.0
#: the clients of one issuer together hold at most 1/this of a cache's slots (one client with many issued
#: names must not take every slot)
ISSUER_SHARE = 4


def current_scope() -> Hashable:
    """The requesting user of the session this thread serves (``((role, name),)``: the least of its users, so a
    connection presenting k tokens has at most k scopes, not one per subset, each a user whose token it holds),
    or None in-process. Every session of one user shares that user's scope (it reveals only its own requests)."""
    account = ACTING.get()
    return None if account is None else tuple(account.users[:1])


def _group(scope: Hashable) -> Hashable:
    """What a scope's slot counts toward: an issued client's issuer (``("client", NAME)`` for ``NAME/HOLDER``),
    otherwise the scope itself."""
    if isinstance(scope, tuple) and len(scope) == 1:
        role, name = scope[0]
        if role == "client" and "/" in name:
            return ("client", name.split("/", 1)[0])
    return scope


class ScopedCache:
    """Least-recently-used entries per scope: at most ``per_scope`` weight each (an entry heavier than that is
    not kept); ``total // per_scope`` slots, one kept for the in-process scope (None); a scope's partition
    dropped only after ``idle_seconds`` without use. Thread-safe."""

    def __init__(self, per_scope: int, total: int, idle_seconds: float = IDLE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < per_scope <= total:
            raise ValueError(f"need 0 < per_scope <= total, got {per_scope}, {total}")
        self.per_scope, self.total, self.idle_seconds, self._clock = per_scope, total, idle_seconds, clock
        self.slots = max(1, total // per_scope - 1)  # (network scopes; None's slot beside them)
        self._scopes: OrderedDict = OrderedDict()  # scope -> [OrderedDict(key -> (value, weight)), weight, used]
        self._groups: dict = {}  # group -> network scopes holding a slot
        self._weight = 0
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        """(Under the lock.) Drops the partitions idle for idle_seconds (the least recently used are first)."""
        while self._scopes:
            scope, part = next(iter(self._scopes.items()))
            if now - part[2] < self.idle_seconds:
                return
            self._drop(scope)

    def _drop(self, scope: Hashable) -> None:
        self._weight -= self._scopes.pop(scope)[1]
        if scope is not None:
            group = _group(scope)
            self._groups[group] -= 1
            if not self._groups[group]:
                del self._groups[group]

    def _admit(self, scope: Hashable) -> bool:
        """(Under the lock.) Whether a new partition for ``scope`` gets a slot now (counted if it does)."""
        if scope is None:
            return True
        group = _group(scope)
        held = self._groups.get(group, 0)
        if len(self._scopes) - (None in self._scopes) >= self.slots or \
                (group != scope and held >= max(1, self.slots // ISSUER_SHARE)):
            return False
        self._groups[group] = held + 1
        return True

    def get(self, scope: Hashable, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            now = self._clock()
            self._expire(now)
            part = self._scopes.get(scope)
            if part is None:
                return default
            found = part[0].get(key, _MISSING)
            if found is _MISSING:
                return default
            part[2] = now
            self._scopes.move_to_end(scope)
            part[0].move_to_end(key)
            return found[0]

    def put(self, scope: Hashable, key: Hashable, value: Any, weight: int = 1) -> bool:
        """Keeps the entry in the scope's partition; False if it is not kept (too heavy, or no slot free)."""
        if weight > self.per_scope:
            return False
        with self._lock:
            now = self._clock()
            self._expire(now)
            part = self._scopes.get(scope)
            if part is None:
                if not self._admit(scope):
                    return False
                part = self._scopes[scope] = [OrderedDict(), 0, now]
            part[2] = now
            self._scopes.move_to_end(scope)
            entries = part[0]
            if key in entries:
                return True
            entries[key] = (value, weight)
            part[1] += weight
            self._weight += weight
            while part[1] > self.per_scope:  # the scope's own oldest first (never another scope's)
                _k, (_v, w) = entries.popitem(last=False)
                part[1] -= w
                self._weight -= w
            return True

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
            self._groups.clear()
            self._weight = 0


class _SessionEntries:
    """Entries of sessions whose user has no slot, each session's its own (at most ``per_user``, its oldest
    dropped; gone with the session): without them such a user's DP-SGD charge composed its history again inside
    the ledger's write lock, which every user's charge waits for. Nothing here is shared between sessions."""

    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self._of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Account -> OrderedDict
        self._lock = threading.Lock()

    def get(self, account: Any, key: Hashable) -> Any:
        with self._lock:
            entries = self._of.get(account)
            return _MISSING if entries is None else entries.get(key, _MISSING)

    def put(self, account: Any, key: Hashable, value: Any) -> None:
        with self._lock:
            entries = self._of.setdefault(account, OrderedDict())
            entries[key] = value
            while len(entries) > self.per_user:
                entries.popitem(last=False)


def per_user_cache(per_user: int, total: int) -> Callable[[Callable], Callable]:
    """``functools.lru_cache`` for a function of hashable arguments, its entries kept per requesting user
    (:class:`ScopedCache`, one entry weighing 1; a session whose user has no slot keeps its own, apart). The
    wrapper has ``cache`` and ``cache_clear``."""

    def wrap(fn: Callable) -> Callable:
        unslotted = _SessionEntries(per_user)

        @functools.wraps(fn)
        def cached(*args: Any, **kwargs: Any) -> Any:
            cache, account = cached.cache, ACTING.get()  # type: ignore[attr-defined]
            scope, key = current_scope(), (args if not kwargs else (*args, _MISSING, *sorted(kwargs.items())))
            found = cache.get(scope, key, _MISSING)
            if found is _MISSING and account is not None:
                found = unslotted.get(account, key)
            if found is not _MISSING:
                return found
            value = fn(*args, **kwargs)
            if not cache.put(scope, key, value) and account is not None:
                unslotted.put(account, key, value)
            return value

        cached.cache = ScopedCache(per_user, total)  # type: ignore[attr-defined]
        cached.cache_clear = lambda: cached.cache.clear()  # type: ignore[attr-defined]
        return cached

    return wrap


def _install_in_mpc() -> None:
    """The crypto provider's product shapes (veil/mpc/material.py) kept per requesting user on a worker."""
    from veil.mpc import material

    material.keep_product_shapes_with(per_user_cache(per_user=256, total=16384))


_install_in_mpc()
