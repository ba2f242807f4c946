"""Bounded source sets: the owner data an object derives from (``Entry.provenance``), kept to a bounded size.

A source is a dataset id of this worker (an int: the owner's policies are keyed by it, so it is always kept)
or a ``"worker:id"`` string another worker or a client named in a provenance capability tag. The strings only
say "derived from owner data elsewhere" (shown to the owner, exported with a move); nothing checks them against
a policy. A client could claim any number of them (tags of 64 KiB each, several per object) and every result
computed from such objects carried the union of them all, a fresh copy per result that no quota counted, and a
move exported them all in one tag past what a receiver accepts. A set keeps at most
:data:`MAX_FOREIGN_SOURCES` strings: past it, the first ones in sorted order and one summary counting the rest
(the set never becomes empty: the object stays derived from owner data).
"""

from __future__ import annotations

#: strings a source set keeps (a moved value's export tag of them stays far below a receiver's tag limit)
MAX_FOREIGN_SOURCES = 256
#: characters of one string source an arriving object may name ("worker:id")
MAX_SOURCE_CHARS = 200
#: how a summary of the strings not kept starts (sorts after every "worker:id": summaries go first)
SUMMARY = "~ "
#: the largest count a summary says (a client may claim a summary-looking source with any count: the sum of
#: 190-digit ones made a summary past :data:`MAX_SOURCE_CHARS`, and every receiver refused the value)
MAX_COUNTED = 10 ** 15


def join_sources(a: frozenset, b: frozenset) -> frozenset:
    """``a | b``, its strings cut to :data:`MAX_FOREIGN_SOURCES` (a summary counts those left out)."""
    joined = a | b
    if len(joined) <= MAX_FOREIGN_SOURCES:
        return joined
    foreign = sorted(s for s in joined if type(s) is str)
    if len(foreign) <= MAX_FOREIGN_SOURCES:
        return joined
    kept = foreign[:MAX_FOREIGN_SOURCES - 1]
    left_out = min(sum(_counted(s) for s in foreign[MAX_FOREIGN_SOURCES - 1:]), MAX_COUNTED)
    summary = f"{SUMMARY}{left_out} more sources named by other workers or clients (not listed)"
    return frozenset([s for s in joined if type(s) is not str] + kept + [summary])


def _counted(source: str) -> int:
    """How many sources a string stands for (a summary: the count it carries; ASCII digits only: ``"²"`` is a
    digit to ``str.isdigit`` that ``int`` refuses, and a join past the bound raised on a client's claim)."""
    if source.startswith(SUMMARY):
        head = source[len(SUMMARY):].split(" ", 1)[0]
        if head.isascii() and head.isdigit():
            return min(int(head), MAX_COUNTED)
    return 1
