"""Whose CKKS contexts a decode may load a tensor under: the session it is decoded for.

The registry of received contexts (:mod:`veil.he.ckks_wire`) is one per process, and a network worker serves
many sessions from it. Looked up for everyone, a session that had another's public context bytes (a round's
context is public) sent a ciphertext naming their digest: it loaded iff that context was held here, an
existence oracle on another session's context, and then computed under it. So each context is registered in
a scope, and a decode looks in its own scope and the shared one only.

Trust, per what decodes (``Scope.sees_all``: loads under a context of any scope):

* no session (a client process, the in-process ``VirtualWorker``, the worker's own code): the shared scope,
  where local code's :func:`~veil.he.ckks_wire.remember` also puts its contexts (the owner made them available);
  the only scope where an in-process key owner's secret-holding context serves its key (``Scope.key_owner``).
* an admin session (the owner): registers in the shared scope (a scientist may use the owner's context) and
  sees all (the owner sees every object here anyway).
* a peer-only session (another worker the owner linked with a peer token): its own scope and the shared one,
  like a scientist's. A move carries the contexts of the ciphertexts it hands over (:func:`carrying_contexts`,
  around a move's send): the receiver loads each under the context it carried, kept in the peer link's scope.
  Seeing every scope, a scientist who also held a peer token, or who had an honest peer move a ciphertext
  naming another session's context, learned whether that context was held here and computed under it.
* any other session: its own scope and the shared one. Naming a context only another session holds is
  refused as naming one nobody holds: the same text and the same lookups.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from veil.workers import base

#: the scope name of contexts every session may load under (local code's, the owner's)
SHARED = ""


@dataclass(frozen=True)
class Scope:
    name: str  # where a context received in this decode is registered
    sees_all: bool  # whether its tensors load under a context of any scope
    #: whether an in-process key owner's secret-holding context serves its key's tensors and contexts: for no
    #: network session only (for every session, a scientist's tensor of that key loaded whatever keys it named,
    #: an oracle on whose key owner lives here, and its public context was answered with the secret-holding one)
    key_owner: bool = False


_SHARED_SCOPE = Scope(SHARED, False, key_owner=True)
_current: contextvars.ContextVar[Scope] = contextvars.ContextVar("veil_he_context_scope", default=_SHARED_SCOPE)


def current() -> Scope:
    """The scope of the decode running in this context (shared outside any session)."""
    return _current.get()


def of_session(session: Any) -> Scope:
    """The scope a network session's decodes run in (``None``: no session, the shared scope)."""
    if session is None:
        return _SHARED_SCOPE
    if session.has_role("admin"):
        return Scope(SHARED, True)
    if session.peer_only:
        return Scope("peer:" + session.id, False)
    return Scope("session:" + session.id, False)


@contextlib.contextmanager
def decoding_for(session: Any) -> Iterator[Scope]:
    """Runs a decode for ``session`` (a network worker's :class:`Session`, or None)."""
    scope = of_session(session)
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)


#: encodes, meanwhile, each CKKS tensor with its public context, once per context (around a move's send to a
#: peer: the receiver's peer session loads it under that context, in its own scope, not under whatever context
#: another session sent); :func:`carried` is what that send has carried so far (None outside one)
carrying_contexts = base.moving_to_peer
carried = base.peer_move_memo
