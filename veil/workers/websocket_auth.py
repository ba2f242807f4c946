"""Who may connect to a network worker, and as whom.

A connection presents one or more access tokens in its opening handshake
(``Authorization: Bearer <token>``, further ones in ``X-Veil-Tokens``, comma
separated). Every token must be known, or the handshake is refused with HTTP 401
before any message is read. Each token names a *principal* with a *role*:

- ``scientist``: a data scientist; computes, ``.get()`` s what the owner's rules allow.
- ``peer``: another worker the owner trusts for worker-to-worker moves and
  dealing: the objects it stores can be claimed by whoever names them
  (hand-offs), and what it deals may be dealer material. It names only its own
  objects and hand-offs, like any session (no confused deputy).
- ``admin``: the data owner (owner view of the store, loading data); it does not
  bypass ``.get()`` rules.
- ``client``: a serving client (``veil.serving``): it may only send the requests
  registered in :data:`CLIENT_REQUESTS` (submit a query, fetch its own result).

Roles are least-privilege (:func:`check_request`): a ``peer`` only *hands off*
objects to this worker (stores them, runs the delivery functions in
:data:`PEER_COMMANDS`, frees its own deliveries); it can neither read nor name
other sessions' objects, so a peer cannot act as a confused deputy.

The connection becomes a :class:`Session` with a fresh random id; objects it
creates are recorded under that id, which is what isolates clients and what is
freed when the connection closes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable

from veil.exceptions import PermissionDeniedError
from veil.messaging import messages as m
from veil.workers import client_tokens
from veil.workers.accounts import END_ACCOUNT, Account
from veil.workers.auth_throttle import source_of

ROLES = ("scientist", "peer", "admin", "client")
AUTH_HEADER = "Authorization"
EXTRA_TOKENS_HEADER = "X-Veil-Tokens"
MAX_TOKENS_PER_CONNECTION = 8
#: issued clients (``client_tokens``) listed by :meth:`TokenTable.principals` once they connected
MAX_LISTED_ISSUED = 10_000


def new_token() -> str:
    """A fresh access token (256 random bits, URL-safe, never starting with "-").

    One URL-safe token in 64 starts with "-", which command lines read as an option
    (``veil worker --token -x...`` failed with "expected one argument"); such draws are
    discarded, which keeps every token uniform over the remaining set.
    """
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


#: character categories refused in a principal's name: controls, format (zero-width, bidi), line separators
_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp"})
#: characters of other categories that are drawn as nothing: the combining grapheme joiner, variation
#: selectors (Mn), Hangul fillers (Lo), Khmer inherent vowels, Mongolian selectors, the Braille blank
_BLANK = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\ufe00-\ufe0f\uffa0"
                    "\U000e0100-\U000e01ef]")


def _alike(name: str) -> str:
    """What two names that read the same have in common (case, compatibility forms and space runs folded)."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    #: a client token an issuer secret made (``client_tokens``): the issuer's name, which the
    #: principal ``issuer/holder`` stands in for where clients are allowed; "" for a table entry
    issued_by: str = ""


class TokenTable:
    """Access tokens the data owner issued, each naming a principal and a role."""

    def __init__(self) -> None:
        #: (keyed digest of a token, its principal): lookups compare fixed-length digests, so the time a
        #: comparison takes says nothing of a token's length either
        self._entries: list[tuple[bytes, Principal]] = []
        self._digest_key = secrets.token_bytes(32)
        #: each table name by what it has in common with names that read the same (``_alike``)
        self._alike_names: dict[str, str] = {}
        #: issuer name -> (secret, role) of client tokens checked by their MAC (``client_tokens``)
        self._issuers: dict[str, tuple[bytes, str]] = {}
        #: issued principals that presented a valid token, by name (listed and revocable by name); replaced
        #: whole, so readers on other threads need no lock; only the owner's issued tokens add to it
        self._issued_seen: dict[str, Principal] = {}
        #: names the owner revoked (veil/governance/revocation.py); replaced whole, so readers need no lock
        self.revoked: frozenset[str] = frozenset()

    def add(self, token: str, name: str, role: str = "scientist") -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        if not token or len(token) < 8:
            raise ValueError(f"the access token for {name!r} is too short (at least 8 characters)")
        if not name or "#" in name:
            raise ValueError(f"invalid principal name {name!r}")
        self._check_distinct(name)
        self._entries.append((self._digest(token), Principal(name, role)))

    def _check_distinct(self, name: str) -> None:
        """Principals are revoked, audited and allowed by name: a name that only case, width or an invisible
        character tells apart from another's (``Alice``/``alice``, a fullwidth letter, a zero-width space), or
        that an issuer's clients take (``ISSUER/HOLDER``), would make ``veil users revoke`` act on one where
        the owner meant the other. Refused here, where the owner names them."""
        if any(unicodedata.category(c) in _INVISIBLE for c in name) or _BLANK.search(name):
            raise ValueError(f"principal name {name!r} has an invisible or control character")
        if name != name.strip():  # ("alice " read as "alice")
            raise ValueError(f"principal name {name!r} starts or ends with a space")
        folded = _alike(name)  # (a fullwidth solidus is a "/" once folded: "client\uff0fx" reads as "client/x")
        issuer = folded.partition("/")[0] if "/" in folded else None
        if issuer is not None and issuer in {_alike(i) for i in self._issuers}:
            raise ValueError(f"principal name {name!r} is one the client issuer {issuer!r} gives its clients")
        other = self._alike_names.setdefault(_alike(name), name)
        if other != name:
            raise ValueError(f"principal name {name!r} differs from {other!r} only in case or form: two "
                             "principals must not be told apart by that (revocation and audit go by name)")

    def _digest(self, token: str) -> bytes:
        return hmac.new(self._digest_key, token.encode(), hashlib.sha256).digest()

    def add_issuer(self, secret: str, name: str, role: str = "client") -> None:
        """Accepts every token ``client_tokens.issue(secret, name, holder)`` makes, as principal
        ``name/holder`` of ``role`` (one principal per client: its own session cap, audit name, revocation)."""
        if role != "client":
            raise ValueError("only client tokens are issued from a secret")
        client_tokens.check_secret(secret)
        if client_tokens.NAME_PATTERN.fullmatch(name or "") is None:
            raise ValueError(f"invalid client issuer name {name!r} (letters, digits, '_' or '-')")
        taken = [p.name for _, p in self._entries if _alike(p.name).partition("/")[0] == _alike(name)
                 and "/" in _alike(p.name)]
        if taken:  # (its clients would share that principal's name: revoking one would revoke the other)
            raise ValueError(f"client issuer {name!r} would give its clients names like principal {taken[0]!r}'s")
        alike = [i for i in self._issuers if i != name and _alike(i) == _alike(name)]
        if alike:
            raise ValueError(f"client issuer {name!r} differs from issuer {alike[0]!r} only in case or form")
        self._issuers[name] = (secret.encode(), role)

    def lookup(self, token: str) -> Principal | None:
        """The principal for ``token``, comparing against every entry in constant time."""
        presented = self._digest(token)
        found = None
        for known, principal in self._entries:
            if hmac.compare_digest(known, presented) and found is None:
                found = principal  # no early exit: timing does not reveal which entry matched
        if found is None and self._issuers:
            issued = client_tokens.verify({k: v[0] for k, v in self._issuers.items()}, token)
            if issued is not None:
                found = Principal(f"{issued[0]}/{issued[1]}", self._issuers[issued[0]][1], issued_by=issued[0])
                if found.name not in self._issued_seen and len(self._issued_seen) < MAX_LISTED_ISSUED:
                    self._issued_seen = {**self._issued_seen, found.name: found}
        if found is not None and found.name in self.revoked:
            return None  # refused as an unknown token is: the refusal does not say the name exists
        return found

    def issued_principal(self, name: str) -> Principal | None:
        """The principal ``ISSUER/HOLDER`` an issuer configured here would give a client token, whether or not
        that client ever connected (so the owner can revoke a leaked, unused issued token by name)."""
        issuer, _, holder = name.partition("/")
        known = self._issuers.get(issuer)
        if known is None or not client_tokens.is_holder(holder):
            return None
        return Principal(name, known[1], issued_by=issuer)

    def principals(self) -> list[Principal]:
        """Every principal with a token here, and every issued client that connected, once each (never a token)."""
        return list(dict.fromkeys([*(p for _, p in self._entries), *self._issued_seen.values()]))

    def revoke(self, name: str) -> None:
        self.revoked = self.revoked | {name}

    def readmit(self, name: str) -> None:
        self.revoked = self.revoked - {name}

    @property
    def issues_tokens(self) -> bool:
        """Whether clients may hold tokens of their own here (an issuer secret: :meth:`add_issuer`)."""
        return bool(self._issuers)

    def __len__(self) -> int:
        return len(self._entries) + len(self._issuers)


def tokens_from_headers(headers) -> list[str]:
    """The tokens a handshake presents (empty list if none). A repeated ``X-Veil-Tokens`` header is one
    list (HTTP joins repeated fields with commas); a repeated ``Authorization`` is refused as a bad token.

    Raises:
        PermissionDeniedError: more than one ``Authorization`` header.
    """
    tokens = []
    auths = headers.get_all(AUTH_HEADER)  # (``get`` raises MultipleValuesError on a repeated header: was a 500)
    if len(auths) > 1:
        raise PermissionDeniedError("more than one Authorization header")
    auth = auths[0] if auths else ""
    if auth.startswith("Bearer "):
        tokens.append(auth[len("Bearer "):].strip())
    for extra in headers.get_all(EXTRA_TOKENS_HEADER):
        tokens.extend(t.strip() for t in extra.split(",") if t.strip())
    return tokens


def handshake_headers(token: str, extra_tokens: tuple | list = ()) -> dict[str, str]:
    headers = {AUTH_HEADER: f"Bearer {token}"}
    if extra_tokens:
        headers[EXTRA_TOKENS_HEADER] = ",".join(extra_tokens)
    return headers


@dataclass
class Session:
    """One authenticated connection.

    Attributes:
        id: random session id; recorded as ``created_by`` of the objects it makes.
        principals: every principal this connection authenticated as (the first
            is the default identity for ``.get()`` rules).
    """

    principals: tuple[Principal, ...]
    id: str = field(default_factory=lambda: "session-" + secrets.token_hex(8))

    @property
    def user(self) -> str:
        return self.principals[0].name

    def has_role(self, role: str) -> bool:
        return any(p.role == role for p in self.principals)

    @property
    def peer_only(self) -> bool:
        """Whether this connection is a peer worker's alone (only those fetch shares)."""
        return all(p.role == "peer" for p in self.principals)

    #: the monitor's Principal for this session (built once by the server)
    principal: object = field(default=None, compare=False, repr=False)
    #: this connection's skeleton commands, number -> definition (``veil/workers/skeletons.py``)
    skeletons: dict = field(default_factory=dict, compare=False, repr=False)
    #: its requester account at this worker's peers (``veil/workers/accounts.py``)
    account: Account = field(default_factory=Account, compare=False, repr=False)
    #: a peer link's session: account tag -> its Principal (made once per tag)
    account_principals: dict = field(default_factory=dict, compare=False, repr=False)
    #: set when the owner revokes one of its principals: none of its requests runs from then on
    revoked: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # (its entries in worker-wide caches are its users', apart from other users': user_caches.py)
        self.account.users = tuple(sorted({(str(p.role), str(p.name)) for p in self.principals}))

    def claim_user(self, claimed: object) -> str:
        """The identity a get/move acts as: a claimed user must be one this connection proved."""
        if claimed is None or claimed == "":
            return self.user
        if not isinstance(claimed, str) or all(p.name != claimed for p in self.principals):
            shown = ascii(claimed)  # (bounded: the claim is the requester's text, up to the message limit)
            shown = shown if len(shown) <= 100 else f"{shown[:100]}..."
            raise PermissionDeniedError(
                f"this connection did not authenticate as user {shown}; present that user's token to act as it"
            )
        return claimed


def authenticate(table: TokenTable, tokens: list[str]) -> Session:
    """A session for the presented tokens; raises PermissionDeniedError if any is unknown."""
    if not tokens:
        raise PermissionDeniedError("no access token presented")
    if len(tokens) > MAX_TOKENS_PER_CONNECTION:
        raise PermissionDeniedError(f"too many tokens (at most {MAX_TOKENS_PER_CONNECTION})")
    principals = [table.lookup(token) for token in tokens]  # every one: the time says nothing of which failed
    unknown = sum(p is None for p in principals)
    if unknown:
        refusal = PermissionDeniedError("unknown access token")
        refusal.failures = unknown  # each unknown token is one guess (auth_throttle counts them)
        raise refusal
    return Session(tuple(dict.fromkeys(principals)))


#: the summary key of refused connects past ``RefusalLog.max_sources`` sources in one window
OTHER_SOURCES = "other sources"


class RefusalLog:
    """Audits refused unauthenticated connections in aggregate (no log flooding).

    Per window of ``window`` seconds the first ``burst`` refusals get a row each;
    the rest are counted per source address and written as one summary row
    ("N more refused connects from ADDR") when the window closes (:meth:`flush_due`,
    which the server calls periodically, or :meth:`flush` at shutdown). An
    attacker hammering the port thus adds at most ``burst`` + one row per source
    per window, instead of one row per attempt.

    Sources are counted as :func:`auth_throttle.source_of` groups them (loopback is one, IPv4 /24, IPv6 /64),
    and at most ``max_sources`` per window get a row of their own; the rest share one ("other sources"): an
    attacker cycling addresses (every 127.0.0.0/8 one, or a /64's) neither grows the counts without bound
    nor writes a summary row per address.
    """

    max_sources = 64

    def __init__(self, db, worker_id: str, window: float = 10.0, burst: int = 5) -> None:
        import threading
        import time

        self._db, self._worker_id, self.window, self.burst = db, worker_id, window, burst
        self._clock = time.monotonic
        self._lock = threading.Lock()
        self._window_start = self._clock()
        self._written = 0
        self._suppressed: dict[str, int] = {}
        #: other aggregating logs closed on this one's timer and at shutdown (refusal_rows.RefusedRequestLog)
        self.followers: list = []
        #: where a row goes, ``(action, principal, session, ids, outcome, detail)``; None: the database, on this
        #: thread (a network server hands them to its writer thread: the handshake runs on the event loop)
        self.write_row = None

    def _row(self, detail: str, stands_for: int = 1) -> None:
        if self.write_row is not None:  # (stands_for: the refusals a summary counts, kept if the stop folds it)
            self.write_row("connect", "?", "-", [], "refused", detail, stands_for=stands_for)
        else:
            self._db.audit(self._worker_id, "connect", "?", "-", (), "refused", detail)

    def refused(self, source: str, reason: str) -> None:
        self.flush_due()
        with self._lock:
            if self._written < self.burst:
                self._written += 1
                write = True
            else:
                key = source_of(source)
                if key not in self._suppressed and len(self._suppressed) >= self.max_sources:
                    key = OTHER_SOURCES
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                write = False
        if write:
            self._row(f"from {source}: {reason}")

    def flush_due(self) -> None:
        """Closes the window if it is over (writes its summary rows)."""
        if self._clock() - self._window_start >= self.window:
            self.flush(followers=False)
        for follower in self.followers:
            follower.flush_due()

    def flush(self, followers: bool = True) -> None:
        with self._lock:
            suppressed, self._suppressed = self._suppressed, {}
            self._window_start, self._written = self._clock(), 0
        for source, n in sorted(suppressed.items()):
            self._row(f"{n} more refused connects from {source} (aggregated over {self.window:g} s)", n)
        for follower in self.followers if followers else ():
            follower.flush()

# ------------------------------------------------------------------ least privilege per role

#: roles whose requests are limited only by the worker's own rules (allowlist, owner rules)
FULL_ROLES = frozenset({"scientist", "admin"})

#: what a ``client`` may send: message type -> predicate on the message (veil.serving registers
#: its submit/fetch actions); anything else is refused before it reaches a handler
CLIENT_REQUESTS: dict[type, Callable[[Any], bool]] = {}

#: worker functions a ``peer`` may run here: deliveries that only store what the peer hands over
#: (dealt MPC material, secure-aggregation shares). Register new ones with :func:`register_peer_command`.
PEER_COMMANDS: set[str] = {"veil.mpc.expand_material", "veil.mpc.receive_comparison", "veil.secagg.deposit",
                           END_ACCOUNT}


def register_peer_command(name: str) -> None:
    """Lets peer workers run worker function ``name`` (it must only store what the peer sends)."""
    PEER_COMMANDS.add(name)


#: message types a ``peer`` may send besides hand-offs; each one's handler checks that the session is a
#: peer's and what that peer may take (peer openings' fetches). Register with :func:`register_peer_message`.
PEER_MESSAGES: set[type] = set()


def register_peer_message(cls: type) -> None:
    """Lets peer workers send messages of type ``cls`` (its handler must check the peer's rights)."""
    PEER_MESSAGES.add(cls)


def _peer_may(msg: Any) -> bool:
    tp = type(msg)
    if tp is m.ObjectMessage or tp is m.DeleteMessage or tp in PEER_MESSAGES:  # hand-offs, freeing them
        return True
    return tp is m.CommandMessage and isinstance(msg.op, str) and msg.op in PEER_COMMANDS


def _client_may(msg: Any) -> bool:
    allowed = CLIENT_REQUESTS.get(type(msg))
    return allowed is not None and bool(allowed(msg))


def check_request(session: Session, msg: Any) -> None:
    """Refuses (PermissionDeniedError) a request none of the session's roles covers."""
    roles = {p.role for p in session.principals}
    if roles & FULL_ROLES:
        return
    if "peer" in roles and _peer_may(msg):
        return
    if "client" in roles and _client_may(msg):
        return
    what = type(msg).__name__
    if "client" in roles:
        raise PermissionDeniedError(f"a client token may only submit queries and fetch results, not send {what}")
    raise PermissionDeniedError(f"a peer connection may only hand off objects to this worker, not send {what}")


# ------------------------------------------------------------------ session lifecycle

#: called as ``handler(worker, session_id)`` when a connection closes (e.g. serving drops that
#: client's queued requests); a failing handler is logged and never blocks the others
SESSION_END_HANDLERS: list[Callable[[Any, str], None]] = []


def run_session_end_handlers(worker: Any, session_id: str) -> None:
    for handler in SESSION_END_HANDLERS:
        try:
            handler(worker, session_id)
        except Exception:  # cleanup of one subsystem must not leak the session's objects
            logging.getLogger(__name__).exception("session-end handler %r failed", handler)
