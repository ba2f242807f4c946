"""Requester code (a torch command, a plan, a DP plan's per-record gradients) runs with its warnings dropped, on
its own thread only (:data:`DROPPED`); a plan's trace keeps its ops' warnings the same way (:class:`capturing`).

Its warnings must never reach the owner's process: under an owner's "error" filter a warning that follows the
values (``out=`` resized by a ``masked_select``'s count) fails the command on some data only, one bit per command;
under "default" every distinct text (shapes in it) is a line in the owner's log and an entry kept in a module's
``__warningregistry__`` for as long as the worker runs (memory without bound).

The filters are one process-wide list, so dropping warnings for one thread is done by one filter entry whose
category matches no warning except on a thread that runs requester code (:data:`DROPPED`): inert for the
owner's threads, it is never taken out (taking out one thread's filter dropped another's, or an owner's, or
put back a list without it while a run went on: ``catch_warnings`` restores the list it saved), only put first
again when something went before it (checked as each run starts). What stays open: a filter the owner's code
puts before it on another thread while a command runs (``simplefilter``), or a list another thread's
``catch_warnings`` saved after such a change and before any run, put back while a command runs, decides that
command's warnings until it ends. A warning torch raises once per process (``TORCH_WARN_ONCE``: ``x.T`` of a 3-d
tensor) is spent by whichever thread raises it first, a requester's run included (a flag inside torch).
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Callable


class _Running(threading.local):
    depth = 0  # requester code this thread is running, nested
    caught: list | None = None  # where its warnings go (a trace's op: shown once the build is done), or dropped
    text = ""  # the text of the warning being filtered (its category is checked after it)


_RUNNING = _Running()


def _reset_in_child() -> None:
    """A process forked from inside a run starts as owner code (it would drop every warning for good)."""
    _RUNNING.depth, _RUNNING.caught = 0, None


os.register_at_fork(after_in_child=_reset_in_child)
#: warnings kept by one :func:`capturing` block (an op warns a few times at most)
MAX_CAUGHT = 64


class _TextOnRequesterThreads:
    """The filter's message pattern: matches any text on a thread running requester code (noted for
    :func:`capturing`), none on any other (``warnings`` calls ``message_pattern.match(text)``)."""

    __slots__ = ()

    def match(self, text: str) -> bool:
        try:
            running = _RUNNING
            if running.depth <= 0:
                return False
            running.text = text
            return True
        except Exception:  # noqa: BLE001 - (at interpreter exit, this module's globals may be gone)
            return False


class _OnRequesterThreads(type):
    """The metaclass of the filter's category: every warning is of it on a thread running requester code, none
    on any other (``warnings`` asks ``issubclass(category, filter_category)``, after the text's match)."""

    def __subclasscheck__(cls, category: Any) -> bool:
        try:
            running = _RUNNING
            if running.depth <= 0:
                return False
            if running.caught is not None and len(running.caught) < MAX_CAUGHT:
                running.caught.append((running.text, category))
            return True
        except Exception:  # noqa: BLE001
            return False


class _RequesterWarningA(Warning, metaclass=_OnRequesterThreads):
    """The warnings of requester code (one of two twins: see :func:`_put_first`)."""


class _RequesterWarningB(Warning, metaclass=_OnRequesterThreads):
    """The warnings of requester code (the other twin)."""


# (a filter entry: action, message, category, module, line; equal to nothing but itself)
_TEXT = _TextOnRequesterThreads()
_TWINS = (("ignore", _TEXT, _RequesterWarningA, None, 0), ("ignore", _TEXT, _RequesterWarningB, None, 0))
_LOCK = threading.Lock()


def _put_first() -> None:
    """The filter first in the current list. Moved as one twin put first, then the other taken out: at no moment
    is neither in the list (another thread's run relies on it), and a list of the owner's is never rebuilt
    (``remove`` takes the twin's equal, which is only itself, wherever the owner's code moved the rest)."""
    with _LOCK:
        filters = warnings.filters
        if filters and (filters[0] is _TWINS[0] or filters[0] is _TWINS[1]):
            return
        present = [twin for twin in _TWINS if twin in filters]
        if len(present) == 2:  # (both: one goes, the other still covers running threads)
            filters.remove(_TWINS[1])
            present = [_TWINS[0]]
        new = _TWINS[1] if present == [_TWINS[0]] else _TWINS[0]
        filters.insert(0, new)
        for old in present:
            while old in filters:
                filters.remove(old)
        mutated = getattr(warnings, "_filters_mutated", None)  # (cached "already warned" entries: read anew)
        if mutated is not None:
            mutated()


def _enter() -> None:
    """One more level of requester code on this thread, the filter first. Counted only once it is in place: a
    start that raised (an interrupt, memory) ran no ``__exit__``, and its count left this thread's own warnings,
    the owner's code it runs next included, dropped for ever once any run put the filter first."""
    filters = warnings.filters
    if not filters or (filters[0] is not _TWINS[0] and filters[0] is not _TWINS[1]):
        _put_first()
    _RUNNING.depth += 1


class _Dropping:
    """``with DROPPED:`` runs its block with this thread's warnings dropped (re-entrant; ~1 us)."""

    __slots__ = ()

    def __enter__(self) -> None:
        _enter()

    def __exit__(self, *exc: Any) -> None:
        _RUNNING.depth -= 1


#: the one way to run requester code on a worker: ``with DROPPED:``
DROPPED = _Dropping()


def dropping_warnings(fn: Callable) -> Callable:
    """``fn`` run under :data:`DROPPED` (a decorator)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        with DROPPED:
            return fn(*args, **kwargs)
    run.__name__, run.__qualname__, run.__doc__, run.__wrapped__ = (  # type: ignore[attr-defined]
        fn.__name__, fn.__qualname__, fn.__doc__, fn)
    return run


class capturing:
    """``with capturing(into):``: this thread's warnings in the block go to ``into`` as ``(text, category)``
    (at most :data:`MAX_CAUGHT`), neither shown nor seen by the code that raised them (its own
    ``catch_warnings(record=True)`` or ``simplefilter("error")``: the filter is put first again as the block
    starts), and nothing process-wide is swapped (``catch_warnings`` per op, on two threads tracing at once,
    left the filters and ``showwarning`` of one of them to the whole process for good)."""

    __slots__ = ("into", "outer")

    def __init__(self, into: list) -> None:
        self.into, self.outer = into, None

    def __enter__(self) -> list:
        _enter()  # (first: a start that raised leaves this thread's list where its warnings go as it was)
        self.outer, _RUNNING.caught = _RUNNING.caught, self.into
        return self.into

    def __exit__(self, *exc: Any) -> None:
        _RUNNING.depth -= 1
        _RUNNING.caught = self.outer
