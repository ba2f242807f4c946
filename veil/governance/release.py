"""The one release decision: may this object leave the worker for this user now?

``decide(worker, oid, entry, user)`` is called by every handler that lets a value
out (get and move today; the reference monitor of issue #12 calls it for its
release purposes). It reads the monitor's ``Entry.provenance`` (see
:func:`veil.governance.provenance.sources_of`) and the owner's policy of each
source; only the ``review`` policy makes a difference here (``dp-only`` data is
already refused to every non-DP op by the DP guard, ``open`` is as before).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Union

import torch

from veil.exceptions import PermissionDeniedError, RequestDeniedError, ReviewPendingError
from veil.governance.graphtext import render_graph
from veil.governance.lapses import RevocationMark, after_given_back, give_back, revocations, use_approval
from veil.governance.moved_marks import refuse_marked, refuse_tightened
from veil.governance.provenance import GRAPH, ROOT, sources_of
from veil.governance.requests import ReviewQueue, digest
from veil.governance.state import _STATE, audit, governance
from veil.workers import cancellation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allow:
    request_id: str | None = None  # the approval consumed, when there was one


@dataclass(frozen=True)
class Pending:
    request_id: str


@dataclass(frozen=True)
class Denied:
    request_id: str
    message: str


Decision = Union[Allow, Pending, Denied]
ALLOW = Allow()


def needs_review(worker: Any, oid: int, entry: Any, user: str) -> bool:
    """Whether releasing ``entry`` to ``user`` needs the owner's approval."""
    state = _STATE.get(worker)
    if state is None or "review" not in state.policies.values():
        return False  # fast path: no dataset on this worker is under review
    sources = sources_of(oid, entry)
    if not any(state.policies.get(s) == "review" for s in sources):
        return False
    # The owner's explicit grant on the dataset itself (allowed_users) stands.
    return not (sources == {oid} and entry.protected and entry.allowed_users is not None
                and user in entry.allowed_users)


def decide(worker: Any, oid: int, entry: Any, user: str, session: str = "-", reason: str | None = None,
           consume: bool = True, value_digest: str | None = None) -> Decision:
    """Allow, or the pending/denied request that stands in the way (filing one when there is none).

    ``consume``: an approval lets the object go once; a get that is allowed uses it up (and the release is on
    record before the value goes: a worker killed while it is on its way leaves the record). ``value_digest``:
    the object's digest, taken in the worker's turn (:func:`snapshot`) when this runs outside it.
    """
    if not needs_review(worker, oid, entry, user):
        return ALLOW
    with governance(worker).lock:
        queue = ReviewQueue(worker)
        req = queue.latest_for(oid, user)
        current = value_digest or digest(entry.obj)
        mine = computation(entry.meta.get(GRAPH) or {}, entry.meta.get(ROOT, ""))
        # the same request only while the object is as filed: its bytes and the computation that made them (an
        # object rewritten in place to a probe equal to the denied bytes answered "denied", any other probe
        # "pending": the probe's value; the same computation redone under the same id, after a restart, matches)
        same = req is not None and req.digest == current and computation(req.graph, req.root) == mine
        if not same or req.state != "denied":
            # an approval of exactly this value still stands when a request for other bytes came under the id
            # since (a restart on other data), or a newer one for the same value (a get racing a move filed it
            # while the move held the approval, which the destination's refusal then gave back): it was hidden,
            # lost without any release. Approved ones only: the value they release is what the answer says,
            # while a pending one would answer "equal or not". The newest request, approved, is read through it
            # too: one the owner's later denial of the same value voided (left approved by an older version or a
            # lapse that failed) was used; it lapses, and a new request is filed
            approved = queue.approved_for(oid, user, current, same_computation(mine))
            if approved is None and same and req.state == "approved":
                after_given_back(queue, req.id, request_computation)  # (shown lapsed; a failure is logged)
                req = None
            req = approved if approved is not None or not same else req
        if req is not None:
            if req.state == "pending":
                if reason:
                    queue.update_reason(req.id, reason)
                return Pending(req.id)
            if req.state == "denied":
                return Denied(req.id, req.message)
            if req.state == "approved":
                if consume:
                    # (its other open requests lapse with it, in one transaction: lapses.py)
                    use_approval(queue, req, request_computation)
                    audit(worker, "release", user, session, [oid], "allowed", f"{req.id} approved by {req.decided_by}")
                return Allow(req.id)
        # none yet (a value whose bytes a denied request of this user already has is filed like any other: a
        # different answer would tell the scientist whether a fresh value equals the denied one; the owner's
        # preview flags it instead, ReviewQueue.preview), the last one was used up, or the value changed since: a new request
        return Pending(queue.file(oid, entry, user, session, reason or "", current).id)


def snapshot(entry: Any) -> tuple[Any, str]:
    """What a release decision reads of ``entry`` (its bytes' digest, its op graph and root, its sources), taken in
    the worker's turn, so the decision's reads and writes can run outside it (:func:`decide_outside_turn`): an
    in-place write of another request meanwhile changes neither what is filed nor what is approved."""
    meta = dict(entry.meta)
    if isinstance(meta.get(GRAPH), dict):
        meta[GRAPH] = dict(meta[GRAPH])
    obj = entry.obj
    if isinstance(obj, torch.Tensor):  # its shape and dtype as now (a request files them: an in-place t_()
        # meanwhile filed the shape of another value under this one's digest), no bytes (the digest has them)
        obj = torch.empty(tuple(obj.shape), dtype=obj.dtype, device="meta")
    return replace(entry, meta=meta, obj=obj), digest(entry.obj)


def decide_outside_turn(worker: Any, oid: int, entry: Any, user: str, session: str = "-",
                        reason: str | None = None) -> tuple[Decision, Any]:
    """:func:`decide` (``consume=False``: a filed request or a refusal, nothing released) with its database work
    outside a network worker's turn, and the request it names (None when allowed). A review request's filing
    waited there for the owner's database: a COMMIT whose answer was lost is looked up for up to ~10 s, and
    every other session's command waited with it."""
    if not needs_review(worker, oid, entry, user):
        return ALLOW, None
    frozen, value_digest = snapshot(entry)
    cancellation.check()  # (past its deadline: nothing filed)
    with cancellation.outside_turn():
        decision = decide(worker, oid, frozen, user, session, reason, consume=False, value_digest=value_digest)
        rid = getattr(decision, "request_id", None)
        return decision, (ReviewQueue(worker).get(rid) if rid else None)


def computation(graph: dict, root: str) -> tuple:
    """An op graph as the owner reads it (node ids are random per command: names come from the order) and its
    root's key (the values the text leaves out: veil/governance/computation_key.py), so the same computation
    redone compares equal and any other does not."""
    return (*render_graph(graph, root), (graph.get(root) or {}).get("key"))


def same_computation(key: tuple) -> Callable[[Any], bool]:
    """Whether a request was filed for the computation whose :func:`computation` is ``key``."""
    return lambda r: request_computation(r) == key


def request_computation(req: Any) -> tuple:
    """:func:`computation` of the value a request was filed for."""
    return computation(req.graph, req.root)


def enforce(worker: Any, oid: int, entry: Any, user: str, session: str = "-", purpose: str = "get") -> None:
    """Raises ReviewPendingError / RequestDeniedError unless ``decide`` allows the release."""
    _raise_unless_allowed(worker, oid, decide(worker, oid, entry, user, session))


def _raise_unless_allowed(worker: Any, oid: int, decision: Decision) -> None:
    if isinstance(decision, Pending):
        raise ReviewPendingError(
            f"object {oid} on worker {worker.id!r} derives from data under the owner's review policy: "
            f"release request {decision.request_id} is pending the owner's approval "
            f"(wait with .get(wait=SECONDS); see sy.requests(worker))"
        )
    if isinstance(decision, Denied):
        raise RequestDeniedError(
            f"the data owner of worker {worker.id!r} denied release request {decision.request_id}: {decision.message}"
        )


def enforce_all(worker: Any, ids: list, entries: list, user: str, session: str = "-", purpose: str = "get",
                consume: bool = True, before_deciding: Callable[[], None] | None = None) -> list:
    """``enforce`` for a batch; approvals are consumed only when every object may go (a batch that releases
    nothing must not use an approval up nor record a release). ``consume=False``: the refusals only (a move
    checks its destination between the two: one it cannot reach releases nothing). Returns the approvals used
    up, (object id, request id) pairs. ``before_deciding()`` runs outside the turn before any decision (only when
    an object needs review)."""
    refuse_tightened(worker, ids, entries, purpose, user, session)  # (dp-only since the monitor's check: moved_marks)
    if _STATE.get(worker) is None:
        return []
    blocked = [(oid, e) for oid, e in zip(ids, entries) if needs_review(worker, oid, e, user)]
    # (the marks again, after the policies the review check read: a tightening marks before it puts dp-only in
    # force, and one that ran since refuse_tightened made that check read dp-only, not review: moved_marks)
    refuse_marked(worker, ids, entries, purpose, user, session)
    if not blocked:
        return []
    if len({oid for oid, _ in blocked}) < len(blocked):  # [A, A]: one approval lets A go once, not twice
        raise PermissionDeniedError(f"a {purpose} names an object under review more than once: ask for it once")
    # The decisions' reads and writes (requests filed, approvals used up, their audit rows) run outside a network
    # worker's turn: a COMMIT whose answer was lost is looked up for up to ~10 s, and they held every other
    # session's command that long. What they read of the objects is taken in the turn (snapshot), and a value
    # that changed meanwhile is not released (_released_as_approved).
    frozen = [(oid, *snapshot(entry)) for oid, entry in blocked]
    marks = [write_mark(entry.obj) for _, entry in blocked]
    cancellation.check()  # (past its deadline or cancelled: nothing filed, nothing used up)
    with cancellation.outside_turn():
        if before_deciding is not None:
            before_deciding()
        used = _decide_all(worker, frozen, user, session, purpose, consume, blocked)
    if used:
        _released_as_approved(worker, blocked, frozen, marks)
    return used


def write_mark(obj: Any) -> tuple:
    """What any in-place write changes whatever it writes: the object under the entry, and a tensor's version
    counter (which its views share, so a write through one counts)."""
    try:
        return obj, obj._version if isinstance(obj, torch.Tensor) else None
    except RuntimeError:  # (an inference tensor keeps no counter: its bytes are compared)
        return obj, None


def _released_as_approved(worker: Any, blocked: list, frozen: list, marks: list) -> None:
    """Back in the turn: no object whose approval was used up was written since the snapshot (another request
    of the scientist's may have written it in place meanwhile). Any write counts, not only one that changed the
    bytes: comparing them answered with the approved value when the write held the same bytes and refused it
    otherwise, an equality oracle on whatever was written (data under review). Fails closed: the approvals stay
    used, nothing is released."""
    for (oid, entry), (_, _, approved), mark in zip(blocked, frozen, marks):
        obj, version = write_mark(entry.obj)
        if obj is not mark[0] or version != mark[1] or digest(obj) != approved:
            raise PermissionDeniedError(
                f"object {oid} on worker {worker.id!r} changed while its release was being recorded: nothing was "
                "released and its approval is used up (ask for the value again)")


def _decide_all(worker: Any, frozen: list, user: str, session: str, purpose: str, consume: bool,
                blocked: list) -> list:
    """:func:`enforce_all`'s two passes over the objects as taken in the turn (entry, digest); ``blocked``: the
    (id, entry) they were taken from, whose marks are read again under the lock a tightening holds."""
    with governance(worker).lock:  # (reentrant) no decision of this process changes between the two passes
        # (out of the turn since the review check: the owner's tightening to dp-only ran meanwhile and each decide
        # read dp-only, not review: allowed, unapproved; it marks before the policy changes, under this lock)
        refuse_marked(worker, [oid for oid, _ in blocked], [e for _, e in blocked], purpose, user, session)
        pending = []
        for oid, entry, value_digest in frozen:  # first pass files/looks up every request, using no approval up
            decision = decide(worker, oid, entry, user, session, consume=False, value_digest=value_digest)
            if isinstance(decision, Denied):
                _raise_unless_allowed(worker, oid, decision)
            if isinstance(decision, Pending):
                pending.append((oid, decision.request_id))
        if len(pending) == 1:
            _raise_unless_allowed(worker, pending[0][0], Pending(pending[0][1]))
        if pending:  # one error naming every request, so the owner can decide them all at once
            raise ReviewPendingError(
                f"objects {', '.join(str(oid) for oid, _ in pending)} on worker {worker.id!r} derive from data "
                f"under the owner's review policy: release requests {', '.join(r for _, r in pending)} are "
                f"pending the owner's approval (see sy.requests(worker))")
        if not consume:
            return []
        used = []
        for oid, entry, value_digest in frozen:
            decision = decide(worker, oid, entry, user, session, value_digest=value_digest)
            _raise_unless_allowed(worker, oid, decision)
            if isinstance(decision, Allow) and decision.request_id is not None:
                used.append((oid, decision.request_id))
        return used


@contextmanager
def releasing(worker: Any, ids: list, entries: list, user: str, session: str, purpose: str,
              nothing_left: Callable[[BaseException], bool]) -> Iterator[None]:
    """Uses the approvals of a release that can still fail after them (a move the destination may refuse).

    The approvals are taken, and the release recorded, before the values go (a second release racing this one
    finds them used: no replay; a worker killed while they are on their way leaves the record). When the block
    fails and ``nothing_left(error)`` says the other side stored nothing, they are given back (approved again)
    with a row that says so: the scientist lost the owner's approval through a release that never happened.
    That is the other side's word: the value did leave, so its release row stays, and a hostile destination
    that kept it only gets the same value released again, on record again; once (``requests.GIVEN_BACK``): refused
    moves in a loop sent it, and wrote rows the audit cap keeps, without end. Any other failure keeps them used."""
    # read before the approvals are taken (a revocation while the move holds them voids them), outside the turn
    # with the decisions (the stored record is a database read: a frozen database held every session's command
    # on each move once any dataset was under review); a revocation between the turn and the read lapsed the
    # still-open approvals, or its record says revoked (give_backs.says_revoked)
    marks: list[RevocationMark] = []
    used = enforce_all(worker, ids, entries, user, session, purpose,
                       before_deciding=lambda: marks.append(revocations(worker, user)))
    revoked_before = marks[0] if marks else RevocationMark(-1)  # (no approval taken: nothing to give back)
    try:
        yield
    except BaseException as error:
        if used and nothing_left(error):
            with cancellation.outside_turn():  # (the database only, as when they were used up)
                _give_back_all(worker, used, user, session, purpose, revoked_before, error)
        raise


def _give_back_all(worker: Any, used: list, user: str, session: str, purpose: str, revoked_before: RevocationMark,
                   error: BaseException) -> None:
    """:func:`releasing`'s approvals given back after the destination said it stored nothing, each send's
    ``refused`` row saying whether its approval stands again and, if not, why (a revocation, a twin's release, a
    later denial, a second give-back: the owner's audit tells them apart). A give-back the database fails leaves
    that approval used (fails closed), its row written and the others still given back: the destination's
    refusal is what the scientist is answered."""
    queue = ReviewQueue(worker)
    for oid, request_id in used:
        # (not when the owner revoked the user or denied the same value while the move held it: lapses.py)
        try:
            why = give_back(queue, request_id, user, revoked_before, request_computation)
        except Exception as failure:  # noqa: BLE001 - the destination's refusal stays the answer
            log.error("worker %s: the approval of %s was not given back (%s)", worker.id, request_id,
                      type(failure).__name__)
            why = f"its give-back could not be recorded ({type(failure).__name__})"
        try:
            audit(worker, "release", user, session, [oid], "refused",
                  f"{request_id}: the {purpose} was refused where it went ({type(error).__name__}: it says it "
                  "stored nothing); the value was sent, " + ("the approval stands again" if why is None else
                                                              f"the approval stays used ({why})"))
        except Exception as failure:  # noqa: BLE001 - (the database: its "allowed" row is on record)
            log.error("worker %s: the refused send of %s was not audited (%s)", worker.id, request_id,
                      type(failure).__name__)
