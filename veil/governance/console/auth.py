"""Console log-in: the worker's admin token, then an HttpOnly session cookie with a CSRF token.

- The token is posted once in a form (never in a URL) and compared in constant time
  through the worker's TokenTable; only principals with the ``admin`` role get in.
- The session id lives in an HttpOnly, SameSite=Strict cookie; the server keeps the
  session (expiry, CSRF token). Every state-changing request is a POST carrying the
  session's CSRF token in a form field, and a cross-origin ``Origin`` is refused.
- The log-in form itself is protected by a double-submit token (cookie + field).
- Failed log-ins count against the client's address with the worker port's (``auth_throttle``): past
  the free ones, that source is refused for a while whatever it presents (HTTP 429).
- Failed log-ins are audited at most once per ``FAILURE_WINDOW``: the first at once, the rest of the
  window as one row with their count when it closes (a timer) or when the console stops.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from veil.workers.auth_throttle import FailureThrottle, Throttled, unguessable

COOKIE = "veil_console"
LOGIN_COOKIE = "veil_console_login"
SESSION_SECONDS = 8 * 3600
FAILURE_WINDOW = 10.0  # seconds; as the worker port's RefusalLog
#: how long the Sessions page may confirm a disconnect this console session made
CONFIRM_SECONDS = 300


@dataclass
class ConsoleSession:
    user: str
    csrf: str
    expires: float
    #: session id -> when this console session disconnected it (so a link cannot fake a confirmation)
    disconnected: dict = field(default_factory=dict)

    def note_disconnected(self, sid: str) -> None:
        self.disconnected[sid] = time.time()
        while len(self.disconnected) > 16:  # bounded: only the latest few are ever confirmed
            self.disconnected.pop(next(iter(self.disconnected)))

    def did_disconnect(self, sid: str) -> bool:
        return time.time() - self.disconnected.get(sid, 0.0) < CONFIRM_SECONDS


class ConsoleAuth:
    failure_window = FAILURE_WINDOW

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self._sessions: dict[str, ConsoleSession] = {}
        self._lock = threading.Lock()
        self._failures = 0
        self._last_failure_audit = float("-inf")
        self._flush_timer: threading.Timer | None = None
        #: the worker's (failures at its port and here count together), or the console's own
        throttle = getattr(worker, "auth_throttle", None)
        self.throttle = throttle if throttle is not None else FailureThrottle()

    def login(self, token: str, source: str = "?") -> tuple[str, ConsoleSession] | None:
        """A new session for a valid admin token; None otherwise (and the failure is counted against
        ``source``, the client's address, as at the worker port: ``auth_throttle``).

        Raises:
            Throttled: ``source`` failed too often (whatever the token, unless it is a valid admin token
                long enough to be unguessable).
        """
        blocked = self.throttle.blocked_for(source)
        if blocked and not unguessable([token]):  # (not even looked up: no timing tells a right guess apart)
            self._failed()  # (audited with the failures: the same aggregate rows)
            raise Throttled.after(blocked)
        tokens = getattr(self.worker, "tokens", None)
        principal = tokens.lookup(token) if tokens is not None and token else None
        admitted = principal is not None and principal.role == "admin"
        if blocked and not admitted:
            self._failed()
            raise Throttled.after(blocked)
        if not admitted:
            if token:  # (an empty form guesses nothing)
                self.throttle.failed(source)
            self._failed()
            return None
        sid = secrets.token_urlsafe(32)
        session = ConsoleSession(principal.name, secrets.token_urlsafe(32), time.time() + SESSION_SECONDS)
        with self._lock:
            self._sessions[sid] = session
        self._audit("console_login", principal.name, "allowed", "owner console log-in")
        return sid, session

    def session(self, sid: str | None) -> ConsoleSession | None:
        if not sid:
            return None
        with self._lock:
            s = self._sessions.get(sid)
            if s is not None and s.expires < time.time():
                del self._sessions[sid]
                s = None
        return s

    def logout(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    @staticmethod
    def csrf_ok(session: ConsoleSession, presented: Any) -> bool:
        return isinstance(presented, str) and hmac.compare_digest(session.csrf.encode(), presented.encode())

    def flush_failures(self) -> None:
        """Writes the failures counted since the last row (the window's timer, and the console's stop)."""
        with self._lock:
            timer, self._flush_timer = self._flush_timer, None
            count, self._failures = self._failures, 0
            if count:
                self._last_failure_audit = time.monotonic()
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
        if count:
            self._audit("console_login", "?", "refused", f"{count} failed console log-in(s)")

    def _failed(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._failures += 1
            elapsed = now - self._last_failure_audit
            if elapsed < self.failure_window:  # counted; written when the window closes, whatever comes next
                if self._flush_timer is None:
                    self._flush_timer = threading.Timer(self.failure_window - elapsed, self.flush_failures)
                    self._flush_timer.daemon = True
                    self._flush_timer.start()
                return
            count, self._failures, self._last_failure_audit = self._failures, 0, now
        self._audit("console_login", "?", "refused", f"{count} failed console log-in(s)")

    def _audit(self, action: str, principal: str, outcome: str, detail: str) -> None:
        from veil.governance.state import audit

        try:
            audit(self.worker, action, principal, "console", (), outcome, detail)
        except Exception as e:  # the console must not fall over on a full disk; the owner still hears of it
            logging.getLogger("veil.console").warning("console audit row (%s, %s) not written: %s", action,
                                                      outcome, type(e).__name__)
