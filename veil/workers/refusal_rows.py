"""Refused requests of authenticated sessions, written to the owner's audit log in bounded numbers.

Every refused request was one audit row (~200 bytes of SQLite, and an fsync'd write): a scientist looping a
refused command (an unknown id, a private object, an op off the allowlist) wrote thousands of rows a second
into the owner's database, without limit, and every audit read grew with it. Here, per window of ``window``
seconds, each user (principal name, so reconnecting starts nothing afresh) gets its first ``burst`` refusals
written in full, as before; the rest are counted per (user, action) and written as one summary row when the
window closes: "N more refused ACTION requests ...", with every session they came from, the object ids they
named (up to :data:`SUMMARY_IDS`) and the last refusal's text. Nothing is dropped: every refusal is counted.
A user thus adds at most ``burst`` + one row per action per window, whatever its request rate (and one more per
:data:`TRACKED_SESSIONS` sessions it refuses from in a window: a summary keeps that many sessions, then it is
written early and a new one starts, so the sessions are all counted in bounded memory).

Allowed rows (data leaving the worker, releases, DP charges) and the owner's own decisions are never
aggregated: they are written one each, as they happen.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

#: object ids a summary row lists (the audit table keeps at most 1000 per row)
SUMMARY_IDS = 1000
#: sessions a summary row names (the rest are counted)
SUMMARY_SESSIONS = 8
#: sessions one summary keeps (to count them; a session a connection): past it the summary is written early
TRACKED_SESSIONS = 1000
#: what a summary keeps of its last refusal's text (what the audit table keeps of a row's: a refusal's text may
#: quote the request, up to the message limit, and was held whole until the window closed)
LAST_DETAIL = 500


class _Suppressed:
    __slots__ = ("count", "sessions", "ids", "last")

    def __init__(self) -> None:
        self.count, self.sessions, self.ids, self.last = 0, {}, {}, ""


class RefusedRequestLog:
    """Aggregates refused requests per user and window (module doc). ``write(action, principal, session,
    ids, outcome, detail)`` writes one audit row (or hands it to a writer thread: audit_writer.py; then
    ``written()`` waits for the rows handed; a summary row is written with ``stands_for=`` its count).
    Thread-safe; :meth:`flush_due` is called with every refusal and periodically by the server (the connect
    log's timer), :meth:`flush` at shutdown."""

    def __init__(self, write: Callable[..., None], window: float = 10.0, burst: int = 20,
                 written: Callable[[], object] | None = None) -> None:
        self._write, self.window, self.burst, self._written_all = write, window, burst, written
        self._clock = time.monotonic
        self._lock = threading.Lock()
        self._window_start = self._clock()
        self._written: dict[str, int] = {}  # user -> rows written in full this window
        self._suppressed: dict[tuple[str, str], _Suppressed] = {}

    def refused(self, action: str, principal: str, session: str, ids: list, detail: str) -> None:
        self.flush_due()
        full = None
        with self._lock:
            written = self._written.get(principal, 0)
            if written < self.burst:
                self._written[principal] = written + 1
                summary = None
            else:
                summary = self._suppressed.get((principal, action))
                if summary is not None and session not in summary.sessions \
                        and len(summary.sessions) >= TRACKED_SESSIONS:
                    full, summary = summary, None  # (written now, its sessions counted; a new one starts)
                if summary is None:
                    summary = self._suppressed[(principal, action)] = _Suppressed()
                summary.count += 1
                summary.sessions[session] = None
                for oid in ids:
                    if len(summary.ids) >= SUMMARY_IDS:
                        break
                    if type(oid) is int:
                        summary.ids[oid] = None
                summary.last = detail[:LAST_DETAIL]  # (the requester's text, held for the window: bounded)
        if full is not None:
            self._write_summary(principal, action, full)
        if summary is None:
            self._write(action, principal, session, ids, "refused", detail)

    def flush_due(self) -> None:
        """Closes the window if it is over (writes its summary rows)."""
        if self._clock() - self._window_start >= self.window:
            self.flush(wait=False)  # (on a requester's thread or the event loop: never waits for the database)

    def flush(self, wait: bool = True) -> None:
        """Writes the window's summary rows; ``wait``: returns once every row handed is on record."""
        with self._lock:
            suppressed, self._suppressed = self._suppressed, {}
            self._window_start, self._written = self._clock(), {}
        for (principal, action), s in sorted(suppressed.items()):
            self._write_summary(principal, action, s)
        if wait and self._written_all is not None:
            self._written_all()

    def _write_summary(self, principal: str, action: str, s: _Suppressed) -> None:
        sessions = list(s.sessions)
        named = ",".join(sessions[:SUMMARY_SESSIONS])
        if len(sessions) > SUMMARY_SESSIONS:
            named += f",+{len(sessions) - SUMMARY_SESSIONS}"
        self._write(action, principal, named, list(s.ids), "refused",
                    f"{s.count} more refused {action} requests from {len(sessions)} session(s) "
                    f"(aggregated over {self.window:g} s); last: {s.last}", stands_for=s.count)
