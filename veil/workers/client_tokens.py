"""Client tokens an owner issues one per client, checked by a worker without a table of them.

A serving cluster used to hand every client the one client token: every client was the same principal,
so the per-principal session cap could not tell them apart and one client could hold every client slot.
An owner who gives clients an *issuer secret*'s tokens (``veil worker --client-issuer NAME=SECRET``,
``Cluster.issue_client_token``) gives each its own principal ``NAME/HOLDER`` (role ``client``): capped
on its own, audited under its own name, revocable alone (``veil users revoke NAME/HOLDER``), and allowed
wherever ``NAME`` is (a service open to ``client`` takes ``client/alice``); once it connected, the owner
lists it (``veil users list``) and may revoke it alone.

A token is ``vc1.NAME.HOLDER.MAC`` with MAC = HMAC-SHA256(secret, "veil-client-token:NAME/HOLDER")
(url-safe base64): the names are not secret, only the MAC is, and a worker recomputes it; issuing
more tokens needs no restart. HOLDER is in lower case: with no table of issued names, that is what keeps
"Alice" and "alice" from being two principals that read alike (a token of a name in capitals is refused).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import unicodedata

PREFIX = "vc1"
#: the names a token may carry (no separator, no comma, nothing a header or a command line would mangle)
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
MIN_SECRET_CHARS = 16
_UNKNOWN_ISSUER_KEY = secrets.token_bytes(32)


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(f"a client token's {what} is 1 to 64 letters, digits, '_' or '-', got {name!r}")
    return name


def _folded(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold()


def _check_holder(holder: object) -> str:
    """A holder's name, which must be its own case-folded NFKC form: issuing keeps no table (a token is an
    HMAC), so "Alice" beside "alice" could only be refused by issuing neither: two principals that read
    alike in the audit log, the console and ``veil users``."""
    _check_name(holder, "holder")
    if _folded(holder) != holder:
        raise ValueError(f"a client token's holder is written in lower case (names that differ only in case "
                         f"would be two principals that read alike), got {holder!r}: use {_folded(holder)!r}")
    return holder


def is_holder(holder: object) -> bool:
    """Whether ``holder`` is a name a client token may be issued to (:func:`issue`)."""
    return isinstance(holder, str) and NAME_PATTERN.fullmatch(holder) is not None and _folded(holder) == holder


def check_secret(secret: object) -> bytes:
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"a client issuer secret has at least {MIN_SECRET_CHARS} characters")
    return secret.encode()


def _mac(key: bytes, issuer: str, holder: str) -> str:
    digest = hmac.new(key, f"veil-client-token:{issuer}/{holder}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def issue(secret: str, issuer: str, holder: str) -> str:
    """The token of client ``holder`` under issuer ``issuer`` (principal ``issuer/holder``)."""
    return f"{PREFIX}.{_check_name(issuer, 'issuer')}.{_check_holder(holder)}." \
           f"{_mac(check_secret(secret), issuer, holder)}"


def verify(keys: dict[str, bytes], token: str) -> tuple[str, str] | None:
    """``(issuer, holder)`` of a valid issued token (``keys``: issuer name -> secret); None otherwise."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        return None
    _, issuer, holder, mac = parts
    key = keys.get(issuer)
    if not is_holder(holder):  # (also one made before holders were folded: "Alice" beside "alice")
        return None
    # an unknown issuer costs the same MAC as a known one: the time does not tell which issuer names exist
    expected = _mac(key if key is not None else _UNKNOWN_ISSUER_KEY, issuer, holder)
    if not hmac.compare_digest(expected.encode(), mac.encode()) or key is None:
        return None
    return issuer, holder
