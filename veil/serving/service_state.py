"""One serving service's state and the look-ups every serving action starts with.

:class:`_Service` holds a service's queues (pending, claimed, outputs); :func:`_who` says who asks (user,
session), :func:`_owned` finds the asking owner's own service and :func:`_client_service` the service a client
may query (by its user or the issuer of its token); :func:`_listed` is what the owner is shown. The actions
themselves: :mod:`veil.serving.protocol`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from veil.serving import names
from veil.serving.errors import ServingError


@dataclass
class _Service:
    owner: str  # authenticated user that opened it
    clients: tuple  # users allowed to submit
    info: dict  # public description: shapes, encoding, parties
    pending: "OrderedDict[tuple[str, int], torch.Tensor]" = field(default_factory=OrderedDict)  # (session, id)
    outputs: dict = field(default_factory=dict)  # (session, request id) -> share or error message
    claimed: dict = field(default_factory=dict)  # request id -> submitting session (one per id at a time)
    held: dict = field(default_factory=dict)  # request id -> its claimed input share (for requeue)
    closed: bool = False
    reason: str = "the model owner stopped the service"
    #: keys the opaque label ``pending`` shows for each submitting session (its batch group)
    group_key: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    #: the owner's session that opened it: it holds the model's shares, which go when it ends
    opened_by: str = ""


def _group(svc: _Service, session: str) -> str:
    """A label the owner may batch by: equal for one submitting session's requests, unlinkable to the session
    (and across parties, each keying its own)."""
    return hashlib.blake2b(session.encode(), key=svc.group_key, digest_size=8).hexdigest()


def _who(worker: Any, sender: str) -> tuple[str, str]:
    """(user, session) of the request: authenticated on network workers, claimed in-process."""
    current = getattr(worker, "current_session", None)
    session = current() if current is not None else None
    if session is not None:
        return session.user, session.id
    return sender, sender


def _service(worker: Any, name: str, user: str) -> _Service:
    """``user``'s own service ``name``: another user's of that name gets the answer of a name nobody holds."""
    svc = names.owned_by(worker, user, name)
    if svc is None:
        raise ServingError(f"worker {worker.id!r} serves no model named {name!r} of user {user!r}")
    return svc


#: most request ids one owner action names (a batch is at most a service's queue, protocol.MAX_PENDING): a claim,
#: fail or requeue of millions of ids held the serving lock for as long as they took, every client waiting
MAX_REQUEST_IDS = 1024
#: most characters of what an owner stores in a party's serving state with ``open``, ``fail`` and ``close``: a service's
#: name, its client list and its public description (together), a failed request's message, a close reason. That state
#: is outside the session's quota and outlives the session (a closed service stays until its owner's room reclaims it):
#: a description holding a 20 MB tensor, a 20 MB client list or name, was kept for ever, 64 services per user
MAX_OPEN_CHARS = 256 * 1024
MAX_REASON_CHARS = 2000
#: deepest nesting of lists and maps in a service's description (the honest one: a map of lists of integers)
MAX_INFO_DEPTH = 8


def _request_ids(values: Any) -> list[int]:
    if not isinstance(values, (list, tuple)) or len(values) > MAX_REQUEST_IDS or not all(type(v) is int
                                                                                           for v in values):
        raise ServingError(f"request ids must be a list of at most {MAX_REQUEST_IDS} integers")
    return list(values)


def _plain_chars(value: Any, depth: int = 0) -> int:
    """Characters of a plain description (strings, numbers, booleans, None, and lists and maps of them): what it
    holds, each number counted as 8; raises ServingError for anything else (a tensor, an object reference)."""
    if depth > MAX_INFO_DEPTH:
        raise ServingError(f"a service's description nests at most {MAX_INFO_DEPTH} levels")
    if value is None or type(value) in (bool, int, float):
        return 8
    if type(value) is str:
        return len(value)
    if type(value) in (list, tuple):
        return 8 + sum(_plain_chars(v, depth + 1) for v in value)
    if type(value) is dict:
        if not all(type(k) is str for k in value):
            raise ServingError("a service's description is a map with text keys")
        return 8 + sum(len(k) + _plain_chars(v, depth + 1) for k, v in value.items())
    raise ServingError(f"a service's description holds plain values only (text, numbers, lists, maps), "
                       f"not {type(value).__name__}")


def checked_open(name: str, clients: Any, info: Any) -> tuple:
    """``(clients, info)`` of an ``open``, checked before anything is stored: a list of user names and a plain
    description, with the service's name at most :data:`MAX_OPEN_CHARS` characters together (one line each
    refusal, naming sizes only)."""
    if not isinstance(clients, (list, tuple)) or not all(type(c) is str for c in clients) or type(info) is not dict:
        raise ServingError("open expects [clients, info]")
    size = len(name) + sum(len(c) + 8 for c in clients)
    if size <= MAX_OPEN_CHARS:  # (the walk is bounded by the frame; cut short once past the bound)
        size += _plain_chars(info)
    if size > MAX_OPEN_CHARS:
        raise ServingError(f"a service's name, clients and description hold at most {MAX_OPEN_CHARS} characters "
                           f"together (they stay on the party while the service is kept)")
    return tuple(clients), info


def checked_reason(value: Any) -> str:
    """An owner's text for clients (a failed request's message, a close reason): its text (another value's
    ``str``, as the owner sent it: an object reference is its repr, never the object), at most
    :data:`MAX_REASON_CHARS` of it kept."""
    text = value if type(value) is str else str(value)
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


def _listed(svc: _Service) -> "OrderedDict[int, tuple[str, torch.Tensor]]":
    """The requests the owner sees, id -> (session, share): per id the oldest queued one, none while one
    with that id is being computed (a later session's request with the same id waits behind, unseen)."""
    out: OrderedDict = OrderedDict()
    for (sub, r), share in svc.pending.items():
        if r not in out and r not in svc.claimed:
            out[r] = (sub, share)
    return out


def _owned(worker: Any, name: str, user: str) -> _Service:
    return _service(worker, name, user)  # (only the owner's own names are looked up: see names.py)


def _client_service(worker: Any, name: str, user: str,
                    holds: Callable[[_Service], bool] = lambda s: False) -> _Service:
    # one answer for a model the client may not query and a name nothing is served under: the names of
    # other models are not the client's to learn by guessing (which of several it means: names.for_client)
    issuer = _issuer_of(worker, user)
    svc = names.for_client(worker, name, lambda s: user in s.clients or issuer in s.clients, holds)
    if svc is None:
        raise ServingError(f"user {user!r} may not query model {name!r} on worker {worker.id!r} "
                           "(no such model, or not for this user)")
    return svc


def _user_of(worker: Any, session: str) -> str | None:
    found = getattr(worker, "sessions", {}).get(session)
    return found.user if found is not None else None


def _issuer_of(worker: Any, user: str) -> str | None:
    """The client user whose issued token (``client_tokens``) ``user`` holds: ``client/alice`` may query
    where ``client`` may; None for any other user."""
    current = getattr(worker, "current_session", None)
    session = current() if current is not None else None
    for p in session.principals if session is not None else ():
        if p.name == user and p.issued_by:
            return p.issued_by
    return None
