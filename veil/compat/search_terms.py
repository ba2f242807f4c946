"""PySyft 0.2's search (``worker.search``, ``sy.PrivateGridNetwork(...).search``) as the worker answers it:
each term matches a tag, the object's id, or a substring of its description.

The query is bounded: at most :data:`MAX_TERMS` distinct terms of at most :data:`MAX_TERM_CHARS` characters.
A search runs in one uninterruptible pass over the owner's data while every other session waits for its
turn; a million repeated matching terms (a 40 MB frame) held a worker with 100 datasets for over a minute.
"""

from __future__ import annotations

from typing import Any

from veil.exceptions import SerializationError

#: distinct terms one search may name (PySyft's queries name a few tags)
MAX_TERMS = 64
#: characters per term
MAX_TERM_CHARS = 256


def checked_terms(query: Any) -> tuple[str, ...]:
    """The query's distinct terms, in order; refuses anything but a short list of short strings."""
    if not isinstance(query, list) or not all(isinstance(q, str) for q in query):
        raise SerializationError("search query must be a list of strings")
    terms = tuple(dict.fromkeys(query))
    if len(terms) > MAX_TERMS or any(len(q) > MAX_TERM_CHARS for q in terms):
        raise SerializationError(f"a search takes at most {MAX_TERMS} terms of at most {MAX_TERM_CHARS} characters")
    return terms


def matches(terms: tuple[str, ...], oid: int, tags: tuple, description: str | None) -> bool:
    """Whether every term is one of ``tags``, the id ``oid`` written out, or a substring of ``description``."""
    name, text = str(oid), description or ""
    return all(q in tags or q == name or (q and q in text) for q in terms)
