"""PySyft 0.2's search (``worker.search``, ``sy.PrivateGridNetwork(...).search``) as the worker answers it:
each term matches a tag, the object's id, or a substring of its description.

The query is bounded: at most :data:`MAX_TERMS` distinct terms of at most :data:`MAX_TERM_CHARS` characters.
A search runs in one uninterruptible pass over the owner's data while every other session waits for its
turn; a million repeated matching terms (a 40 MB frame) held a worker with 100 datasets for over a minute.

So is the work of one page (:func:`search_page`): a term is looked for in a description's first
:data:`MATCHED_DESCRIPTION_CHARS` characters only, and a page ends once it compared
:data:`PAGE_MATCH_BUDGET` characters (the client asks for the next one, ``after=``, as for any page). Without
them a session's own objects with 2 MB descriptions ending in 63 of the terms made each 16 KB search request
hold the worker (on its event loop first, the inline lane) for 64 times their size in substring scans:
1.7 s per request for 64 MB of descriptions, and no quota by default.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

from veil.exceptions import SerializationError

#: distinct terms one search may name (PySyft's queries name a few tags)
MAX_TERMS = 64
#: characters per term
MAX_TERM_CHARS = 256
#: items one query list may hold, repeats included (each is read; PySyft's queries repeat none)
MAX_QUERY_ITEMS = 1 << 17
#: characters of a description a term is looked for in (PySyft's descriptions are a line or a paragraph)
MATCHED_DESCRIPTION_CHARS = 1 << 16
#: characters one search page may compare (tags and description prefixes, times the terms): ~10 ms of scans
PAGE_MATCH_BUDGET = 1 << 24
#: characters of the budget one term's check costs whatever it compares (a Python step, ~0.3 us: some 500
#: characters of substring scan; at 64 such a page of tag-matched terms still took 70 ms, at 256 14 ms)
TERM_STEP_CHARS = 256
#: tags past which an entry's tags are hashed once rather than scanned per term
_SCANNED_TAGS = 8


def checked_terms(query: Any) -> tuple[str, ...]:
    """The query's distinct terms, in order; refuses anything but a short list of short strings.

    Refused as soon as it is seen to be too long (deduplicating 5M distinct terms first held the turn seconds)."""
    if not isinstance(query, list):
        raise SerializationError("search query must be a list of strings")
    too_many = SerializationError(f"a search takes at most {MAX_TERMS} terms of at most {MAX_TERM_CHARS} characters")
    if len(query) > MAX_QUERY_ITEMS:
        raise too_many
    terms: dict = {}
    for q in query:
        if not isinstance(q, str):
            raise SerializationError("search query must be a list of strings")
        if len(q) > MAX_TERM_CHARS:
            raise too_many
        terms[q] = None
        if len(terms) > MAX_TERMS:
            raise too_many
    return tuple(terms)


def matches(terms: tuple[str, ...], oid: int, tags: tuple, description: str | None) -> bool:
    """Whether every term is one of ``tags``, the id ``oid`` written out, or a substring of the description's
    first :data:`MATCHED_DESCRIPTION_CHARS` characters."""
    name, text = str(oid), (description or "")[:MATCHED_DESCRIPTION_CHARS]
    tagged = tags if len(tags) <= _SCANNED_TAGS else frozenset(tags)
    return all(q in tagged or q == name or (q and q in text) for q in terms)


def match_cost(terms: tuple[str, ...], tags: tuple, description: str | None) -> int:
    """An upper bound on the work :func:`matches` does for one entry, in compared characters: each term is a
    Python step worth :data:`TERM_STEP_CHARS` (64 terms found among 64 tags of 16384 undescribed objects held
    the worker 0.34 s a page, charged 1/16 of the budget) plus a scan of the description's matched prefix."""
    return 1 + len(tags) + len(terms) * (TERM_STEP_CHARS + min(len(description or ""), MATCHED_DESCRIPTION_CHARS))


class _Budgeted:
    """The entries of one page while its matching budget lasts (at least one entry per page, so pages advance).
    Only entries that are matched are charged: one the page skips (``keep``) costs nothing, so the page count
    never follows a description the page does not describe."""

    def __init__(self, entries: Iterable[tuple[int, Any]], terms: tuple[str, ...]) -> None:
        self.entries, self.terms, self.spent, self.cut, self.last = entries, terms, 0, False, None

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for oid, entry in self.entries:
            if self.spent >= PAGE_MATCH_BUDGET:
                self.cut = True  # (an entry is left: the next page starts at it)
                return
            self.last = oid
            yield oid, entry

    def matched(self, oid: int, entry: Any) -> bool:
        self.spent += match_cost(self.terms, entry.tags, entry.description)
        return matches(self.terms, oid, entry.tags, entry.description)


def search_page(entries: Iterable[tuple[int, Any]], terms: tuple[str, ...], keep: Callable[[int, Any], bool],
                describe: Callable[[int, Any], Any]) -> tuple[list, Optional[int]]:
    """``listing.page`` of the entries that match every term (and ``keep``), ending early at the budget."""
    from veil.workers import listing

    budgeted = _Budgeted(entries, terms)
    found, next_after = listing.page(iter(budgeted), lambda oid, e: keep(oid, e) and budgeted.matched(oid, e),
                                     describe)
    # cut inside the page, or at its look past the end: the page's last entry is the one yielded last
    return found, (budgeted.last if next_after is None and budgeted.cut else next_after)
