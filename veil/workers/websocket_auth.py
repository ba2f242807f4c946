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

The connection becomes a :class:`Session` with a fresh random id; objects it
creates are recorded under that id, which is what isolates clients and what is
freed when the connection closes.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

from veil.exceptions import PermissionDeniedError

ROLES = ("scientist", "peer", "admin")
AUTH_HEADER = "Authorization"
EXTRA_TOKENS_HEADER = "X-Veil-Tokens"
MAX_TOKENS_PER_CONNECTION = 8


def new_token() -> str:
    """A fresh access token (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


class TokenTable:
    """Access tokens the data owner issued, each naming a principal and a role."""

    def __init__(self) -> None:
        self._entries: list[tuple[bytes, Principal]] = []

    def add(self, token: str, name: str, role: str = "scientist") -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        if not token or len(token) < 8:
            raise ValueError(f"the access token for {name!r} is too short (at least 8 characters)")
        if not name or "#" in name:
            raise ValueError(f"invalid principal name {name!r}")
        self._entries.append((token.encode(), Principal(name, role)))

    def lookup(self, token: str) -> Principal | None:
        """The principal for ``token``, comparing against every entry in constant time."""
        presented = token.encode()
        found = None
        for known, principal in self._entries:
            if hmac.compare_digest(known, presented) and found is None:
                found = principal  # no early exit: timing does not reveal which entry matched
        return found

    def __len__(self) -> int:
        return len(self._entries)


def tokens_from_headers(headers) -> list[str]:
    """The tokens a handshake presents (empty list if none)."""
    tokens = []
    auth = headers.get(AUTH_HEADER, "")
    if auth.startswith("Bearer "):
        tokens.append(auth[len("Bearer "):].strip())
    extra = headers.get(EXTRA_TOKENS_HEADER, "")
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

    #: the monitor's Principal for this session (built once by the server)
    principal: object = field(default=None, compare=False, repr=False)

    def claim_user(self, claimed: object) -> str:
        """The identity a get/move acts as: a claimed user must be one this connection proved."""
        if claimed is None or claimed == "":
            return self.user
        if not isinstance(claimed, str) or all(p.name != claimed for p in self.principals):
            raise PermissionDeniedError(
                f"this connection did not authenticate as user {claimed!r}; present that user's token to act as it"
            )
        return claimed


def authenticate(table: TokenTable, tokens: list[str]) -> Session:
    """A session for the presented tokens; raises PermissionDeniedError if any is unknown."""
    if not tokens:
        raise PermissionDeniedError("no access token presented")
    if len(tokens) > MAX_TOKENS_PER_CONNECTION:
        raise PermissionDeniedError(f"too many tokens (at most {MAX_TOKENS_PER_CONNECTION})")
    principals = []
    for token in tokens:
        principal = table.lookup(token)
        if principal is None:
            raise PermissionDeniedError("unknown access token")
        principals.append(principal)
    return Session(tuple(dict.fromkeys(principals)))
