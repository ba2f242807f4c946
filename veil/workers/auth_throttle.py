"""Throttles access-token guessing, per source, at the worker port and the owner console alike.

Every failed authentication (an unknown or revoked token at the handshake, each one of several presented;
a wrong token at the console's log-in) counts against its *source* (:func:`source_of`: loopback is one
source, IPv4 is grouped by /24, IPv6 by /64, as one host holds many addresses). The first
:data:`FREE_FAILURES` of a window cost nothing; each further one blocks the source for twice as long as the
last (from :data:`FIRST_BLOCK` up to :data:`MAX_BLOCK` seconds). A blocked source's attempts are refused
without a verdict (HTTP 429, one answer for every token, and a short token is not even looked up: neither
the answer nor its timing tells a right guess apart). Attempts refused so are not counted (they test
nothing). One exception: a valid token of at least :data:`UNGUESSABLE_CHARS` characters (veil's generated
tokens have 43, a cluster's 32, issued client tokens more) still gets in, as no rate of guessing finds such
a token; an owner who uses generated tokens is never locked out by anyone, whatever source they share.
Owner-chosen short tokens are what the throttle protects, and their holders are the ones a spray from their
own source (another local user on loopback, a neighbour in the /24) can hold up until the block ends.

Memory is bounded: at most :data:`MAX_SOURCES` sources are tracked; a source idle past the window is
forgotten, and while the table is full of active ones, every new source counts as one shared source
(:data:`OVERFLOW`), so an attacker with many addresses gets one source's allowance for all the rest (the
price: while that lasts, short-token holders at sources not yet tracked share that allowance too).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from typing import Callable

from veil.exceptions import PermissionDeniedError

#: failures a source may make per window before it is blocked (a client retrying a mistyped token for a while)
FREE_FAILURES = 30
#: seconds a source's failures are remembered after its last one (and its block ended)
FAILURE_WINDOW = 600.0
#: the first block past the free failures; each further failure doubles it, up to MAX_BLOCK
FIRST_BLOCK = 2.0
MAX_BLOCK = 600.0
#: sources tracked at once; past that, new sources share the OVERFLOW record
MAX_SOURCES = 16_384
OVERFLOW = "other sources"
#: a valid token this long is let in even from a blocked source (no guessing rate finds it)
UNGUESSABLE_CHARS = 32
#: how often (seconds) a full table is swept for forgotten sources (a sweep costs one pass over it)
_SWEEP_EVERY = 1.0


def source_of(address: str) -> str:
    """The source a connection's address counts as: one host may hold many addresses (every 127.0.0.0/8 one on
    Linux without privileges, an IPv6 /64), so loopback is one source, IPv6 is grouped by /64 and IPv4 by /24."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def unguessable(tokens: list[str]) -> bool:
    """Whether every token presented is long enough to be let in from a blocked source (when valid)."""
    return bool(tokens) and all(len(t) >= UNGUESSABLE_CHARS for t in tokens)


class Throttled(PermissionDeniedError):
    """An attempt refused because its source failed too often; ``seconds``: until it may try again."""

    seconds = 1

    @classmethod
    def after(cls, seconds: float) -> "Throttled":
        """The refusal of a source blocked for ``seconds`` more (whole seconds, at least one)."""
        wait = max(1, int(seconds + 0.999))
        error = cls(f"too many failed authentications from this address; try again in {wait} s")
        error.seconds = wait
        return error


class _Record:
    __slots__ = ("failures", "last", "blocked_until", "block")

    def __init__(self) -> None:
        self.failures, self.last, self.blocked_until, self.block = 0, 0.0, 0.0, 0.0


class FailureThrottle:
    """Failed authentications per source (thread-safe: the worker's loop and the console's thread share one)."""

    def __init__(self, free: int = FREE_FAILURES, window: float = FAILURE_WINDOW, first_block: float = FIRST_BLOCK,
                 max_block: float = MAX_BLOCK, max_sources: int = MAX_SOURCES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.window, self.first_block, self.max_block = free, window, first_block, max_block
        self.max_sources, self._clock = max_sources, clock
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()
        self._swept = float("-inf")

    def blocked_for(self, address: str) -> float:
        """Seconds until ``address``'s source may try again (0.0: it may now)."""
        now = self._clock()
        with self._lock:
            record = self._records.get(self._key(source_of(address), now))
            return max(0.0, record.blocked_until - now) if record is not None else 0.0

    def failed(self, address: str, count: int = 1) -> None:
        """Counts ``count`` failed authentications of ``address``'s source."""
        now = self._clock()
        with self._lock:
            key = self._key(source_of(address), now)
            record = self._records.get(key)
            if record is None:
                record = self._records[key] = _Record()
            elif self._forgotten(record, now):
                record.failures, record.block = 0, 0.0
            record.failures += count
            record.last = now
            if record.failures > self.free:
                record.block = min(self.max_block, record.block * 2 if record.block else self.first_block)
                record.blocked_until = now + record.block

    def __len__(self) -> int:
        return len(self._records)

    def _forgotten(self, record: _Record, now: float) -> bool:
        return now >= record.blocked_until and now - max(record.last, record.blocked_until) >= self.window

    def _key(self, source: str, now: float) -> str:
        """``source``, or OVERFLOW while the table is full of remembered sources (caller holds the lock)."""
        if source in self._records or len(self._records) < self.max_sources:
            return source
        if now - self._swept >= _SWEEP_EVERY:  # (at most once a second: a sweep is a pass over the table)
            self._swept = now
            for key in [k for k, r in self._records.items() if k != OVERFLOW and self._forgotten(r, now)]:
                del self._records[key]
            if len(self._records) < self.max_sources:
                return source
        return OVERFLOW
