"""Dealt material on a worker: which fields may mask an opening, and whom an item's fields belong to.

A crypto provider deals *items*: a Beaver triple ``(a, b, c = a*b)``, a
truncation pair ``(r, r >> d, g)``, comparison material. Their *uniform*
fields are independent uniform ring elements; their *derived* fields are
functions of them (``c``, ``q = r >> d``, the wrap bit ``g``, which is almost
always 0). Openings of a value someone else protects (serving: a client's
input) are safe only if

* every mask position holds a **fresh uniform field**, each mask used once
  and never twice in one opening (a derived field hides nothing: ``x + g``
  is ``x`` almost always), and every output is exactly as large as its mask
  (a broadcast mask hides differences only);
* the mask's **item belongs to that protected value** from then on: its
  fields are *bound* to the value's ``reveal_to``, so what anyone computes
  from ``q`` later inherits it (``x + r`` opened and ``q`` revealed would give
  ``x``'s top bits), and an item first used for an unrestricted computation
  (whose fields may have been revealed since) never masks a protected value.

An item binds at its first use: an opening binds it to the restriction of
the values it opens (unrestricted when none is protected), a command to the
strictest ``reveal_to`` of its other inputs and of the session's taint. Honest
protocols use an item inside one protocol run on one batch, so they never
see the difference; the rules only bite a requester that moves material
between protocol runs.
"""

from __future__ import annotations

import weakref
from typing import Iterable

from veil.mpc.runtime import DEALT_FIXED
from veil.workers.store import Entry, Kind

#: ``DealtItem.bound`` before the item's first use
UNBOUND = object()


class DealtItem:
    """The fields of one dealt item held by this worker, and the restriction they were bound to."""

    __slots__ = ("_entries", "bound")

    def __init__(self) -> None:
        # Weak: each field's entry holds its item (``meta["item"]``), and strong references both ways
        # made every dealt tensor a reference cycle, freed only when the cyclic GC ran (~300 MB of
        # used triples per worker under mul 1e6, and fresh pages every call). A field whose entry is
        # gone can no longer be used, so it needs no binding.
        self._entries: list[weakref.ref] = []
        #: UNBOUND, None (first used unrestricted), or the reveal_to tuple of the value it protects
        self.bound: object = UNBOUND

    def add(self, entry: Entry) -> None:
        self._entries.append(weakref.ref(entry))

    @property
    def entries(self) -> list[Entry]:
        """The item's fields still held by some entry of this worker."""
        return [e for e in (r() for r in self._entries) if e is not None]

    def bind(self, reveal_to: tuple | None) -> None:
        """Binds an unbound item; its fields become revealable only where ``reveal_to`` allows."""
        if self.bound is not UNBOUND:
            return
        self.bound = reveal_to
        if reveal_to is None:
            return
        for e in self.entries:
            e.reveal_to = reveal_to if e.reveal_to is None else tuple(sorted(set(e.reveal_to) & set(reveal_to)))


def group(entries: list[Entry], layout: list[tuple]) -> None:
    """Marks freshly dealt ``entries``: ``layout[i] = (item index, uniform field?[, sources])``, where
    :data:`DEALT_FIXED` marks a constant operand's fixed mask (not a mask of openings: see :func:`fixed_error`)
    and ``sources`` a derived field's uniform sources (positions in its item, fields in dealing order)."""
    if len(layout) != len(entries):
        raise ValueError(f"dealt layout names {len(layout)} fields for {len(entries)} objects")
    items: dict[int, DealtItem] = {}
    counts: dict[int, int] = {}
    for entry, (k, uniform, *rest) in zip(entries, layout):
        item = items.get(k)
        if item is None:
            item = items[k] = DealtItem()
        item.add(entry)
        entry.meta["item"] = item
        entry.meta["field"] = counts[k] = counts.get(k, -1) + 1
        if rest and rest[0]:
            entry.meta["sources"] = tuple(rest[0])
        if uniform == DEALT_FIXED:
            entry.meta["fixed"] = True
        elif uniform:
            entry.meta["mask"] = True


def inherit_fixed(entry: Entry, sources: Iterable[Entry]) -> None:
    """Dealt material computed from a constant operand's fixed mask (``b.clone()``) is that mask to the
    opening rules, already opened: it opens nowhere (``w' - copy`` beside ``w - b`` gives ``w' - w``)."""
    for s in sources:
        if s.meta and s.meta.get("fixed"):
            entry.meta["fixed"] = entry.meta["fixed_opened"] = True
            return


def item_of(entry: Entry) -> DealtItem | None:
    return entry.meta.get("item") if entry.kind == Kind.DEALER and entry.meta else None


def strictest(reveal_tos: Iterable[tuple | None], taint: tuple | None) -> tuple | None:
    """The intersection of the restricting ``reveal_to`` sets and the session's taint (None: no restriction)."""
    out: set | None = None if taint is None else set(taint)
    for r in reveal_tos:
        if r is not None:
            out = set(r) if out is None else out & set(r)
    return None if out is None else tuple(sorted(out))


def bind_all(entries: Iterable[Entry], reveal_to: tuple | None) -> None:
    """Binds the items of every dealt entry among ``entries`` that is still unbound."""
    for e in entries:
        item = item_of(e)
        if item is not None and item.bound is UNBOUND:
            item.bind(reveal_to)


def consume(entries: Iterable[Entry]) -> None:
    """Dealt fields used in a computation (not an opening): a uniform field, and the uniform sources of a
    derived one (every uniform field of its item where the dealer named none), mask nothing after it.
    The honest protocols compute with a mask, or with what the dealer derived from it, only once it has
    opened; a requester that moved mask bits into an operand first could cancel them in the opening they
    hide (red team: ``X - d q`` opened under a truncation pair's ``r`` is ``X + (r mod d)``)."""
    for e in entries:
        if e.kind != Kind.DEALER or not e.meta:
            continue
        if e.meta.get("mask"):
            e.meta["opened"] = True
            continue
        for source in sources_of(e):
            source.meta["opened"] = True


def sources_of(entry: Entry) -> list[Entry]:
    """The uniform fields a derived dealt field is computed from: those the dealer named, every uniform
    field of its item where it named none (none for a field without an item)."""
    item = entry.meta.get("item") if entry.meta else None
    if item is None:
        return []
    sources = entry.meta.get("sources")
    return [other for other in item.entries
            if other.meta.get("mask") and (sources is None or other.meta.get("field") in sources)]


def mask_error(entry: Entry | None, target: tuple | None = ()) -> str | None:
    """Why ``entry`` may not mask a value protected for ``target`` in an opening (None: it may)."""
    if entry is None or entry.kind != Kind.DEALER:
        return "is not dealer material"
    if not entry.meta.get("mask"):
        return "is not a uniform field of dealt material (a derived field hides nothing)"
    if entry.meta.get("opened"):
        return "was already used as a mask or in a computation"
    item = entry.meta.get("item")
    if item is None or item.bound is None:
        return "belongs to dealt material already used for an unrestricted computation"
    if item.bound is not UNBOUND and target is not None and not set(item.bound) <= set(target):
        # bound to a wider audience by an earlier command (even a failed one): a product computed with its item
        # could then be revealed to someone the opened value is not protected for (red team, third pass)
        return "belongs to dealt material already bound to a computation revealable to others"
    return None
