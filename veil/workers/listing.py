"""One page of a search or an object listing (``SearchMessage``, ``ListObjectsMessage``), bounded.

A search or listing runs inside the worker's turn, while every other session waits: over a session's
million tiny tensors it described each of them (and matched each against up to 64 terms) in one pass and
sent every descriptor back in one reply. Now one page looks at most at :data:`MAX_SCANNED` of the objects
the sender may list and answers at most :data:`MAX_LISTED` of them; the reply's ``next_after`` names the
last object looked at (None: the listing is complete), and the next page is asked with ``after=`` it.
Pages follow the worker's store order (objects stored since come later); ``veil.search`` /
``list_objects`` (PySyft's ``worker.search(tags)``, ``worker.list_objects()``) follow the pages themselves,
so their call shapes and results are unchanged, each page one bounded turn of the worker.

A page finds its cursor among a snapshot of the store's ids at C speed (:func:`visible_after`) and runs the Python
ownership filter only over what it walks: run over every object to find the cursor, a page cost the whole
store and listing N objects N^2/1024 filter steps (200 000 tiny tensors: 2 s a page, 206 s in all). A cursor
the sender may not list (another session's object) reads as a deleted one; the handlers walk only what a
page may describe or the sender made (an owner's object a page never describes is never its cursor). A page
also ends at MAX_PAGE_META_CHARS of described tags and descriptions (its reply's size). The client checks the
pages it follows (:func:`every_page`): at most MAX_LISTED each, cursors that never come back, a few restarts,
bounded metadata and descriptors, MAX_LISTING_SECONDS in all.
"""

from __future__ import annotations

import time
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from veil.exceptions import ObjectNotFoundError, SerializationError, register_remote_error

#: most descriptors one reply carries
MAX_LISTED = 1024
#: most objects one page matches or describes (the rest of the pass is a cheap ownership filter)
MAX_SCANNED = 16384
#: most pages a client follows, restarts included (a bound on a listing that keeps changing under it)
MAX_PAGES = 4096
#: most times a client starts a listing again because its cursor left it (a worker may answer that for ever)
MAX_RESTARTS = 32
#: most characters of tags and descriptions a client keeps from one listing (a worker answering page after page
#: of fresh descriptors with long descriptions made the scientist's grid search gather them until out of memory)
MAX_LISTING_META_CHARS = 64 << 20
#: characters of tags and descriptions past which a page ends (the next describes the rest): a session's 256
#: objects with 1 MiB descriptions made each 50-byte request encode a 256 MiB reply (2.5 s of the worker)
MAX_PAGE_META_CHARS = 1 << 22
#: characters of tags and descriptions one object a scientist sends may hold: a page describes at least one
#: object whole (a session's object with a 200 MB description made every 50-byte search encode 200 MB)
MAX_OBJECT_META_CHARS = 1 << 20
#: characters a tag counts for at least, in both bounds (a reference to it is 8 bytes: 1024 empty tags of each
#: of a hostile worker's descriptors were kept with nothing counted)
TAG_CHARS = 8
#: seconds a client follows one listing's pages (a hostile worker answering each of MAX_PAGES pages just inside
#: the reply timeout held ``sy.search`` for 136 hours); an honest worker's page is a bounded turn
MAX_LISTING_SECONDS = 600.0
#: most descriptors a client keeps from one listing (each becomes a pointer, ~800 bytes: a worker answering
#: page after page of fresh ones had the scientist make 4096 x 1024 of them, 3 GB)
MAX_LISTING_ENTRIES = 1 << 18


@register_remote_error
class ListingCursorGoneError(ObjectNotFoundError):
    """The object a page's ``after=`` names left the listing (deleted since): list again from the start."""


def pointable(obj: Any) -> bool:
    """An object a search or listing describes: a tensor a pointer can stand for. A nested one has no shape
    (its ``.shape`` raised, failing every search or listing that met it, the owner's own included): left out,
    as a stored plan is."""
    return isinstance(obj, torch.Tensor) and not obj.is_nested


def visible_after(spaces: tuple, after: Any, visible: Callable[[Any], bool]) -> Iterator[tuple[int, Any]]:
    """The (id, entry) the sender may list (``visible``) of the store's ``spaces`` (its namespace's objects and
    the shared ones: ``ObjectStore.spaces``), in store order (the shared first), from the one after object
    ``after`` (None: from the start). ``after`` must be one the sender may list, else it reads as deleted."""
    if after is not None and type(after) is not int:
        raise ObjectNotFoundError("a listing's after= is an object id (an integer) or None")
    own, shared = spaces
    ids = list(shared) + ([] if own is shared else list(own))  # (C-level, no new objects: a snapshot of ids)
    start = 0
    if after is not None:
        try:  # (C-level: a Python pass, or a snapshot of (id, entry) pairs, cost each page the whole store)
            start = ids.index(after) + 1
        except ValueError:
            start = None
        if start is None or not visible(_entry(spaces, after)):  # (another session's object: as a deleted one)
            raise ListingCursorGoneError(f"object {after} (the listing's after=) is no longer listed: "
                                         "list again from the start")
    return ((oid, e) for oid, e in ((oid, _entry(spaces, oid)) for oid in islice(ids, start, None))
            if e is not None and visible(e))


def _entry(spaces: tuple, oid: int) -> Any:
    own, shared = spaces
    entry = own.get(oid)
    return shared.get(oid) if entry is None else entry


def page(entries: Iterable[tuple[int, Any]], keep: Callable[[int, Any], bool],
         describe: Callable[[int, Any], Any]) -> tuple[list, Optional[int]]:
    """(descriptors, next_after) of the page that ``entries`` (those past the cursor: :func:`visible_after`)
    start: at most MAX_SCANNED looked at, MAX_LISTED described, MAX_PAGE_META_CHARS of their tags and
    descriptions (at least one described); next_after None when nothing is left."""
    entries = iter(entries)
    found, last, meta = [], None, 0
    for oid, entry in islice(entries, MAX_SCANNED):
        last = oid
        if keep(oid, entry):
            found.append(describe(oid, entry))
            meta += meta_chars(found[-1])
            if len(found) == MAX_LISTED or meta >= MAX_PAGE_META_CHARS:
                break
    done = last is None or next(entries, None) is None  # (one look past the page: more, or the end)
    return found, None if done else last


def check_sent_meta(tags: tuple, description: Any) -> None:
    """Refuses, in one line, a sent object whose tags and description pass MAX_OBJECT_META_CHARS (PySyft's
    ``.tag()`` and ``.describe()`` are a few words and a paragraph). Counted before any tag is read."""
    most = MAX_OBJECT_META_CHARS
    if len(tags) * TAG_CHARS > most or len(description or "") + sum(
            len(t) if type(t) is str else TAG_CHARS for t in tags) + TAG_CHARS * len(tags) > most:
        raise SerializationError(f"a sent object's tags and description hold at most {most} characters "
                                 f"(a tag counts at least {TAG_CHARS})")


def meta_chars(d: Any) -> int:
    """What a descriptor's tags and description count toward the bounds: their characters, a tag at least
    TAG_CHARS."""
    return len(d.description) + sum(map(len, d.tags)) + TAG_CHARS * len(d.tags)


def every_page(ask: Callable[[Optional[int]], Any]) -> list:
    """Every descriptor of a paged listing: ``ask(after)`` answers one page (a DescriptorsReply). A page
    whose ``after=`` left the listing starts it again (descriptors are listed once, by id). A worker's page
    longer than MAX_LISTED, or a cursor it already gave since the last start, ends the listing in one line
    (a hostile or broken worker kept the client asking MAX_PAGES times, gathering pages of any size), as do
    non-string tags or descriptions, more than MAX_LISTING_META_CHARS characters of them in all (a tag counts at
    least TAG_CHARS), more than MAX_LISTING_ENTRIES descriptors, or pages past MAX_LISTING_SECONDS."""
    seen: dict[int, Any] = {}
    after, cursors, restarts, meta = None, set(), 0, 0
    deadline = time.monotonic() + MAX_LISTING_SECONDS
    for _ in range(MAX_PAGES):
        if time.monotonic() > deadline:
            raise ObjectNotFoundError(f"the worker's listing did not end within {MAX_LISTING_SECONDS:g} s "
                                      "(a page at a time); search with narrower terms")
        try:
            reply = ask(after)
        except ListingCursorGoneError:
            restarts += 1
            if restarts > MAX_RESTARTS:
                break
            after, cursors = None, set()
            continue
        page_of = getattr(reply, "descriptors", None)
        if not isinstance(page_of, list) or len(page_of) > MAX_LISTED or not all(_well_formed(d) for d in page_of):
            raise ObjectNotFoundError(f"the worker answered a malformed listing page (at most {MAX_LISTED} "
                                      "descriptors, each with an integer id, string tags and a string description)")
        for d in page_of:
            if d.id not in seen:
                meta += meta_chars(d)
                seen[d.id] = d
        if meta > MAX_LISTING_META_CHARS or len(seen) > MAX_LISTING_ENTRIES:
            raise ObjectNotFoundError(f"the worker's listing holds more than {MAX_LISTING_ENTRIES} objects or "
                                      f"{MAX_LISTING_META_CHARS} characters of tags and descriptions; search with "
                                      "narrower terms")
        after = reply.next_after
        if after is None:
            return list(seen.values())
        if type(after) is not int or after in cursors:
            raise ObjectNotFoundError("the worker's listing does not advance (a page cursor came back)")
        cursors.add(after)
    raise ObjectNotFoundError(f"the listing did not settle within {MAX_PAGES} pages or {MAX_RESTARTS} "
                              "restarts (it keeps changing)")


def _well_formed(d: Any) -> bool:
    """A descriptor a pointer can be made from: an integer id, a tuple of string tags, a string description."""
    tags = getattr(d, "tags", None)
    return (type(getattr(d, "id", None)) is int and isinstance(getattr(d, "description", None), str)
            and isinstance(tags, tuple) and all(isinstance(t, str) for t in tags))
