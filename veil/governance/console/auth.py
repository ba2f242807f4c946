"""Console log-in: the worker's admin token, then an HttpOnly session cookie with a CSRF token.

- The token is posted once in a form (never in a URL) and compared in constant time
  through the worker's TokenTable; only principals with the ``admin`` role get in.
- The session id lives in an HttpOnly, SameSite=Strict cookie; the server keeps the
  session (expiry, CSRF token). Every state-changing request is a POST carrying the
  session's CSRF token in a form field, and a cross-origin ``Origin`` is refused.
- The log-in form itself is protected by a double-submit token (cookie + field).
- Failed log-ins are audited at most once a minute, with a count.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

COOKIE = "veil_console"
LOGIN_COOKIE = "veil_console_login"
SESSION_SECONDS = 8 * 3600


@dataclass
class ConsoleSession:
    user: str
    csrf: str
    expires: float


class ConsoleAuth:
    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self._sessions: dict[str, ConsoleSession] = {}
        self._lock = threading.Lock()
        self._failures = 0
        self._last_failure_audit = 0.0

    def login(self, token: str) -> tuple[str, ConsoleSession] | None:
        """A new session for a valid admin token; None otherwise (and the failure is counted)."""
        tokens = getattr(self.worker, "tokens", None)
        principal = tokens.lookup(token) if tokens is not None and token else None
        if principal is None or principal.role != "admin":
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

    def _failed(self) -> None:
        now = time.time()
        with self._lock:
            self._failures += 1
            if now - self._last_failure_audit < 60:
                return
            count, self._failures, self._last_failure_audit = self._failures, 0, now
        self._audit("console_login", "?", "refused", f"{count} failed console log-in(s)")

    def _audit(self, action: str, principal: str, outcome: str, detail: str) -> None:
        from veil.governance.state import audit

        try:
            audit(self.worker, action, principal, "console", (), outcome, detail)
        except Exception:  # the console must not fall over on a full disk
            pass
