"""Run-time revocation of a principal's tokens: ``worker.revoke(name)``, ``veil users revoke NAME``.

A revoked name authenticates nobody: each of its tokens is refused at the handshake exactly like an
unknown token (``TokenTable.lookup``), and every open session of that name is closed at once
(``ConnectionServing.close_sessions_of``: no further request of it runs, its objects are freed by the
session-end path). The decision is stored in the owner database (``kv`` namespace
``governance.revoked``, key: the name, value ``{"revoked", "by", "ts"}``), like run-time policies: restored
when a worker starts (a restart with the same ``--user`` keeps the name out) and reread by every replica
sharing the database once a second (:func:`sync_stored_revocations`, outside the worker's turn: a long
command does not delay it). :func:`readmit` stores ``revoked: false`` rather than deleting the row, so
replicas readmit too.

A revoked name that is also one of this worker's peers (``--peer NAME=...``) loses the link this worker
opened to it as well (:func:`cut_peer_link`): no peer fetch, move or pointer chain reaches it until readmitted.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import weakref
from typing import Any, Callable

from veil.exceptions import ObjectNotFoundError, PermissionDeniedError

NAMESPACE = "governance.revoked"
log = logging.getLogger(__name__)

#: what else a revoked name leaves on a worker, closed when the revocation is put in force: ``fn(worker, name)``
#: (serving: the services it owns; its sessions' own state goes by SESSION_END_HANDLERS as they close)
REVOKE_HANDLERS: list[Callable[[Any, str], None]] = []

#: one store of a decision, readmission or sync at a time: a sync between putting a decision in force and
#: storing it would otherwise undo it from the previous stored row
_LOCK = threading.RLock()
#: held while a decision is put in force here, never across database I/O: a revocation is in force at once
#: even while a sync (or another decision) waits on a slow or frozen owner database under _LOCK. Taken after
#: _LOCK where both are held.
_FORCE = threading.RLock()
#: worker -> names it revoked whose record is not stored yet (weak: an in-process worker's go with it)
_UNSTORED: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()
#: worker -> names whose stored record was unreadable at the last sync (logged once, not every second)
_DAMAGED: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()


def _audit(worker: Any, action: str, by: str, detail: str) -> None:
    worker.db.audit(worker.id, action, by, "-", [], "allowed", detail)


def _principals(worker: Any, name: str) -> list:
    found = [p for p in worker.tokens.principals() if p.name == name]
    issued = getattr(worker.tokens, "issued_principal", None)
    if not found and issued is not None and issued(name) is not None:  # an issued client not seen yet
        found = [issued(name)]
    return found


def revoke(worker: Any, name: str, by: str = "owner") -> int:
    """Refuses every token of principal ``name`` from now on and closes its open sessions; returns how many
    sessions were closed. Refused (PermissionDeniedError) for the admin role, ObjectNotFoundError for a
    name this worker has neither a token nor a peer link for."""
    found = _principals(worker, name)
    if not found and name not in getattr(worker, "peers", {}):  # (a peer reached with --peer only may go too)
        raise ObjectNotFoundError(f"worker {worker.id!r} has no user named {name!r} (see `veil users list`)")
    if any(p.role == "admin" for p in found):
        raise PermissionDeniedError(f"{name!r} holds the admin role, which cannot be revoked (restart the worker "
                                    "with a new --admin-token to replace the owner's token)")
    with _FORCE:  # in force first, without waiting for the database: a refusal holds even if storing fails
        _unstored(worker).add(name)  # until stored, no sync takes an older row's "readmitted"
        closed = _put_in_force(worker, name)
    lapsed = 0
    with _LOCK:
        if name in _unstored(worker):  # (else stored since, or readmitted since: that later decision stands)
            lapsed = _store_revoked(worker, name, by)
    roles = ", ".join(sorted({p.role for p in found})) or "peer link"
    _audit(worker, "revoke", by, f"revoked {name} ({roles}); {closed} open session(s) closed"
                                 + (f"; {lapsed} open release request(s) lapsed" if lapsed else ""))
    return closed


def readmit(worker: Any, name: str, by: str = "owner") -> None:
    """Lets ``name``'s tokens in again (``veil users restore NAME``); ObjectNotFoundError if it is not revoked."""
    with _LOCK:
        if name not in worker.tokens.revoked:
            raise ObjectNotFoundError(f"{name!r} is not revoked on worker {worker.id!r}")
        from veil.governance.lapses import after_revocation

        # its open requests lapse again first (a revocation whose lapse failed left them open, and readmission
        # ends its retry): if that fails the name stays out
        after_revocation(worker, name)
        _store(worker, name, False, by)  # stored first: if storing fails the name stays out
        with _FORCE:
            _unstored(worker).discard(name)
            _readmit_in_force(worker, name)
    _audit(worker, "readmit", by, f"readmitted {name}")


def users(worker: Any) -> list[dict]:
    """Each principal with a token here: name, role, revoked (never a token); then each peer this worker
    links to (``--peer``) without a token here, as role ``peer`` (it can be revoked too)."""
    revoked = worker.tokens.revoked
    listed = [{"name": p.name, "role": p.role, "revoked": p.name in revoked} for p in worker.tokens.principals()]
    names = {u["name"] for u in listed}
    return listed + [{"name": n, "role": "peer", "revoked": n in revoked}
                     for n in sorted(getattr(worker, "peers", {})) if n not in names]


def revocable_users(worker: Any) -> list[str]:
    """Names the owner may revoke now (the console's choices): not revoked, holding no admin token."""
    tokens = getattr(worker, "tokens", None)
    if tokens is None or not hasattr(tokens, "revoked"):
        return []
    admins = {p.name for p in tokens.principals() if p.role == "admin"}
    names = {p.name for p in tokens.principals()} | set(getattr(worker, "peers", {}))
    return sorted(names - admins - tokens.revoked)


def _put_in_force(worker: Any, name: str) -> int:
    worker.tokens.revoke(name)
    close = getattr(worker, "close_sessions_of", None)
    closed = close(name, "access revoked by the data owner") if close is not None else 0
    cut_peer_link(worker, name)
    for handler in REVOKE_HANDLERS:
        handler(worker, name)
    return closed


def _readmit_in_force(worker: Any, name: str) -> None:
    worker.tokens.readmit(name)
    admit = getattr(getattr(worker, "peers", {}).get(name), "admit", None)
    if admit is not None:
        admit()


def cut_peer_link(worker: Any, name: str) -> None:
    """The link this worker opened to peer ``name`` (``--peer NAME=...``: peer fetches, moves, pointer chains)
    closes, a request in flight on it included, and refuses every request until ``name`` is readmitted:
    revoking a peer's token must also stop this worker sending it anything (``resolve_worker`` refuses the
    name too; this covers a link an object already holds)."""
    refuse = getattr(getattr(worker, "peers", {}).get(name), "refuse", None)
    if refuse is not None:
        refuse("the data owner revoked this peer")


def _unstored(worker: Any) -> set:
    """Names this worker revoked whose record could not be stored yet (the database was unavailable)."""
    return _UNSTORED.setdefault(worker, set())


def _report_damaged(worker: Any, names: list[str]) -> None:
    """Logs each newly unreadable record once (the sync runs every second); the name keeps the state it has
    here, so a damaged row neither lets a revoked name in nor stops the other names' decisions syncing."""
    for name in set(names) - _DAMAGED.get(worker, set()):
        log.error("worker %s: stored revocation %r is unreadable; %r keeps its current state here (%s)",
                  worker.id, name, name, "revoked" if name in worker.tokens.revoked else "admitted")
    _DAMAGED[worker] = set(names)  # (a row mended and damaged again is logged again)


def _holds_admin(worker: Any, name: str) -> bool:
    """A stored record never locks out a name that holds the admin role here (a replica where the name is
    a scientist, or an edited row, could store one; ``revoke`` refuses it)."""
    return any(p.role == "admin" for p in _principals(worker, name))


def _store(worker: Any, name: str, revoked: bool, by: str) -> None:
    # (a fresh nonce in each record: a move compares the record before and after, give_backs.py, and a revocation
    # and readmission within one tick of a coarse clock rewrote the bytes it read)
    value = json.dumps({"revoked": revoked, "by": by, "ts": time.time(), "nonce": secrets.token_hex(8)}).encode()
    worker.db.kv_put(NAMESPACE, name, value)


def _store_revoked(worker: Any, name: str, by: str) -> int:
    """Stores ``name``'s revocation and lapses its open release requests (veil/governance/lapses.py: PySyft's
    request model, a revocation voids outstanding approvals; one given before it matched the same value
    recomputed under the same id after readmission); both done, the name is no longer unstored (a failure
    leaves it for the next sync, which does both again). How many requests lapsed. (_LOCK held.)"""
    from veil.governance.lapses import after_revocation

    _store(worker, name, True, by)
    lapsed = after_revocation(worker, name)
    _unstored(worker).discard(name)
    return lapsed


def _records(worker: Any) -> tuple[dict[str, bool], list[str]]:
    """(name -> revoked for each readable record, names whose record is unreadable)."""
    out, damaged = {}, []
    for key, raw in worker.db.kv_items(NAMESPACE):
        try:
            value = json.loads(raw)
        except (ValueError, TypeError):
            value = None
        if type(value) is not dict or type(value.get("revoked")) is not bool:
            damaged.append(key)
        else:
            out[key] = value["revoked"]
    return out, damaged


def stored_revocations(worker: Any) -> dict[str, bool]:
    """name -> revoked, as stored. An unreadable record raises ValueError (one line): a start stops on it
    rather than letting a revoked name in."""
    out, damaged = _records(worker)
    if damaged:
        raise ValueError(f"stored revocation {damaged[0]!r} is unreadable (not a JSON object with 'revoked')")
    return out


def restore_revocations(worker: Any) -> None:
    """At start: every stored revocation is in force before the first handshake."""
    for name, revoked in stored_revocations(worker).items():
        if revoked and not _holds_admin(worker, name):
            worker.tokens.revoke(name)


def sync_stored_revocations(worker: Any) -> list[str]:
    """Puts in force what the owner decided on another replica sharing the database (a serving worker runs
    this every second with its policy sync): revocations close that name's sessions here too; readmissions
    let it in again. Returns the names changed."""
    changed = []
    with _LOCK:
        for name in list(_unstored(worker)):  # a revocation made here while the database was away: store it now
            _store_revoked(worker, name, "owner")
        records, damaged = _records(worker)
        _report_damaged(worker, damaged)  # the other records still sync; a damaged one changes nothing here
        for name, revoked in records.items():
            with _FORCE:  # (a revocation made here since the read, not stored yet, wins over the row)
                if revoked == (name in worker.tokens.revoked) or (revoked and _holds_admin(worker, name)) \
                        or name in _unstored(worker):
                    continue
                if revoked:
                    closed = _put_in_force(worker, name)
                    detail = f"revoked {name} (the owner's stored decision, made on another replica); {closed} " \
                             "open session(s) closed"
                else:
                    _readmit_in_force(worker, name)
                    detail = f"readmitted {name} (the owner's stored decision, made on another replica)"
            _audit(worker, "revoke" if revoked else "readmit", "owner", detail)
            changed.append(name)
    return changed
