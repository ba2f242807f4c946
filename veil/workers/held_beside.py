"""What a stored object keeps alive beside itself, charged once per session (``veil worker --max-session-mb``).

A CKKS ciphertext holds its context (TenSEAL's vectors point at it): tens to hundreds of MB of keys beside a
ciphertext of a few hundred kB, or beside none at all (an empty tensor, charged 1 kB). Charged only its own
bytes, a session kept any context alive for that: it stored its context and a tensor under it, then deleted the
context; or it stored a tensor naming another session's context (by its keys' digest) and held it past that
session's delete. A part is charged to a session while the session stores an object that holds it and no entry
that is the part itself (that entry is charged its size already): an honest session's context and its
ciphertexts are charged the context once, and another session's hold never charges it.
"""

from __future__ import annotations

from typing import Any, Callable

#: type -> its objects' parts kept alive beside them, as ((part, bytes it holds), ...)
HELD_BESIDE: dict[type, Callable[[Any], tuple]] = {}


def register_held_beside(tp: type, parts: Callable[[Any], tuple]) -> None:
    """Tells the quota what a stored ``tp`` keeps alive beside itself (an object may list itself: the part its
    own entry pays for)."""
    HELD_BESIDE[tp] = parts


def parts_of(obj: Any) -> tuple:
    """``obj``'s parts as ((part, bytes, whether it is ``obj``), ...): fixed when it is stored (an entry's object
    replaced later is released as it was charged)."""
    parts = HELD_BESIDE.get(type(obj))
    return () if parts is None else tuple((part, nbytes, part is obj) for part, nbytes in parts(obj))


class BesideCharges:
    """namespace -> id(part) -> [part, bytes charged, entries holding it, entries that are it]. The caller holds
    the store's lock."""

    def __init__(self) -> None:
        self._held: dict[str, dict[int, list]] = {}

    def change(self, ns: str, parts: tuple, sign: int, apply: bool) -> int:
        """What storing (``sign`` 1) or removing (-1) an entry holding ``parts`` (:func:`parts_of`) changes
        ``ns``'s usage by; recorded if ``apply``."""
        if not parts:
            return 0
        held = self._held.get(ns) or {}
        delta = 0
        for part, nbytes, itself in parts:
            row = held.get(id(part)) or [part, nbytes, 0, 0]
            before = row[1] if row[2] and not row[3] else 0
            holders, selves = row[2] + (0 if itself else sign), row[3] + (sign if itself else 0)
            after = row[1] if holders and not selves else 0
            delta += after - before
            if apply:
                if holders <= 0 and selves <= 0:
                    held.pop(id(part), None)
                else:
                    row[2], row[3] = holders, selves
                    held[id(part)] = row
        if apply:
            if held:
                self._held[ns] = held
            else:
                self._held.pop(ns, None)
        return delta

    def drop(self, ns: str) -> None:
        self._held.pop(ns, None)
