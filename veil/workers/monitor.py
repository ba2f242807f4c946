"""The reference monitor: the only door between a client's message and a worker's objects.

Every client-initiated access names (principal, object ref, purpose) and goes through
:meth:`ReferenceMonitor.resolve`. The monitor

- scopes names to the principal's session (its own namespace, the owner's protected data, hand-offs
  addressed to it); anything else is *unknown*, and unknown ids and ids of other sessions fail with the
  same error and text;
- applies the owner's rules for the purpose: ``allowed_users``, ``reveal_to``, the DP-only policy, dealer
  material never revealed, owner data never deleted or replaced by clients;
- records capabilities on every object it stores (``Entry.kind``, ``reveal_to`` and ``provenance``:
  derived objects inherit the union of their sources' provenance and the strictest ``reveal_to``);
- charges each session's memory quota (``veil/workers/quota.py``), growth in place included; and
- writes the audit row (allowed releases, every refusal and unknown-id probe).

The object store answers only the monitor: it holds the store's key.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import torch

from veil.exceptions import ObjectNotFoundError, PermissionDeniedError, VeilError
from veil.messaging import messages as m
from veil.shapes import extent
from veil.tensors.handle import RemoteHandle
from veil.workers import capabilities, dealt, listing
from veil.workers.capabilities import CAP_PREFIX, DEALER_TAG  # noqa: F401  (re-exported)
from veil.workers.no_deputy import NO_DEPUTY, _NoDeputy  # noqa: F401  (re-exported)
from veil.workers.openings import OPENING_MASKS, OpeningRules  # noqa: F401  (re-exported)
from veil.workers.principals import PURPOSES, Principal, Purpose, PurposeRule  # noqa: F401  (re-exported)
from veil.workers.quota import (DEFAULT_OBJECT_BYTES, MIN_TENSOR_BYTES, SIZE_ESTIMATORS,  # noqa: F401
                                QuotaExceededError, QuotaRules, _nbytes, metadata_nbytes,
                                register_size_estimator)
from veil.workers.store import GRADIENT, SHARED_NS, Entry, Kind, ObjectStore, StoreKey
from veil.workers.store_admission import AFTER_LOCK, BATCH_AFTER_LOCK, StoreAdmission, audit_later

__all__ = ["Purpose", "Kind", "Principal", "ReferenceMonitor", "QuotaExceededError", "DEALER_TAG", "Entry",
           "register_size_estimator"]


#: worker functions whose results are dealer material when a dealer (peer / in-process) runs them
DEALER_OUTPUTS: set[str] = {"veil.mpc.expand_material", "veil.mpc.receive_comparison"}
#: worker-function prefixes whose results are protocol shares
PROTOCOL_PREFIXES: tuple[str, ...] = ("veil.mpc.",)
#: in-process audit rows kept (network workers write to their OwnerDB)
AUDIT_LOG_SIZE = 10_000


_EMPTY: frozenset = frozenset()
_CLIENT = Kind.CLIENT
_TENSOR = torch.Tensor


def strictest_reveal_to(sources: Iterable[Entry]) -> tuple | None:
    """The intersection of the sources' ``reveal_to`` sets (None when none restricts)."""
    return dealt.strictest((e.reveal_to for e in sources), None)


def derived_kind(sources: Iterable[Entry], op_name: str | None, principal: Principal) -> str:
    """Kind of a result: dealer outputs (from a dealer), protocol shares, or tainted by its inputs."""
    if op_name is not None:
        if op_name in DEALER_OUTPUTS and principal.may_deal:
            return Kind.DEALER
        if op_name.startswith(PROTOCOL_PREFIXES):
            return Kind.SHARE
    kind = Kind.CLIENT
    for e in sources:
        if e.kind == Kind.DEALER:
            return Kind.DEALER  # plain ops on dealer material stay dealer material: never revealable
        if e.kind == Kind.SHARE:
            kind = Kind.SHARE
    return kind


class ReferenceMonitor(QuotaRules, OpeningRules, StoreAdmission):
    """One per worker; owns the worker's object store (``worker_id``: the worker's name, in error texts;
    ``max_session_bytes``: the per-session memory quota, None: unlimited)."""

    def __init__(self, worker_id: str, max_session_bytes: int | None = None) -> None:
        self.worker_id = worker_id
        self.__key = StoreKey()
        self._store = ObjectStore(worker_id, self.__key)
        self.max_session_bytes = max_session_bytes
        #: in-process audit rows (dicts); a network server replaces ``audit_sink``
        self.audit_log: deque = deque(maxlen=AUDIT_LOG_SIZE)
        self.audit_sink: Callable[[str, Principal, list, str, str], None] = self._audit_in_memory
        self._local = _RequestLocal()
        self._taints: dict[str, tuple] = {}  # namespace -> reveal_to every new object of it gets
        #: the owner's review policy (veil.governance), asked before an opening reveals a client object
        #: derived from owner data; the worker installs it: (principal, ids, entries, action, consume) -> None or raise
        self.release_hook: Callable[[Principal, list, list, str, bool], None] | None = None
        #: the owner's enable_dp(hide_count=True): every DP-only dataset's record count is described as 0,
        #: whenever it became DP-only (a load or a policy change after enable_dp included)
        self.hide_dp_counts = False

    # ------------------------------------------------------------- audit

    def _audit_in_memory(self, action: str, principal: Principal, ids: list, outcome: str, detail: str) -> None:
        self.audit_log.append({"action": action, "principal": principal.user, "session": principal.session,
                               "object_ids": [i for i in ids if type(i) is int], "outcome": outcome,
                               "detail": detail[:500]})

    def audit(self, action: str, principal: Principal, ids: list, outcome: str = "allowed", detail: str = "") -> None:
        self.audit_sink(action, principal, list(ids), outcome, detail)

    def _refuse(self, error: VeilError, action: str, principal: Principal, ids: list) -> VeilError:
        if audit_later():  # (under the store's lock: audited once it is let go, store_admission.py)
            error.audit_row = (self, action, principal, list(ids), str(error))
        else:
            self.audit(action, principal, ids, "refused", str(error))
        error.audited = True  # the server does not write a second row
        return error

    def unknown(self, oid: Any) -> ObjectNotFoundError:
        """The one error for ids that do not exist and ids the requester may not name."""
        shown = oid if type(oid) is int else type(oid).__name__
        return ObjectNotFoundError(f"object {shown!r} not found on worker {self.worker_id!r}")

    # ------------------------------------------------------------ lookup

    def _find(self, principal: Principal, oid: Any) -> Entry | None:
        if type(oid) is not int:
            return None
        entry = self._store.lookup(self.__key, principal.namespace, oid)
        if entry is not None:
            if not principal.isolated or entry.protected or entry.created_by == principal.namespace:
                return entry
        elif principal.isolated:
            return self._store.claim(self.__key, principal.namespace, oid)
        return None

    def stored_bytes(self, principal: Principal, ids: Iterable[Any]) -> int:
        """Bytes of the objects among ``ids`` that ``principal`` may name now: a size, for scheduling only.

        Reveals no value, claims no hand-off and audits nothing (no access happens); ids that are
        unknown, not nameable, or not yet stored (results of earlier commands of the same request)
        count 0. The server uses it to keep large protocol steps off its event loop."""
        total = 0
        store, key = self._store, self.__key
        for oid in ids:
            entry = store.lookup(key, principal.namespace, oid) if type(oid) is int else None
            if entry is not None and (not principal.isolated or entry.protected
                                      or entry.created_by == principal.namespace):
                total += entry.nbytes
        return total

    def stored_size(self, principal: Principal, oid: Any) -> tuple | None:
        """``(shape or None, extent, bytes)`` of the object ``oid`` names, if ``principal`` may name it now (as
        :meth:`stored_bytes`: sizes for scheduling, no access, claim or audit; None otherwise). A tensor's shape
        as it shows it (an expanded view's too), its extent ``prod(max(d, 1))`` and its logical bytes; another
        object: no shape, its charged bytes for both. (The inline lane sizes ops with it: inline_work.py.)"""
        entry = self._store.lookup(self.__key, principal.namespace, oid) if type(oid) is int else None
        if entry is None or (principal.isolated and not entry.protected and entry.created_by != principal.namespace):
            return None
        obj = entry.obj
        if isinstance(obj, _TENSOR):
            try:
                shape = tuple(obj.shape)
                return shape, extent(shape), obj.numel() * obj.element_size()
            except Exception:  # noqa: BLE001  (a wrapper that cannot tell: its charged bytes)
                pass
        return None, max(entry.nbytes, 1), entry.nbytes

    def resolve(self, principal: Principal, ref: Any, purpose: Purpose, detail: str = "") -> Entry:
        """The entry ``ref`` (an ObjectRef or id) names, if ``principal`` may use it for ``purpose``.

        Raises:
            ObjectNotFoundError: unknown, or not nameable by this principal (same text).
            PermissionDeniedError: nameable but the owner's rules refuse this purpose.
        """
        oid = ref.id if type(ref) is m.ObjectRef else ref
        rule = PURPOSES[purpose]
        entry = self._find(principal, oid)
        if entry is None:
            raise self._refuse(self.unknown(oid), rule.action, principal, [oid])
        if rule.releases_value:
            self._check_release(principal, entry, oid, rule.action)
        if principal.isolated and purpose is not Purpose.REVEAL and isinstance(entry.obj, RemoteHandle):
            raise self._refuse(self.chain_error(oid), rule.action, principal, [oid])
        if rule.audit_allowed:
            self.audit(rule.action, principal, [oid], "allowed", detail)
        return entry

    def chain_error(self, oid: Any) -> PermissionDeniedError:
        """Network pointer chains are refused (docs/architecture.md, "Pointer chains")."""
        return PermissionDeniedError(
            f"object {oid} on worker {self.worker_id!r} is a pointer to another worker: pointer chains are not "
            "followed on network workers (the worker would act there with its own peer rights, not yours); "
            "use a pointer to that worker directly")

    def _dp_only_error(self, what: str) -> PermissionDeniedError:
        return PermissionDeniedError(
            f"{what} refused: this data on worker {self.worker_id!r} is under the owner's differential-privacy "
            "policy and answers only differentially private releases")

    def _check_release(self, principal: Principal, entry: Entry, oid: int, action: str) -> None:
        error = self._release_error(principal, entry, oid, action)
        if error is not None:
            raise self._refuse(error, action, principal, [oid])

    def _release_error(self, principal: Principal, entry: Entry, oid: int, action: str) -> VeilError | None:
        """Why ``principal`` may not reveal ``entry`` (None: it may)."""
        error: VeilError | None = None
        user = principal.user
        if entry.kind == Kind.DEALER:
            error = PermissionDeniedError(
                f"object {oid} on worker {self.worker_id!r} is dealer material (triples, masks, keys): it is "
                "never revealed")
        elif entry.allowed_users is not None and user not in entry.allowed_users:
            error = PermissionDeniedError(
                f"object {oid} on worker {self.worker_id!r} is private: user {user!r} may not retrieve it; "
                "compute on it through pointers instead")  # who may is the owner's business, not the refused user's
        elif entry.reveal_to is not None and not self._may_see(principal, entry.reveal_to):
            error = PermissionDeniedError(
                f"object {oid} on worker {self.worker_id!r} may be revealed only to its designated recipient "
                "(a share of someone else's value); it is released by the protocol's output step")
        elif entry.meta.get("dp_only"):
            error = self._dp_only_error(action)
        return error

    def release_output(self, principal: Principal, ref: Any, recipients: list) -> Entry:
        """A protocol's output step: ``ref``'s value goes to ``recipients`` (session ids) only.

        The object must be a share whose ``reveal_to`` names every recipient (it
        derives from their inputs); anything else (owner data, client objects,
        dealer material) is refused.
        """
        oid = ref.id if type(ref) is m.ObjectRef else ref
        entry = self.resolve(principal, oid, Purpose.PROTOCOL_STEP)
        recipients = [r for r in recipients if r is not None]
        if (entry.kind != Kind.SHARE or entry.reveal_to is None or entry.protected or entry.meta.get("dp_only")
                or any(r not in entry.reveal_to for r in recipients)):
            raise self._refuse(PermissionDeniedError(
                f"object {oid} on worker {self.worker_id!r} is not an output share of these requests"),
                "release", principal, [oid])
        self.audit("release", principal, [oid], "allowed", f"to {len(recipients)} recipient(s)")
        return entry

    def taint(self, principal: Principal, reveal_to: tuple) -> None:
        """From now on, everything ``principal``'s session stores is revealable only to ``reveal_to``.

        Openings hand a protocol's intermediate values back as plain tensors, so
        capabilities cannot follow them; a session computing on inputs protected
        for someone else (a serving batch) is tainted as a whole until
        :meth:`untaint`.
        """
        current = self._taints.get(principal.namespace)
        self._taints[principal.namespace] = tuple(sorted(set(reveal_to) | set(current or ())))

    def untaint(self, principal: Principal) -> None:
        self._taints.pop(principal.namespace, None)

    def may_reveal(self, principal: Principal, entry: Entry) -> bool:
        """Whether ``principal`` could .get() ``entry`` (no audit row)."""
        return self._release_error(principal, entry, 0, "check") is None

    # --------------------------------------------------------- arguments

    def resolve_args(self, principal: Principal, value: Any, purpose: Purpose, found: dict[int, Entry]) -> Any:
        """Replaces ObjectRefs in (nested) arguments by their objects; ``found``: id -> entry."""
        tp = type(value)
        if tp is m.ObjectRef:
            entry = found.get(value.id)
            if entry is None:
                entry = found[value.id] = self.resolve(principal, value.id, purpose)
            return entry.obj
        if tp is tuple or tp is list:
            return tp([self.resolve_args(principal, v, purpose, found) for v in value])
        if tp is dict:
            return {k: self.resolve_args(principal, v, purpose, found) for k, v in value.items()}
        return value

    def resolve_list(self, principal: Principal, values: Any, purpose: Purpose, found: dict[int, Entry]) -> list:
        """:meth:`resolve_args` for a command's top-level argument list (the hot path: one call per
        command). Purposes that neither release values nor audit allowed uses only need the name
        scoping of :meth:`_find`; anything else goes through :meth:`resolve`."""
        quiet = purpose is Purpose.COMPUTE or purpose is Purpose.PROTOCOL_STEP
        space = self._store.spaces(self.__key, principal.namespace)[0]
        out = []
        for v in values:
            tp = type(v)
            if tp is m.ObjectRef:
                oid = v.id
                entry = found.get(oid)
                if entry is None:
                    entry = found[oid] = self._resolve_id(principal, oid, purpose, quiet, space)
                out.append(entry.obj)
            elif tp is list or tp is tuple or tp is dict:
                out.append(self.resolve_args(principal, v, purpose, found))
            else:
                out.append(v)
        return out

    def resolve_ids(self, principal: Principal, ids: Any, purpose: Purpose, found: dict[int, Entry]) -> None:
        """:meth:`resolve_list` for bare ids in argument order (a skeleton use's objects): each id not in
        ``found`` yet is resolved, with the same scoping, refusal and audit row, into ``found``."""
        quiet = purpose is Purpose.COMPUTE or purpose is Purpose.PROTOCOL_STEP
        space = self._store.spaces(self.__key, principal.namespace)[0]
        for oid in ids:
            if oid not in found:
                found[oid] = self._resolve_id(principal, oid, purpose, quiet, space)

    def _resolve_id(self, principal: Principal, oid: Any, purpose: Purpose, quiet: bool, space: dict) -> Entry:
        """One id of a command (``space``: the principal's objects, read once per command). Quiet purposes
        need only the name scoping (:meth:`_nameable`); anything else goes through :meth:`resolve`. An id
        the principal may not name is refused and audited as unknown."""
        entry = self._nameable(principal, oid, space) if quiet else self.resolve(principal, oid, purpose)
        if entry is None:
            raise self._refuse(self.unknown(oid), PURPOSES[purpose].action, principal, [oid])
        return entry

    def _nameable(self, principal: Principal, oid: Any, space: dict) -> Entry | None:
        """:meth:`_find` with its usual case read straight from ``space``: an entry of the principal's it
        may name; anything else (shared objects, an isolated principal's hand-off claims) through _find."""
        entry = space.get(oid) if type(oid) is int else None
        if entry is None or (principal.isolated and not entry.protected and entry.created_by != principal.namespace):
            entry = self._find(principal, oid)
        return entry

    def hides(self, principal: Principal, entry: Entry) -> bool:
        """Whether ``entry``'s value is secret from ``principal``: dealt material, or a value revealable
        only to others (its shape, an op's failure or an error text must not depend on it)."""
        return entry.kind == Kind.DEALER or (entry.reveal_to is not None
                                             and not self._may_see(principal, entry.reveal_to))

    @staticmethod
    def _may_see(principal: Principal, reveal_to: tuple) -> bool:
        return principal.session in reveal_to or principal.user in reveal_to

    # ------------------------------------------------------------ storing

    def check_free(self, principal: Principal, ids: list) -> None:
        """Refuses a command whose return ids are taken before its op runs: :meth:`store` refuses them
        too, but only after an in-place op has already written into its input.

        Raises:
            PermissionDeniedError: one of ``ids`` is taken in this namespace (or by the owner's data).
        """
        space, shared = self._store.spaces(self.__key, principal.namespace)
        for oid in ids:
            if type(oid) is not int or oid < 0:  # (store's own check, before anything ran)
                raise VeilError(f"object id must be a positive integer, got {repr(oid)[:40]}")
            if oid and (oid in space or oid in shared):  # 0: an in-place op's result, its input's own id
                raise self._in_use(oid)

    def _in_use(self, oid: int) -> PermissionDeniedError:
        """The refusal of a taken id (the same text for one taken in the namespace and an owner's id)."""
        return PermissionDeniedError(f"object id {oid} is already in use on worker {self.worker_id!r}")

    def store(self, principal: Principal, oid: Any, obj: Any, *, sources: Iterable[Entry] = (),
              op_name: str | None = None, kind: str | None = None, reveal_to: tuple | None = None,
              tags: tuple = (), description: str = "", allowed_users: tuple | None = None,
              hand_off: bool | None = None, extra_nbytes: int = 0) -> Entry:
        """Stores a client object under ``oid`` in the principal's namespace, with derived capabilities.

        Raises:
            PermissionDeniedError: ``oid`` is taken in this namespace (or by the owner's data).
            QuotaExceededError: the session would exceed its memory quota.
        """
        if type(oid) is not int or oid <= 0:
            raise VeilError(f"object id must be a positive integer, got {oid!r}")
        ns = principal.namespace
        if hand_off is None:  # what a peer worker stores is for whoever names the id first
            hand_off = principal.isolated and "peer" in principal.roles
        store, key = self._store, self.__key
        space, shared = store.spaces(key, ns)
        if oid in space or oid in shared:  # (early; put checks again under the store's lock)
            raise self._in_use(oid)
        if type(sources) is not list:
            sources = list(sources)
        if ns == SHARED_NS:  # sessions are charged; in-process has none
            nbytes = 0
        elif type(obj) is _TENSOR:  # _nbytes of the usual result, without the call
            try:
                nbytes = obj.untyped_storage().nbytes()
                if nbytes < MIN_TENSOR_BYTES:
                    nbytes = MIN_TENSOR_BYTES
            except (RuntimeError, NotImplementedError):
                nbytes = _nbytes(obj)
        else:
            nbytes = _nbytes(obj)
        nbytes += extra_nbytes  # what the op's autograd graph keeps beside it (output_bounds.GraphSaves)
        provenance = _EMPTY
        client_sources = True
        if sources:  # one pass: does any source restrict reveals or carry provenance? (plain client data: no)
            restricted = False
            for e in sources:
                if e.reveal_to is not None:
                    restricted = True
                if e.provenance and not e.provenance <= provenance:
                    provenance = capabilities.join_sources(provenance, e.provenance)
                if e.kind != _CLIENT:
                    client_sources = False
            if reveal_to is None and restricted:
                reveal_to = strictest_reveal_to(sources)
        if kind is None:  # derived_kind, without the call for the usual result (a torch op on client objects)
            kind = _CLIENT if client_sources and (op_name is None or (
                op_name not in DEALER_OUTPUTS and not op_name.startswith(PROTOCOL_PREFIXES))) \
                else derived_kind(sources, op_name, principal)
        taint = self._taints.get(ns) if kind == Kind.SHARE else None
        if taint is not None:  # a share computed while the session holds others' protected inputs
            reveal_to = taint if reveal_to is None else tuple(sorted(set(reveal_to) & set(taint)))
        # positional: a class called with keywords packs them into a dict first (~5 K instructions per result)
        entry = Entry(obj, tuple(tags), description, allowed_users, False, principal.session, {}, reveal_to, kind,
                      provenance, nbytes)
        if kind == Kind.DEALER and sources:
            dealt.inherit_fixed(entry, sources)
        with AFTER_LOCK, store.locked(key):  # checked and stored in one step (veil/workers/store_admission.py)
            if ns != SHARED_NS and store.charged_already(key, ns, obj):  # (a gradient, or a tensor under a new id)
                entry.shared = nbytes - extra_nbytes  # (its storage: what it grows by past that is its own)
                nbytes = entry.nbytes = MIN_TENSOR_BYTES + extra_nbytes
            self.admit_store(principal, oid, nbytes + store.beside_bytes(key, ns, entry), hand_off)
            store.put(key, ns, oid, entry, hand_off=hand_off, account=principal.account)
        return entry

    def end_account(self, principal: Principal) -> int:
        """A peer says its requester session ended: frees the hand-offs it stored for it that nobody claimed
        (:mod:`veil.workers.accounts`); returns how many."""
        if not (principal.isolated and principal.is_peer) or not principal.account:
            raise PermissionDeniedError("only a peer worker ends its own requesters' accounts")
        return self._store.drop_account(self.__key, principal.namespace, principal.account)

    def store_objects(self, principal: Principal, objects: list, then: Callable[[list], Any] | None = None) -> list:
        """ObjectMessage: client-sent objects; dealt material when a dealer tags it; peer hand-offs. All or none
        (:meth:`ObjectStore.all_or_none`), ``then(stored)`` too: the handler's work on them (a mover reads any error
        as "stored nothing"). Travelled capabilities (:meth:`export_capabilities`) only restrict, except ``kind``
        share/dealer from dealers / peers. Returns (entry, capabilities) per object (governance records them)."""
        for so in objects if principal.isolated and not principal.is_peer else ():  # (a peer's carry them as made)
            listing.check_sent_meta(so.tags, so.description)  # (a page describes each whole: bounded per object)
        parsed = [(so, *self._import_capabilities(principal, so.tags)) for so in objects]  # all checks first
        dealt_entries, layout, stored = [], [], []
        with BATCH_AFTER_LOCK, self._store.all_or_none(self.__key, principal.namespace, [so.id for so in objects]):
            for so, tags, caps in parsed:
                entry = self.store(principal, so.id, so.obj, kind=caps["kind"], reveal_to=caps["reveal_to"],
                                   tags=tags, description=so.description, allowed_users=so.allowed_users,
                                   extra_nbytes=metadata_nbytes(tags, so.description))
                if caps["kind"] == Kind.DEALER and caps["item"] is not None:
                    dealt_entries.append(entry)
                    layout.append((caps["item"], caps["mask"], caps["sources"]))
                if caps["provenance"]:  # travelled with the object (sent objects have no sources here)
                    entry.provenance = capabilities.join_sources(entry.provenance, caps["provenance"])
                if caps["dp_only"]:
                    entry.meta["dp_only"] = True
                stored.append((entry, caps))
            if dealt_entries:
                dealt.group(dealt_entries, layout)
            if then is not None:
                then(stored)
        return stored

    # ------------------------------------------------------ capabilities on the move

    def export_capabilities(self, principal: Principal, entry: Entry, note: str = "") -> tuple:
        """Tags that carry ``entry``'s capabilities to another worker (:func:`capabilities.export_tags`)."""
        return capabilities.export_tags(principal, entry, self.worker_id, note)

    def outgoing(self, principal: Principal, new_id: int, entry: Entry) -> m.StoredObject:
        """The StoredObject that moves ``entry`` to another worker, its capabilities included."""
        return capabilities.outgoing(principal, new_id, entry, self.worker_id)

    def _import_capabilities(self, principal: Principal, tags: Any) -> tuple[tuple, dict]:
        return capabilities.parse_tags(tags, principal.may_deal)

    def store_output(self, oid: int, obj: Any) -> Entry:
        """For worker functions that store a result under an id they were given (HE ops, encrypted
        aggregation): stored for the current request's principal, derived from its inputs."""
        current = self._local.request
        if current is None:
            raise PermissionDeniedError(f"worker {self.worker_id!r}: store_output outside a request")
        principal, sources, op_name, outputs = current
        entry = self.store(principal, oid, obj, sources=sources, op_name=op_name)
        outputs.append(entry)  # (the handler gives any left without an op graph the command's: governance)
        return entry

    def current_principal(self) -> Principal | None:
        """Who asked for the worker function now running (protocol functions check their roles
        and round ownership with it); None outside a request."""
        current = self._local.request
        return None if current is None else current[0]

    def request_reads_owner_data(self) -> bool:
        """Whether the worker function now running was given the owner's data or a value computed from it
        (protected, with provenance, or revealable only to some): it must then not fail or branch on values."""
        current = self._local.request
        return current is not None and any(e.protected or e.provenance or e.reveal_to is not None
                                           for e in current[1])

    def running(self, principal: Principal, sources: list, op_name: str) -> "_Running":
        """Context for executing an op: :meth:`store_output` sees who asked and the op's inputs."""
        return _Running(self._local, (principal, sources, op_name, []))

    def replace(self, principal: Principal, oid: int, obj: Any, purpose: Purpose = Purpose.HAND_OFF) -> None:
        """Replaces a client object's value (remote_get); owner data is never replaced."""
        entry = self.resolve(principal, oid, purpose)
        if entry.protected:
            raise self._refuse(PermissionDeniedError(
                f"object {oid} on worker {self.worker_id!r} belongs to the data owner: it is never replaced"),
                PURPOSES[purpose].action, principal, [oid])
        entry.obj = obj

    def discard(self, principal: Principal, oid: Any, only: Entry | None = None) -> bool:
        """Deletes a client object of the principal; owner data, unknown ids and an entry not ``only`` stay."""
        entry = self._nameable(principal, oid, self._store.spaces(self.__key, principal.namespace)[0])
        if entry is None or entry.protected or (only is not None and entry is not only):
            return False
        removed = self._store.remove(self.__key, principal.namespace, oid)
        if removed is None:
            return False
        if (self.max_session_bytes is not None and principal.isolated and not principal.is_peer
                and isinstance(removed.obj, _TENSOR) and removed.nbytes
                and (removed.obj.requires_grad or removed.meta.get("graph_saved") or getattr(removed.obj, GRADIENT, 0)
                     or self._store.named(self.__key, principal.namespace, removed.obj))):
            # a tensor in an autograd graph may outlive its name: a result computed from it keeps it (tracked,
            # or saved by a tracked op: ``x * w`` keeps ``x`` for ``w``'s gradient, GraphSaves marks it). It
            # stays charged until it is freed (when nothing else holds it, as soon as ``removed`` goes: now).
            # A gradient (a leaf may hold it) or a tensor another id names (charged once, by this one) too.
            # Only then: an exception's traceback cycle holding some other deleted tensor until the next
            # garbage collection would keep it charged meanwhile.
            self._store.linger(self.__key, principal.namespace, removed.nbytes, removed.obj)
        return True

    def owned_entries(self, principal: Principal, after: Any = None, listed: Callable | None = None) -> Iterator:
        """What the principal may list/search and ``listed`` lets a page walk (None: all), past ``after``."""
        ns, isolated = principal.namespace, principal.isolated
        return listing.visible_after(self._store.spaces(self.__key, ns), after, lambda e: (
            e.protected or not isolated or e.created_by == ns) and (listed is None or listed(e)))

    def end_session(self, namespace: str) -> int:
        """Frees everything a session stored (disconnect); returns how many objects."""
        self._taints.pop(namespace, None)
        return self._store.drop_namespace(self.__key, namespace)

    def charge_growth(self, principal: Principal, found: dict, gradient: tuple | None = None) -> None:
        """Charges what a command grew the requester's own tensors among ``found`` (id -> entry) by in place
        (``out=``, a plan's state), or a ``gradient`` ``backward`` made (veil/workers/grad_charges.py)."""
        self._store.charge_growth(self.__key, principal.namespace, found, gradient)

    def session_bytes(self, namespace: str) -> int:
        return self._store.usage.get(namespace, 0)

    def _account_state(self, namespace: str, account: str) -> tuple[bool, int, int]:
        """For the quota (:class:`~veil.workers.quota.QuotaRules`): whether requester ``account`` of peer
        namespace ``namespace`` holds unclaimed hand-offs, their bytes, and how many accounts there do
        (counted only when it holds none: the count matters only for a new account)."""
        store = self._store
        held = store.holds_account(namespace, account)
        return held, store.account_usage.get((namespace, account), 0), 0 if held else store.accounts(namespace)

    # ---------------------------------------------------------- owner API

    def owner_load(self, oid: int, obj: Any, tags: tuple, description: str, allowed_users: tuple | None,
                   owner: str) -> Entry:
        """The data owner's own object: protected, its own provenance. Its tags and description are text and its
        allowed users names (every scientist's search, the owner's console and the release rules read them:
        a tag that was a map failed every search on the worker)."""
        check_owner_meta(tags, description, allowed_users)
        entry = Entry(obj, tags=tags, description=description, allowed_users=allowed_users, protected=True,
                      created_by=owner, kind=Kind.OWNER, provenance=frozenset({oid}), nbytes=_nbytes(obj))
        self._store.put(self.__key, SHARED_NS, oid, entry)
        return entry

    def owner_entries(self) -> Iterator[tuple[int, Entry]]:
        """Every entry (the data owner's view: DP setup, the admin listing)."""
        return self._store.entries(self.__key, None)

    def owner_objects(self) -> dict[int, Any]:
        return {oid: e.obj for oid, e in self._store.entries(self.__key, None)}

    def owner_clear(self) -> None:
        self._store.clear_clients(self.__key)

    def __len__(self) -> int:
        return len(self._store)


def check_owner_meta(tags: Any, description: Any, allowed_users: Any) -> None:
    """Refuses (TypeError, one line) owner data whose tags or description are not text, or whose allowed users
    are not user names (None: anyone who may name it)."""
    if not isinstance(tags, (tuple, list)) or not all(type(t) is str for t in tags):
        raise TypeError("an owner object's tags must be strings")
    if type(description) is not str:
        raise TypeError("an owner object's description must be a string")
    if allowed_users is not None and (not isinstance(allowed_users, (tuple, list))
                                      or not all(type(u) is str for u in allowed_users)):
        raise TypeError("allowed_users must be a list of user names (or None)")


class _RequestLocal(threading.local):
    # per-thread defaults as class attributes: read without a getattr default, which raises and
    # swallows an AttributeError on every thread that never set them
    request: tuple | None = None
    opening_refs: Any = None
    opening_kwrefs: Any = None  # (and its keyword arguments, as received)
    opened_masks: Any = None
    opening_wanted: Any = None  # (OpeningRules.opening_layout)


class _Running:
    __slots__ = ("_local", "_value", "_previous", "outputs")

    def __init__(self, local: threading.local, value: tuple) -> None:
        self._local, self._value = local, value
        self.outputs = value[3]  # what the worker function stored itself (store_output)

    def __enter__(self) -> None:
        self._previous = self._local.request
        self._local.request = self._value

    def __exit__(self, *exc: Any) -> None:
        self._local.request = self._previous
