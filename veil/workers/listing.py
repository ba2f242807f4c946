"""One page of a search or an object listing (``SearchMessage``, ``ListObjectsMessage``), bounded.

A search or listing runs inside the worker's turn, while every other session waits: over a session's
million tiny tensors it described each of them (and matched each against up to 64 terms) in one pass and
sent every descriptor back in one reply. Now one page looks at most at :data:`MAX_SCANNED` of the objects
the sender may list and answers at most :data:`MAX_LISTED` of them; the reply's ``next_after`` names the
last object looked at (None: the listing is complete), and the next page is asked with ``after=`` it.
Pages follow the worker's store order (objects stored since come later); ``veil.search`` /
``list_objects`` (PySyft's ``worker.search(tags)``, ``worker.list_objects()``) follow the pages themselves,
so their call shapes and results are unchanged, each page one bounded turn of the worker.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, Callable, Iterable, Optional

from veil.exceptions import ObjectNotFoundError, register_remote_error

#: most descriptors one reply carries
MAX_LISTED = 1024
#: most objects one page matches or describes (the rest of the pass is a cheap ownership filter)
MAX_SCANNED = 16384
#: most pages a client follows, restarts included (a bound on a listing that keeps changing under it)
MAX_PAGES = 4096


@register_remote_error
class ListingCursorGoneError(ObjectNotFoundError):
    """The object a page's ``after=`` names left the listing (deleted since): list again from the start."""


def page(entries: Iterable[tuple[int, Any]], after: Any, keep: Callable[[int, Any], bool],
         describe: Callable[[int, Any], Any]) -> tuple[list, Optional[int]]:
    """(descriptors, next_after) of the page of ``entries`` after object ``after`` (None: from the start)."""
    if after is not None and type(after) is not int:
        raise ObjectNotFoundError("a listing's after= is an object id (an integer) or None")
    entries = list(entries)
    start = 0
    if after is not None:
        try:  # (C-level: the listing's own order, so a page never re-sorts the session's objects)
            start = list(map(itemgetter(0), entries)).index(after) + 1
        except ValueError:
            raise ListingCursorGoneError(f"object {after} (the listing's after=) is no longer listed: "
                                         "list again from the start") from None
    found, last = [], None
    for oid, entry in entries[start:start + MAX_SCANNED]:
        last = oid
        if keep(oid, entry):
            found.append(describe(oid, entry))
            if len(found) == MAX_LISTED:
                break
    done = last is None or last == entries[-1][0]
    return found, None if done else last


def every_page(ask: Callable[[Optional[int]], Any]) -> list:
    """Every descriptor of a paged listing: ``ask(after)`` answers one page (a DescriptorsReply). A page
    whose ``after=`` left the listing starts it again (descriptors are listed once, by id)."""
    seen: dict[int, Any] = {}
    after = None
    for _ in range(MAX_PAGES):
        try:
            reply = ask(after)
        except ListingCursorGoneError:
            after = None
            continue
        for d in reply.descriptors:
            seen.setdefault(d.id, d)
        after = reply.next_after
        if after is None:
            return list(seen.values())
    raise ObjectNotFoundError(f"the listing did not settle within {MAX_PAGES} pages (it keeps changing)")
