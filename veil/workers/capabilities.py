"""Capabilities that travel with an object between workers, as tags on a StoredObject.

A value moved to another worker (``.move()``, a peer hand-off, a worker
secret-sharing its own values) keeps what restricts it there: the receiver's
monitor applies the tags (:meth:`ReferenceMonitor.store_objects`), and they only
ever restrict. ``kind`` share/dealer and a dealer's layout tags are honoured from
dealers (peer sessions, in-process) only; a client cannot label its own objects.
"""

from __future__ import annotations

import json
from typing import Any

from veil.exceptions import PermissionDeniedError, VeilError
from veil.messaging import messages as m
from veil.mpc.runtime import DEALER_TAG, DEALT_FIXED, DEALT_FIXED_TAG, DEALT_ITEM_TAG, DEALT_MASK_TAG, DEALT_SOURCES_TAG
from veil.workers.source_sets import MAX_SOURCE_CHARS, join_sources
from veil.workers.store import Entry, Kind

#: capabilities travel between workers as tags with this prefix
CAP_PREFIX = "#veil.cap."
#: bytes one capability tag may hold (a provenance list of many sources stays far below)
CAP_TAG_LIMIT = 64 * 1024

__all__ = ["CAP_PREFIX", "CAP_TAG_LIMIT", "DEALER_TAG", "export_tags", "join_sources", "outgoing", "parse_tags"]


def export_tags(principal: Any, entry: Entry, worker_id: str, note: str = "") -> tuple:
    """Tags that carry ``entry``'s capabilities to another worker.

    A value never becomes revealable by more parties by moving: ``reveal_to``
    (session ids mean nothing on another worker, so the set travels with the
    mover's user added: the mover passed the reveal check here), ``kind`` share,
    the DP-only policy, and provenance as ``"worker:id"`` sources, with the op graph this worker's owner reviews
    as lines of text (``note``: one more, what the sender does with it; the receiver shows them as this
    worker's report, from peers only: :mod:`veil.governance.received`).
    ``allowed_users`` travels in ``StoredObject.allowed_users``. Dealer material
    never moves (refused before).
    """
    tags = []
    if entry.kind == Kind.SHARE:
        tags.append(CAP_PREFIX + "kind=share")
    if entry.reveal_to is not None:
        to = sorted(set(entry.reveal_to) | {principal.user})
        tags.append(CAP_PREFIX + "reveal_to=" + json.dumps(to))
    if entry.meta.get("dp_only"):
        tags.append(CAP_PREFIX + "dp_only")
    if entry.provenance:
        sources = sorted(p if type(p) is str else f"{worker_id}:{p}" for p in entry.provenance)
        tags.append(CAP_PREFIX + "provenance=" + _listed(sources))
        from veil.governance.received import bounded, reported_lines

        lines = bounded(reported_lines(entry) + ([note] if note else []))
        if lines:
            tags.append(CAP_PREFIX + "graph=" + _listed(lines))
    return tuple(tags)


def _listed(items: list) -> str:
    """A tag's JSON list with its characters as they are: ``ensure_ascii`` wrote each non-ASCII character as
    6 or 12 (a graph of CJK or emoji dataset descriptions grew past :data:`CAP_TAG_LIMIT`, so every move of a
    value derived from them was refused by the receiver, its approval used up)."""
    return json.dumps(items, ensure_ascii=False)


def outgoing(principal: Any, new_id: int, entry: Entry, worker_id: str) -> m.StoredObject:
    """The StoredObject that moves ``entry`` to another worker, its capabilities included."""
    tags = tuple(t for t in entry.tags if not t.startswith(CAP_PREFIX)) + export_tags(principal, entry, worker_id)
    return m.StoredObject(new_id, entry.obj, tags, entry.description, entry.allowed_users)


def _sources(value: str) -> tuple:
    parts = value.split(".")
    if not 0 < len(parts) <= 64 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise PermissionDeniedError("malformed dealt sources tag on an arriving object")
    return tuple(int(p) for p in parts)


def parse_tags(tags: Any, from_dealer: bool) -> tuple[tuple, dict]:
    """Splits an arriving object's tags into plain tags and the capabilities they carry."""
    caps: dict[str, Any] = {"kind": Kind.CLIENT, "reveal_to": None, "dp_only": False, "provenance": frozenset(),
                            "item": None, "mask": False, "sources": None, "graph": None}
    plain = []
    for tag in tags:
        if not isinstance(tag, str):
            raise VeilError("object tags must be strings")
        if tag == DEALER_TAG:
            if from_dealer:
                caps["kind"] = Kind.DEALER
            continue
        if tag.startswith(DEALT_SOURCES_TAG):  # a derived field's uniform sources in its item
            if from_dealer:
                caps["sources"] = _sources(tag[len(DEALT_SOURCES_TAG):])
            continue
        if tag in (DEALT_MASK_TAG, DEALT_FIXED_TAG) or tag.startswith(DEALT_ITEM_TAG):  # a dealer's layout
            if from_dealer and tag == DEALT_MASK_TAG:  # (veil/workers/dealt.py)
                caps["mask"] = True
            elif from_dealer and tag == DEALT_FIXED_TAG:
                caps["mask"] = DEALT_FIXED
            elif from_dealer:
                caps["item"] = tag
            continue
        if not tag.startswith(CAP_PREFIX):
            plain.append(tag)
            continue
        name, _, value = tag[len(CAP_PREFIX):].partition("=")
        if name == "kind" and value == "share":
            if from_dealer and caps["kind"] != Kind.DEALER:
                caps["kind"] = Kind.SHARE  # a client cannot label its objects protocol shares
        elif name == "dp_only" and not value:
            caps["dp_only"] = True
        elif name == "graph":  # the sender's report of how it was computed (shown from peers only)
            items = _string_list(value)
            if items is None:
                raise PermissionDeniedError("malformed capability tag 'graph' on an arriving object")
            caps["graph"] = items
        elif name in ("reveal_to", "provenance"):
            items = _string_list(value)
            if items is None:
                raise PermissionDeniedError(f"malformed capability tag {name!r} on an arriving object")
            if name == "reveal_to":  # several tags: the strictest (intersection)
                caps["reveal_to"] = tuple(sorted(set(items) if caps["reveal_to"] is None
                                                 else set(items) & set(caps["reveal_to"])))
            elif any(len(i) > MAX_SOURCE_CHARS for i in items):
                raise PermissionDeniedError(f"capability tag 'provenance' on an arriving object names a source "
                                            f"longer than {MAX_SOURCE_CHARS} characters")
            else:  # (bounded: a client may claim any number of sources, veil/workers/source_sets.py)
                caps["provenance"] = join_sources(caps["provenance"], frozenset(items))
        else:
            raise PermissionDeniedError(f"unknown capability tag {name!r} on an arriving object")
    return tuple(plain), caps


def _string_list(value: str) -> list | None:
    """A capability tag's JSON list of strings (None: malformed)."""
    if len(value) > CAP_TAG_LIMIT:
        return None
    try:
        items = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        return None
    return items
