"""The review queue: release requests for objects derived from ``review`` datasets.

A request names one object and one user. Its life: ``pending`` -> ``approved`` ->
``released`` (the approved object went out once), or ``pending`` -> ``denied``.
A request also records the digest of the value it was filed for, so an approval
releases exactly that value: an object changed after filing needs a new request.
Everything persists in the owner's database (table ``release_requests``).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from veil.messaging.serde import encode_value

from veil.exceptions import ObjectNotFoundError, PermissionDeniedError
from veil.governance.canonical import canonical_floats
from veil.governance.lock_order import governance_lock
from veil.governance.state import audit, governance
from veil.workers.database import equality_filters
from veil.workers.persistence import db_clock, db_execute, db_update, db_update_then, insert_below_cap

STATES = ("pending", "approved", "denied", "released", "lapsed")  # lapsed: veil/governance/lapses.py
_COLUMNS = ("id", "ts", "worker", "principal", "session", "object_id", "reason", "shape", "dtype", "digest",
            "sources", "graph", "state", "message", "decided_ts", "decided_by")


@dataclass
class ReleaseRequest:
    """One request as the owner sees it (``to_user()`` is the scientist's view)."""

    id: str
    ts: float
    worker: str
    principal: str
    session: str
    object_id: int
    reason: str
    shape: list
    dtype: str
    digest: str
    sources: list
    graph: dict
    state: str = "pending"
    message: str = ""
    decided_ts: float | None = None
    decided_by: str = ""
    root: str = field(default="")

    def to_user(self) -> dict:
        """What the requester may see: no graph internals, no preview, no owner ids."""
        return {"id": self.id, "state": self.state, "reason": self.reason, "shape": list(self.shape),
                "dtype": self.dtype, "created": self.ts, "decided": self.decided_ts, "message": self.message}

    def to_dict(self) -> dict:
        return asdict(self)


#: characters of JSON a request's op graph and sources may take in the owner's database and Requests page (a
#: 200-step plan run 70 times in a row files ~400 KB, the 64 nodes kept each listing its steps; twelve runs of
#: one listing 200 ops of 150 arguments each filed 1.5 MB; a usual request: a few KB)
MAX_REQUEST_GRAPH_CHARS = 512 * 1024

#: pending requests one user may have at a time: a flood of requests (each get of a derived value files one,
#: and they stay after the value is freed) pushed other users' requests off the owner's list
MAX_PENDING_PER_USER = 100

#: the owner database's key-value namespace marking approvals given back once (:meth:`ReviewQueue.restore_approval`):
#: each refused move sent the value (the destination may have kept it) and wrote two release rows the audit cap
#: never deletes, so a scientist moving to an id in use, or to a destination that keeps the value and claims a
#: refusal, in a loop grew the owner's record without end; now the second refusal leaves the approval used (at
#: most two sends per approval, each on record)
GIVEN_BACK = "review.given_back"


def digest(obj: Any) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes, or of any other object's wire encoding (an encrypted
    tensor: its ciphertexts), so that what was asked for is what is released. An object without an encoding
    gets a fresh random digest: no approval ever matches it again (an approval keyed by its type alone
    released whatever the scientist later stored under the same id). A float tensor's digest is of its released
    form (:mod:`veil.governance.canonical`: canonical NaNs, positive zeros)."""
    h = hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = canonical_floats(obj).detach().cpu().contiguous()  # (as released: canonical.py)
        h.update(str(t.dtype).encode() + repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()
    try:
        encoded = encode_value(obj)
    except Exception:  # noqa: BLE001 - not encodable: nothing to compare by, so never equal
        return "unmatchable-" + secrets.token_hex(16)
    h.update(type(obj).__name__.encode() + b"\0" + encoded)
    return h.hexdigest()


def preview(obj: Any, limit: int = 12) -> str:
    """A few values for the owner's eyes only, and statistics of them all: min/max/mean of the finite values
    and counts of the others (one NaN must not blind them, nor a value past the head hide behind them)."""
    if not isinstance(obj, torch.Tensor):
        return f"<{type(obj).__name__}>"
    flat = obj.detach().reshape(-1)
    head = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in flat[:limit].tolist())
    more = f", ... ({flat.numel()} values)" if flat.numel() > limit else ""
    return f"[{head}{more}]{_stats(flat)}"


def _stats(flat: torch.Tensor) -> str:
    if not flat.numel():
        return ""
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if not flat.is_floating_point():  # integers and bools: exact min/max
        flat = flat.to(torch.uint8) if flat.dtype == torch.bool else flat
        return f"  min {flat.min().item()} max {flat.max().item()} mean {flat.double().mean().item():.4g}"
    f = flat.double()
    finite = f[torch.isfinite(f)]
    out = ""
    if finite.numel():
        out = f"  min {finite.min().item():.4g} max {finite.max().item():.4g} mean {finite.mean().item():.4g}"
    for name, count in (("nan", int(f.isnan().sum())), ("inf", int((f == float("inf")).sum())),
                        ("-inf", int((f == float("-inf")).sum()))):
        if count:
            out += f"  {name} {count}" + (_nan_bits(flat) if name == "nan" else "")
    return out


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _nan_bits(flat: torch.Tensor) -> str:
    """A NaN's sign and payload bits print as plain "nan" but can carry data (a record's bits packed into
    them): says how many NaNs hold a payload other than the canonical one, and the signs when they differ."""
    ints = _BITS.get(flat.element_size())
    if ints is None:
        return ""
    bits = flat[flat.isnan()].contiguous().view(ints)
    canonical = torch.full((1,), float("nan"), dtype=flat.dtype).view(ints)
    magnitude = torch.iinfo(ints).max
    payloads = int(((bits & magnitude) != (canonical & magnitude)).sum())
    negative = int((bits < 0).sum())
    notes = [f"{payloads} with payload bits"] if payloads else []
    if 0 < negative < bits.numel():
        notes.append(f"{negative} with the sign bit")
    return f" ({', '.join(notes)}: NaN bits can carry data; a release clears them)" if notes else ""


def _check_reason(reason: Any) -> None:
    """A release request's reason is text for the owner: a NUL character is refused (PostgreSQL text cannot
    hold one, and the owner's tools would cut the text there)."""
    if "\x00" in str(reason):
        raise PermissionDeniedError("a release request's reason may not hold a NUL character (\\x00)")


class ReviewQueue:
    """The worker's release requests (one instance per call; state lives in the database)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.db = governance(worker).db

    # ----------------------------------------------------------- reading

    def _rows(self, where: str = "", params: tuple = (), limit: int = 500, graphs: bool = True) -> list[ReleaseRequest]:
        # graphs=False: each row's graph read as {} (a list of 500 requests parsed up to 128 MB of them)
        columns = ", ".join(c if graphs or c != "graph" else "'{}'" for c in _COLUMNS)
        rows = db_execute(self.db, f"SELECT {columns} FROM release_requests {where} "
                                   f"ORDER BY ts DESC LIMIT ?", (*params, int(limit)))
        out = []
        for r in rows:
            d = dict(zip(_COLUMNS, r))
            d["object_id"] = int(d["object_id"])
            d["shape"] = json.loads(d["shape"])
            d["sources"] = json.loads(d["sources"])
            graph = json.loads(d["graph"])
            d["root"] = graph.pop("__root__", "")
            d["graph"] = graph
            out.append(ReleaseRequest(**d))
        return out

    def list(self, state: str | None = None, principal: str | None = None, limit: int = 500,
             graphs: bool = True) -> list[ReleaseRequest]:
        """Requests, newest first, optionally of one state and/or one user (``graphs=False``: without their op
        graphs, for lists that show none)."""
        clauses, params = equality_filters(state=state, principal=principal)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        return self._rows(where, tuple(params), limit, graphs)

    def pending(self) -> list[ReleaseRequest]:
        return self.list("pending")

    def count(self, state: str, principal: str | None = None) -> int:
        """How many requests (of one user) are in ``state``, without reading them (the console's badge on every
        page, the cap on pending requests per user)."""
        if principal is None:
            return int(db_execute(self.db, "SELECT COUNT(*) FROM release_requests WHERE state = ?", (state,))[0][0])
        return int(db_execute(self.db, "SELECT COUNT(*) FROM release_requests WHERE state = ? AND principal = ?",
                              (state, principal))[0][0])

    def get(self, request_id: str) -> ReleaseRequest:
        found = self._rows("WHERE id = ?", (str(request_id),), 1) if isinstance(request_id, str) else []
        if not found:
            raise ObjectNotFoundError(f"no release request {request_id!r} on worker {self.worker.id!r}")
        return found[0]

    def latest_for(self, object_id: int, principal: str) -> ReleaseRequest | None:
        found = self._rows("WHERE object_id = ? AND principal = ?", (str(object_id), principal), 1)
        return found[0] if found else None

    def approved_for(self, object_id: int, principal: str, value_digest: str, same: Any) -> ReleaseRequest | None:
        """The user's newest approved request for this id and these bytes that ``same(request)`` (its
        computation) accepts, if any (:func:`veil.governance.release.decide`), unless the owner denied a request
        ``same`` accepts for them since: an approval a refused move gave back outlived the owner's later denial of
        the very request a get racing that move filed, and released the value over it."""
        found = self._rows("WHERE object_id = ? AND principal = ? AND digest = ? AND state IN ('approved', 'denied')",
                           (str(object_id), principal, value_digest), 20)
        denials = [r.decided_ts or 0.0 for r in found if r.state == "denied" and same(r)]
        latest_denial = max(denials, default=None)
        return next((r for r in found if r.state == "approved" and same(r)
                     and (latest_denial is None or (r.decided_ts or 0.0) > latest_denial)), None)

    def denied_for(self, value_digest: str, principal: str) -> ReleaseRequest | None:
        """The user's newest denied request for the same bytes (under any object id), if any: the owner's preview
        flags a request asking again for what was denied (never the scientist's answer: that would be an
        equality oracle on review data)."""
        found = self._rows("WHERE digest = ? AND principal = ? AND state = 'denied'", (value_digest, principal), 1)
        return found[0] if found else None

    def preview(self, request_id: str) -> str:
        """The requested value, abbreviated (owner only); notes when the object is gone or changed."""
        req = self.get(request_id)
        # the object of the session that filed it (ids are per session: another session's object under the same
        # id is not what the approval would release); in process ("-") there is one namespace
        entry = next((e for oid, e in self.worker.monitor.owner_entries()
                      if oid == req.object_id and (req.session == "-" or e.created_by == req.session)), None)
        if entry is None:
            return "(the object is gone: the scientist freed it or disconnected)"
        denied = self.denied_for(req.digest, req.principal)
        again = f"  (the same bytes as denied request {denied.id})" if denied is not None and denied.id != req.id \
            else ""  # (owner only: the scientist is answered as for any fresh value)
        if digest(entry.obj) != req.digest:  # (its values now are not what an approval would release: not shown)
            return ("(CHANGED since the request was filed: what is under this id now is not what an approval "
                    "releases, so it is not shown; an approval releases only the filed value, should the scientist "
                    "compute it again: deny, or wait for a new request)" + again)
        return preview(entry.obj) + again

    # ----------------------------------------------------------- writing

    def file(self, object_id: int, entry: Any, principal: str, session: str, reason: str = "",
             value_digest: str | None = None) -> ReleaseRequest:
        """Files a new pending request for ``entry`` (the caller decided it needs one); ``value_digest``: its
        bytes' digest, taken in the worker's turn when the filing runs outside it (release.py)."""
        from veil.governance.provenance import GRAPH, ROOT, sources_of

        waiting = self.count("pending", principal)  # (refused before the graph is built; counted again below)
        if waiting >= MAX_PENDING_PER_USER:
            raise self._over_cap(principal, waiting)
        _check_reason(reason)
        obj = entry.obj
        graph = dict(entry.meta.get(GRAPH) or {})
        req = ReleaseRequest(
            id=f"req-{secrets.token_hex(8)}", ts=db_clock(self.db), worker=self.worker.id, principal=principal,
            session=session, object_id=object_id, reason=str(reason)[:2000],
            shape=list(obj.shape) if isinstance(obj, torch.Tensor) else [],
            dtype=str(obj.dtype).replace("torch.", "") if isinstance(obj, torch.Tensor) else type(obj).__name__,
            digest=value_digest or digest(obj), sources=sorted(str(s) for s in sources_of(object_id, entry)),
            graph=graph,
            root=entry.meta.get(ROOT, ""),
        )
        stored_graph = json.dumps(dict(graph, __root__=req.root))
        size = len(stored_graph) + len(json.dumps(req.sources))
        if size > MAX_REQUEST_GRAPH_CHARS:  # (the server audits the refusal against the requester)
            raise PermissionDeniedError(
                f"object {object_id} on worker {self.worker.id!r}: the computation behind it is too large for the "
                f"data owner to review ({size // 1024} KiB of op graph, at most {MAX_REQUEST_GRAPH_CHARS // 1024} "
                "KiB): compute the value you need in fewer or shorter steps, then ask for that")
        # the count and the insert in one transaction: two processes of the owner on one database both counted
        # below the cap, then both filed
        waiting = insert_below_cap(
            self.db, f"veil.release_requests.pending:{principal}",
            "SELECT COUNT(*) FROM release_requests WHERE state = ? AND principal = ?", ("pending", principal),
            MAX_PENDING_PER_USER,
            f"INSERT INTO release_requests ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * 16)})", (
                req.id, req.ts, req.worker, req.principal, req.session, str(req.object_id), req.reason,
                json.dumps(req.shape), req.dtype, req.digest, json.dumps(req.sources), stored_graph,
                req.state, req.message, None, ""))
        if waiting is not None:
            raise self._over_cap(principal, waiting)
        audit(self.worker, "request", principal, session, [object_id], "pending",
              f"{req.id} shape={req.shape} reason={req.reason[:200]!r}")
        return req

    def _over_cap(self, principal: str, waiting: int) -> PermissionDeniedError:
        return PermissionDeniedError(
            f"user {principal!r} already has {waiting} release requests pending on worker {self.worker.id!r}: "
            "wait for the data owner's decisions before asking for more")

    def update_reason(self, request_id: str, reason: str) -> None:
        """Gives a request filed without a reason its reason. Once given it stays: the owner decides on what
        they read, and the record must keep it (a later reason was written over the one the owner saw)."""
        _check_reason(reason)
        db_execute(self.db, "UPDATE release_requests SET reason = ? WHERE id = ? AND reason = ''",
                   (str(reason)[:2000], request_id))

    def _decide(self, request_id: str, state: str, by: str, message: str) -> ReleaseRequest:
        with governance_lock(self.worker):  # (never waited for in a request's turn: lock_order.py)
            return self._decide_locked(request_id, state, by, message)

    def _decide_locked(self, request_id: str, state: str, by: str, message: str) -> ReleaseRequest:
        req = self.get(request_id)
        if req.state != "pending":
            raise PermissionDeniedError(f"request {request_id} is already {req.state}")
        # The lock above is this process's only: another process of the owner (same database) may have decided
        # since the read. The conditional UPDATE is the arbiter: no row back = it lost, so no audit, no success.
        changed = db_update(self.db, "UPDATE release_requests SET state = ?, message = ?, decided_ts = ?,"
                                     " decided_by = ? WHERE id = ? AND state = 'pending'",
                            (state, str(message)[:2000], db_clock(self.db), by, request_id))
        if not changed:
            raise PermissionDeniedError(f"request {request_id} is already {self.get(request_id).state}")
        audit(self.worker, "approve" if state == "approved" else "deny", by, "-", [req.object_id],
              "allowed" if state == "approved" else "refused",
              f"{request_id} for {req.principal}" + (f": {message[:200]}" if message else ""))
        return self.get(request_id)

    def approve(self, request_id: str, by: str = "owner", message: str = "") -> ReleaseRequest:
        """Lets exactly that object go once to that user (the next get/move of it)."""
        return self._decide(request_id, "approved", by, message)

    def deny(self, request_id: str, message: str = "", by: str = "owner") -> ReleaseRequest:
        """Refuses the release; the scientist's get raises RequestDeniedError with ``message``. The user's
        earlier approvals of the same value lapse (``approved_for`` no longer releases them: shown so)."""
        from veil.governance.lapses import after_denial
        from veil.governance.release import request_computation

        with governance_lock(self.worker):
            denied = self._decide_locked(request_id, "denied", by, message or "denied by the data owner")
            after_denial(self, denied, request_computation)
        return self.get(request_id)

    def mark_released(self, request_id: str) -> None:
        """Uses the approval up (before the value goes out); raises if it was no longer ``approved``: another
        process of the owner released it first, and an approval lets the value go once."""
        changed = db_update(self.db, "UPDATE release_requests SET state = 'released' WHERE id = ?"
                                     " AND state = 'approved'", (request_id,))
        if not changed:
            raise PermissionDeniedError(f"request {request_id} is already {self.get(request_id).state}")

    def restore_approval(self, request_id: str) -> bool:
        """Gives back an approval :meth:`mark_released` took for a release the other side refused
        (:func:`veil.governance.release.releasing`), once; nothing when it is no longer ``released`` or was given
        back before. Whether it did."""
        # (the mark: a key-value row of the owner's database, so the review queue's table keeps its columns)
        return db_update_then(
            self.db, "UPDATE release_requests SET state = 'approved' WHERE id = ? AND state = 'released' AND NOT "
                     "EXISTS (SELECT 1 FROM kv WHERE namespace = ? AND key = ?)", (request_id, GIVEN_BACK, request_id),
            "INSERT INTO kv (namespace, key, value, updated) VALUES (?, ?, ?, ?)",
            (GIVEN_BACK, request_id, b"1", time.time())) > 0
